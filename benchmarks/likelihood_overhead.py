"""Time per likelihood ODE evaluation with a real network vs one forward + one VJP.

Network: NCSNpp with the ``ddpmpp_vp`` fixture config (DDPM++ at nf = 16, 16x16 px, 318k
parameters) and the fixture weights when ``../shared/fixtures/reference`` exists (random
initialisation otherwise), VP SDE, batch 2. The floor is one forward pass of the probability-flow
drift plus one autograd VJP (what any Hutchinson estimate needs); the likelihood's figure is the
wall time of a whole ``log_likelihood`` solve divided by its NFE (solver bookkeeping included).
Writes ``benchmarks/out/likelihood_overhead.md``.

Run: ``OMP_NUM_THREADS=1 python benchmarks/likelihood_overhead.py``
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import likelihood  # noqa: E402
import models.ncsnpp  # noqa: E402,F401  registers 'ncsnpp'
import sde_lib  # noqa: E402
from models import utils as mutils  # noqa: E402

FIXTURES = ROOT.parent / "shared" / "fixtures" / "reference"
OUT = ROOT / "benchmarks" / "out"


def build():
    import ml_collections

    meta = json.loads((FIXTURES / "ddpmpp_vp.json").read_text())
    model = mutils.create_model(ml_collections.ConfigDict(meta["config"]))
    weights = FIXTURES / "ddpmpp_vp.safetensors"
    if weights.exists():
        from safetensors.torch import load_file

        state = {k.removeprefix("module."): v for k, v in load_file(str(weights)).items()}
        model.load_state_dict(state, strict=True)
    return model, meta["shapes"]["x"]


def main(batch: int = 2, repeats: int = 20):
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    model, shape = build()
    sde = sde_lib.VPSDE(0.1, 20.0, 1000)
    score_fn = mutils.get_score_fn(sde, model, train=False, continuous=True)
    drift_fn = sde.reverse(score_fn, probability_flow=True).sde
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, *shape[1:], generator=g) * 2 - 1
    v = torch.randint(0, 2, x.shape, generator=g).float() * 2 - 1
    t = torch.full((batch,), 0.5)

    def forward_vjp():
        xt = x.clone().requires_grad_(True)
        with torch.enable_grad():
            drift = drift_fn(xt, t)[0]
            (grad,) = torch.autograd.grad((drift * v).sum(), xt)
        return drift, (grad * v).flatten(1).sum(1)

    def timed(fn):
        fn()
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples)

    floor = timed(forward_vjp)
    with torch.no_grad():
        forward = timed(lambda: drift_fn(x, t))
    rows = [("forward only", forward, None), ("forward + 1 VJP (floor)", floor, None)]
    for name, K in (("rademacher", 1), ("rademacher", 4)):
        per_eval = []
        for seed in range(2):
            t0 = time.perf_counter()
            _, info = likelihood.log_likelihood(sde, score_fn, x, divergence=name, num_probes=K,
                                                rtol=1e-3, atol=1e-3,
                                                generator=torch.Generator().manual_seed(seed))
            per_eval.append((time.perf_counter() - t0) / info["nfe"])
        rows.append((f"log_likelihood {name} K={K}, per evaluation (NFE {info['nfe']})",
                     min(per_eval), min(per_eval) / floor - 1))
    lines = ["| what | ms | overhead vs floor |", "|---|---|---|"]
    lines += [f"| {name} | {sec * 1e3:.2f} | {'' if o is None else f'{100 * o:+.1f} %'} |"
              for name, sec, o in rows]
    table = (f"NCSNpp (ddpmpp_vp fixture config), batch {batch}, 1 thread, median of "
             f"{repeats}.\n\n" + "\n".join(lines) + "\n")
    (OUT / "likelihood_overhead.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
