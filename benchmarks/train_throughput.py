"""Training throughput: seconds and images per second of one full training step (forward,
backward, clipping, Adam, EMA) for the CLI's configs, on random data.

    OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE python benchmarks/train_throughput.py
    python benchmarks/train_throughput.py --configs vp_cifar --batch_size 8 --steps 5

Wall time is what a user waits; on a shared machine it inflates, so the CPU time of the process
per step is printed too (with one thread it is the wall time the step would take alone). With
two threads on a CPU whose other core is busy, OpenMP's default busy-waiting made steps up to
30x slower here; ``OMP_WAIT_POLICY=PASSIVE`` avoids that. Writes
``benchmarks/out/train_throughput.json`` and, for ``benchmarks/update_docs.py``,
``benchmarks/out/train_throughput.md`` (quoted in docs/benchmarks.md).

CIFAR-10 configs run at ``--batch_size`` (default 8, the size at which the reference's DDPM++
takes 2.83 s/step on the 2-core development machine); other configs at their own batch size.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from update_docs import markdown_table, write_table  # noqa: E402

from configs.registry import CONFIGS  # noqa: E402
from score_sde.datasets import data_shape, get_data_scaler  # noqa: E402
from score_sde.training.loop import get_step_fns  # noqa: E402
from score_sde.training.sampling import get_sde  # noqa: E402

REFERENCE_S_PER_STEP = {"vp_cifar": 2.83}  # reference DDPM++, batch 8, this machine


def measure(name: str, batch_size: int | None, steps: int, warmup: int) -> dict:
    """Median seconds per training step of config ``name`` (random data in [0, 1])."""
    from models.ema import ExponentialMovingAverage
    from models.utils import create_model
    from score_sde import losses

    config = importlib.import_module(CONFIGS[name]).get_config()
    config.device = "cpu"
    if batch_size is not None and config.data.dataset == "CIFAR10":
        config.training.batch_size = batch_size
    bs = config.training.batch_size
    torch.manual_seed(0)
    model = create_model(config)
    sde = get_sde(config)
    state = dict(model=model, step=0,
                 ema=ExponentialMovingAverage(model.parameters(), config.model.ema_rate),
                 optimizer=losses.get_optimizer(config, model.parameters()))
    train_step, _ = get_step_fns(config, sde)
    g = torch.Generator().manual_seed(0)
    batch = get_data_scaler(config)(torch.rand(bs, *data_shape(config), generator=g))
    times, cpu_times = [], []
    for k in range(warmup + steps):
        t0, c0 = time.perf_counter(), time.process_time()
        train_step(state, batch, generator=g)
        if k >= warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    s = sorted(times)[len(times) // 2]
    cpu = sorted(cpu_times)[len(cpu_times) // 2]
    return {"config": name, "model": config.model.name, "batch_size": bs,
            "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "s_per_step": round(s, 4), "images_per_s": round(bs / s, 2),
            "cpu_s_per_step": round(cpu, 4),
            "threads": torch.get_num_threads(),
            "reference_s_per_step": REFERENCE_S_PER_STEP.get(name)}


def main() -> None:
    """Parse arguments, measure each config, print one line each (and a JSON file)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["vp_cifar", "ve_cifar", "digits"],
                        choices=sorted(CONFIGS))
    parser.add_argument("--batch_size", type=int, default=8, help="for CIFAR-10 configs")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--out", default="benchmarks/out/train_throughput.json")
    args = parser.parse_args()
    results = []
    for name in args.configs:
        r = measure(name, args.batch_size, args.steps, args.warmup)
        ref = r["reference_s_per_step"]
        vs = f"  (reference {ref:.2f} s/step: {ref / r['s_per_step']:.2f}x)" if ref else ""
        print(f"{name:12s} {r['model']:8s} {r['params_M']:7.2f}M  batch {r['batch_size']:4d}  "
              f"{r['s_per_step']:8.3f} s/step  {r['images_per_s']:9.1f} images/s  "
              f"(CPU time {r['cpu_s_per_step']:.3f} s/step, {r['threads']} threads){vs}",
              flush=True)
        results.append(r)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out} and {save_markdown(results)}")


def save_markdown(results) -> Path:
    """The results as Markdown for docs/benchmarks.md (``benchmarks/update_docs.py`` pastes it)."""
    header = ["config", "model", "parameters", "batch", "s / step", "images / s",
              "reference s / step"]
    rows = [[f"`{r['config']}`", r["model"], f"{r['params_M']:.1f}M", str(r["batch_size"]),
             f"{r['s_per_step']:.3f}", f"{r['images_per_s']:.0f}",
             f"{r['reference_s_per_step']:.2f}" if r["reference_s_per_step"] else "–"]
            for r in results]
    caption = (f"torch {torch.__version__}, {results[0]['threads']} threads, median step; "
               "`python benchmarks/train_throughput.py`\n\n")
    return write_table("train_throughput", caption + markdown_table(header, rows))


if __name__ == "__main__":
    main()
