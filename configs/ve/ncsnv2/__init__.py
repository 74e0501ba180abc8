"""Configs of the reference's `configs/ve/ncsnv2/` folder."""
