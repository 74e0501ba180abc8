"""Accuracy of log p_eps(x) against the oracle vs wall time and NFE, per divergence estimator.

Problems (VP SDE, exact oracle score): a 192-D four-mode mixture (200 samples) and the 2-D ring
(2 000 samples). Baseline: a reference-style solve written here (scipy RK45 on the host, one
Rademacher probe, numpy round trip per evaluation, rtol = atol = 1e-5), timed on this machine
under the same load. Writes ``benchmarks/out/likelihood_accuracy.{md,png}``.

Run: ``OMP_NUM_THREADS=1 python benchmarks/likelihood_accuracy.py``
"""

from __future__ import annotations

import functools
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import integrate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import likelihood  # noqa: E402
import sde_lib  # noqa: E402
from score_sde import oracle  # noqa: E402

OUT = ROOT / "benchmarks" / "out"
EPS = 1e-5


def reference_style(sde, score_fn, x, seed, rtol=1e-5, atol=1e-5):
    """The reference's recipe: scipy RK45 on a flat numpy state, one Rademacher probe."""
    B, shape = x.shape[0], x.shape
    g = torch.Generator().manual_seed(seed)
    v = torch.randint(0, 2, shape, generator=g).to(x.dtype) * 2 - 1
    drift_fn = sde.reverse(score_fn, probability_flow=True).sde
    nfe = 0

    def f(t, y):
        nonlocal nfe
        nfe += 1
        xt = torch.from_numpy(y[:-B]).reshape(shape).to(x.dtype).requires_grad_(True)
        with torch.enable_grad():
            drift = drift_fn(xt, torch.full((B,), t, dtype=x.dtype))[0]
            (grad,) = torch.autograd.grad((drift * v).sum(), xt)
        div = (grad * v).flatten(1).sum(1)
        return np.concatenate([drift.detach().numpy().ravel(), div.numpy()])

    y0 = np.concatenate([x.numpy().ravel(), np.zeros(B)])
    sol = integrate.solve_ivp(f, (EPS, sde.T), y0, rtol=rtol, atol=atol, method="RK45")
    z = torch.from_numpy(sol.y[:-B, -1]).reshape(shape).to(x.dtype)
    delta = torch.from_numpy(sol.y[-B:, -1]).to(x.dtype)
    return sde.prior_logp(z) + delta, nfe


def timed(fn, repeats):
    """(result, best wall time of ``repeats`` runs); the CPU is shared, the minimum is the cost."""
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def run(problem, sde, mix, x, ref, configs, rows, repeats):
    D = mix.dim
    score_fn = mix.score_fn(sde)
    likelihood.log_likelihood(sde, score_fn, x[:2], rtol=1e-2, atol=1e-2)  # warm-up
    (logp, nfe), seconds = timed(lambda: reference_style(sde, score_fn, x, seed=0), repeats)
    rows.append(_row(problem, "reference-style (scipy, host)", 1, 1e-5, "RK45", logp, ref, D,
                     seconds, nfe, None))
    print(_fmt(rows[-1]), flush=True)
    for name, K, tol, method, antithetic in configs:
        solve = functools.partial(
            likelihood.log_likelihood, sde, score_fn, x, divergence=name, num_probes=K,
            antithetic=antithetic, rtol=tol, atol=tol, method=method)
        (logp, info), seconds = timed(
            lambda: solve(generator=torch.Generator().manual_seed(0)),  # noqa: B023 (run now)
            1 if name == "exact" and D > 2 else repeats)
        label = name + (" antithetic" if antithetic else "")
        rows.append(_row(problem, label, K, tol, method, logp, ref, D, seconds, info["nfe"],
                         info["stderr"]))
        print(_fmt(rows[-1]), flush=True)


def _row(problem, label, K, tol, method, logp, ref, D, seconds, nfe, stderr):
    err = (logp.double() - ref) / D
    se = math.nan if stderr is None else (stderr.double() / D).pow(2).mean().sqrt().item()
    return dict(problem=problem, estimator=label, K=K, tol=tol, method=method, nfe=nfe,
                seconds=seconds, mean=err.mean().item(), rms=err.pow(2).mean().sqrt().item(),
                max=err.abs().max().item(), se=se)


