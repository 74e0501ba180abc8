"""``torch.compile`` of a network, refused up front with a clear message where its backend
cannot run (no C++ compiler for the CPU inductor backend, no Triton for CUDA).

The compiled module shares the network's parameters; checkpoints are written from the bare
network (``state['model']``), so their keys never carry the ``_orig_mod.`` prefix of torch's
``OptimizedModule`` (see ``utils.precision.unwrap_model``).
"""

from __future__ import annotations

import importlib.util
import os
import shutil

import torch
from torch import nn

#: the C++ compilers torch's inductor looks for on a CPU (after ``$CXX``)
CXX_CANDIDATES = ("g++", "c++", "clang++")


def compile_unavailable(device: torch.device | str, backend: str = "inductor") -> str | None:
    """Why ``torch.compile(backend=backend)`` cannot run on ``device``, or None if it can."""
    if not hasattr(torch, "compile"):
        return f"this torch ({torch.__version__}) has no torch.compile"
    if backend != "inductor":
        return None
    if torch.device(device).type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return "the inductor backend needs Triton on CUDA (pip install triton)"
        return None
    candidates = ([os.environ["CXX"]] if os.environ.get("CXX") else []) + list(CXX_CANDIDATES)
    if not any(shutil.which(c) for c in candidates):
        return (f"the inductor backend needs a C++ compiler on {torch.device(device).type} "
                f"(none of {', '.join(candidates)} is on PATH; install g++ or set CXX)")
    return None


def compile_model(model: nn.Module, device: torch.device | str, *,
                  key: str = "config.training.compile", backend: str = "inductor",
                  **options) -> nn.Module:
    """``torch.compile(model, backend=backend, **options)``: the network compiled on its first
    call (its parameters shared with ``model``).

    Raises:
        RuntimeError: the backend is unavailable here, naming why and the config ``key`` that
            turns compilation off.
    """
    reason = compile_unavailable(device, backend)
    if reason is not None:
        raise RuntimeError(f"{key}=True: torch.compile cannot run here: {reason}. "
                           f"Set {key}=False to run the network eagerly")
    return torch.compile(model, backend=backend, **options)


__all__ = ["CXX_CANDIDATES", "compile_unavailable", "compile_model"]
