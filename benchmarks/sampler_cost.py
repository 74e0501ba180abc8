"""Sampler machinery cost per step with a near-free score, -x / (m^2 + s^2) (the exact score of
N(0, I) data): microseconds per step at batch 10 000 in 2-D and batch 1 000 in 192-D, float32.

On the benchmark's VP SDE m^2 + s^2 = 1, so the score is -x: one pass over the batch, with no
per-call SDE arithmetic (which on scalar tensors costs about as much as a 2-D step). The
"score alone" row prints what that pass costs; the rest of a step is the sampler's machinery.

Goal (issue 5): <= 80 us and <= 150 us per step for first-order steps, twice that (<= 160 and
<= 300 us) for higher-order steps, on this 2-core machine. Runs on torch's default number of
threads (every core; ``--threads 1`` for one). Prints a table and writes
``benchmarks/out/sampler_cost.png`` and, for ``benchmarks/update_docs.py``, the Markdown table
``benchmarks/out/sampler_cost.md`` (quoted in docs/samplers.md).
Usage: ``python benchmarks/sampler_cost.py [--threads N]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from update_docs import markdown_table, write_table  # noqa: E402

import sde_lib  # noqa: E402
from samplers import SAMPLERS, sample  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
#: Wall time, or (``--clock cpu``) this process's CPU time, which on a shared machine leaves out
#: the time other jobs hold the core (with 1 thread, equal to wall time on a quiet machine).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
PROBLEMS = [("2-D, B=10000", (10_000, 2), 80.0), ("192-D, B=1000", (1_000, 192), 150.0)]
#: name -> (method, options, steps per run, steps counted as first-order?)
CASES = {
    "euler_maruyama": ("pc", dict(predictor="euler_maruyama", corrector="none")),
    "reverse_diffusion": ("pc", dict(predictor="reverse_diffusion", corrector="none")),
    "ancestral": ("pc", dict(predictor="ancestral_sampling", corrector="none")),
    "euler_maruyama (PF)": ("pc", dict(predictor="euler_maruyama", corrector="none",
                                       probability_flow=True)),
    "ddim = ancestral (PF)": ("pc", dict(predictor="ancestral_sampling", corrector="none",
                                         probability_flow=True)),
    "langevin (corrector only)": ("pc", dict(predictor="none", corrector="langevin",
                                             denoise=False)),
    "ald (corrector only)": ("pc", dict(predictor="none", corrector="ald", denoise=False)),
    "reverse_diffusion + langevin": ("pc", dict(predictor="reverse_diffusion",
                                                corrector="langevin")),
    "ode euler": ("ode", dict(solver="euler")),
    "ode rk4 (4 NFE)": ("ode", dict(solver="rk4")),
    # Fast samplers (issue 5, part 2): budget nfe = steps * nfe_per_step (see _budget).
    "ddim (eta=0)": ("ddim", dict()),
    "ddim (eta=1)": ("ddim", dict(eta=1.0)),
    "dpm_solver++_2m": ("dpm_solver++_2m", dict()),
    "dpm_solver++_3m": ("dpm_solver++_3m", dict()),
    "unipc_2": ("unipc_2", dict()),
    "unipc_3": ("unipc_3", dict()),
    "dpm_solver++_2m_sde": ("dpm_solver++_2m_sde", dict()),
    "dpm_solver++_3m_sde": ("dpm_solver++_3m_sde", dict()),
    "dpm_solver_2 (2 NFE)": ("dpm_solver_2", dict()),
    "dpm_solver_3 (3 NFE)": ("dpm_solver_3", dict()),
    "edm_heun (2 NFE)": ("edm_heun", dict()),
    "edm_heun churn (2 NFE)": ("edm_heun", dict(churn=10.0)),
    # Fixed steps h = (T - eps)/steps, every step accepted: the per-iteration cost (2 NFE).
    "adaptive (2 NFE)": ("adaptive", dict(rtol=1e9, atol=1e9, r=1e-12, theta=1.0)),
}


def _budget(method, steps):
    """The step-count option of ``method`` for ``steps`` steps."""
    if method == "pc":
        return {"N": steps}
    if method == "ode":
        return {"steps": steps}
    if method == "adaptive":
        return {"nfe": 2 * steps, "h_init": (1.0 - 1e-3) / steps}
    return {"nfe": steps * SAMPLERS.get(method).nfe_per_step}


def near_free_score(sde):
    """The exact score -x / (m^2 + s^2) of N(0, I) data, as a new tensor per call (the score_fn
    contract). A variance-preserving SDE has m^2 + s^2 = 1 at every t (checked here, once, on a
    grid), so its score is -x; other SDEs take the coefficient at the batch's first time (all
    times are equal)."""
    grid = torch.linspace(0.0, sde.T, 101, dtype=torch.float64)
    m, s = sde.marginal_coeffs(grid)
    if torch.allclose(m * m + s * s, torch.ones_like(grid), rtol=0.0, atol=1e-12):
        return lambda x, t: torch.neg(x)

    def score_fn(x, t):
        m, s = sde.marginal_coeffs(t[0])
        return x * (-1.0 / (m * m + s * s))

    return score_fn


def time_case(sde, shape, method, options, steps, repeats, clock=time.perf_counter):
    """Best wall time per step (us) over ``repeats`` runs of ``steps`` steps."""
    opts = {**options, **_budget(method, steps)}
    gen = torch.Generator().manual_seed(0)
    x_T = torch.randn(shape, generator=gen)
    score_fn = near_free_score(sde)
    sample(sde, score_fn, x_T, method, generator=gen, **{**options, **_budget(method, 3)})
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        sample(sde, score_fn, x_T, method, generator=gen, **opts)
        best = min(best, clock() - start)
    return best / steps * 1e6


def time_score(sde, shape, calls=200, clock=time.perf_counter):
    """Cost of the score itself per call (us), to separate it from the machinery."""
    x = torch.randn(shape)
    t = torch.full((shape[0],), 0.5)
    score_fn = near_free_score(sde)
    start = clock()
    for _ in range(calls):
        score_fn(x, t)
    return (clock() - start) / calls * 1e6


def time_noise(shape, calls=200, clock=time.perf_counter):
    """Cost of one standard-normal draw into a buffer (us): the floor of a stochastic step."""
    buffer = torch.empty(shape)
    gen = torch.Generator().manual_seed(0)
    start = clock()
    for _ in range(calls):
        buffer.normal_(generator=gen)
    return (clock() - start) / calls * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                        help="wall time (default) or process CPU time (for a shared machine)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's default, every core)")
    parser.add_argument("--only", nargs="*", default=None, metavar="SUBSTRING",
                        help="time only the cases whose name contains one of these (no plot)")
    args = parser.parse_args()
    cases = {name: case for name, case in CASES.items()
             if args.only is None or any(part in name for part in args.only)}
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    clock = CLOCKS[args.clock]
    sde = sde_lib.VPSDE(N=args.steps)
    results = {}
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, float32, "
          f"{args.steps} steps, best of {args.repeats}, {args.clock} time")
    header = f"{'sampler':32s}" + "".join(f"{name:>18s}" for name, _, _ in PROBLEMS)
    print(header)
    print("-" * len(header))
    for label, shape, _ in PROBLEMS:
        results[("score alone", label)] = time_score(sde, shape, clock=clock)
        results[("noise draw alone", label)] = time_noise(shape, clock=clock)
    for key in ("score alone", "noise draw alone"):
        print(f"{'(' + key + ', per call)':32s}" + "".join(
            f"{results[(key, label)]:18.1f}" for label, _, _ in PROBLEMS))
    for case, (method, options) in cases.items():
        row = f"{case:32s}"
        for label, shape, _ in PROBLEMS:
            us = time_case(sde, shape, method, options, args.steps, args.repeats, clock)
            results[(case, label)] = us
            row += f"{us:18.1f}"
        print(row, flush=True)
    print("goal (first-order steps):      " + "".join(f"{g:18.0f}" for _, _, g in PROBLEMS))
    print("goal (higher-order steps):     " + "".join(f"{2 * g:18.0f}" for _, _, g in PROBLEMS))
    if args.only is None:
        plot(results)
        print(f"wrote {save_markdown(results, cases, args)}")


def save_markdown(results, cases, args) -> Path:
    """The table as Markdown for docs/samplers.md (``benchmarks/update_docs.py`` pastes it)."""
    header = ["sampler", *(f"{label} (µs / step)" for label, _, _ in PROBLEMS)]
    names = ["score alone", "noise draw alone", *cases]
    rows = [[f"`{name}`" if name in cases else f"({name}, per call)",
             *(f"{results[(name, label)]:.0f}" for label, _, _ in PROBLEMS)] for name in names]
    caption = (f"torch {torch.__version__}, float32, {torch.get_num_threads()} threads, "
               f"{args.steps} steps, best of {args.repeats} ({args.clock} time); "
               f"`python benchmarks/sampler_cost.py --repeats {args.repeats}`\n\n")
    return write_table("sampler_cost", caption + markdown_table(header, rows), OUT)


def plot(results):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    OUT.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(PROBLEMS), figsize=(12, 5), sharey=False)
    for ax, (label, _, goal) in zip(axes, PROBLEMS):
        names = list(CASES)
        values = [results[(n, label)] for n in names]
        ax.barh(names, values, color="tab:blue")
        ax.axvline(goal, color="tab:red", ls="--", label=f"goal {goal:.0f} us (first order)")
        ax.axvline(results[("score alone", label)], color="tab:gray", ls=":",
                   label="score alone")
        ax.axvline(results[("noise draw alone", label)], color="tab:green", ls="-.",
                   label="one noise draw alone")
        ax.set_xlabel(f"us per step (float32, {torch.get_num_threads()} threads)")
        ax.set_title(label)
        ax.invert_yaxis()
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = OUT / "sampler_cost.png"
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