def _fmt(r):
    return (f"| {r['problem']} | {r['estimator']} | {r['K']} | {r['tol']:.0e} | {r['method']} | "
            f"{r['nfe']} | {r['seconds']:.2f} | {r['mean']:+.1e} | {r['rms']:.1e} | "
            f"{r['max']:.1e} | {r['se']:.1e} |")


def main(repeats: int = 3):
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    sde = sde_lib.VPSDE(0.1, 20.0, 1000)
    rows = []
    problems = {
        "192-D mixture, 200": (oracle.GaussianMixture.random(192, 4, seed=0), 200, [
            ("rademacher", 1, 1e-1, "dopri5", False),
            ("rademacher", 1, 1e-2, "dopri5", False),
            ("rademacher", 1, 1e-2, "bosh3", False),
            ("rademacher", 1, 1e-5, "dopri5", False),
            ("gaussian", 1, 1e-2, "dopri5", False),
            ("rademacher", 6, 1e-5, "dopri5", False),
            ("hutchpp", 6, 1e-5, "dopri5", False),
            ("rademacher", 12, 1e-5, "dopri5", False),
            ("hutchpp", 12, 1e-5, "dopri5", False),
            ("rademacher", 24, 1e-5, "dopri5", False),
            ("hutchpp", 24, 1e-5, "dopri5", False),
            ("rademacher", 12, 1e-3, "dopri5", False),
            ("hutchpp", 12, 1e-3, "dopri5", False),
            ("exact", 1, 1e-2, "dopri5", False),
            ("exact", 1, 1e-3, "dopri5", False),
        ]),
        "2-D ring, 2000": (oracle.GaussianMixture.ring(), 2000, [
            ("rademacher", 1, 1e-1, "dopri5", False),
            ("rademacher", 1, 1e-2, "dopri5", False),
            ("rademacher", 2, 1e-2, "dopri5", False),
            ("rademacher", 2, 1e-2, "dopri5", True),
            ("hutchpp", 6, 1e-2, "dopri5", False),
            ("rademacher", 6, 1e-2, "dopri5", False),
            ("exact", 1, 1e-1, "bosh3", False),
            ("exact", 1, 1e-1, "dopri5", False),
            ("exact", 1, 1e-2, "dopri5", False),
            ("exact", 1, 1e-2, "bosh3", False),
            ("exact", 1, 1e-3, "bosh3", False),
            ("exact", 1, 1e-5, "dopri5", False),
        ]),
    }
    for problem, (mix, n, configs) in problems.items():
        x = mix.sample_marginal(n, sde, EPS, generator=torch.Generator().manual_seed(1))
        run(problem, sde, mix, x, mix.log_prob(x.double(), EPS, sde), configs, rows, repeats)
    header = ("| problem | estimator | K | rtol=atol | method | NFE | wall s | mean err | "
              "RMS err | max err | RMS stderr |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    table = header + "\n".join(_fmt(r) for r in rows) + "\n"
    (OUT / "likelihood_accuracy.md").write_text(
        "Error of log p_eps(x) against the oracle, nats/dim per sample (VP SDE, 1 thread, best "
        f"of {repeats} wall times; exact 192-D: one run; load average at the end "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores). RMS stderr: the estimator's own "
        "Monte Carlo error estimate (NaN for one probe).\n\n" + table)
    print(table)
    _plot(rows)


def _plot(rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems = list(dict.fromkeys(r["problem"] for r in rows))
    estimators = list(dict.fromkeys(r["estimator"] for r in rows))
    colours = dict(zip(estimators, plt.cm.tab10.colors))
    fig, axes = plt.subplots(1, len(problems), figsize=(6.5 * len(problems), 5))
    for ax, problem in zip(axes, problems):
        for r in (r for r in rows if r["problem"] == problem):
            marker = "s" if "reference" in r["estimator"] else "o"
            ax.scatter(r["seconds"], r["rms"], marker=marker, color=colours[r["estimator"]],
                       label=r["estimator"])
            ax.annotate(f"K={r['K']} {r['tol']:.0e} {r['method']}", (r["seconds"], r["rms"]),
                        fontsize=6, xytext=(3, 3), textcoords="offset points")
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=7)
        ax.set(xscale="log", yscale="log", xlabel="wall time [s] (best of repeats)",
               ylabel="RMS error per sample [nats/dim]", title=problem)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(OUT / "likelihood_accuracy.png", dpi=120)


if __name__ == "__main__":
    main()
