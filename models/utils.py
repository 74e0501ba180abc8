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
from models.latent_space import model_space_config
from models.memory import apply_channels_last
from score_sde.utils import Registry, ScoreFn, as_batch_time, batch_mul

MODELS = Registry("model")
register_model = MODELS.register
SCORE_ADAPTERS = Registry("score adapter")

#: ``model_fn(x, labels) -> output`` with train/eval mode set.
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


#: Modules whose import registers the architectures (imported on first lookup, since they
#: import this module themselves).
ARCHITECTURE_MODULES = ("models.ncsnpp", "models.ddpm", "models.ncsnv2", "models.mlp", "models.dit")


def _register_architectures() -> None:
    for module in ARCHITECTURE_MODULES:
        importlib.import_module(module)


def get_model(name: str) -> Callable[..., nn.Module]:
    """The model class (or factory, ``model = get_model(name)(config)``) registered as ``name``
    (the reference's ``config.model.name``)."""
    _register_architectures()
    return MODELS.get(name)


def strip_module_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the ``module.`` prefix that ``torch.nn.DataParallel`` adds to reference state dicts."""
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def create_model(config) -> nn.Module:
    """Build the model named by ``config.model.name`` on ``config.device`` (no DataParallel),
    its parameters in channels_last when ``config.model.channels_last`` (``models.memory``); a
    latent config's network is built for the latent shape (``models.latent_space``)."""
    model = apply_channels_last(get_model(config.model.name)(model_space_config(config)))
    device = getattr(config, "device", None)
    return model.to(device) if device is not None else model


def read_learn_sigma(config, model_name: str, supported: bool = True) -> bool:
    """``config.model.learn_sigma`` (False when absent): whether the network also outputs the
    variance interpolation v of improved DDPM (Nichol & Dhariwal 2021, eq. 15).

    A model with ``learn_sigma`` outputs 2 C channels: the first C are its usual output (epsilon),
    the next C are v, with log Sigma = frac log beta_t + (1 - frac) log beta~_t, frac = (v + 1) / 2.

    Raises:
        ValueError: a value that is not a bool, or True for a model that does not support it.
    """
    value = config.model.get("learn_sigma", False)
    value = False if value is None else value
    if not isinstance(value, bool):
        raise ValueError(f"config.model.learn_sigma must be True or False, got {value!r}")
    if value and not supported:
        raise ValueError(
            f"{model_name} does not support config.model.learn_sigma = True (learned variances "
            "are available on ddpm, ncsnpp and dit)"
        )
    return value


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


