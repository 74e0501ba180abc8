"""Configs of the reference's `configs/vp/ddpm/` folder."""
