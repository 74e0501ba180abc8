"""Pixel-space diffusers models (``UNet2DModel`` + its DDPM/DDIM scheduler config) as score
models on the :class:`sde_lib.DiscreteVPSDE` their scheduler describes (e.g. the layout of
``google/ddpm-cifar10-32``; Ho et al. 2020), read from local files only.

Layout: the UNet's ``config.json`` + ``diffusion_pytorch_model.safetensors`` (or ``.bin``, read
weights-only) in the folder or its ``unet/``; the scheduler's ``scheduler_config.json`` in
``scheduler/`` or the folder itself.

The network sees the original, possibly fractional, step index n = t N - 1 (the ``vp_index``
convention of :class:`models.utils.VPIndexAdapter`) and :class:`DiffusersUNet` returns the noise
prediction eps^: for ``prediction_type = 'v_prediction'`` (Salimans & Ho 2022, Sec. 4) it turns
v = m eps - s x_0 into eps^ = m v + s x_t, with m, s the SDE's marginal coefficients at t, so
``models.utils.get_score_fn(sde, model)`` gives score = -eps^ / s(t) for every sampler.

:func:`ddim_time_grid` maps a diffusers ``DDIMScheduler`` run (its ``timestep_spacing``,
``steps_offset`` and ``set_alpha_to_one``) to explicit times for ``samplers.ddim``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

import sde_lib
from models.diffusers_io import (
    build_from_config,
    find_model_folder,
    find_weights,
    import_diffusers,
    load_weights_into,
    missing,
    read_config,
    read_weights,
)

#: what the missing-file errors tell the user to download
DOWNLOAD = "google/ddpm-cifar10-32 (or another UNet2DModel pipeline)"
SCHEDULER_NAME = "scheduler_config.json"
PREDICTION_TYPES = ("epsilon", "v_prediction")
SCHEDULER_BETAS = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


class DiffusersUNet(nn.Module):
    """A ``UNet2DModel`` as a ``vp_index`` noise-prediction network on ``sde``.

    Args:
        unet: the loaded UNet2DModel.
        sde: the DiscreteVPSDE of its scheduler.
        prediction_type: ``'epsilon'`` or ``'v_prediction'``.
    """

    learn_sigma = False

    def __init__(self, unet: nn.Module, sde: sde_lib.DiscreteVPSDE,
                 prediction_type: str = "epsilon") -> None:
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"Unknown prediction_type {prediction_type!r}; valid: "
                             f"{', '.join(PREDICTION_TYPES)}")
        self.unet = unet
        self.sde = sde
        self.prediction_type = prediction_type
        self.source = ""

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """eps^ (B, C, H, W) at x (B, C, H, W) and step indices ``labels`` = n (B,)."""
        out = self.unet(x, labels).sample
        if self.prediction_type == "epsilon":
            return out
        t = self.sde.index_to_time(labels.to(torch.float64)).to(x.device)
        m, s = self.sde.marginal_coeffs(t)  # (B,) each, float64
        m, s = m.to(x.dtype)[:, None, None, None], s.to(x.dtype)[:, None, None, None]
        return m * out + s * x  # eps = m v + s x_t


def _get(config: dict, key: str, default: Any) -> Any:
    value = config.get(key, default)
    return default if value is None else value


def sde_from_scheduler(config: dict) -> sde_lib.DiscreteVPSDE:
    """The DiscreteVPSDE of a diffusers DDPM/DDIM scheduler config: ``trained_betas``, or
    ``beta_schedule`` (linear | scaled_linear | squaredcos_cap_v2, :func:`sde_lib.beta_table`)
    with ``beta_start``, ``beta_end`` and ``num_train_timesteps`` (diffusers' defaults where
    absent), the table in diffusers' float32 values.

    Raises:
        ValueError: an unknown schedule, or ``rescale_betas_zero_snr`` (alpha_bar_N = 0 is not a
            VP SDE with a Gaussian prior).
    """
    if config.get("rescale_betas_zero_snr"):
        raise ValueError("rescale_betas_zero_snr=True ends at alpha_bar = 0 (zero terminal SNR), "
                         "which a DiscreteVPSDE cannot represent")
    if config.get("trained_betas") is not None:
        return sde_lib.DiscreteVPSDE(torch.as_tensor(config["trained_betas"], dtype=torch.float64))
    schedule = _get(config, "beta_schedule", "linear")
    if schedule not in SCHEDULER_BETAS:
        raise ValueError(f"Unknown beta_schedule {schedule!r}; valid: {', '.join(SCHEDULER_BETAS)}")
    start, end = float(_get(config, "beta_start", 1e-4)), float(_get(config, "beta_end", 0.02))
    N = int(_get(config, "num_train_timesteps", 1000))
    sde_lib.beta_table(schedule, N, start, end)  # validates the values, naming them
    # The table as diffusers builds it, in float32 (its linspace differs from a float64 one
    # rounded to float32 by an ulp in a third of the entries: ~1e-7 of the samples)
    if schedule == "linear":
        betas = torch.linspace(start, end, N, dtype=torch.float32)
    elif schedule == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, N, dtype=torch.float32) ** 2
    else:
        betas = sde_lib.beta_table(schedule, N).to(torch.float32)
    return sde_lib.DiscreteVPSDE(betas.to(torch.float64))


def scheduler_timesteps(config: dict, num_inference_steps: int) -> list[int]:
    """The timesteps (decreasing) of a diffusers DDIM run of ``num_inference_steps``, by its
    ``timestep_spacing`` ('leading' + ``steps_offset``, 'trailing', 'linspace')."""
    N = int(_get(config, "num_train_timesteps", 1000))
    n = int(num_inference_steps)
    if not 1 <= n <= N:
        raise ValueError(f"num_inference_steps must be in [1, {N}], got {num_inference_steps!r}")
    spacing = _get(config, "timestep_spacing", "leading")
    if spacing == "leading":
        offset = int(_get(config, "steps_offset", 0))
        return [i * (N // n) + offset for i in range(n - 1, -1, -1)]
    if spacing == "trailing":
        ratio = N / n
        return [round(N - i * ratio) - 1 for i in range(n)]
    if spacing == "linspace":
        return [round(i * (N - 1) / (n - 1)) if n > 1 else 0 for i in range(n - 1, -1, -1)]
    raise ValueError(f"Unknown timestep_spacing {spacing!r}; valid: {', '.join(TIMESTEP_SPACINGS)}")


def ddim_time_grid(config: dict, num_inference_steps: int, sde: sde_lib.DiscreteVPSDE
                   ) -> tuple[sde_lib.DiscreteVPSDE, dict[str, Any]]:
    """The SDE and ``samplers.ddim`` options (eta = 0) that take the steps of diffusers'
    ``DDIMScheduler`` with this config (Song, Meng & Ermon 2021, eq. 12).

    DDIMScheduler starts from x_T ~ N(0, I) at its first timestep k_0 (980 of 1000 with
    'leading' spacing, not the table's end) and steps from k to k - N // n (n =
    ``num_inference_steps``), below 0 to the final alpha_bar: 1 with ``set_alpha_to_one``
    (time 0: the last step returns x0^, ``final_time_zero``), else alpha_bar_0 (time 1 / N; a
    last step from timestep 0 to it is the identity and is left out, so the grid may have n - 1
    steps). The returned SDE is the table's first k_0 + 1 steps, so that its end time T is
    k_0 (the same index map t = (k + 1) / N', :meth:`sde_lib.DiscreteVPSDE.index_to_time`, and
    the same alpha_bar_k at every kept step): sample with
    ``samplers.sample(sde_k, get_score_fn(sde_k, model), x_T, 'ddim', **options)``.

    Returns:
        (sde_k, {'grid': times (n + 1,) float64, 'nfe', 'eta': 0.0, 'final_time_zero'}).
    Raises:
        ValueError: a spacing whose steps do not chain (k - N // n is not the next timestep, as
            'linspace' when N / n is not an integer): no time grid reproduces it.
    """
    ks = scheduler_timesteps(config, num_inference_steps)
    N, stride = sde.N, sde.N // int(num_inference_steps)
    for k, k_next in zip(ks[:-1], ks[1:]):
        if k - stride != k_next:
            raise ValueError(
                f"DDIMScheduler steps from timestep {k} to {k - stride}, but its next timestep is "
                f"{k_next} (timestep_spacing={_get(config, 'timestep_spacing', 'leading')!r}, "
                f"{num_inference_steps} steps of {N}): not a chain of times; use 'leading' or "
                f"'trailing' with a step count that divides {N}")
    if not 0 <= ks[0] < N:
        raise ValueError(f"the first timestep {ks[0]} lies outside the table of {N} steps")
    sde_k = sde if ks[0] == N - 1 else sde_lib.DiscreteVPSDE(sde.discrete_betas[:ks[0] + 1])
    last = ks[-1] - stride
    steps = list(ks)
    if last >= 0:
        steps.append(last)
    times = [(k + 1) / sde_k.N for k in steps]
    to_one = bool(_get(config, "set_alpha_to_one", True))
    if last < 0 and to_one:
        times.append(0.0)
    elif last < 0 and ks[-1] != 0:
        times.append(1 / sde_k.N)
    grid = torch.tensor(times, dtype=torch.float64)
    return sde_k, {"grid": grid, "nfe": len(times) - 1, "eta": 0.0,
                   "final_time_zero": last < 0 and to_one}


def _scheduler_config(root: Path) -> Path:
    for path in (root / "scheduler" / SCHEDULER_NAME, root / SCHEDULER_NAME):
        if path.is_file():
            return path
    raise missing(f"the scheduler config (scheduler/{SCHEDULER_NAME} or {SCHEDULER_NAME})",
                  root / "scheduler" / SCHEDULER_NAME, DOWNLOAD)


def load_diffusers_unet(path: str | os.PathLike) -> tuple[DiffusersUNet, dict]:
    """A local diffusers UNet2DModel folder as a score network on its scheduler's SDE.

    Args:
        path: the pipeline folder (see the module docstring for the layout).
    Returns:
        (the :class:`DiffusersUNet` in eval mode, whose ``sde`` is the scheduler's
        DiscreteVPSDE; the scheduler config dict). Use ``models.utils.get_score_fn(model.sde,
        model)`` for score_fn(x, t) = -eps^ / s(t).
    Raises:
        ImportError: diffusers is not installed (naming the extra).
        FileNotFoundError: naming the missing file and what to download.
        ValueError: a config that is not a UNet2DModel's or an unsupported scheduler.
        CheckpointError: unsafe, damaged, non-finite or non-float weights, or keys that do not
            fit the config.
    """
    diffusers = import_diffusers()
    root = Path(path)
    folder = find_model_folder(root, "unet", DOWNLOAD)
    unet_config = read_config(folder / "config.json")
    name = unet_config.get("_class_name", "UNet2DModel")
    if name != "UNet2DModel":
        raise ValueError(f"{folder / 'config.json'}: a pixel model must be a UNet2DModel, "
                         f"got {name!r}")
    scheduler_path = _scheduler_config(root)
    scheduler = read_config(scheduler_path)
    sde = sde_from_scheduler(scheduler)
    if unet_config.get("num_train_timesteps") not in (None, sde.N):
        raise ValueError(f"the UNet was made for {unet_config['num_train_timesteps']} steps, the "
                         f"scheduler at {scheduler_path} has {sde.N}")
    unet = build_from_config(diffusers.UNet2DModel, unet_config, folder / "config.json")
    weights = find_weights(folder, DOWNLOAD)
    load_weights_into(unet, read_weights(weights), weights)
    model = DiffusersUNet(unet.float(), sde, _get(scheduler, "prediction_type", "epsilon"))
    model.source = str(root)
    return model.eval(), scheduler


def is_diffusers_pixel_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder of :func:`load_diffusers_unet`'s layout (checked by file
    names only)."""
    root = Path(path)
    if not root.is_dir():
        return False
    has_unet = any((f / "config.json").is_file() for f in (root, root / "unet"))
    has_scheduler = any(p.is_file() for p in (root / "scheduler" / SCHEDULER_NAME,
                                               root / SCHEDULER_NAME))
    return has_unet and has_scheduler


__all__ = [
    "DOWNLOAD",
    "DiffusersUNet",
    "PREDICTION_TYPES",
    "ddim_time_grid",
    "is_diffusers_pixel_folder",
    "load_diffusers_unet",
    "scheduler_timesteps",
    "sde_from_scheduler",
]
