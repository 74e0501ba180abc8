"""Training objectives: per-sample losses on given draws and the reference-style factories.

Every objective is one function of the model and its random draws (``dsm_loss``, ``ssm_loss``,
``smld_loss``, ``ddpm_loss``) returning per-sample losses (B,); the reference-style factories
(``get_sde_loss_fn``, ``get_smld_loss_fn``, ``get_ddpm_loss_fn``, ``get_ssm_loss_fn``) return
``loss_fn(model, batch, *, generator=None, shard=None, class_labels=None) -> scalar`` that draws
them from an injected ``torch.Generator`` and averages over the batch. ``class_labels`` (B,)
(class-conditional training) reach the network as ``model(x, t_label, class_labels=...)``, and
``cond_image`` / ``cond_level`` (image-conditional training) likewise; they
draw nothing, so the draws are those of unconditional training. Label dropout for
classifier-free guidance is the model's own (its label embedder), never the loss's. Semantics and
draw order are those of the reference implementation (yang-song/score_sde_pytorch ``losses.py``),
including its reduction: ``reduce_mean=True`` averages the squared residual over data dimensions,
``reduce_mean=False`` takes half its sum.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

import sde_lib
from models.utils import ModelFn, get_model_fn, get_score_fn
from score_sde.discrete_diffusion import RespacedProcess, VLBImportanceSampler, hybrid_loss_terms
from score_sde.utils import Registry, ScoreFn, batch_mul

#: ``loss_fn(model, batch, *, generator=None, shard=None, class_labels=None) -> loss`` (a scalar
#: tensor); ``shard`` (a slice of rows) draws the noise for the whole batch and averages over
#: those rows only (rows of ``class_labels`` (B,) too).
LossFn = Callable[..., torch.Tensor]
DISCRETE_LOSSES = Registry("discrete loss")
#: ``training.loss`` of discrete VP training: Ho et al.'s L_simple, or improved DDPM's L_hybrid
OBJECTIVES = ("simple", "hybrid")


def _reduce(sq: torch.Tensor, reduce_mean: bool) -> torch.Tensor:
    """The reference's ``reduce_op`` over data dims: mean, or half the sum. (B, *D) -> (B,)."""
    flat = sq.reshape(sq.shape[0], -1)
    return flat.mean(dim=1) if reduce_mean else 0.5 * flat.sum(dim=1)


def _check_batch(batch: torch.Tensor) -> None:
    """The loss functions' boundary check: a floating-point batch (B, *D) of data."""
    if not isinstance(batch, torch.Tensor) or not batch.is_floating_point() or batch.dim() < 2:
        found = (f"{batch.dtype} of shape {tuple(batch.shape)}" if isinstance(batch, torch.Tensor)
                 else type(batch).__name__)
        raise ValueError(f"batch must be a floating-point tensor (B, *D) of data, got {found}")


def _check_class_labels(class_labels: torch.Tensor | None, batch: torch.Tensor) -> None:
    """The loss functions' boundary check of ``class_labels``: None or integers (B,)."""
    if class_labels is None:
        return
    if (not isinstance(class_labels, torch.Tensor) or class_labels.is_floating_point()
            or class_labels.is_complex() or class_labels.dtype == torch.bool
            or class_labels.shape != batch.shape[:1]):
        found = (f"{class_labels.dtype} of shape {tuple(class_labels.shape)}"
                 if isinstance(class_labels, torch.Tensor) else type(class_labels).__name__)
        raise ValueError(f"class_labels must be an integer tensor ({batch.shape[0]},) matching "
                         f"the batch, got {found}")


