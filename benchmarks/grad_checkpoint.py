"""Memory and time of one forward + backward pass with and without activation checkpointing
(``config.model.grad_checkpoint``) and the channels_last layout (``config.model.channels_last``).

    OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE python benchmarks/grad_checkpoint.py
    python benchmarks/grad_checkpoint.py --configs vp_cifar --batch_size 8 --steps 3

Each setting runs in its own process (torch's CPU allocator is invisible to ``tracemalloc``, and
a process's peak resident size only grows). A training-mode forward + backward of a mean-square
output first runs on one sample, paying the one-off costs (thread pools, kernel caches, the
gradient buffers) and peaking at the activations of one sample; the peak RSS is read, one pass
runs on B samples, and the peak is read again. The growth is the activation memory of B - 1
samples (what the backward keeps, plus the transient buffers of the largest layer), so
``MB/sample`` = growth / (B - 1): the memory that scales with the batch, which is what
checkpointing saves. Seconds per pass are the median of ``--steps`` further passes at B (wall
time; CPU time too, since a shared machine inflates wall time). On a GPU the same comparison is
``torch.cuda.max_memory_allocated``; the CPU figures show the relative memory and cost.

CIFAR-10 configs run at ``--batch_size`` (default 8); the others at their own batch size.
"""

from __future__ import annotations

import argparse
import importlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs.registry import CONFIGS  # noqa: E402
from score_sde.datasets import data_shape, get_data_scaler  # noqa: E402

SETTINGS = {
    "plain": {},
    "grad_checkpoint": {"grad_checkpoint": True},
    "channels_last": {"channels_last": True},
    "both": {"grad_checkpoint": True, "channels_last": True},
}


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure(name: str, setting: str, batch_size: int, steps: int) -> dict:
    """Activation memory per sample (MB) and seconds of one forward + backward of config
    ``name`` at ``batch_size`` (the config's own batch size unless it trains on CIFAR-10)."""
    from models.utils import create_model

    config = importlib.import_module(CONFIGS[name]).get_config()
    config.device = "cpu"
    config.model.update(SETTINGS[setting])
    if config.data.dataset != "CIFAR10":
        batch_size = config.training.batch_size
    torch.manual_seed(0)
    model = create_model(config).train()
    g = torch.Generator().manual_seed(0)
    x = get_data_scaler(config)(torch.rand(batch_size, *data_shape(config), generator=g))
    if config.model.name in ("ddpm", "dit") or config.model.get("embedding_type") == "positional":
        labels = torch.rand(batch_size, generator=g) * (config.model.num_scales - 1)
    elif config.model.name.startswith("ncsnv2"):
        labels = torch.randint(0, config.model.num_scales, (batch_size,), generator=g)
    else:  # NCSN++: sigma
        labels = torch.rand(batch_size, generator=g) * config.model.sigma_max + 0.01

    def step(n: int) -> None:
        model(x[:n], labels[:n]).square().mean().backward()

    step(1)
    before = _peak_mb()
    step(batch_size)
    per_sample = (_peak_mb() - before) / (batch_size - 1)
    times, cpu_times = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step(batch_size)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    return {"config": name, "model": config.model.name, "setting": setting,
            "batch_size": batch_size,
            "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "MB_per_sample": round(per_sample, 2),
            "s_per_pass": round(sorted(times)[steps // 2], 3),
            "cpu_s_per_pass": round(sorted(cpu_times)[steps // 2], 3),
            "threads": torch.get_num_threads()}


def main() -> None:
    """Run each config and setting in a child process; print a table (and a JSON file)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["vp_cifar", "ddpm_cifar", "dit_digits"])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--child", nargs=2, metavar=("CONFIG", "SETTING"), help=argparse.SUPPRESS)
    parser.add_argument("--out",
                        default=str(Path(__file__).parent / "out" / "grad_checkpoint.json"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child, args.batch_size, args.steps)))
        return
    rows = []
    header = f"{'config':12} {'setting':16} {'batch':>5} {'params M':>8} {'MB/sample':>9} " \
             f"{'vs plain':>8} {'s/pass':>7} {'cpu s':>7}"
    print(header)
    for name in args.configs:
        plain = None
        for setting in args.settings:
            if setting != "plain" and "channels_last" in SETTINGS[setting] and \
                    CONFIGS[name].endswith(("dit_digits", "dit_xl2")):
                continue  # DiT refuses channels_last
            result = subprocess.run(
                [sys.executable, __file__, "--child", name, setting, "--batch_size",
                 str(args.batch_size), "--steps", str(args.steps)],
                check=True, capture_output=True, text=True)
            row = json.loads(result.stdout.strip().splitlines()[-1])
            plain = row["MB_per_sample"] if setting == "plain" else plain
            ratio = f"{row['MB_per_sample'] / plain:.2f}" if plain else "-"
            print(f"{name:12} {setting:16} {row['batch_size']:>5} {row['params_M']:>8} "
                  f"{row['MB_per_sample']:>9} {ratio:>8} {row['s_per_pass']:>7} "
                  f"{row['cpu_s_per_pass']:>7}", flush=True)
            rows.append(row)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
