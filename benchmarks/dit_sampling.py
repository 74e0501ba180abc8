"""DiT sampling on this CPU: forward times of DiT-S/2 and DiT-B/2, and the samplers on a trained
``dit_digits`` model (NFE, wall time, digits metric, one grid per sampler).

(a) One forward of DiT-S/2 and DiT-B/2 (Peebles & Xie 2023, Table 1: 256 px images as 4x32x32
    latents, 1000 classes, learned sigma) at batch 8 with random weights, median of
    ``--repeats`` after one warm-up; the FLOPs are counted by torch (2 per multiply-add, so
    twice the paper's "Gflops"), and DiT-XL/2 is extrapolated from DiT-B/2 by its FLOPs. A
    guided NFE is one forward of the doubled batch (conditional and null label), also timed.
(b) Each sampler at 10-25 NFE on the EMA weights of a finished ``dit_digits`` run
    (``--workdir``): ``--num_samples`` samples (every class in turn) guided with the run's
    ``sampling.cfg_scale`` (DiT's s), their Fréchet Digits Distance, classifier score and class
    accuracy (the fraction the digits classifier assigns to the class they were drawn for), and
    ``benchmarks/out/dit_sampling_<sampler>.png`` (one class per row), on the run's
    ``config.num_threads`` as the CLI. Then DPM-Solver++(2M) at 20 NFE for several s. The
    ``ddpm`` ancestral sampler (25 and 250 respaced steps) is included when registered.

Writes ``benchmarks/out/dit_sampling.md`` (pasted into docs/dit.md by update_docs.py) and PNGs.
Usage: ``python benchmarks/dit_sampling.py --workdir runs/dit_digits [--num_samples 500]``
(first: ``python main.py --config dit_digits --mode train --workdir runs/dit_digits``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import ml_collections
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from update_docs import markdown_table, write_table  # noqa: E402

import samplers  # noqa: E402
from models.dit import build_dit  # noqa: E402
from score_sde.evaluation import digits_metric  # noqa: E402
from score_sde.training import checkpoints, classes  # noqa: E402
from score_sde.training.images import class_rows, save_image_grid  # noqa: E402
from score_sde.training.inference import load_ema_model  # noqa: E402
from score_sde.training.sampling import config_key, generate, get_sde  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
SIZES = ("DiT-S/2", "DiT-B/2")
#: row name -> (method, NFE budget); ``ddpm`` is added when registered
CASES = {
    "dpm_solver++_2m": ("dpm_solver++_2m", (10, 20)),
    "unipc_3": ("unipc_3", (10, 20)),
    "ddim": ("ddim", (10, 25)),
}
DDPM_STEPS = (25, 250)
GUIDANCE_SCALES = (1.0, 2.0, 3.0, 4.0)


def _threads() -> str:
    n = torch.get_num_threads()
    return f"{n} thread{'s' if n > 1 else ''}"


def forward_flops(name: str, batch: int) -> float:
    """FLOPs of one forward of the named DiT at batch ``batch`` (counted on the meta device)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build_dit(name, input_size=32).eval()
        x, t = torch.empty(batch, 4, 32, 32), torch.zeros(batch)
        y = torch.zeros(batch, dtype=torch.long)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, t, y)
    return float(counter.get_total_flops())


