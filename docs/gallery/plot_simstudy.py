"""
Simulation study
================

A small version of the simulation study of Jolly's essay on analysing
repeated-measures data: datasets with J groups of n observations and group-specific
coefficients drawn around the truth, analysed by a full mixed model, an
intercept-only mixed model, OLS with cluster-robust standard errors and two-stage
regression (:mod:`mlmeta.simstudy`). Panels: rows are the number of groups, columns
the observations per group, the x axis the SD of the group coefficients.

The full grid (``simstudy.ESSAY_GRID``, 9,000 fits) runs with
``python benchmarks/simstudy_essay.py``; here 15 replicates per cell keep the
documentation build short.
"""

from mlmeta import simstudy

grid = {"n_groups": [10, 30], "n_obs": [5, 25], "group_sd": [0.25, 1.0, 2.0]}
results = simstudy.run(grid, strategies=simstudy.ESSAY_STRATEGIES, n_sim=15, seed=2,
                       n_jobs=1, progress=False)

# %%
# Sum of absolute errors of the four coefficients, per replicate:

fig = simstudy.plot(results, "coef_abs_err")

# %%
# Share of 95 % confidence intervals that contain the true coefficient:

fig = simstudy.plot(results, "coverage")

# %%
# Mean error and coverage per cell:

summary = simstudy.summarize(results)
print(summary.pivot_table(index=["n_groups", "n_obs", "group_sd"], columns="strategy",
                          values=["coef_abs_err", "coverage"]).round(2).to_string())