def _rows(shard: slice | None, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Rows ``shard`` of each tensor (all of them for ``None``; a ``None`` stays ``None``).

    Data-parallel training: every rank draws the noise of the whole global batch and keeps its
    rows, so sample i sees the same draws (and its own class label) whatever the number of
    ranks.
    """
    if shard is None:
        return tensors
    return tuple(None if x is None else x[shard] for x in tensors)


#: the image conditioning a loss passes on to the network (``models.image_conditioning``)
IMAGE_COND_KEYS = ("cond_image", "cond_level")


def _image_cond_rows(image_cond: dict, batch: torch.Tensor, shard: slice | None
                     ) -> dict[str, torch.Tensor]:
    """The losses' boundary check of the image conditioning ``cond_image`` (B, C_y, h, w) and
    ``cond_level`` (B,) of the whole batch, cut to the rows of ``shard``."""
    unknown = sorted(set(image_cond) - set(IMAGE_COND_KEYS))
    if unknown:
        raise TypeError(f"unexpected loss arguments {unknown}; the image conditioning is "
                        f"{', '.join(IMAGE_COND_KEYS)}")
    image_cond = {k: v for k, v in image_cond.items() if v is not None}
    for key, value in image_cond.items():
        if not isinstance(value, torch.Tensor) or value.shape[:1] != batch.shape[:1]:
            found = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{key} must be a tensor with the batch's {batch.shape[0]} rows, "
                             f"got {found}")
    return dict(zip(image_cond, _rows(shard, *image_cond.values())))


def _check_eps(sde: sde_lib.SDE, eps: float) -> float:
    if not (isinstance(eps, (int, float)) and 0 < eps < sde.T):
        raise ValueError(f"eps must lie in (0, T={sde.T}), got {eps!r}")
    return float(eps)


# -- time sampling -------------------------------------------------------------------------------

def sample_time(batch: torch.Tensor, sde: sde_lib.SDE, eps: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """t ~ U(eps, T) (B,) on the batch's device and dtype (the reference's draw)."""
    u = torch.rand(batch.shape[0], generator=generator, device=batch.device, dtype=batch.dtype)
    return u * (sde.T - eps) + eps


def likelihood_normalizer(sde: sde_lib.SDE, eps: float) -> float:
    """Z = int_eps^T g(t)^2 / s(t)^2 dt = lambda(eps) - lambda(T), with lambda the log-SNR.

    For every linear SDE whose variance obeys the moment ODE d s^2/dt = 2 f s^2 + g^2 (all of
    ``sde_lib``), d lambda/dt = 2 f - (2 f s^2 + g^2) / s^2 = -g^2 / s^2, so the likelihood weight
    divided by the variance is minus the log-SNR's derivative (as in Kingma et al. 2021, VDM).
    """
    lam = sde.log_snr(torch.tensor([eps, sde.T], dtype=torch.float64))
    return float(lam[0] - lam[1])


def sample_importance_time(batch: torch.Tensor, sde: sde_lib.SDE, eps: float,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """t ~ p(t) = g(t)^2 / (s(t)^2 Z) on [eps, T] by the closed-form inverse CDF (B,).

    The importance density of Song, Durkan, Murray & Ermon 2021 for the likelihood
    weighting lambda(t) = g(t)^2: since g^2 / s^2 = -d lambda / dt (see ``likelihood_normalizer``),
    the CDF is (lambda(eps) - lambda(t)) / Z and t = lambda^{-1}(lambda(eps) - u Z), u ~ U(0, 1).
    """
    u = torch.rand(batch.shape[0], generator=generator, device=batch.device, dtype=torch.float64)
    lam = sde.log_snr(torch.tensor([eps, sde.T], dtype=torch.float64, device=batch.device))
    t = sde.log_snr_inverse(lam[0] - u * (lam[0] - lam[1]))
    return t.clamp(eps, sde.T).to(batch.dtype)


# -- objectives on given draws -------------------------------------------------------------------

def dsm_loss(
    score_fn: ScoreFn,
    sde: sde_lib.SDE,
    batch: torch.Tensor,
    t: torch.Tensor,
    z: torch.Tensor,
    reduce_mean: bool = True,
    likelihood_weighting: bool = False,
    importance_weighting: bool = False,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Weighted denoising score matching per sample (Song et al. 2021, eq. 7).

    ``lambda(t) |score(x_t, t) + z / s(t)|^2`` at x_t = m(t) x_0 + s(t) z, reduced over data dims:
    lambda = s^2 gives ``|s score + z|^2``; likelihood weighting lambda = g^2 gives
    ``g^2 |score + z / s|^2`` (Song, Durkan, Murray & Ermon 2021, Thm. 1). With
    ``importance_weighting`` the times are assumed drawn from ``sample_importance_time``; the
    likelihood-weighted term divided by its density (times T - eps, the uniform density's inverse)
    is ``Z / (T - eps) |s score + z|^2``, an unbiased estimate of the same objective.

    Args:
        score_fn: ``score_fn(x, t) -> score``.
        batch: data x_0 (B, *D).
        t: times (B,) in [eps, T].
        z: standard normal draws (B, *D).
        reduce_mean: mean over data dims; else half the sum (the reference's ``reduce_op``).
    Returns:
        losses (B,).
    """
    mean, std = sde.marginal_prob(batch, t)
    x_t = mean + batch_mul(std, z)  # (B, *D)
    score = score_fn(x_t, t)
    if importance_weighting:
        if not likelihood_weighting:
            raise ValueError("importance_weighting samples t for the likelihood weighting; "
                             "set likelihood_weighting=True")
        scale = likelihood_normalizer(sde, eps) / (sde.T - eps)
        return _reduce(torch.square(batch_mul(std, score) + z), reduce_mean) * scale
    if likelihood_weighting:
        g2 = sde.sde(torch.zeros_like(batch), t)[1] ** 2
        return _reduce(torch.square(score + batch_mul(1.0 / std, z)), reduce_mean) * g2
    return _reduce(torch.square(batch_mul(std, score) + z), reduce_mean)


