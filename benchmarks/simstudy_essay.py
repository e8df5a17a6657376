"""The repeated-measures simulation study of Jolly's essay, end to end.

Groups 10/30/100 x observations per group 5/25/100 x between-group SD
.1/.25/1/2/4 x 50 simulated datasets, each analysed by a full mixed model
(random intercept and slopes, correlated), an intercept-only mixed model,
cluster-robust OLS and two-stage OLS. Prints the wall time and tables of the
qualitative findings.

    python benchmarks/simstudy_essay.py                      # the essay's grid
    python benchmarks/simstudy_essay.py --null               # also under the null (slopes = 0)
    python benchmarks/simstudy_essay.py --path study.csv     # save as it goes; rerun resumes
    python benchmarks/simstudy_essay.py --plots figs/        # the essay's figures (matplotlib)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")   # small matrices: one BLAS thread per worker
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pandas as pd  # noqa: E402

from mlmeta import simstudy  # noqa: E402

LABELS = {"mixed_full": "MLM full", "mixed_intercept": "MLM intercept", "ols_cluster": "OLS cluster",
          "two_stage_ols": "2-stage OLS", "two_stage_meta": "2-stage meta"}


def _pivot(res, value, index, fmt="{:.3f}"):
    tab = res.pivot_table(index=index, columns="strategy", values=value, aggfunc="mean")
    tab = tab[[s for s in LABELS if s in tab.columns]].rename(columns=LABELS)
    return tab.map(lambda v: fmt.format(v) if pd.notna(v) else "")


def _findings(res):
    """Statements checked on the results (the essay's qualitative conclusions)."""
    out = []
    m = res.groupby(["n_groups", "n_obs", "group_sd", "strategy"])[
        ["coef_abs_err", "se_sum", "t_sum", "fit_success", "coverage"]].mean().reset_index()
    few = m[m.n_obs == 5].pivot_table(index=["n_groups", "group_sd"], columns="strategy",
                                      values="coef_abs_err")
    if "two_stage_ols" in few:
        worst = (few.idxmax(axis=1) == "two_stage_ols").mean()
        out.append(f"5 obs/group: two-stage OLS has the largest coefficient error in {100 * worst:.0f}% of "
                   f"cells (mean {few['two_stage_ols'].mean():.3f} vs "
                   f"{few.drop(columns='two_stage_ols').mean().min():.3f} for the best other strategy).")
    many = m[m.n_obs == 100].pivot_table(index=["n_groups", "group_sd"], columns="strategy",
                                         values="coef_abs_err")
    spread = (many.max(axis=1) / many.min(axis=1)).median()
    out.append(f"100 obs/group: strategies recover coefficients alike (median max/min error ratio "
               f"across strategies {spread:.2f}).")
    hi = m[m.group_sd >= 1].pivot_table(index=["n_groups", "n_obs", "group_sd"], columns="strategy",
                                        values="t_sum")
    if "mixed_intercept" in hi:
        top = (hi.idxmax(axis=1) == "mixed_intercept").mean()
        out.append(f"group SD >= 1: the intercept-only mixed model has the largest sum of |t| in "
                   f"{100 * top:.0f}% of cells (smallest SEs: misspecified, anticonservative).")
    cov = res.groupby("strategy")["coverage"].mean()
    out.append("95% CI coverage over all cells: " + ", ".join(f"{LABELS[s]} {cov[s]:.3f}" for s in LABELS
                                                               if s in cov))
    if "mixed_full" in set(res.strategy):
        full = res[res.strategy == "mixed_full"]
        fail = 1 - full.fit_success.mean()
        sing = full.singular.astype(float).mean()
        out.append(f"full mixed model: {100 * fail:.1f}% non-converged fits; {100 * sing:.1f}% singular "
                   f"(boundary) fits, mostly at small group SD and few observations "
                   f"({100 * full[full.group_sd <= 0.25].singular.astype(float).mean():.0f}% at SD <= .25 vs "
                   f"{100 * full[full.group_sd >= 2].singular.astype(float).mean():.0f}% at SD >= 2).")
    if "null" in res and res["null"].any():
        fp = res[res["null"]].groupby("strategy")["reject_rate"].mean()
        out.append("false-positive rate of the slopes under the null (alpha .05): "
                   + ", ".join(f"{LABELS[s]} {fp[s]:.3f}" for s in LABELS if s in fp))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-sim", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-jobs", type=int, default=None)
    ap.add_argument("--path", default=None, help="CSV/parquet file for incremental results")
    ap.add_argument("--null", action="store_true", help="also run every cell with true slopes = 0")
    ap.add_argument("--meta", action="store_true", help="add the two-stage meta-analytic strategy")
    ap.add_argument("--plots", default=None, help="directory for the figures")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    grid = dict(simstudy.ESSAY_GRID)
    if args.null:
        grid["null"] = [False, True]
    strategies = simstudy.ESSAY_STRATEGIES + (("two_stage_meta",) if args.meta else ())
    n_cells = len(simstudy.cells(grid))
    print(f"{n_cells} cells x {args.n_sim} replicates x {len(strategies)} strategies "
          f"({n_cells * args.n_sim * len(strategies)} fits), n_jobs={args.n_jobs or os.cpu_count()}")
    t0 = time.perf_counter()
    res = simstudy.run(grid, strategies, n_sim=args.n_sim, seed=args.seed, n_jobs=args.n_jobs,
                       path=args.path, progress=not args.no_progress)
    wall = time.perf_counter() - t0
    print(f"\nwall time {wall:.1f} s ({wall / 60:.1f} min); fitting time summed over all rows "
          f"(resumed ones included) {res['seconds'].sum():.0f} s")
    print("\nmean seconds per fit:")
    print(res.groupby("strategy")["seconds"].mean().rename(LABELS).map("{:.4f}".format).to_string())
    main_res = res[~res["null"]] if "null" in res else res
    pd.set_option("display.width", 160)
    for value, title in [("coef_abs_err", "absolute coefficient error (sum over 4 coefficients)"),
                         ("se_sum", "sum of standard errors"), ("t_sum", "sum of |t|"),
                         ("coverage", "95% CI coverage")]:
        print(f"\n{title}, by observations per group x between-group SD:")
        print(_pivot(main_res, value, ["n_obs", "group_sd"]).to_string())
    print("\ncoefficient error by number of groups x observations per group:")
    print(_pivot(main_res, "coef_abs_err", ["n_groups", "n_obs"]).to_string())
    full = main_res[main_res.strategy == "mixed_full"]
    if len(full):
        print("\nfull mixed model: % non-converged / % singular, by groups x obs (rows) and SD (columns):")
        tab = full.assign(fail=100 * (1 - full.fit_success.astype(float)),
                          sing=100 * full.singular.astype(float))
        print(tab.pivot_table(index=["n_groups", "n_obs"], columns="group_sd", values=["fail", "sing"],
                              aggfunc="mean").round(0).to_string())
    if args.null:
        print("\nfalse-positive rate of the slopes under the null, by groups x obs:")
        print(_pivot(res[res["null"]], "reject_rate", ["n_groups", "n_obs"]).to_string())
    print("\nfindings:")
    for line in _findings(res):
        print(" * " + line)
    if args.plots:
        import matplotlib
        matplotlib.use("Agg")
        os.makedirs(args.plots, exist_ok=True)
        for metric, fig in simstudy.plot(main_res, ["coef_abs_err", "se_sum", "t_sum", "fit_success",
                                                    "coverage"]).items():
            fig.savefig(os.path.join(args.plots, f"{metric}.png"), dpi=110)
        print(f"figures written to {args.plots}")
    return res


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
