"""Score networks (NCSN++, DDPM++, DDPM, NCSNv2, MLP, DiT), EMA, checkpoints and score adapters."""