def ssm_loss(
    score_fn: ScoreFn,
    sde: sde_lib.SDE,
    batch: torch.Tensor,
    t: torch.Tensor,
    z: torch.Tensor,
    v: torch.Tensor,
    reduce_mean: bool = True,
    likelihood_weighting: bool = False,
    importance_weighting: bool = False,
    eps: float = 1e-5,
    create_graph: bool = True,
) -> torch.Tensor:
    """Weighted sliced score matching per sample, variance-reduced (SSM-VR, Song et al. 2019).

    ``lambda(t) [v^T grad_x(v^T score) + |score|^2 / 2]`` at x_t = m x_0 + s z, averaged over the
    probes v ~ N(0, I). Its expectation is the DSM objective minus a model-free constant
    (lambda(t) D / (2 s^2) per sample; D / 2 for lambda = s^2), so its weights and reductions
    mirror ``dsm_loss``: lambda = s^2, g^2, or s^2 Z / (T - eps) with importance-sampled t;
    ``reduce_mean`` scales by 2 / D (the DSM mean is 2 / D times its half-sum).

    Args:
        v: probes (num_probes, B, *D).
        create_graph: keep the graph of the Jacobian-vector product (needed to train).
    Returns:
        losses (B,).
    """
    if importance_weighting and not likelihood_weighting:
        raise ValueError("importance_weighting samples t for the likelihood weighting; "
                         "set likelihood_weighting=True")
    mean, std = sde.marginal_prob(batch, t)
    with torch.enable_grad():  # the Jacobian term needs autograd even in evaluation
        x_t = (mean + batch_mul(std, z)).detach().requires_grad_(True)
        score = score_fn(x_t, t)  # (B, *D)
        jvp_terms = []
        for probe in v:
            (grad,) = torch.autograd.grad((score * probe).sum(), x_t, create_graph=create_graph,
                                          retain_graph=True)
            jvp_terms.append((probe * grad).reshape(batch.shape[0], -1).sum(dim=1))
    objective = torch.stack(jvp_terms).mean(dim=0)
    objective = objective + 0.5 * score.reshape(batch.shape[0], -1).square().sum(dim=1)
    if importance_weighting:
        weight = std**2 * (likelihood_normalizer(sde, eps) / (sde.T - eps))
    elif likelihood_weighting:
        weight = sde.sde(torch.zeros_like(batch), t)[1] ** 2
    else:
        weight = std**2
    scale = 2.0 / batch[0].numel() if reduce_mean else 1.0
    return objective * weight * scale


