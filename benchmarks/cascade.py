"""Cascaded generation on the digits: an 8x8 base-only model against the 4x4 -> 8x8
``digits_cascade`` at equal total NFE, and the effect of the augmentation level.

(a) ``--num_samples`` samples of (i) the 8x8 ``digits`` model with DPM-Solver++(2M) at ``--nfe``
    NFE and (ii) the cascade with ``--nfe`` / 2 NFE per stage (the same total), their digits
    metric (Fréchet Digits Distance and classifier score, ``evaluation.digits_metric``) and wall
    time on the runs' ``config.num_threads`` (one thread); (iii) the SR stage alone on the true
    4x4 test digits (area-downsampled, cycled to ``--num_samples``), the quality of the SR stage
    given perfect low-resolution images, beside (iv) the true 8x8 test digits cycled the same
    way (the FDD of repeated test images is not 0: 297 digits, and the reference is the train
    split).
(b) The cascade at the same budget for sampling augmentation levels s in ``LEVELS`` (a time of
    the VP augmentation SDE; the SR stage was trained with s ~ U[0, 0.25]), and truncated
    conditioning augmentation (the base stage stopped at the time matching s) at s = 0.1; one
    grid per level, ``benchmarks/out/cascade_s<level>.png``.

Writes ``benchmarks/out/cascade.md`` (pasted into docs/cascade.md by update_docs.py) and the PNGs.
Usage, after training both runs (about 15 min on 2 cores):

    python main.py --config digits_cascade --mode train --workdir runs/digits_cascade
    python main.py --config digits --mode train --workdir runs/digits
    python benchmarks/cascade.py --cascade runs/digits_cascade --base runs/digits
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import ml_collections
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from update_docs import markdown_table, write_table  # noqa: E402

from samplers.cascade import Cascade, super_resolve  # noqa: E402
from score_sde import datasets  # noqa: E402
from score_sde.evaluation import digits_metric  # noqa: E402
from score_sde.training import checkpoints  # noqa: E402
from score_sde.training.cascade import build_stage  # noqa: E402
from score_sde.training.images import save_image_grid  # noqa: E402
from score_sde.training.inference import load_ema_model  # noqa: E402
from score_sde.training.sampling import generate, get_sde  # noqa: E402
from score_sde.utils.resize import downsample  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
LEVELS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)
TRUNCATED_LEVEL = 0.1


def load_run(workdir: Path) -> tuple[ml_collections.ConfigDict, torch.nn.Module, int]:
    """A run's saved config (on the CPU) and the EMA model of its latest checkpoint."""
    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    config.device = "cpu"
    model, step = load_ema_model(config, checkpoints.latest_checkpoint(workdir))
    return config, model, step


def to_images(config, x: torch.Tensor) -> torch.Tensor:
    """Model space -> [0, 1] images."""
    return datasets.get_data_inverse_scaler(config)(x).clamp(0, 1)


def scores(images: torch.Tensor) -> dict:
    return digits_metric.evaluate_digits(images)


def row(name: str, nfe: str, seconds: float, result: dict) -> list[str]:
    return [name, nfe, f"{seconds:.1f}", f"{result['fdd']:.2f}",
            f"{result['classifier_score']:.2f}"]


def base_only(workdir: Path, nfe: int, n: int, seed: int) -> tuple[list[str], int]:
    """(i): the 8x8 model alone at ``nfe``."""
    config, model, step = load_run(workdir)
    config.sampling.method, config.sampling.nfe = "dpm_solver++_2m", nfe
    start = time.perf_counter()
    x, info = generate(config, get_sde(config), model, (n, 1, 8, 8),
                       inverse_scaler=lambda z: z, generator=torch.Generator().manual_seed(seed))
    seconds = time.perf_counter() - start
    images = to_images(config, x)
    save_image_grid(images[:100], OUT / "cascade_base_only.png")
    return row(f"8x8 base only (`digits`, step {step})", str(info["nfe"]), seconds,
               scores(images)), step


def cascade_stages(workdir: Path, nfe: int) -> tuple[list, list, list[int]]:
    """The two stages of a ``digits_cascade`` run, each at ``nfe`` NFE of DPM-Solver++(2M)."""
    stages, configs, steps = [], [], []
    for i, name in enumerate(("base", "sr")):
        config, model, step = load_run(workdir / name)
        stage = build_stage(config, model, base=i == 0)
        stages.append(dataclasses.replace(stage, method="dpm_solver++_2m",
                                          options={**stage.options, "nfe": nfe}))
        configs.append(config)
        steps.append(step)
    return stages, configs, steps


