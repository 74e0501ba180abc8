"""Training throughput: seconds and images per second of one full training step (forward,
backward, clipping, Adam, EMA) for the CLI's configs, on random data, per precision, compile and
channels_last setting, with the peak memory.

    OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE python benchmarks/train_throughput.py
    python benchmarks/train_throughput.py --configs vp_cifar --batch_size 8 --steps 5
    python benchmarks/train_throughput.py --configs digits --precisions fp32 bf16 --compile off on

Wall time is what a user waits; on a shared machine it inflates, so the CPU time of the process
per step is printed too (with one thread it is the wall time the step would take alone). With
two threads on a CPU whose other core is busy, OpenMP's default busy-waiting made steps up to
30x slower here; ``OMP_WAIT_POLICY=PASSIVE`` avoids that. Writes
``benchmarks/out/train_throughput.json`` and, for ``benchmarks/update_docs.py``,
``benchmarks/out/train_throughput.md`` (quoted in docs/benchmarks.md).

Each setting runs in its own process, so its peak memory is its own: on CUDA
``torch.cuda.max_memory_allocated`` (tensors only); on a CPU, where torch keeps no peak counter,
the process's peak resident set size (``resource.getrusage`` ``ru_maxrss``: torch, the
interpreter and the data included) and its increase over the resident size just before the
first step (what the steps themselves added at their peak). The ``channels_last`` column is
``config.model.channels_last`` (``--channels_last`` sets it; a config without the key trains in
the default layout). The first (untimed) step of a compiled setting includes the compilation.

CIFAR-10 configs run at ``--batch_size`` (default 8, the size at which the reference's DDPM++
takes 2.83 s/step on the 2-core development machine); other configs at their own batch size.
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

from update_docs import markdown_table, write_table  # noqa: E402

from configs.registry import CONFIGS  # noqa: E402
from score_sde.datasets import data_shape, get_data_scaler  # noqa: E402
from score_sde.training import acceleration  # noqa: E402
from score_sde.training.loop import get_step_fns  # noqa: E402
from score_sde.training.sampling import get_sde  # noqa: E402

REFERENCE_S_PER_STEP = {"vp_cifar": 2.83}  # reference DDPM++, batch 8, fp32, this machine


def _rss_mb() -> float:
    """The process's peak resident set size so far, MB (Linux reports KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mb() -> float:
    """The process's resident set size now, MB (Linux /proc; the peak where that is missing)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * resource.getpagesize() / 2**20
    except (OSError, IndexError, ValueError):
        return _rss_mb()


def measure(name: str, batch_size: int | None, steps: int, warmup: int, *,
            precision: str = "auto", compile: bool = False, channels_last: bool = False,
            grad_accum: int = 1, device: str = "cpu") -> dict:
    """Median seconds per training step of config ``name`` (random data in [0, 1]) in one
    setting, and the peak memory of this process (see the module docstring)."""
    from models.ema import ExponentialMovingAverage
    from models.utils import create_model
    from score_sde import losses

    config = importlib.import_module(CONFIGS[name]).get_config()
    config.device = device
    if batch_size is not None and config.data.dataset == "CIFAR10":
        config.training.batch_size = batch_size
    config.training.precision = precision
    config.training.compile = compile
    config.training.grad_accum = grad_accum
    if channels_last:
        config.model.channels_last = True
    bs = config.training.batch_size
    torch.manual_seed(0)
    model = create_model(config).to(device)
    sde = get_sde(config)
    state = dict(model=model, step=0,
                 ema=ExponentialMovingAverage(model.parameters(), config.model.ema_rate),
                 optimizer=losses.get_optimizer(config, model.parameters()))
    scaler = acceleration.grad_scaler(config)
    if scaler is not None:
        state["grad_scaler"] = scaler
    train_step, _ = get_step_fns(config, sde)
    train_step = acceleration.with_forward_model(train_step,
                                                 acceleration.forward_model(config, model))
    g = torch.Generator(device=device).manual_seed(0)
    batch = get_data_scaler(config)(torch.rand(bs, *data_shape(config), generator=g,
                                               device=device))
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = _current_rss_mb()
    times, cpu_times = [], []
    for k in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize(device)
        t0, c0 = time.perf_counter(), time.process_time()
        train_step(state, batch, generator=g)
        if cuda:
            torch.cuda.synchronize(device)
        if k >= warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    s = sorted(times)[len(times) // 2]
    cpu = sorted(cpu_times)[len(cpu_times) // 2]
    if cuda:
        memory = {"peak_memory_MB": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
                  "memory_kind": "torch.cuda.max_memory_allocated"}
    else:
        peak = _rss_mb()
        memory = {"peak_memory_MB": round(peak, 1),
                  "peak_increase_MB": round(peak - rss_before, 1),
                  "memory_kind": "peak RSS of the process (ru_maxrss)"}
    return {"config": name, "model": config.model.name, "batch_size": bs,
            "precision": acceleration.training_precision(config),
            "compile": compile, "channels_last": bool(config.model.get("channels_last", False)),
            "grad_accum": grad_accum, "device": device,
            "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "s_per_step": round(s, 4), "images_per_s": round(bs / s, 2),
            "cpu_s_per_step": round(cpu, 4),
            "threads": torch.get_num_threads(), **memory,
            "reference_s_per_step": REFERENCE_S_PER_STEP.get(name) if precision in (
                "auto", "fp32") and not compile and device == "cpu" else None}


def measure_in_subprocess(**setting) -> dict:
    """:func:`measure` in a fresh process (its own peak memory); raises with its stderr."""
    result = subprocess.run([sys.executable, __file__, "--worker", json.dumps(setting)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{setting} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    """Parse arguments, measure each setting, print one line each (and a JSON file)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["vp_cifar", "ve_cifar", "digits"],
                        choices=sorted(CONFIGS))
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"],
                        choices=["auto", "fp32", "tf32", "bf16", "fp16"])
    parser.add_argument("--compile", nargs="+", default=["off"], choices=["off", "on"])
    parser.add_argument("--channels_last", action="store_true",
                        help="set config.model.channels_last = True")
    parser.add_argument("--grad_accum", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch_size", type=int, default=8, help="for CIFAR-10 configs")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--out", default="benchmarks/out/train_throughput.json")
    parser.add_argument("--append", action="store_true",
                        help="add these rows to those already in --out (one table of both)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:  # one setting, in its own process
        print(json.dumps(measure(**json.loads(args.worker))))
        return
    out = Path(args.out)
    results = json.loads(out.read_text()) if args.append and out.is_file() else []
    for name in args.configs:
        for compile_flag in args.compile:
            for precision in args.precisions:
                r = measure_in_subprocess(
                    name=name, batch_size=args.batch_size, steps=args.steps,
                    warmup=args.warmup, precision=precision, compile=compile_flag == "on",
                    channels_last=args.channels_last, grad_accum=args.grad_accum,
                    device=args.device)
                ref = r["reference_s_per_step"]
                vs = f"  (reference {ref:.2f} s/step: {ref / r['s_per_step']:.2f}x)" if ref else ""
                print(f"{name:10s} {r['model']:8s} {r['params_M']:6.2f}M batch "
                      f"{r['batch_size']:4d} {r['precision']:5s} compile {r['compile']!s:5s} "
                      f"channels_last {r['channels_last']!s:5s} {r['s_per_step']:8.3f} s/step "
                      f"{r['images_per_s']:9.1f} images/s  peak {r['peak_memory_MB']:.0f} MB  "
                      f"(CPU time {r['cpu_s_per_step']:.3f} s/step, {r['threads']} threads){vs}",
                      flush=True)
                results.append(r)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out} and {save_markdown(results)}")


