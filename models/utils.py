"""Model registry, model builders and the score adapters that turn a network into score_fn(x, t).

Downstream of ``models`` everything sees ``score_fn(x, t) -> score``. The reference
implementation's label and output conventions live here as small adapter classes, one per
convention, chosen by the data an SDE declares in ``SDE.model_conventions``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping

import torch
from torch import nn

import sde_lib
from score_sde.utils import Registry, ScoreFn, as_batch_time, batch_mul

MODELS = Registry("model")
register_model = MODELS.register
SCORE_ADAPTERS = Registry("score adapter")

#: ``model_fn(x, labels) -> output`` with train/eval mode set.
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


#: Modules whose import registers the architectures (imported on first lookup, since they
#: import this module themselves).
ARCHITECTURE_MODULES = ("models.ncsnpp", "models.ddpm", "models.ncsnv2", "models.mlp")


def _register_architectures() -> None:
    for module in ARCHITECTURE_MODULES:
        importlib.import_module(module)


def get_model(name: str) -> type[nn.Module]:
    """The model class registered as ``name`` (the reference's ``config.model.name``)."""
    _register_architectures()
    return MODELS.get(name)


def strip_module_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the ``module.`` prefix that ``torch.nn.DataParallel`` adds to reference state dicts."""
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def create_model(config) -> nn.Module:
    """Build the model named by ``config.model.name`` on ``config.device`` (no DataParallel)."""
    model = get_model(config.model.name)(config)
    device = getattr(config, "device", None)
    return model.to(device) if device is not None else model


def check_image_inputs(model: nn.Module, x: torch.Tensor, labels: torch.Tensor,
                       channels: int) -> None:
    """The boundary check of the image networks: x (B, channels, H, W) and labels (B,).

    Raises:
        ValueError: naming the model and the shapes expected and received.
    """
    name = type(model).__name__
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"{name}: x must be (B, {channels}, H, W), got {tuple(x.shape)}")
    if labels.shape != (x.shape[0],):
        raise ValueError(
            f"{name}: labels must be ({x.shape[0]},) to match x, got {tuple(labels.shape)}"
        )


def get_model_fn(model: nn.Module, train: bool = False,
                 class_labels: torch.Tensor | None = None) -> ModelFn:
    """``model_fn(x, labels)`` that puts ``model`` in train or eval mode before each call.

    ``class_labels`` (B,) integers, when given, are bound: every call is
    ``model(x, labels, class_labels=class_labels)`` (``models.conditioning``); None calls
    ``model(x, labels)`` as for an unconditional model (a class-conditional one then sees its
    null label).
    """
    if class_labels is None:
        def model_fn(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            model.train(train)
            return model(x, labels)
    else:
        def model_fn(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            model.train(train)
            return model(x, labels, class_labels=class_labels)

    return model_fn


class _ScoreAdapter:
    """Base of the adapters: holds the SDE and the model function."""

    def __init__(self, sde: sde_lib.SDE, model_fn: ModelFn) -> None:
        self.sde = sde
        self.model_fn = model_fn

    def labels(self, t: torch.Tensor) -> torch.Tensor:
        """The second argument the network receives at time t (B,)."""
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The score grad_x log p_t(x) (B, *D) at x (B, *D) and times t (B,) or a scalar."""
        raise NotImplementedError


@SCORE_ADAPTERS.register("vp_continuous")
class VPContinuousAdapter(_ScoreAdapter):
    """VP / sub-VP, continuous training: label 999 t, score = -output / s(t) (noise prediction)."""

    def labels(self, t):
        return t * 999

    def __call__(self, x, t):
        t = as_batch_time(t, x)
        std = self.sde.marginal_std(t)
        return batch_mul(-1.0 / std, self.model_fn(x, self.labels(t)))


@SCORE_ADAPTERS.register("vp_discrete")
class VPDiscreteAdapter(_ScoreAdapter):
    """VP (DDPM) discrete training: label (N - 1) t (a float), std from the DDPM table."""

    def labels(self, t):
        return t * (self.sde.N - 1)

    def __call__(self, x, t):
        t = as_batch_time(t, x)
        labels = self.labels(t)
        table = self.sde.discrete_table("sqrt_1m_alphas_cumprod", x.device, x.dtype)
        std = table[labels.long()]
        return batch_mul(-1.0 / std, self.model_fn(x, labels))


@SCORE_ADAPTERS.register("ve_continuous")
class VEContinuousAdapter(_ScoreAdapter):
    """VE continuous training: label sigma(t); the network outputs the score."""

    def labels(self, t):
        return self.sde.marginal_std(t)

    def __call__(self, x, t):
        return self.model_fn(x, self.labels(as_batch_time(t, x)))


@SCORE_ADAPTERS.register("ve_discrete")
class VEDiscreteAdapter(_ScoreAdapter):
    """VE (SMLD/NCSN) discrete training: integer label round((T - t)(N - 1)) into sigmas."""

    def labels(self, t):
        return torch.round((self.sde.T - t) * (self.sde.N - 1)).long()

    def __call__(self, x, t):
        return self.model_fn(x, self.labels(as_batch_time(t, x)))


def get_score_adapter(sde: sde_lib.SDE, model_fn: ModelFn, continuous: bool) -> _ScoreAdapter:
    """The adapter for ``sde`` and the training kind, from ``sde.model_conventions``."""
    kind = "continuous" if continuous else "discrete"
    name = sde.model_conventions.get(kind)
    if name is None:
        valid = ", ".join(sorted(sde.model_conventions)) or "none"
        raise ValueError(
            f"{type(sde).__name__} has no {kind} model convention; supported: {valid}"
        )
    return SCORE_ADAPTERS.get(name)(sde, model_fn)


def get_score_fn(
    sde: sde_lib.SDE, model: nn.Module | ModelFn, train: bool = False, continuous: bool = False,
    class_labels: torch.Tensor | None = None,
) -> ScoreFn:
    """``score_fn(x, t)`` for a network trained with the reference's conventions.

    Args:
        sde: the SDE the model was trained with.
        model: an ``nn.Module`` (train/eval mode is set per call) or a ``model_fn(x, labels)``.
        train: evaluate the module in training mode (dropout on).
        continuous: the model was trained with continuous time (else the discrete DDPM/SMLD
            conventions).
        class_labels: (B,) integer classes bound into every call (the score of p_t(x | y));
            None: no class labels (a class-conditional model sees its null label). With a
            ``model_fn`` they are passed as ``model_fn(x, labels, class_labels=...)``.
    Returns:
        ``score_fn(x (B, *D), t (B,)) -> score (B, *D)``.
    """
    if isinstance(model, nn.Module):
        model_fn = get_model_fn(model, train=train, class_labels=class_labels)
    elif class_labels is None:
        model_fn = model
    else:
        def model_fn(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return model(x, labels, class_labels=class_labels)
    return get_score_adapter(sde, model_fn, continuous)