def run_cascade(stages, config, n: int, seed: int, level: float, truncate: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, int, float, str]:
    sr = dataclasses.replace(stages[1], aug_level=level, truncate=truncate)
    start = time.perf_counter()
    outputs, infos = Cascade([stages[0], sr]).sample(n, generator=torch.Generator().manual_seed(
        seed), device="cpu")
    seconds = time.perf_counter() - start
    return (to_images(config, outputs[0]), to_images(config, outputs[1]),
            sum(i["nfe"] for i in infos), seconds, infos[1]["conditioning"])


def sr_of_real(stages, config, n: int, seed: int) -> tuple[list[str], torch.Tensor]:
    """(iii): the SR stage on the area-downsampled test digits."""
    test, _ = digits_metric.digits_split("test")  # (297, 1, 8, 8) in [0, 1]
    y = downsample(test, 4).repeat(-(-n // test.shape[0]), 1, 1, 1)[:n]
    y = datasets.get_data_scaler(config)(y)
    start = time.perf_counter()
    x, info = super_resolve(stages[1], y, generator=torch.Generator().manual_seed(seed))
    seconds = time.perf_counter() - start
    images = to_images(config, x)
    return row("SR stage on the true 4x4 test digits", str(info["nfe"]), seconds,
               scores(images)), images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cascade", type=Path, required=True, help="a digits_cascade run")
    parser.add_argument("--base", type=Path, required=True, help="a digits (8x8) run")
    parser.add_argument("--num_samples", type=int, default=500)
    parser.add_argument("--nfe", type=int, default=30, help="total NFE (half per stage)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the runs' config.num_threads, as the CLI
    OUT.mkdir(parents=True, exist_ok=True)
    n, half = args.num_samples, args.nfe // 2

    base_row, base_step = base_only(args.base, args.nfe, n, args.seed)
    stages, configs, steps = cascade_stages(args.cascade, half)
    config = configs[1]
    level = float(config.sampling.cond_level)
    low, high, nfe, seconds, _ = run_cascade(stages, config, n, args.seed, level)
    save_image_grid(low[:100], OUT / "cascade_stage_base.png")
    save_image_grid(high[:100], OUT / "cascade_stage_sr.png")
    rows = [base_row,
            row("its 4x4 base stage (scored against the 4x4 train digits)", str(half),
                float("nan"), scores(low)),
            row(f"4x4 -> 8x8 cascade, s = {level:g}", str(nfe), seconds, scores(high))]
    rows[1][2] = "-"
    real_row, real = sr_of_real(stages, config, n, args.seed)
    save_image_grid(real[:100], OUT / "cascade_sr_of_real.png")
    rows.append(real_row)
    test, _ = digits_metric.digits_split("test")
    rows.append(row(f"the true 8x8 test digits ({test.shape[0]}, cycled to {n})", "-",
                    float("nan"), scores(test.repeat(-(-n // test.shape[0]), 1, 1, 1)[:n])))
    rows[-1][2] = "-"
    for r in rows:
        print(" | ".join(r), flush=True)

    levels = []
    for s in LEVELS:
        _, x, nfe_s, sec, conditioning = run_cascade(stages, config, n, args.seed, s)
        result = scores(x)
        levels.append([f"{s:g}", conditioning, str(nfe_s), f"{sec:.1f}", f"{result['fdd']:.2f}",
                       f"{result['classifier_score']:.2f}"])
        save_image_grid(x[:100], OUT / f"cascade_s{s:g}.png")
        print(" | ".join(levels[-1]), flush=True)
    _, x, nfe_s, sec, conditioning = run_cascade(stages, config, n, args.seed, TRUNCATED_LEVEL,
                                                 truncate=True)
    result = scores(x)
    levels.append([f"{TRUNCATED_LEVEL:g}", f"truncated ({conditioning})", str(nfe_s), f"{sec:.1f}",
                   f"{result['fdd']:.2f}", f"{result['classifier_score']:.2f}"])
    save_image_grid(x[:100], OUT / f"cascade_s{TRUNCATED_LEVEL:g}_truncated.png")
    print(" | ".join(levels[-1]), flush=True)

    header = ["samples", "NFE", "wall (s)", "FDD", "classifier score"]
    caption = (f"{n} samples, seed {args.seed}, DPM-Solver++(2M), one thread; `digits` at step "
               f"{base_step}, `digits_cascade` base at step {steps[0]}, SR at step {steps[1]}; "
               f"`python benchmarks/cascade.py --cascade runs/digits_cascade --base runs/digits "
               f"--num_samples {n} --nfe {args.nfe}`")
    text = (f"(a) {caption}\n\n{markdown_table(header, rows)}\n(b) the cascade at {args.nfe} "
            f"NFE by the sampling augmentation level s (VP SDE time; trained on s ~ U[0, "
            f"{configs[1].training.cond_aug_max:g}]):\n\n"
            + markdown_table(["s", "conditioning", "NFE", "wall (s)", "FDD", "classifier score"],
                             levels))
    print(f"wrote {write_table('cascade', text, OUT)}")


if __name__ == "__main__":
    main()