def smld_loss(model_fn: ModelFn, vesde: sde_lib.SDE, batch: torch.Tensor, labels: torch.Tensor,
              z: torch.Tensor, reduce_mean: bool = False) -> torch.Tensor:
    """NCSN/SMLD denoising score matching per sample (Song & Ermon 2019, eqs. 5-6).

    sigma = sigmas[labels] in descending order (label 0 is sigma_max); the network sees
    x_0 + sigma z and its label and is regressed onto -z / sigma with weight sigma^2.

    Args:
        labels: integer noise levels (B,) in [0, N).
        z: standard normal draws (B, *D); the reference's ``noise`` is sigma z.
    Returns:
        losses (B,).
    """
    # Label n is the reference's flip(discrete_sigmas)[n], i.e. discrete_sigmas[N - 1 - n].
    table = vesde.discrete_table("discrete_sigmas", batch.device, batch.dtype)
    sigmas = table[vesde.N - 1 - labels]  # (B,)
    noise = batch_mul(sigmas, z)
    score = model_fn(batch + noise, labels)
    target = -batch_mul(1.0 / sigmas**2, noise)
    return _reduce(torch.square(score - target), reduce_mean) * sigmas**2


def ddpm_loss(model_fn: ModelFn, vpsde: sde_lib.SDE, batch: torch.Tensor, labels: torch.Tensor,
              z: torch.Tensor, reduce_mean: bool = True) -> torch.Tensor:
    """DDPM noise-prediction loss per sample, |eps_theta(x_n, n) - z|^2 (Ho et al. 2020, eq. 14).

    x_n = sqrt(alpha_bar_n) x_0 + sqrt(1 - alpha_bar_n) z with the SDE's DDPM tables.

    Args:
        labels: integer steps n (B,) in [0, N).
        z: standard normal draws (B, *D) (the reference's ``noise``).
    Returns:
        losses (B,).
    """
    mean_coeff = vpsde.discrete_table("sqrt_alphas_cumprod", batch.device, batch.dtype)[labels]
    std = vpsde.discrete_table("sqrt_1m_alphas_cumprod", batch.device, batch.dtype)[labels]
    x_n = batch_mul(mean_coeff, batch) + batch_mul(std, z)
    return _reduce(torch.square(model_fn(x_n, labels) - z), reduce_mean)


# -- reference-style factories -------------------------------------------------------------------

def _time_sampler(sde: sde_lib.SDE, eps: float, likelihood_weighting: bool,
                  importance_weighting: bool) -> tuple[float, Callable[..., torch.Tensor]]:
    """The checked ``eps`` and ``draw(batch, generator)``: t uniform on [eps, T], or with
    ``importance_weighting`` from g^2 / s^2 (which needs ``likelihood_weighting``)."""
    eps = _check_eps(sde, eps)
    if importance_weighting and not likelihood_weighting:
        raise ValueError("importance_weighting=True needs likelihood_weighting=True")
    sample_t = sample_importance_time if importance_weighting else sample_time
    return eps, lambda batch, generator: sample_t(batch, sde, eps, generator)