def _bound_kwargs(class_labels: torch.Tensor | None, cond_image: torch.Tensor | None,
                  cond_level: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The conditioning keyword arguments bound into every network call (only those given)."""
    kwargs = {"class_labels": class_labels, "cond_image": cond_image, "cond_level": cond_level}
    return {k: v for k, v in kwargs.items() if v is not None}


def get_model_fn(model: nn.Module, train: bool = False,
                 class_labels: torch.Tensor | None = None,
                 cond_image: torch.Tensor | None = None,
                 cond_level: torch.Tensor | None = None) -> ModelFn:
    """``model_fn(x, labels)`` that puts ``model`` in train or eval mode before each call.

    ``class_labels`` (B,) integers, when given, are bound: every call is
    ``model(x, labels, class_labels=class_labels)`` (``models.conditioning``); None calls
    ``model(x, labels)`` as for an unconditional model (a class-conditional one then sees its
    null label). ``cond_image`` (B, C_y, h, w) and ``cond_level`` (B,) of an image-conditional
    model (``models.image_conditioning``) are bound the same way.
    """
    kwargs = _bound_kwargs(class_labels, cond_image, cond_level)

    def model_fn(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        model.train(train)
        return model(x, labels, **kwargs)

    return model_fn


class _ScoreAdapter:
    """Base of the adapters: holds the SDE and the model function.

    Attributes:
        learned_variance: the network's output holds, after the C channels of its prediction, C
            more channels of the improved-DDPM variance interpolation v (``model.learn_sigma``;
            Nichol & Dhariwal 2021, eq. 15); only noise-prediction adapters accept it.
    """

    supports_learned_variance = False

    def __init__(self, sde: sde_lib.SDE, model_fn: ModelFn, learned_variance: bool = False
                 ) -> None:
        if learned_variance and not self.supports_learned_variance:
            raise ValueError(
                f"a model with learned variances (learn_sigma=True) needs a discrete VP SDE "
                f"(vpsde or discrete_vpsde, training.continuous=False); {type(self).__name__} "
                f"of {type(sde).__name__} has none")
        self.sde = sde
        self.model_fn = model_fn
        self.learned_variance = bool(learned_variance)

    def labels(self, t: torch.Tensor) -> torch.Tensor:
        """The second argument the network receives at time t (B,)."""
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The score grad_x log p_t(x) (B, *D) at x (B, *D) and times t (B,) or a scalar."""
        raise NotImplementedError


class _NoisePredictionAdapter(_ScoreAdapter):
    """Networks that predict the noise eps of x_t = m(t) x_0 + s(t) eps: score = -eps / std."""

    supports_learned_variance = True

    def std(self, t: torch.Tensor, labels: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The std s(t) (B,) that turns the network's eps into the score."""
        return self.sde.marginal_std(t)

    def eps_and_v(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor
                                                                   | None]:
        """The network's raw output at (x, t), split: eps (B, C, ...) and, for a model with
        learned variances, the interpolation v (B, C, ...) (else None). One network call."""
        t = as_batch_time(t, x)
        out = self.model_fn(x, self.labels(t))
        if not self.learned_variance:
            return out, None
        if out.shape[1] != 2 * x.shape[1]:
            raise ValueError(f"a model with learned variances must output 2 x {x.shape[1]} "
                             f"channels, got {tuple(out.shape)}")
        eps, v = out.chunk(2, dim=1)
        return eps, v

    def __call__(self, x, t):
        t = as_batch_time(t, x)
        eps, _ = self.eps_and_v(x, t)
        return batch_mul(-1.0 / self.std(t, self.labels(t), x), eps)


@SCORE_ADAPTERS.register("vp_continuous")
class VPContinuousAdapter(_NoisePredictionAdapter):
    """VP / sub-VP, continuous training: label 999 t, score = -output / s(t) (noise prediction)."""

    supports_learned_variance = False

    def labels(self, t):
        return t * 999


@SCORE_ADAPTERS.register("vp_discrete")
class VPDiscreteAdapter(_NoisePredictionAdapter):
    """VP (DDPM) discrete training: label (N - 1) t (a float), std from the DDPM table."""

    def labels(self, t):
        return t * (self.sde.N - 1)

    def std(self, t, labels, x):
        table = self.sde.discrete_table("sqrt_1m_alphas_cumprod", x.device, x.dtype)
        return table[labels.long()]


@SCORE_ADAPTERS.register("vp_index")
class VPIndexAdapter(_NoisePredictionAdapter):
    """Discrete-table VP models (``DiscreteVPSDE``: DDPM, DiT, ADM, diffusers): the network sees
    the original, possibly fractional, step index n = t N - 1 and predicts eps; std = s(t) of the
    interpolated schedule, which equals the table's sqrt(1 - alpha_bar_n) at t = t_n."""

    def labels(self, t):
        return self.sde.time_to_index(t)


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


def get_score_adapter(sde: sde_lib.SDE, model_fn: ModelFn, continuous: bool,
                      learned_variance: bool = False) -> _ScoreAdapter:
    """The adapter for ``sde`` and the training kind, from ``sde.model_conventions``."""
    kind = "continuous" if continuous else "discrete"
    name = sde.model_conventions.get(kind)
    if name is None:
        valid = ", ".join(sorted(sde.model_conventions)) or "none"
        raise ValueError(
            f"{type(sde).__name__} has no {kind} model convention; supported: {valid}"
        )
    return SCORE_ADAPTERS.get(name)(sde, model_fn, learned_variance)


def get_score_fn(
    sde: sde_lib.SDE, model: nn.Module | ModelFn, train: bool = False, continuous: bool = False,
    class_labels: torch.Tensor | None = None, learned_variance: bool | None = None,
    cond_image: torch.Tensor | None = None, cond_level: torch.Tensor | None = None,
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
        learned_variance: the output holds C more channels of the variance interpolation v
            (None: ``model.learn_sigma`` of a module, else False). The score uses the eps half;
            ``score_fn.eps_and_v(x, t)`` returns both halves.
        cond_image: (B, C_y, h, w) low-resolution conditioning image in model space, already
            augmented, bound into every call of an image-conditional model (the score of
            p_t(x | y_s)); None: the null conditioning.
        cond_level: (B,) its augmentation level s in [0, 1].
    Returns:
        ``score_fn(x (B, *D), t (B,)) -> score (B, *D)``.
    """
    if learned_variance is None:
        learned_variance = bool(getattr(model, "learn_sigma", False))
    kwargs = _bound_kwargs(class_labels, cond_image, cond_level)
    if isinstance(model, nn.Module):
        model_fn = get_model_fn(model, train=train, **kwargs)
    elif not kwargs:
        model_fn = model
    else:
        def model_fn(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return model(x, labels, **kwargs)
    return get_score_adapter(sde, model_fn, continuous, learned_variance)


#: ``score_factory(y_low_aug (B, C_y, h, w), level (B,) or a number) -> score_fn(x, t)``
ScoreFactory = Callable[[torch.Tensor, "torch.Tensor | float"], ScoreFn]


def get_cond_score_factory(
    sde: sde_lib.SDE, model: nn.Module | ModelFn, continuous: bool = False,
    class_labels: torch.Tensor | None = None,
) -> ScoreFactory:
    """``score_factory(y_low_aug, level) -> score_fn`` of an image-conditional network: the
    score of p_t(x | y_s) (Ho, Saharia et al. 2022, Sec. 4.1) with the augmented low-resolution
    image y_s = m(s) y + sigma(s) eps (B, C_y, h, w) and its level s bound (a number or (B,)).

    This is what a super-resolution stage of ``samplers.cascade`` calls; eval mode.

    Raises:
        ValueError: a module without image conditioning (``cond_channels = 0``).
    """
    if isinstance(model, nn.Module) and not getattr(model, "cond_channels", 0):
        raise ValueError(f"{type(model).__name__} has no image conditioning "
                         "(config.model.cond_channels = 0): it cannot be a super-resolution stage")

    def score_factory(y_low_aug: torch.Tensor, level) -> ScoreFn:
        if not isinstance(y_low_aug, torch.Tensor) or y_low_aug.dim() != 4:
            raise ValueError("y_low_aug must be a (B, C_y, h, w) tensor")
        level = torch.as_tensor(level, device=y_low_aug.device, dtype=y_low_aug.dtype)
        level = level.expand(y_low_aug.shape[0]) if level.dim() == 0 else level
        return get_score_fn(sde, model, train=False, continuous=continuous,
                            class_labels=class_labels, cond_image=y_low_aug, cond_level=level)

    return score_factory