def time_forward(name: str, batch: int, repeats: int) -> float:
    """Median wall time (s) of one forward of the named DiT (random weights) at ``batch``."""
    torch.manual_seed(0)
    model = build_dit(name, input_size=32).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, 32, 32, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g).float()
    y = torch.randint(0, 1000, (batch,), generator=g)
    times = []
    with torch.no_grad():
        model(x, t, y)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            model(x, t, y)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward_table(batch: int, repeats: int) -> str:
    """Part (a): a Markdown table of forward times, with DiT-XL/2 extrapolated."""
    rows, seconds = [], {}
    for name in SIZES:
        seconds[name] = time_forward(name, batch, repeats), time_forward(name, 2 * batch, repeats)
        flops = forward_flops(name, 1)
        rows.append([name, f"{flops / 1e9:.1f}", *(f"{s:.2f}" for s in seconds[name])])
        print(f"{name}: {seconds[name][0]:.2f} s per forward at batch {batch}, "
              f"{seconds[name][1]:.2f} s at {2 * batch} ({flops / 1e9:.1f} GFLOP per image)",
              flush=True)
    ratio = forward_flops("DiT-XL/2", 1) / forward_flops("DiT-B/2", 1)
    xl = [ratio * s for s in seconds["DiT-B/2"]]
    rows.append(["DiT-XL/2 (DiT-B/2 x FLOP ratio)", f"{forward_flops('DiT-XL/2', 1) / 1e9:.1f}",
                 *(f"~{s:.0f}" for s in xl)])
    print(f"DiT-XL/2: ~{xl[0]:.0f} s per forward, ~{xl[1]:.0f} s per guided step (DiT-B/2's "
          f"times x {ratio:.2f}, the FLOP ratio)")
    header = ["model (256 px: 4x32x32 latent)", "GFLOP / image",
              f"forward, batch {batch} (s)", f"guided NFE = forward at batch {2 * batch} (s)"]
    return markdown_table(header, rows)


def load_run(workdir: Path) -> tuple[ml_collections.ConfigDict, torch.nn.Module, int]:
    """The run's saved config and its latest checkpoint's EMA model (CPU)."""
    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    config.device = "cpu"
    path = checkpoints.latest_checkpoint(workdir)
    model, step = load_ema_model(config, path)
    return config, model, step