def _checked_draws(batch: torch.Tensor, class_labels: torch.Tensor | None, image_cond: dict,
                   shard: slice | None, draw: Callable[..., object],
                   generator: torch.Generator | None) -> tuple[dict, object, torch.Tensor]:
    """The prologue of every loss: the batch and labels checked, the image conditioning cut to
    the shard's rows, then ``draw(batch, generator)`` (the times or steps) and z ~ N(0, I)
    (B, *D), both for the whole global batch, in the reference's order."""
    _check_batch(batch)
    _check_class_labels(class_labels, batch)
    image_cond = _image_cond_rows(image_cond, batch, shard)
    t = draw(batch, generator)
    z = torch.randn(batch.shape, generator=generator, device=batch.device, dtype=batch.dtype)
    return image_cond, t, z


def _uniform_steps(N: int) -> Callable[..., torch.Tensor]:
    """``draw(batch, generator)``: discrete steps n ~ U{0..N-1} (B,)."""
    return lambda batch, generator: torch.randint(0, N, (batch.shape[0],), generator=generator,
                                                  device=batch.device)


def get_sde_loss_fn(sde: sde_lib.SDE, train: bool, reduce_mean: bool = True,
                    continuous: bool = True, likelihood_weighting: bool = False,
                    eps: float = 1e-5, importance_weighting: bool = False) -> LossFn:
    """``loss_fn(model, batch, *, generator=None, shard=None, class_labels=None)``: batch mean of
    ``dsm_loss`` (eq. 7).

    Draws t ~ U(eps, T) (or, with ``importance_weighting``, from g^2 / s^2 on [eps, T]), then
    z ~ N(0, I) like the batch, from ``generator``; the model enters through
    ``models.utils.get_score_fn(sde, model, train, continuous, class_labels)``, so a
    class-conditional model learns the score of p_t(x | y) for the given labels (B,).
    """
    eps, draw_t = _time_sampler(sde, eps, likelihood_weighting, importance_weighting)

    def loss_fn(model, batch: torch.Tensor, *, generator: torch.Generator | None = None,
                shard: slice | None = None, class_labels: torch.Tensor | None = None,
                **image_cond: torch.Tensor):
        image_cond, t, z = _checked_draws(batch, class_labels, image_cond, shard, draw_t,
                                          generator)
        batch, t, z, y = _rows(shard, batch, t, z, class_labels)
        score_fn = get_score_fn(sde, model, train=train, continuous=continuous, class_labels=y,
                                **image_cond)
        return dsm_loss(score_fn, sde, batch, t, z, reduce_mean, likelihood_weighting,
                        importance_weighting, eps).mean()

    return loss_fn


def get_ssm_loss_fn(sde: sde_lib.SDE, train: bool, reduce_mean: bool = True,
                    continuous: bool = True, likelihood_weighting: bool = False,
                    eps: float = 1e-5, importance_weighting: bool = False,
                    num_probes: int = 1) -> LossFn:
    """``loss_fn(model, batch, *, generator=None, shard=None, class_labels=None)``: batch mean
    of ``ssm_loss``.

    Draws t (as ``get_sde_loss_fn``), z ~ N(0, I), then ``num_probes`` Gaussian probes v;
    ``class_labels`` (B,) are bound into the score as in ``get_sde_loss_fn``.
    """
    eps, draw_t = _time_sampler(sde, eps, likelihood_weighting, importance_weighting)
    if isinstance(num_probes, bool) or not isinstance(num_probes, int) or num_probes < 1:
        raise ValueError(f"num_probes must be an integer >= 1, got {num_probes!r}")

    def loss_fn(model, batch: torch.Tensor, *, generator: torch.Generator | None = None,
                shard: slice | None = None, class_labels: torch.Tensor | None = None,
                **image_cond: torch.Tensor):
        image_cond, t, z = _checked_draws(batch, class_labels, image_cond, shard, draw_t,
                                          generator)
        v = torch.randn((num_probes, *batch.shape), generator=generator, device=batch.device,
                        dtype=batch.dtype)
        batch, t, z, y = _rows(shard, batch, t, z, class_labels)
        v = v if shard is None else v[:, shard]
        score_fn = get_score_fn(sde, model, train=train, continuous=continuous, class_labels=y,
                                **image_cond)
        return ssm_loss(score_fn, sde, batch, t, z, v, reduce_mean, likelihood_weighting,
                        importance_weighting, eps, create_graph=train).mean()

    return loss_fn


