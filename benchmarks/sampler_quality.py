"""Sample quality against NFE for the fast samplers on the exact Gaussian-mixture oracle.

For each SDE (VP, sub-VP, VE) and problem (2-D ring of 8 modes; 192-D random mixture), every
sampler runs from prior noise to eps = 1e-3 with the exact score, and its samples are compared with
exact draws of p_eps (``oracle.sample_marginal``):

* log-likelihood gap in nats/dim: mean log p_eps(samples) - mean log p_eps(exact samples), with
  the standard error of that difference for two exact sets of the same size;
* sliced Wasserstein-2 distance to an exact set (128 random directions), against the mean and
  standard deviation of the same distance between independent exact sets.

A run is "exact quality" when |gap| <= 2 SE (and, in the "+SW" lines, SW <= mean_exact +
2 sd_exact). The table reports, per SDE, the smallest NFE from which the best deterministic and the
best stochastic sampler stay at exact quality on both problems (at every larger budget tried).
``dpm_solver++_3m tuned`` and ``unipc_3 tuned`` are those samplers on a grid from
``samplers.tune_time_grid`` for each budget: tuned from pilot draws of x_T (512 in 2-D, 128 in
192-D; another seed than the evaluated samples) against a 500-NFE solution, starting also from
the grid the same row tuned for the previous budget; the tuning's own evaluations are reported
apart (``tune_nfe``).
The SW null distribution (mean and sd of SW(exact set, reference)) comes from 24 independent exact
sets: with only a few the sd is underestimated and the "+SW" criterion fails exact samplers. All
deterministic samplers map the same x_T, so at large NFE they share one draw of SW.
Writes
``benchmarks/out/sampler_quality.png``, ``.json`` and, for ``benchmarks/update_docs.py``, the
Markdown summary ``benchmarks/out/sampler_quality.md`` (quoted in docs/samplers.md).

    OMP_NUM_THREADS=1 python benchmarks/sampler_quality.py [--quick] [--only LABEL ...]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from update_docs import markdown_table, write_table  # noqa: E402

import sde_lib  # noqa: E402
from samplers import sample, tune_time_grid  # noqa: E402
from score_sde import oracle  # noqa: E402

EPS = 1e-3
OUT = Path(__file__).resolve().parent / "out"
SDES = {"vp": sde_lib.VPSDE(), "subvp": sde_lib.subVPSDE(), "ve": sde_lib.VESDE()}
NFES = [5, 6, 8, 10, 12, 15, 20, 30, 50, 100]
# (label, method, options, deterministic)
SAMPLERS = [
    ("ddim", "ddim", {}, True),
    ("edm_heun", "edm_heun", {}, True),
    ("dpm_solver_3", "dpm_solver_3", {}, True),
    ("dpm_solver++_2m", "dpm_solver++_2m", {}, True),
    ("dpm_solver++_3m", "dpm_solver++_3m", {}, True),
    ("unipc_2", "unipc_2", {}, True),
    ("unipc_3", "unipc_3", {}, True),
    ("dpm_solver++_3m tuned", "dpm_solver++_3m", {"grid": "tuned"}, True),
    ("unipc_3 tuned", "unipc_3", {"grid": "tuned"}, True),
    ("ddim_eta1", "ddim", {"eta": 1.0}, False),
    ("edm_churn", "edm_heun", {"churn": 10.0}, False),
    ("dpm_solver++_2m_sde", "dpm_solver++_2m_sde", {}, False),
    ("dpm_solver++_3m_sde", "dpm_solver++_3m_sde", {}, False),
]
ADAPTIVE_RTOLS = [0.1, 0.05, 0.02]


def tune_pilot(dim: int) -> int:
    """Pilot batch for tuning: 512 draws in 2-D, 128 in 192-D (each has 24 000+ coordinates)."""
    return 512 if dim < 16 else 128


def tune_evals(nfe: int) -> int:
    """Candidate grids tried when tuning for ``nfe`` (fewer at large budgets, where each costs
    more and the registered grids the search starts from are already close)."""
    return 2000 if nfe <= 20 else 800 if nfe <= 30 else 300


def sliced_w2(x: torch.Tensor, y: torch.Tensor, directions: torch.Tensor) -> float:
    """Sliced Wasserstein-2 distance between equal-size samples x, y (n, D)."""
    px, _ = (x @ directions).sort(0)
    py, _ = (y @ directions).sort(0)
    return (px - py).pow(2).mean().sqrt().item()


def exact_baseline(gm, sde, n, directions, repeats=24):
    """Exact reference set, its log-densities, and the exact-vs-exact SE and SW statistics."""
    g = torch.Generator().manual_seed(1000)
    sets = [gm.sample_marginal(n, sde, EPS, generator=g, dtype=torch.float64)
            for _ in range(repeats + 1)]
    ref = sets[0]
    lp_ref = gm.log_prob(ref, EPS, sde)
    se = math.sqrt(2 * lp_ref.var().item() / n) / gm.dim
    sw = torch.tensor([sliced_w2(ref, s, directions) for s in sets[1:]])
    return ref, lp_ref, se, sw.mean().item(), sw.std().item()


def evaluate(gm, sde, x, lp_ref, ref, directions):
    gap = (gm.log_prob(x, EPS, sde).mean() - lp_ref.mean()).item() / gm.dim
    return gap, sliced_w2(x, ref, directions)


def run(quick: bool, only=None, keep=(), sdes=None, problem_names=None):
    """Sample and evaluate every run (only the samplers labelled in ``only``, the SDEs in
    ``sdes`` and the problems in ``problem_names``, where given); the rows so far, after
    ``keep``, are saved after each SDE and problem."""
    problems = {"ring2d": (oracle.GaussianMixture.ring(8), 4000 if quick else 10000),
                "mix192d": (oracle.GaussianMixture.random(192, 4, seed=0), 500 if quick else 1000)}
    nfes = NFES[::2] if quick else NFES
    rows = []
    for sde_name, sde in SDES.items():
        for prob_name, (gm, n) in problems.items():
            if sde_name not in (sdes or SDES) or prob_name not in (problem_names or problems):
                continue
            directions = torch.randn(gm.dim, 128, generator=torch.Generator().manual_seed(5),
                                     dtype=torch.float64)
            directions /= directions.norm(dim=0, keepdim=True)
            ref, lp_ref, se, sw_mean, sw_sd = exact_baseline(gm, sde, n, directions)
            runs = [(label, method, opts, det, {"nfe": nfe})
                    for label, method, opts, det in SAMPLERS for nfe in nfes]
            runs += [("adaptive", "adaptive", {"rtol": r}, False, {"nfe": 4000})
                     for r in ADAPTIVE_RTOLS]
            tuned_grids = {}  # each budget's tuning starts also from the last budget's grid
            for label, method, opts, det, budget in runs:
                if only and label not in only:
                    continue
                extra = {}
                if opts.get("grid") == "tuned":
                    start = time.time()
                    tuned_grids[label], tuned = tune_time_grid(
                        sde, gm.score_fn(sde), (tune_pilot(gm.dim), gm.dim), method, **budget,
                        max_evals=tune_evals(budget["nfe"]), init=tuned_grids.get(label),
                        dtype=torch.float64, generator=torch.Generator().manual_seed(99))
                    opts = dict(opts, grid=tuned_grids[label])
                    extra = dict(tune_nfe=tuned["nfe"], tune_seconds=time.time() - start,
                                 tune_mse=tuned["mse"], tune_mse_start=tuned["mse_start"])
                x, info = sample(sde, gm.score_fn(sde), (n, gm.dim), method, dtype=torch.float64,
                                 generator=torch.Generator().manual_seed(7), **opts, **budget)
                gap, sw = evaluate(gm, sde, x, lp_ref, ref, directions)
                ok = abs(gap) <= 2 * se and sw <= sw_mean + 2 * sw_sd
                rows.append(dict(sde=sde_name, problem=prob_name, sampler=label,
                                 deterministic=det, nfe=info["nfe"], gap=gap, se=se, sw=sw,
                                 sw_exact=sw_mean, sw_exact_sd=sw_sd, exact_quality=ok, **extra))
            OUT.mkdir(exist_ok=True)
            (OUT / "sampler_quality_rows.json").write_text(json.dumps([*keep, *rows], indent=0))
            print(f"{sde_name:6s} {prob_name:8s} done (SE {se:.1e} nats/dim, "
                  f"SW exact {sw_mean:.3f} +- {sw_sd:.3f})", flush=True)
    return rows


def stays_exact_from(rows, with_sw: bool) -> float:
    """Smallest NFE from which every larger budget tried is exact quality (inf if none): the
    log-likelihood gap within 2 SE and, ``with_sw``, the SW distance within 2 sd of exact."""
    best = math.inf
    for r in sorted(rows, key=lambda r: -r["nfe"]):
        ok = abs(r["gap"]) <= 2 * r["se"]
        if not (ok and (r["exact_quality"] or not with_sw)):
            break
        best = r["nfe"]
    return best


def summarise(rows):
    print(f"\n{'sde':6s} {'problem':8s} {'sampler':16s} " + "  ".join(
        f"{'NFE':>4s} {'gap/SE':>7s} {'SW':>6s}" for _ in range(1)))
    for r in rows:
        print(f"{r['sde']:6s} {r['problem']:8s} {r['sampler']:16s} {r['nfe']:4d} "
              f"{r['gap'] / r['se']:+7.1f} {r['sw']:6.3f}{'  *' if r['exact_quality'] else ''}")
    print("\n* = within 2 SE of exact (gap) and SW within 2 sd of exact-vs-exact\n")
    summary = {}
    for sde_name in SDES:
        for kind in (True, False):
            for with_sw in (False, True):
                best = (math.inf, "none")
                for label in sorted({r["sampler"] for r in rows if r["deterministic"] == kind}):
                    per_problem = [stays_exact_from([r for r in rows if r["sde"] == sde_name
                                                     and r["problem"] == p
                                                     and r["sampler"] == label], with_sw)
                                   for p in sorted({r["problem"] for r in rows})]
                    best = min(best, (max(per_problem), label))
                name = f"{'deterministic' if kind else 'stochastic'}{' +SW' if with_sw else ''}"
                summary[f"{sde_name}/{name}"] = best
                print(f"{sde_name:6s} best {name:17s}: exact quality on both problems from NFE "
                      f"{best[0]} ({best[1]})")
    return summary


def best_budget(rows, sde_name, keep, problems) -> str:
    """``'NFE (`sampler`)'``: the smallest budget from which one sampler in ``keep(row)`` stays
    at exact quality (log-likelihood gap and SW) on every problem in ``problems``."""
    best = (math.inf, "none")
    for label in sorted({r["sampler"] for r in rows if keep(r)}):
        per_problem = [stays_exact_from([r for r in rows if r["sde"] == sde_name
                                         and r["problem"] == p and r["sampler"] == label], True)
                       for p in problems]
        best = min(best, (max(per_problem), label))
    return "–" if math.isinf(best[0]) else f"{best[0]} (`{best[1]}`)"


def save_markdown(rows) -> Path:
    """Per SDE, the best sampler of each kind, as Markdown for docs/samplers.md."""
    problems = sorted({r["problem"] for r in rows})
    kinds = {
        "best deterministic, tuned grid": lambda r: r["deterministic"] and "tuned" in r["sampler"],
        "best deterministic, registered grids":
            lambda r: r["deterministic"] and "tuned" not in r["sampler"],
        "best stochastic": lambda r: not r["deterministic"],
    }
    header = ["SDE", *kinds, "192-D mixture alone (deterministic, registered grids)"]
    table = []
    for sde_name in SDES:
        if not any(r["sde"] == sde_name for r in rows):
            continue
        table.append([sde_name, *(best_budget(rows, sde_name, keep, problems)
                                  for keep in kinds.values()),
                      best_budget(rows, sde_name, kinds["best deterministic, registered grids"],
                                  ["mix192d"])])
    caption = ("Smallest NFE tried from which a sampler stays at exact quality on "
               f"{' and '.join(problems)}; `python benchmarks/sampler_quality.py`\n\n")
    return write_table("sampler_quality", caption + markdown_table(header, table), OUT)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems = sorted({r["problem"] for r in rows})
    fig, axes = plt.subplots(len(problems), len(SDES), figsize=(15, 8), squeeze=False)
    for i, prob in enumerate(problems):
        for j, sde_name in enumerate(SDES):
            ax = axes[i][j]
            sub = [r for r in rows if r["problem"] == prob and r["sde"] == sde_name]
            labels = list(dict.fromkeys(r["sampler"] for r in rows))
            for label in dict.fromkeys(r["sampler"] for r in sub):
                pts = sorted((r["nfe"], abs(r["gap"]) / r["se"]) for r in sub
                             if r["sampler"] == label)
                style = "-" if any(r["deterministic"] for r in sub if r["sampler"] == label) \
                    else "--"
                ax.plot(*zip(*pts), style, marker=".", label=label,
                        color=plt.cm.tab20(labels.index(label) % 20))
            ax.axhline(2, color="k", lw=0.8)
            ax.set(xscale="log", yscale="log", title=f"{sde_name} / {prob}", xlabel="NFE",
                   ylabel="|log-lik gap| / SE")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples and budgets")
    parser.add_argument("--from-rows", action="store_true",
                        help="re-summarise out/sampler_quality_rows.json without sampling")
    parser.add_argument("--only", nargs="+", metavar="LABEL",
                        help="run only these samplers and merge them into the saved rows")
    parser.add_argument("--sde", nargs="+", choices=list(SDES), help="with --only: these SDEs")
    parser.add_argument("--problem", nargs="+", choices=["ring2d", "mix192d"],
                        help="with --only: these problems")
    args = parser.parse_args()
    torch.set_num_threads(1)
    OUT.mkdir(exist_ok=True)
    start = time.time()
    if args.from_rows:
        rows = json.loads((OUT / "sampler_quality_rows.json").read_text())
    elif args.only:
        saved = json.loads((OUT / "sampler_quality_rows.json").read_text())
        redo = [(r["sampler"] in args.only and r["sde"] in (args.sde or SDES)
                 and r["problem"] in (args.problem or ("ring2d", "mix192d"))) for r in saved]
        keep = [r for r, again in zip(saved, redo) if not again]
        rows = keep + run(args.quick, args.only, keep, args.sde, args.problem)
    else:
        rows = run(args.quick)
    summary = summarise(rows)
    plot(rows, OUT / "sampler_quality.png")
    (OUT / "sampler_quality.json").write_text(json.dumps(
        {"rows": rows, "summary": {k: list(v) for k, v in summary.items()}}, indent=1))
    print(f"wrote {save_markdown(rows)}")
    print(f"\nwrote {OUT / 'sampler_quality.png'} in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
