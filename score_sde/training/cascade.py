"""Cascade configs on the training side: their stages, training every stage, and sampling the
cascade or super-resolving given low-resolution images (Ho, Saharia et al. 2022).

A cascade config holds the shared settings plus ``config.cascade``: ``stages`` names the stages in
sampling order and ``cascade.<name>`` each stage's overrides (``configs/digits_cascade.py``).
:func:`stage_config` resolves one stage to an ordinary config; stage ``name`` lives in
``<workdir>/<name>/``, an ordinary training workdir. The first stage is the base (no
low-resolution conditioning); each later one is a super-resolution stage
(:mod:`training.super_resolution`) whose ``data.low_res_size`` is the previous stage's
``data.image_size``.

Sampling goes through ``samplers.cascade``: each stage becomes a ``Stage`` with the score factory
of its network (``models.utils.get_cond_score_factory``), its config's sampler, the augmentation
SDE and level ``sampling.cond_level`` and ``sampling.cond_truncate``.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.utils import get_score_fn
from samplers.cascade import Cascade, Stage, super_resolve
from score_sde import datasets
from score_sde.training import super_resolution
from score_sde.training.inference import find_checkpoint, load_ema_model, run_facts
from score_sde.training.loop import write_samples
from score_sde.training.sampling import get_sde, sampling_options, sampling_record
from score_sde.utils import atomic_write_bytes
from score_sde.utils.resize import downsample

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def is_cascade(config) -> bool:
    """Whether ``config`` is a cascade config (it has a ``cascade`` section)."""
    return "cascade" in config


def _merge(base, overrides, where: str) -> None:
    for key, value in overrides.items():
        if key not in base:
            raise ValueError(f"config.{where}{key} overrides a key the shared settings do not "
                             f"have; valid keys of config.{where[:-1] or '(top)'}: "
                             f"{', '.join(sorted(base.keys()))}")
        if hasattr(value, "items") and hasattr(base[key], "items"):
            _merge(base[key], value, f"{where}{key}.")
        else:
            base[key] = value


def stage_names(config) -> tuple[str, ...]:
    """``config.cascade.stages``, checked: names with an override section each.

    Raises:
        ValueError: no stages, a name that is not an identifier, a duplicate, or a stage without
            its ``config.cascade.<name>`` section.
    """
    names = config.cascade.get("stages", ())
    names = (names,) if isinstance(names, str) else tuple(names)
    if not names:
        raise ValueError("config.cascade.stages must name at least one stage, got none")
    for name in names:
        if not isinstance(name, str) or not _NAME.match(name) or name == "stages":
            raise ValueError(f"config.cascade.stages: {name!r} is not a stage name (an "
                             "identifier other than 'stages')")
        if name not in config.cascade:
            raise ValueError(f"config.cascade.stages names {name!r} but config.cascade.{name} "
                             "(its overrides) is missing")
    if len(set(names)) != len(names):
        raise ValueError(f"config.cascade.stages has a duplicate name: {names}")
    return names


def stage_config(config, name: str):
    """The ordinary config of stage ``name``: the shared settings with ``cascade.<name>`` merged
    in (and no ``cascade`` section)."""
    names = stage_names(config)
    if name not in names:
        raise ValueError(f"Unknown cascade stage {name!r}; valid: {', '.join(names)}")
    resolved = copy.deepcopy(config)
    with resolved.unlocked():
        del resolved["cascade"]
    _merge(resolved, config.cascade[name], f"cascade.{name}.")
    return resolved


def stage_configs(config) -> list[tuple[str, object]]:
    """[(name, stage config)] in sampling order, with the chain checked: the first stage has no
    low-resolution conditioning, each later stage's ``data.low_res_size`` is the previous
    stage's ``data.image_size``, and every stage has the same channels and ``data.centered``.

    Raises:
        ValueError: naming the stage and the values that do not chain.
    """
    stages = [(name, stage_config(config, name)) for name in stage_names(config)]
    for i, (name, cfg) in enumerate(stages):
        low = super_resolution.read_low_res_size(cfg)
        if i == 0:
            if low:
                raise ValueError(f"the base stage {name!r} must be unconditional, got "
                                 f"data.low_res_size = {low} (set it to 0)")
            continue
        prev_name, prev = stages[i - 1]
        if low != prev.data.image_size:
            raise ValueError(f"stage {name!r} has data.low_res_size = {low}, but the previous "
                             f"stage {prev_name!r} makes {prev.data.image_size}x"
                             f"{prev.data.image_size} images (set low_res_size to that)")
        for key in ("num_channels", "centered"):
            if cfg.data[key] != prev.data[key]:
                raise ValueError(f"stage {name!r} has data.{key} = {cfg.data[key]!r}, stage "
                                 f"{prev_name!r} {prev.data[key]!r}: a cascade passes model-"
                                 "space images between stages, so they must agree")
    return stages


def stage_workdir(workdir: str | Path, name: str) -> Path:
    """The training workdir of stage ``name``: ``<workdir>/<name>``."""
    return Path(workdir) / name


def train_cascade(config, workdir: str | Path, *, progress: bool = True) -> None:
    """Train every stage of a cascade config in turn, each in its own workdir (resuming as a
    single run does; a finished stage returns at once)."""
    from score_sde.training.loop import train  # the loop imports this package's modules

    for name, cfg in stage_configs(config):
        log.info("cascade: training stage %r in %s", name, stage_workdir(workdir, name))
        train(cfg, stage_workdir(workdir, name), progress=progress)


def build_stage(cfg, model, base: bool) -> Stage:
    """A ``samplers.cascade.Stage`` of stage config ``cfg`` and its network (EMA weights, eval
    mode): the base stage's plain score, or a super-resolution stage's score factory with the
    augmentation SDE and ``sampling.cond_level`` / ``sampling.cond_truncate``
    (:func:`training.super_resolution.sampling_stage`)."""
    sde = get_sde(cfg)
    if not base:
        return super_resolution.sampling_stage(cfg, sde, model)
    method, options = sampling_options(cfg)
    return Stage(sde=sde, shape=datasets.data_shape(cfg), method=method, options=options,
                 score_fn=get_score_fn(sde, model, train=False,
                                       continuous=cfg.training.continuous))


def load_stages(config, workdir: str | Path, checkpoint: str = "") -> list[tuple]:
    """[(name, cfg, Stage, checkpoint path, step)] of every stage, each from the checkpoint
    ``checkpoint`` ('' = the latest) of its workdir."""
    out = []
    for i, (name, cfg) in enumerate(stage_configs(config)):
        path = find_checkpoint(stage_workdir(workdir, name), checkpoint)
        model, step = load_ema_model(cfg, path)
        out.append((name, cfg, build_stage(cfg, model, base=i == 0), path, step))
    return out


def read_low_res(path: str | Path, cfg, device) -> torch.Tensor:
    """Low-resolution images from ``path`` (a folder of image files, or an ``.npz`` whose
    ``samples`` (or only) array is uint8 (N, h, w, C) / (N, h, w) as ``sample.npz`` writes), in
    the model space of stage config ``cfg`` at its ``data.low_res_size`` (downsampled by
    ``data.downsample`` when larger), (N, C, h, h).

    Raises:
        FileNotFoundError: no such path, or a folder without images.
        ValueError: images that are not square, the wrong channel count, or too small.
    """
    path = Path(path)
    if path.suffix == ".npz" and path.is_file():
        with np.load(path) as data:
            key = "samples" if "samples" in data.files else data.files[0]
            array = data[key]
    elif path.is_dir():
        files = sorted(p for p in path.iterdir()
                       if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))
        if not files:
            raise FileNotFoundError(f"--low_res {path}: no .png/.jpg/.jpeg/.bmp images in it")
        mode = "L" if cfg.data.num_channels == 1 else "RGB"
        array = np.stack([np.asarray(Image.open(f).convert(mode)) for f in files])
    else:
        raise FileNotFoundError(f"--low_res {path}: not a folder of images nor an .npz file")
    if array.ndim == 3:
        array = array[..., None]
    x = torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2)  # (N, C, h, w)
    x = x.to(torch.float32) / 255.0 if x.dtype == torch.uint8 else x.to(torch.float32)
    size, channels = cfg.data.low_res_size, cfg.data.num_channels
    if x.shape[1] != channels or x.shape[2] != x.shape[3] or x.shape[2] < size:
        raise ValueError(f"--low_res {path}: images of shape {tuple(x.shape[1:])} (C, h, w); "
                         f"stage needs {channels} channels, square, at least {size}x{size}")
    if x.shape[2] != size:
        x = downsample(x, size, cfg.data.get("downsample", "area"))
    return datasets.get_data_scaler(cfg)(x.to(device))


def _write_stage(x: torch.Tensor, cfg, folder: Path) -> None:
    write_samples(datasets.get_data_inverse_scaler(cfg)(x), folder)


def _sampling_record(cfg, info: dict) -> dict:
    """``sampling_record`` of a stage; a super-resolution stage reads its ``cond_*`` keys."""
    record = sampling_record(cfg, {k: v for k, v in info.items() if k != "options"})
    if super_resolution.read_low_res_size(cfg):
        for key in ("cond_level", "cond_truncate", "cond_cfg_scale"):
            record["not_applied"].pop(key, None)
    return record


def _record(config, stages, infos, num_samples: int, low_res: str | None) -> dict:
    record = {"num_samples": num_samples, "low_res": low_res, "stages": []}
    for (name, cfg, _, path, step), info in zip(stages, infos):
        record["stages"].append({"name": name, **run_facts(cfg, path, step),
                                 "sampling": _sampling_record(cfg, info),
                                 "aug_level": info.get("aug_level"),
                                 "conditioning": info.get("conditioning"),
                                 "nfe": info.get("nfe")})
    record["nfe"] = sum(s["nfe"] or 0 for s in record["stages"])
    return json.loads(json.dumps(record, default=str))


@torch.no_grad()
def run_sample_cascade(config, workdir: str | Path, eval_folder: str = "eval", *,
                       checkpoint: str = "", num_samples: int = 64, low_res: str | None = None,
                       progress: bool = True) -> Path:
    """``--mode sample`` of a cascade config: ``num_samples`` from the base stage, then every
    super-resolution stage from the previous stage's output (``samplers.Cascade``); with
    ``low_res`` (a folder or ``.npz``) the images there replace the base stage's output (at its
    size). Writes ``<workdir>/<eval_folder>/cascade/<stage>/sample.png`` and ``sample.npz`` for
    every stage and ``cascade/info.json`` (per stage: checkpoint, step, sampler, NFE, level).
    """
    stages = load_stages(config, workdir, checkpoint)
    device = torch.device(config.device)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    given = None
    if low_res is not None:
        given = read_low_res(low_res, stages[1][1] if len(stages) > 1 else stages[0][1],
                             device) if len(stages) > 1 else None
        if given is None:
            raise ValueError("--low_res needs a cascade with a super-resolution stage")
        num_samples = given.shape[0]
    cascade = Cascade([s for _, _, s, _, _ in stages])
    outputs, infos = cascade.sample(num_samples, generator=generator, low_res=given,
                                    progress=progress, device=device)
    folder = Path(workdir) / eval_folder / "cascade"
    for (name, cfg, *_), x in zip(stages, outputs):
        _write_stage(x, cfg, folder / name)
    record = _record(config, stages, infos, num_samples, low_res)
    atomic_write_bytes(folder / "info.json", (json.dumps(record, indent=2) + "\n").encode(),
                       what="the sampling record")
    log.info("cascade: %d samples through %s (%d NFE) in %s", num_samples,
             " -> ".join(name for name, *_ in stages), record["nfe"], folder)
    return folder


@torch.no_grad()
def run_super_resolution(config, workdir: str | Path, low_res: str, eval_folder: str = "eval",
                         *, checkpoint: str = "", progress: bool = True) -> Path:
    """``--mode sample --low_res=PATH`` of a single super-resolution config: super-resolve the
    images at ``PATH`` with ``samplers.cascade.super_resolve`` into
    ``<workdir>/<eval_folder>/super_resolution_step_<step>/`` (``sample.png``, ``sample.npz``,
    ``low_res.png`` and ``info.json``)."""
    if not super_resolution.read_low_res_size(config):
        raise ValueError("--low_res needs a super-resolution config (data.low_res_size > 0) or "
                         "a cascade config")
    path = find_checkpoint(workdir, checkpoint)
    model, step = load_ema_model(config, path)
    stage = build_stage(config, model, base=False)
    device = torch.device(config.device)
    y = read_low_res(low_res, config, device)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    x, info = super_resolve(stage, y, generator=generator, progress=progress)
    folder = Path(workdir) / eval_folder / f"super_resolution_step_{step}"
    _write_stage(x, config, folder)
    _write_stage(y, config, folder / "low_res")
    record = {**run_facts(config, path, step), "low_res": str(low_res), "num_samples": y.shape[0],
              "aug_level": info["aug_level"], "conditioning": info["conditioning"],
              "sampling": _sampling_record(config, info)}
    atomic_write_bytes(folder / "info.json",
                       (json.dumps(record, indent=2, default=str) + "\n").encode(),
                       what="the sampling record")
    log.info("%d images super-resolved from %s (%d NFE) in %s", y.shape[0], low_res,
             info["nfe"], folder)
    return folder


__all__ = ["build_stage", "is_cascade", "load_stages", "read_low_res", "run_sample_cascade",
           "run_super_resolution", "stage_config", "stage_configs", "stage_names",
           "stage_workdir", "train_cascade"]
