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
import weakref

import torch
from torch import nn

from score_sde.utils.precision import network_precision

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


#: the compiled module of each network (compiling once per model, not per snapshot)
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compiled(model: nn.Module, device, key: str) -> nn.Module:
    """``torch.compile(model)``, made once per model (:func:`compile_model`)."""
    if model not in _COMPILED:
        _COMPILED[model] = compile_model(model, device, key=key)
    return _COMPILED[model]


def inference_network(config, model: nn.Module, precision: str) -> nn.Module:
    """The network as sampling or bits/dim call it: compiled when ``config.sampling.compile``,
    under autocast for 'bf16' (``utils.precision.network_precision``)."""
    if config.sampling.get("compile", False):
        model = compiled(model, config.device, "config.sampling.compile")
    return network_precision(model, precision)


__all__ = ["CXX_CANDIDATES", "compile_unavailable", "compile_model", "compiled",
           "inference_network"]
