"""Corrector-only sampling (predictor 'none': annealed Langevin dynamics, Song & Ermon 2019) with
the exact score of the 8-mode ring: mean log-density gap to exact draws (nats per dimension,
+/- two standard errors) against NFE, per SDE and corrector.

Corrector-only sampling is not in the tests (it needs many steps per noise level to mix); this
measures how far it gets. Prints a table and writes ``benchmarks/out/corrector_only.png``.
Usage: ``OMP_NUM_THREADS=1 python benchmarks/corrector_only.py``.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sde_lib  # noqa: E402
from samplers import sample  # noqa: E402
from score_sde.oracle import GaussianMixture  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
SDES = {"VP": sde_lib.VPSDE, "sub-VP": sde_lib.subVPSDE, "VE": sde_lib.VESDE}
BUDGETS = [(100, 1), (100, 5), (300, 1), (300, 5), (1000, 1)]  # (N, n_steps)
SNR = {"langevin": 0.05, "ald": 0.1}


def gap(gm, x, exact):
    """Mean log p_0 of x minus that of exact draws, per dimension, and two standard errors."""
    lp, lp_e = gm.log_prob(x), gm.log_prob(exact)
    se = math.sqrt(lp.var().item() / len(lp) + lp_e.var().item() / len(lp_e))
    return (lp.mean().item() - lp_e.mean().item()) / gm.dim, 2 * se / gm.dim


def main():
    gm = GaussianMixture.ring()
    n = 2000
    exact = gm.sample(20000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    rows = []
    print(f"{'SDE':8s}{'corrector':10s}{'N':>6s}{'n_steps':>8s}{'NFE':>7s}"
          f"{'gap nats/dim':>14s}{'+/- 2 SE':>10s}")
    for sde_name, cls in SDES.items():
        sde = cls()
        for corrector, snr in SNR.items():
            for N, n_steps in BUDGETS:
                x, info = sample(sde, gm.score_fn(sde), (n, 2), "pc", predictor="none",
                                 corrector=corrector, snr=snr, N=N, n_steps=n_steps,
                                 dtype=torch.float64, generator=torch.Generator().manual_seed(0))
                g, two_se = gap(gm, x, exact)
                rows.append((sde_name, corrector, info["nfe"], g, two_se))
                print(f"{sde_name:8s}{corrector:10s}{N:6d}{n_steps:8d}{info['nfe']:7d}"
                      f"{g:14.3f}{two_se:10.3f}", flush=True)
    plot(rows)


def plot(rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    OUT.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for sde_name in SDES:
        for corrector, style in (("langevin", "-o"), ("ald", "--s")):
            pts = sorted((r[2], r[3], r[4]) for r in rows if r[:2] == (sde_name, corrector))
            nfe, g, err = zip(*pts)
            ax.errorbar(nfe, g, yerr=err, fmt=style, capsize=3, label=f"{sde_name} {corrector}")
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=0.05)  # gaps span 0.01 to 1000 nats/dim
    ax.set_xlabel("NFE")
    ax.set_ylabel("mean log p gap to exact (nats/dim)")
    ax.set_title("Corrector-only sampling, 8-mode ring, exact score")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = OUT / "corrector_only.png"
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
