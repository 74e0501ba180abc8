"""Time per likelihood ODE evaluation with a real network vs one forward + one VJP.

Network: NCSNpp with the ``ddpmpp_vp`` fixture config (DDPM++ at nf = 16, 16x16 px, 318k
parameters) and the fixture weights when ``../shared/fixtures/reference`` exists (random
initialisation otherwise), VP SDE, batch 2. The floor is one forward pass of the probability-flow
drift plus one autograd VJP (what any Hutchinson estimate needs); the likelihood's figure is the
wall time of a whole ``log_likelihood`` solve divided by its NFE (solver bookkeeping included),
interleaved with the floor measurements because the CPU is shared.
Writes ``benchmarks/out/likelihood_overhead.md``.

Run: ``OMP_NUM_THREADS=1 python benchmarks/likelihood_overhead.py``
"""

from __future__ import annotations

import json
import math
import os
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


def main(batch: int = 2, repeats: int = 50, rounds: int = 3):
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
        """Mean wall time per call over ``repeats`` calls: the same statistic as a solve's."""
        fn()
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - t0) / repeats

    # The CPU is shared: interleave the floor and the solves, keep each one's best round.
    floor, forward, per_eval, nfe = math.inf, math.inf, {}, {}
    for _ in range(rounds):
        floor = min(floor, timed(forward_vjp))
        with torch.no_grad():
            forward = min(forward, timed(lambda: drift_fn(x, t)))
        for K in (1, 4):
            t0 = time.perf_counter()
            _, info = likelihood.log_likelihood(sde, score_fn, x, num_probes=K, rtol=1e-3,
                                                atol=1e-3,
                                                generator=torch.Generator().manual_seed(0))
            seconds = (time.perf_counter() - t0) / info["nfe"]
            per_eval[K], nfe[K] = min(per_eval.get(K, math.inf), seconds), info["nfe"]
    rows = [("forward only", forward, None), ("forward + 1 VJP (floor)", floor, None)]
    rows += [(f"log_likelihood rademacher K={K}, per evaluation (NFE {nfe[K]})", per_eval[K],
              per_eval[K] / floor - 1) for K in (1, 4)]
    lines = ["| what | ms | overhead vs floor |", "|---|---|---|"]
    lines += [f"| {name} | {sec * 1e3:.2f} | {'' if o is None else f'{100 * o:+.1f} %'} |"
              for name, sec, o in rows]
    table = (f"NCSNpp (ddpmpp_vp fixture config), batch {batch}, 1 thread; floor: mean over "
             f"{repeats} calls; solves at rtol = atol = 1e-3, wall time / NFE; best of {rounds} "
             f"interleaved rounds (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} "
             "cores). K = 4 does 4 VJPs per evaluation, so its floor is higher.\n\n"
             + "\n".join(lines) + "\n")
    (OUT / "likelihood_overhead.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