def _check_discrete(sde: sde_lib.SDE, conventions: tuple[str, ...], what: str) -> None:
    if sde.model_conventions.get("discrete") not in conventions:
        raise ValueError(f"{what} training needs an SDE with the {' or '.join(conventions)} "
                         f"convention (got {type(sde).__name__})")


def learns_sigma(model) -> bool:
    """Whether ``model`` (or the module inside its ``DistributedDataParallel`` or
    mixed-precision wrappers) outputs the learned variances of improved DDPM (``learn_sigma``)."""
    while not hasattr(model, "learn_sigma") and isinstance(getattr(model, "module", None),
                                                           nn.Module):
        model = model.module  # DDP, and the mixed-precision wrapper around it
    return bool(getattr(model, "learn_sigma", False))


def _discrete_loss_fn(objective: Callable[..., torch.Tensor], sde: sde_lib.SDE, train: bool,
                      reduce_mean: bool) -> LossFn:
    """Batch mean of a discrete ``objective``; draws labels ~ U{0..N-1} then z ~ N(0, I);
    ``class_labels`` (B,) are bound into the network (``models.utils.get_model_fn``)."""

    def loss_fn(model, batch: torch.Tensor, *, generator: torch.Generator | None = None,
                shard: slice | None = None, class_labels: torch.Tensor | None = None,
                **image_cond: torch.Tensor):
        if learns_sigma(model):
            raise ValueError(
                "training.loss='simple' trains only the eps half of a model with learned "
                "variances (learn_sigma=True): its v would never be trained. Use "
                "training.loss='hybrid' (discrete VP SDEs) or a model without learn_sigma")
        image_cond, labels, z = _checked_draws(batch, class_labels, image_cond, shard,
                                               _uniform_steps(sde.N), generator)
        batch, labels, z, y = _rows(shard, batch, labels, z, class_labels)
        model_fn = get_model_fn(model, train=train, class_labels=y, **image_cond)
        return objective(model_fn, sde, batch, labels, z, reduce_mean).mean()

    return loss_fn


@DISCRETE_LOSSES.register("ve_discrete")
def get_smld_loss_fn(vesde: sde_lib.SDE, train: bool, reduce_mean: bool = False) -> LossFn:
    """``loss_fn(model, batch, *, generator=None, shard=None, class_labels=None)``: batch mean
    of ``smld_loss``; draws labels ~ U{0..N-1} then z ~ N(0, I) (the reference's legacy
    SMLD/NCSN training)."""
    _check_discrete(vesde, ("ve_discrete",), "SMLD")
    return _discrete_loss_fn(smld_loss, vesde, train, reduce_mean)


@DISCRETE_LOSSES.register("vp_discrete", aliases=("vp_index",))
def get_ddpm_loss_fn(vpsde: sde_lib.SDE, train: bool, reduce_mean: bool = True) -> LossFn:
    """``loss_fn(model, batch, *, generator=None, shard=None, class_labels=None)``: batch mean
    of ``ddpm_loss``; draws labels ~ U{0..N-1} then z ~ N(0, I) (the reference's legacy DDPM
    training; for ``DiscreteVPSDE`` label n is the step at time t_n = (n + 1) / N, the
    ``vp_index`` convention)."""
    _check_discrete(vpsde, ("vp_discrete", "vp_index"), "DDPM")
    return _discrete_loss_fn(ddpm_loss, vpsde, train, reduce_mean)


