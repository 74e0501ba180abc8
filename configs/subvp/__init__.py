"""Configs of the reference's `configs/subvp/` folder."""
