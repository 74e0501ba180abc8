"""Score networks (NCSN++, DDPM++, DDPM, NCSNv2, MLP), EMA, checkpoints and score adapters."""