def get_hybrid_loss_fn(sde: sde_lib.SDE, train: bool, *, rescale: bool = False,
                       importance_sampler: VLBImportanceSampler | None = None) -> LossFn:
    """``loss_fn(model, batch, *, generator=None, shard=None, class_labels=None)``: the batch mean
    of L_hybrid = L_simple + L_vlb (Nichol & Dhariwal 2021, eq. 16, as DiT trains it;
    ``discrete_diffusion.hybrid_loss_terms``) for a model with learned variances.

    Draws steps n ~ U{0..N-1} (or from ``importance_sampler``) then z ~ N(0, I), x_n =
    sqrt(alpha_bar_n) x_0 + sqrt(1 - alpha_bar_n) z on the SDE's DDPM table; the network sees
    (x_n, n) and outputs (eps, v). L_vlb's gradient reaches only v (the mean's eps is detached).

    Args:
        sde: ``discrete_vpsde`` or ``vpsde`` (discrete training).
        train: the network in training mode.
        rescale: L_vlb times N / 1000 (the official RESCALED_MSE).
        importance_sampler: draw n ~ p_n proportional to sqrt(E[L_vlb,n^2]) and weight each
            sample's loss by 1 / (N p_n) (Sec. 3.3; unbiased for the uniform-n objective); its
            history records the L_vlb term of every drawn step (of the whole global batch under
            data parallelism, gathered from the ranks' rows ``shard``).
    """
    _check_discrete(sde, ("vp_discrete", "vp_index"), "Hybrid (improved DDPM)")
    process = RespacedProcess.from_sde(sde)
    if importance_sampler is not None and importance_sampler.num_timesteps != sde.N:
        raise ValueError(f"the importance sampler has {importance_sampler.num_timesteps} steps; "
                         f"the SDE has N={sde.N}")

    def draw_steps(batch: torch.Tensor, generator: torch.Generator | None):
        """Steps n (B,) uniform, or from the importance sampler with weights 1 / (N p_n)."""
        if importance_sampler is None:
            return _uniform_steps(sde.N)(batch, generator), None
        n, weights = importance_sampler.sample(batch.shape[0], generator)
        return n.to(batch.device), weights.to(batch.device, batch.dtype)

    def loss_fn(model, batch: torch.Tensor, *, generator: torch.Generator | None = None,
                shard: slice | None = None, class_labels: torch.Tensor | None = None,
                **image_cond: torch.Tensor):
        if not learns_sigma(model):
            raise ValueError("training.loss='hybrid' needs a model with learned variances "
                             "(config.model.learn_sigma=True): L_vlb trains its v")
        image_cond, (n, weights), z = _checked_draws(batch, class_labels, image_cond, shard,
                                                     draw_steps, generator)
        x0, n_rows, z, y, w = _rows(shard, batch, n, z, class_labels, weights)
        x_n = process.q_sample(x0, n_rows, z)
        out = get_model_fn(model, train=train, class_labels=y, **image_cond)(x_n, n_rows)
        if out.shape[1] != 2 * x0.shape[1]:
            raise ValueError(f"a model with learned variances must output 2 x {x0.shape[1]} "
                             f"channels, got {tuple(out.shape)}")
        eps, v = out.chunk(2, dim=1)
        terms = hybrid_loss_terms(process, eps, v, x0, x_n, n_rows, z, rescale=rescale)
        if importance_sampler is None:
            return terms["loss"].mean()
        importance_sampler.update(n, terms["vb"], shard=shard)
        return (terms["loss"] * w).mean()

    return loss_fn


__all__ = [
    "DISCRETE_LOSSES",
    "dsm_loss",
    "ssm_loss",
    "smld_loss",
    "ddpm_loss",
    "sample_time",
    "sample_importance_time",
    "likelihood_normalizer",
    "get_sde_loss_fn",
    "get_ssm_loss_fn",
    "get_smld_loss_fn",
    "get_ddpm_loss_fn",
    "get_hybrid_loss_fn",
    "learns_sigma",
    "OBJECTIVES",
    "LossFn",
]
