"""Configs of the reference's `configs/vp/` folder."""