def class_accuracy(images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of images the digits classifier assigns to their own label."""
    _, probs = digits_metric.digits_features(images)
    return float((probs.argmax(1) == labels).double().mean())


def run_case(config, model, method: str, budget: dict, scale: float, num_samples: int,
             seed: int) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Samples of one sampler setting with its NFE, wall time and digits metric."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.sampling.method = method
    config.sampling.cfg_scale = scale
    for key, value in budget.items():
        config.sampling[config_key(method, key)] = value
    labels = classes.sample_class_labels(classes.sample_classes(config), 0, num_samples)
    start = time.perf_counter()
    x, info = generate(config, get_sde(config), model, (num_samples, 1, 8, 8),
                       inverse_scaler=lambda z: ((z + 1) / 2).clamp(0, 1), class_labels=labels,
                       generator=torch.Generator().manual_seed(seed))
    seconds = time.perf_counter() - start
    scores = digits_metric.evaluate_digits(x)
    return ({"nfe": info["nfe"], "seconds": seconds, **scores,
             "accuracy": class_accuracy(x, labels)}, x, labels)


def save_grid(x: torch.Tensor, labels: torch.Tensor, name: str, per_class: int = 10) -> Path:
    """The first ``per_class`` samples of each class, one class per row."""
    keep = torch.cat([torch.nonzero(labels == c).flatten()[:per_class]
                      for c in labels.unique()])
    rows = class_rows(x[keep], labels[keep])  # None for too few samples per class
    images, cols = rows if rows is not None else (x[keep], None)
    path = OUT / f"dit_sampling_{name.replace('+', 'p')}.png"
    OUT.mkdir(parents=True, exist_ok=True)
    save_image_grid(images, path, nrow=cols)
    return path


def ddpm_budgets() -> list[dict] | None:
    """The ``ddpm`` sampler's options for respaced grids of 25 and 250 steps (the official DiT
    samples 250), or None where it is not registered."""
    if "ddpm" not in samplers.SAMPLERS:
        return None
    key = "nfe" if "nfe" in samplers.option_defaults("ddpm") else "spacing"
    return [{key: n if key == "nfe" else str(n)} for n in DDPM_STEPS]


def sampler_tables(workdir: Path, num_samples: int, seed: int) -> tuple[str, str, str]:
    """Part (b): the sampler table, the guidance table and the caption."""
    config, model, step = load_run(workdir)
    scale = config.sampling.cfg_scale
    if config.get("num_threads"):  # as the CLI runs it (dit_digits: one thread)
        torch.set_num_threads(config.num_threads)
    cases = [(name, method, {"nfe": nfe}) for name, (method, nfes) in CASES.items()
             for nfe in nfes]
    budgets = ddpm_budgets()
    if budgets is None:
        print("note: the 'ddpm' sampler is not registered (the learned-variance work adds it); "
              "its rows are skipped")
    else:
        cases += [("ddpm", "ddpm", budget) for budget in budgets]
    header = ["sampler", "NFE", "wall (s)", "FDD", "classifier score", "class accuracy"]
    print(f"{'sampler':18s} {'NFE':>5s} {'wall s':>7s} {'FDD':>7s} {'cls score':>9s} "
          f"{'class acc':>9s}")
    rows = []
    for name, method, opts in cases:
        r, x, labels = run_case(config, model, method, opts, scale, num_samples, seed)
        print(f"{name:18s} {r['nfe']:5d} {r['seconds']:7.1f} {r['fdd']:7.2f} "
              f"{r['classifier_score']:9.2f} {r['accuracy']:9.3f}", flush=True)
        rows.append([f"`{name}`", str(r["nfe"]), f"{r['seconds']:.1f}", f"{r['fdd']:.2f}",
                     f"{r['classifier_score']:.2f}", f"{r['accuracy']:.3f}"])
        save_grid(x, labels, f"{name}_{r['nfe']}")
    guided = []
    for s in GUIDANCE_SCALES:
        r, x, labels = run_case(config, model, "dpm_solver++_2m", {"nfe": 20}, s, num_samples,
                                seed)
        print(f"s = {s:.1f} (w = {s - 1:.1f}): FDD {r['fdd']:.2f}, classifier score "
              f"{r['classifier_score']:.2f}, class accuracy {r['accuracy']:.3f}", flush=True)
        guided.append([f"{s:g}", f"{s - 1:g}", f"{r['fdd']:.2f}", f"{r['classifier_score']:.2f}",
                       f"{r['accuracy']:.3f}"])
        save_grid(x, labels, f"s{s:g}")
    caption = (f"`dit_digits` at step {step}, EMA weights, {num_samples} samples (every class "
               f"in turn), seed {seed}, {_threads()}")
    guidance = markdown_table(["s (cfg_scale)", "w = s - 1", "FDD", "classifier score",
                               "class accuracy"], guided)
    return markdown_table(header, rows), guidance, caption + f", guided with s = {scale:g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None,
                        help="a finished dit_digits run (else only part (a) runs)")
    parser.add_argument("--num_samples", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=8, help="batch of the forward timings")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of part (a) (default: torch's default, every "
                             "core); part (b) uses the run's config.num_threads")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    forward = forward_table(args.batch, args.repeats)
    text = (f"(a) torch {torch.__version__}, float32, {_threads()}, random weights, median of "
            f"{args.repeats}\n\n{forward}")
    if args.workdir is None or checkpoints.latest_checkpoint(args.workdir) is None:
        where = args.workdir or "runs/dit_digits"
        print(f"no trained dit_digits checkpoint in {where}: run first\n"
              f"  python main.py --config dit_digits --mode train --workdir {where}\n"
              f"then python benchmarks/dit_sampling.py --workdir {where}")
    else:
        table, guidance, caption = sampler_tables(args.workdir, args.num_samples, args.seed)
        text += (f"\n(b) {caption}; `python benchmarks/dit_sampling.py --workdir "
                 f"runs/dit_digits`\n\n{table}\nDPM-Solver++(2M), 20 NFE, by guidance scale:\n\n"
                 f"{guidance}")
    print(f"wrote {write_table('dit_sampling', text, OUT)}")


if __name__ == "__main__":
    main()
