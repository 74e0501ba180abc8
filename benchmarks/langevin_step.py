"""Step-size rules of the Langevin corrector (Song et al. 2021, Alg. 4) against the exact
Gaussian-mixture oracle: mean exact log p_0 (the SDE's t = 0 marginal) of PC samples (reverse
diffusion + one corrector step) minus that of exact draws, in nats (+/- two standard errors).

Rules (eps = Langevin step; alpha, r = snr, m, s as in ``samplers/pc.py``):
    old         2 alpha r^2 (m^2 + s^2)                   t only (unit-variance data)
    ref-batch   2 alpha (r mean||z|| / mean||score||)^2   the reference (ties samples together)
    ref-z_k     2 alpha (r ||z_k|| / ||score_k||)^2       per sample, ||z_k|| of the drawn noise
    sqrtD       2 alpha r^2 D / ||score_k||^2             per sample, uncapped
    capped      min(sqrtD, old)                           per sample, capped
    langevin    max(min(sqrtD, old), ald)                 the registered corrector
    ald         2 alpha (r s)^2                           the reference's AnnealedLangevinDynamics

Usage: ``OMP_NUM_THREADS=1 python benchmarks/langevin_step.py [--quick]``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sde_lib  # noqa: E402
from samplers import sample  # noqa: E402
from samplers.pc import CORRECTORS, Corrector, _detached  # noqa: E402
from score_sde.oracle import GaussianMixture  # noqa: E402

Langevin = CORRECTORS.get("langevin")


class Old(Langevin):
    step_size = Corrector.step_size


class SqrtD(Langevin):
    def step_size(self, score, i):
        sq_norm = score.reshape(score.shape[0], -1).square().sum(dim=1)
        return 2.0 * self._alpha[i] * self.snr**2 * score[0].numel() / sq_norm


class Capped(Langevin):
    def step_size(self, score, i):
        return SqrtD.step_size(self, score, i).clamp_(max=self._step[i])


class _NoiseNorm(Langevin):
    """The reference's order: draw z, then the step from ||z|| and ||score||."""

    batch_mean = False

    def correct(self, score_fn, x, t, i, noise, buffer):
        for _ in range(self.n_steps):
            score = _detached(score_fn(x, t), x)
            z = noise.randn_like(x, out=buffer)
            s_norm = score.reshape(len(x), -1).norm(dim=1)
            z_norm = z.reshape(len(x), -1).norm(dim=1)
            if self.batch_mean:
                s_norm, z_norm = s_norm.mean().expand(len(x)), z_norm.mean().expand(len(x))
            step = 2.0 * self._alpha[i] * (self.snr * z_norm / s_norm) ** 2
            step = step.view((-1,) + (1,) * (x.dim() - 1))
            x.addcmul_(score, step).addcmul_(z, (2.0 * step).sqrt())
        return x


class RefBatch(_NoiseNorm):
    batch_mean = True


class RefZk(_NoiseNorm):
    pass


RULES = {"old": Old, "ref-batch": RefBatch, "ref-z_k": RefZk, "sqrtD": SqrtD, "capped": Capped,
         "langevin": "langevin", "ald": "ald"}
SDES = {"VP": sde_lib.VPSDE, "sub-VP": sde_lib.subVPSDE, "VE": sde_lib.VESDE}


def gap(gm, sde, x, exact):
    """Mean log p_0 of x minus that of exact draws (nats) and two standard errors; p_0 is the
    SDE's marginal at t = 0 (VE keeps sigma_min = 0.01 of noise, as much as sharp data)."""
    lp, lp_e = gm.log_prob(x, 0.0, sde), gm.log_prob(exact, 0.0, sde)
    se = math.sqrt(lp.var().item() / len(lp) + lp_e.var().item() / len(lp_e))
    diff = lp.mean().item() - lp_e.mean().item()
    if not (math.isfinite(diff) and abs(diff) < 1e6):
        return math.nan, math.nan
    return diff, 2 * se


def problems(quick: bool):
    """(name, mixture, n draws, [(snr, N)])."""
    yield "ring 2-D std 0.3", GaussianMixture.ring(), 2000, [(0.05, 500), (0.16, 500)]
    yield "mix 100-D std .2-.6", GaussianMixture.random(100, 4, seed=0), 500, [
        (0.03, 1000), (0.16, 1000)]
    sharp = [(0.16, 500)] if quick else [(0.16, 500), (0.16, 1000)]
    yield "sharp 64-D std .01-.03", GaussianMixture.random(
        64, 4, std_range=(0.01, 0.03), seed=0), 500, sharp
    if not quick:
        yield "sharp 192-D std .01-.03", GaussianMixture.random(
            192, 4, std_range=(0.01, 0.03), seed=1), 500, sharp


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip 192-D and N = 1000 on sharp")
    parser.add_argument("--rules", default=",".join(RULES), help="comma-separated rule names")
    args = parser.parse_args()
    rules = args.rules.split(",")
    print(f"{'data':24s}{'SDE':7s}{'snr':>5s}{'N':>6s}  exact"
          + "".join(f"{r:>17s}" for r in rules))
    for name, gm, n, settings in problems(args.quick):
        for snr, N in settings:
            for sde_name, cls in SDES.items():
                sde = cls()
                exact = gm.sample_marginal(20000, sde, 0.0, dtype=torch.float64,
                                           generator=torch.Generator().manual_seed(123))
                lp_exact = gm.log_prob(exact, 0.0, sde).mean().item()
                cells = []
                for rule in rules:
                    x, _ = sample(sde, gm.score_fn(sde), (n, gm.dim), "pc", N=N, snr=snr,
                                  predictor="reverse_diffusion", corrector=RULES[rule],
                                  dtype=torch.float64,
                                  generator=torch.Generator().manual_seed(0))
                    g, two_se = gap(gm, sde, x, exact)
                    cells.append(f"{g:+8.3f} ±{two_se:5.3f} " if math.isfinite(g)
                                 else f"{'diverged':>16s} ")
                print(f"{name:24s}{sde_name:7s}{snr:5.2f}{N:6d}{lp_exact:7.1f}" + "".join(cells),
                      flush=True)


if __name__ == "__main__":
    main()
