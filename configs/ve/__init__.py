"""Configs of the reference's `configs/ve/` folder."""
