"""Digits in pixel space against digits in latent space: ``digits`` (DDPM++ on 8x8x1) against
``digits_latent`` (DDPM++ on the 2x4x4 latents of the own KL autoencoder ``digits_ae``).

For each run, on one thread: the training step time (forward, backward, Adam, EMA on a batch of
``training.batch_size``; for the latent model also the cost of encoding that batch on the fly,
which the posterior cache removes), the sampling time of ``--num_samples`` samples with
DPM-Solver++(2M) at the same ``--nfe`` (the latent model's decoding timed apart), the digits
metric (Fréchet Digits Distance and classifier score, ``evaluation.digits_metric``) of those
samples, and bits/dim of the first ``--bpd_images`` test digits: the pixel model's
probability-flow ODE bits/dim against the latent model's data-space bound (LSGM eq. 3) from
``--mode likelihood``. Grids of the
first 100 samples: ``benchmarks/out/latent_pixel.png``, ``latent_latent.png``.

Writes ``benchmarks/out/latent.md`` (pasted into docs/latent.md by update_docs.py). Usage, after
training the three runs (about 20 min on 2 cores):

    python main.py --config digits --mode train --workdir runs/digits
    python main.py --config digits_ae --mode train_autoencoder --workdir runs/ae
    python main.py --config digits_latent --mode train --workdir runs/latent
    python benchmarks/latent.py --pixel runs/digits --latent runs/latent
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

from models.ema import ExponentialMovingAverage  # noqa: E402
from models.utils import create_model  # noqa: E402
from score_sde import datasets, losses  # noqa: E402
from score_sde.evaluation import digits_metric  # noqa: E402
from score_sde.training import checkpoints  # noqa: E402
from score_sde.training.images import save_image_grid  # noqa: E402
from score_sde.training.inference import load_ema_model, run_likelihood  # noqa: E402
from score_sde.training.latent import (  # noqa: E402
    get_model_inverse_scaler,
    latent_data_shape,
    load_config_autoencoder,
)
from score_sde.training.latent_data import to_autoencoder_input  # noqa: E402
from score_sde.training.loop import get_step_fns  # noqa: E402
from score_sde.training.sampling import generate, get_sde  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
STEPS = 20  # timed training steps (after 3 warm-up steps)


def load_run(workdir: Path):
    """A run's saved config (on the CPU), its EMA model and step, and its autoencoder (None for
    a pixel run)."""
    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    config.device = "cpu"
    model, step = load_ema_model(config, checkpoints.latest_checkpoint(workdir))
    return config, model, step, load_config_autoencoder(config)


def step_seconds(config, ae) -> tuple[float, float]:
    """Median seconds of a training step of a fresh model of ``config`` on one batch, and of
    encoding that batch on the fly (0 for a pixel model)."""
    torch.manual_seed(0)
    model = create_model(config)
    state = dict(model=model, step=0, optimizer=losses.get_optimizer(config, model.parameters()),
                 ema=ExponentialMovingAverage(model.parameters(), config.model.ema_rate))
    train_step, _ = get_step_fns(config, get_sde(config))
    images = datasets.get_dataset(config, "train").as_float(
        torch.arange(config.training.batch_size))
    g = torch.Generator().manual_seed(0)
    encode_times = []
    if ae is not None:
        for _ in range(STEPS):
            start = time.perf_counter()
            with torch.no_grad():
                batch = ae.sample_latent(to_autoencoder_input(images), generator=g)
            encode_times.append(time.perf_counter() - start)
    else:
        batch = datasets.get_data_scaler(config)(images)
    times = []
    for k in range(3 + STEPS):
        start = time.perf_counter()
        train_step(state, batch, generator=g)
        if k >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times), statistics.median(encode_times) if encode_times else 0.0


def sample(config, model, ae, n: int, nfe: int, seed: int) -> tuple[torch.Tensor, dict]:
    """``n`` samples as [0, 1] images, with the sampling and decoding seconds and the NFE."""
    config.sampling.method, config.sampling.nfe = "dpm_solver++_2m", nfe
    shape = (n, *latent_data_shape(config))
    start = time.perf_counter()
    z, info = generate(config, get_sde(config), model, shape, inverse_scaler=lambda y: y,
                       generator=torch.Generator().manual_seed(seed))
    sampling = time.perf_counter() - start
    start = time.perf_counter()
    images = get_model_inverse_scaler(config, ae)(z).clamp(0, 1)
    decoding = time.perf_counter() - start if ae is not None else 0.0
    return images, {"sampling": sampling, "decoding": decoding, "nfe": info["nfe"]}


def bits_per_dim(config, workdir: Path, n: int) -> str:
    """Bits/dim of the first ``n`` test digits by ``--mode likelihood`` (the pixel ODE, or a
    latent model's data-space bound), with the standard error over images."""
    summary = json.loads(run_likelihood(config, workdir, "bench_latent", max_images=n,
                                        progress=False).read_text())
    return f"{summary['bpd']:.3f} ± {summary['bpd_stderr']:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pixel", type=Path, required=True, help="a digits run")
    parser.add_argument("--latent", type=Path, required=True, help="a digits_latent run")
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--nfe", type=int, default=30)
    parser.add_argument("--bpd_images", type=int, default=297, help="test digits for bits/dim")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the runs' config.num_threads, as the CLI
    OUT.mkdir(parents=True, exist_ok=True)

    rows, steps = [], {}
    for name, workdir in (("pixel", args.pixel), ("latent", args.latent)):
        config, model, step, ae = load_run(workdir)
        steps[name] = step
        train_s, encode_s = step_seconds(config, ae)
        images, t = sample(config, model, ae, args.num_samples, args.nfe, args.seed)
        save_image_grid(images[:100], OUT / f"latent_{name}.png")
        result = digits_metric.evaluate_digits(images)
        shape = "x".join(str(s) for s in latent_data_shape(config))
        rows.append([
            f"{name} (`{workdir.name}`, step {step}, {shape})",
            f"{train_s * 1e3:.0f}" + (f" (+{encode_s * 1e3:.0f} encoding)" if ae else ""),
            str(t["nfe"]), f"{t['sampling']:.1f}" + (f" (+{t['decoding']:.2f} decoding)"
                                                    if ae else ""),
            f"{result['fdd']:.2f}", f"{result['classifier_score']:.2f}",
            bits_per_dim(config, workdir, args.bpd_images)])
        print(" | ".join(rows[-1]), flush=True)

    header = ["model", "train step (ms)", "NFE", f"{args.num_samples} samples (s)", "FDD",
              "classifier score", f"bits/dim ({args.bpd_images} test digits)"]
    caption = (f"{args.num_samples} samples, seed {args.seed}, DPM-Solver++(2M), one thread, "
               f"batch 64 steps (median of {STEPS}); bits/dim: pixel = probability-flow ODE, "
               f"latent = the data-space bound (LSGM eq. 3); `python benchmarks/latent.py "
               f"--pixel {args.pixel} --latent {args.latent} --num_samples {args.num_samples} "
               f"--nfe {args.nfe}`")
    text = f"{caption}\n\n{markdown_table(header, rows)}"
    print(f"wrote {write_table('latent', text, OUT)}")


if __name__ == "__main__":
    main()
