"""Image-folder loading: images/s of the loader alone and the training step on folder data.

    OMP_NUM_THREADS=1 python benchmarks/data_pipeline.py
    python benchmarks/data_pipeline.py --images_256 256 --images_1024 32 --steps 6

Makes two folders of synthetic photo-like JPEGs in a temporary directory (256 and 1024 px,
smooth gradients, shapes and sensor noise, quality 90) and reads them at 64 px (RGB, random
flips, as a training run does):

* the loader alone, images/s and CPU ms per image (this process and its workers) over one
  ordered pass, with ``num_workers`` 0, 1 and 2 (decoding each batch from the files), and from
  the decode cache (built first; its build time is printed too);
* the training step of a small DDPM++ (the ``digits`` network with ``--nf`` 16 channels at
  64 x 64 x 3, batch 16) fed by: data in memory, the decode cache, and the files with 0 and 2
  workers. Seconds per step (batch included) are the median of ``--steps`` steps after one
  untimed step (which starts the workers); the four feeds take turns, step by step.

On a machine with few cores the workers share them with the step (and with any other work: the
caption gives the load average), so the wall rates of the worker rows show how decoding scales
with the cores that are free, and the CPU time per image what decoding costs.
Prints a table, writes ``benchmarks/out/data_pipeline.{json,md,png}`` (the Markdown is quoted in
docs/datasets.md by ``benchmarks/update_docs.py``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from update_docs import OUT, markdown_table, write_table  # noqa: E402

from score_sde import datasets  # noqa: E402
from score_sde.datasets import ArrayDataset, DataIterator  # noqa: E402


def make_folder(root: Path, n: int, size: int, seed: int = 0) -> Path:
    """``n`` photo-like ``size`` px JPEGs: a colour gradient, a few discs and mild noise."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    v, u = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for i in range(n):
        c0, c1, c2 = rng.uniform(0, 255, (3, 3))
        im = c0 + (c1 - c0) * u[..., None] + (c2 - c0) * v[..., None]  # (S, S, 3)
        for _ in range(4):
            cx, cy, r = rng.uniform(0, 1, 3) * (1, 1, 0.3)
            im[(u - cx) ** 2 + (v - cy) ** 2 < r**2] = rng.uniform(0, 255, 3)
        im += rng.normal(0, 6, im.shape)
        Image.fromarray(np.clip(im, 0, 255).astype(np.uint8)).save(root / f"{i:05d}.jpg",
                                                                    quality=90)
    return root


def folder_config(root: Path, cache: str = "none"):
    config = importlib.import_module("configs.digits").get_config()
    config.device = "cpu"
    config.data.dataset, config.data.root = "folder", str(root)
    config.data.image_size, config.data.num_channels = 64, 3
    config.data.random_flip, config.data.cache = True, cache
    return config


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the workers, once closed)."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def loader_rate(iterator: DataIterator) -> tuple[float, float]:
    """(images/s, CPU ms per image of this process and its workers) of one ordered pass, the
    workers' start included. The pass ends, so the workers build no batch that is not read; on a
    machine busy with other work the wall rate falls, the CPU time per image does not."""
    t0, c0, images = time.perf_counter(), _cpu_seconds(), 0
    for x in iterator:
        images += x.shape[0]
    wall = time.perf_counter() - t0
    iterator.close()  # the workers end: their CPU time is counted
    return images / wall, 1e3 * (_cpu_seconds() - c0) / images


