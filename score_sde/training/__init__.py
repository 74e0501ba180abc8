"""Training: one model-agnostic loop (``training.loop.train``), its checkpoints, sampling from a
config and image output."""

from score_sde.training.checkpoints import latest_checkpoint, restore_checkpoint, save_checkpoint
from score_sde.training.loop import build, train, write_config
from score_sde.training.sampling import generate, get_sde, sampling_options

__all__ = [
    "build",
    "generate",
    "get_sde",
    "latest_checkpoint",
    "restore_checkpoint",
    "sampling_options",
    "save_checkpoint",
    "train",
    "write_config",
]
