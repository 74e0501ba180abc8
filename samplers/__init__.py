"""Samplers: predictor-corrector, probability-flow ODE, fast solvers and controllable generation.

Every sampler is reached through :func:`samplers.sample` by its registered name; see
``samplers.base`` for the calling convention.
"""

from samplers.base import SAMPLERS, CountingScore, NoiseSource, Sampler, register_sampler, sample

__all__ = ["SAMPLERS", "CountingScore", "NoiseSource", "Sampler", "register_sampler", "sample"]
