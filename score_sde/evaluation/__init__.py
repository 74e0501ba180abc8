"""Evaluation: sample-quality metrics (FID, KID, Inception score) and evaluation records."""