def step_times(config, feeds: dict[str, DataIterator], steps: int) -> dict[str, float]:
    """Median seconds of (next batch + one training step) of ``config``'s network per feed.
    The feeds take turns step by step, so that a load change of a shared machine hits all."""
    from models.ema import ExponentialMovingAverage
    from models.utils import create_model
    from score_sde import losses
    from score_sde.training.loop import get_step_fns
    from score_sde.training.sampling import get_sde

    torch.manual_seed(0)
    model = create_model(config)
    state = dict(model=model, step=0, optimizer=losses.get_optimizer(config, model.parameters()),
                 ema=ExponentialMovingAverage(model.parameters(), config.model.ema_rate))
    train_step, _ = get_step_fns(config, get_sde(config))
    scaler, g = datasets.get_data_scaler(config), torch.Generator().manual_seed(0)
    times = {name: [] for name in feeds}
    for k in range(steps + 1):  # step 0 (untimed) starts the workers
        for name, iterator in feeds.items():
            t0 = time.perf_counter()
            train_step(state, scaler(next(iterator)), generator=g)
            if k:
                times[name].append(time.perf_counter() - t0)
    for iterator in feeds.values():
        iterator.close()
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def main() -> None:
    """Make the folders, measure, print the table and write the outputs."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images_256", type=int, default=512, help="256 px JPEGs")
    parser.add_argument("--images_1024", type=int, default=96, help="1024 px JPEGs")
    parser.add_argument("--batch_size", type=int, default=32, help="of the loader rows")
    parser.add_argument("--step_batch_size", type=int, default=16)
    parser.add_argument("--nf", type=int, default=16, help="channels of the DDPM++ network")
    parser.add_argument("--steps", type=int, default=6, help="timed training steps per feed")
    args = parser.parse_args()
    args.load_before = os.getloadavg()[0]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for px, n in ((256, args.images_256), (1024, args.images_1024)):
            root = make_folder(tmp / f"jpeg{px}", n, px)
            config = folder_config(root)
            files = datasets.get_dataset(config)
            batch = min(args.batch_size, n)
            for w in (0, 1, 2):
                it = datasets.get_data_iterator(config, batch_size=batch, dataset=files,
                                                train=False, num_workers=w)
                rate, cpu = loader_rate(it)
                results.append(dict(kind="loader", px=px, source=f"files, {w} workers",
                                    images_per_s=rate, cpu_ms_per_image=cpu))
            t0 = time.perf_counter()
            config.data.cache = str(tmp / f"cache{px}")
            cached = datasets.get_dataset(config)  # decoded with 'auto' workers
            build = time.perf_counter() - t0
            it = datasets.get_data_iterator(config, batch_size=batch, dataset=cached,
                                            train=False, num_workers=0)
            rate, cpu = loader_rate(it)
            results.append(dict(kind="loader", px=px, source="decode cache, 0 workers",
                                images_per_s=rate, cpu_ms_per_image=cpu, cache_build_s=build))
            for r in results[-4:]:
                print(f"loader  {px:4d} px JPEGs -> 64 px  {r['source']:25s} "
                      f"{r['images_per_s']:8.0f} images/s  {r['cpu_ms_per_image']:7.3f} CPU ms "
                      f"per image", flush=True)
            print(f"        cache build ({n} images): {build:.2f} s", flush=True)
        # the training step, on the 256 px folder
        config = folder_config(tmp / "jpeg256", str(tmp / "cache256"))
        config.training.batch_size, config.model.nf = args.step_batch_size, args.nf
        cached = datasets.get_dataset(config)
        memory = ArrayDataset(torch.from_numpy(np.array(cached.data.array)), cached.labels,
                              cached.levels)
        files = datasets.get_dataset(folder_config(tmp / "jpeg256"))
        feeds = {"in memory": (memory, 0), "decode cache, 0 workers": (cached, 0),
                 "files, 0 workers": (files, 0), "files, 2 workers": (files, 2)}
        timed = step_times(config, {
            name: datasets.get_data_iterator(config, dataset=data, num_workers=w)
            for name, (data, w) in feeds.items()}, args.steps)
        for source, s in timed.items():
            results.append(dict(kind="step", px=256, source=source, s_per_step=s))
            print(f"step    DDPM++ nf {args.nf}, 64 px, batch {args.step_batch_size}: "
                  f"{source:25s} {s:7.3f} s/step", flush=True)
    base = next(r["s_per_step"] for r in results if r["source"] == "in memory")
    for r in results:
        if r["kind"] == "step":
            r["vs_memory"] = r["s_per_step"] / base
    save(results, args)


def save(results: list[dict], args) -> None:
    """JSON, the Markdown table for the docs and a bar plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "data_pipeline.json").write_text(json.dumps(results, indent=2) + "\n")
    loader = [r for r in results if r["kind"] == "loader"]
    steps = [r for r in results if r["kind"] == "step"]
    big = {r["source"]: r for r in loader if r["px"] == 1024}
    table = markdown_table(
        ["read at 64 px", "256 px JPEGs: images / s", "CPU ms / image",
         "1024 px JPEGs: images / s", "CPU ms / image"],
        [[r["source"], f"{r['images_per_s']:.0f}", f"{r['cpu_ms_per_image']:.2f}",
          f"{big[r['source']]['images_per_s']:.0f}",
          f"{big[r['source']]['cpu_ms_per_image']:.2f}"]
         for r in loader if r["px"] == 256])
    table += "\n" + markdown_table(
        [f"DDPM++ step (nf {args.nf}, 64 px, batch {args.step_batch_size}) fed by", "s / step",
         "vs. in memory"],
        [[r["source"], f"{r['s_per_step']:.3f}", f"{r['vs_memory']:.2f}x"] for r in steps])
    load = (args.load_before, os.getloadavg()[0])  # other work competing for the cores
    caption = (f"{torch.get_num_threads()} torch thread(s), "
               f"{datasets.workers.available_cores()} cores, load average {load[0]:.1f} before "
               f"and {load[1]:.1f} after; `python benchmarks/data_pipeline.py`\n\n")
    md = write_table("data_pipeline", caption + table)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    names = [r["source"] for r in loader if r["px"] == 256]
    for k, px in enumerate((256, 1024)):
        rates = [r["images_per_s"] for r in loader if r["px"] == px]
        a.barh(np.arange(len(rates)) + 0.4 * k, rates, height=0.4, label=f"{px} px JPEGs")
    a.set_yticks(np.arange(len(names)) + 0.2, names)
    a.set_xscale("log")
    a.set_xlabel("images / s at 64 px (loader alone)")
    a.legend()
    b.barh([r["source"] for r in steps], [r["s_per_step"] for r in steps])
    b.set_xlabel("s / training step")
    fig.tight_layout()
    fig.savefig(OUT / "data_pipeline.png", dpi=120)
    print(f"\n{table}\nwrote {OUT / 'data_pipeline.json'}, {md} and {OUT / 'data_pipeline.png'}")


if __name__ == "__main__":
    main()