def save_markdown(results) -> Path:
    """The results as Markdown for docs/benchmarks.md (``benchmarks/update_docs.py`` pastes it)."""
    cuda = results[0]["device"].startswith("cuda")
    header = ["config", "model", "parameters", "batch", "precision", "compile", "channels_last",
              "s / step", "images / s",
              "peak MB (tensors)" if cuda else "peak RSS MB (+ during steps)",
              "reference s / step"]
    rows = [[f"`{r['config']}`", r["model"], f"{r['params_M']:.1f}M", str(r["batch_size"]),
             r["precision"], "yes" if r["compile"] else "no",
             "yes" if r["channels_last"] else "no",
             f"{r['s_per_step']:.3f}",
             f"{r['images_per_s']:.{1 if r['images_per_s'] < 10 else 0}f}",
             f"{r['peak_memory_MB']:.0f}" if cuda
             else f"{r['peak_memory_MB']:.0f} (+{r['peak_increase_MB']:.0f})",
             f"{r['reference_s_per_step']:.2f}" if r["reference_s_per_step"] else "–"]
            for r in results]
    caption = (f"torch {torch.__version__}, {results[0]['device']}, {results[0]['threads']} "
               "threads, median step; each setting in its own process; "
               "`python benchmarks/train_throughput.py`\n\n")
    return write_table("train_throughput", caption + markdown_table(header, rows))


if __name__ == "__main__":
    main()
