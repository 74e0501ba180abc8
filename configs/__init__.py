"""Experiment configs: pure data (ml_collections), one base per dataset plus small named variants.

Files keep the reference's paths (``configs/vp/cifar10_ddpmpp_continuous.py`` ...); short names
for the CLI are in :mod:`configs.registry`. Nothing here imports torch or the toolkit.
"""
