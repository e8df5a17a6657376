"""Bootstrap confidence intervals and permutation tests after a fit.

* Parametric bootstrap: outcomes simulated from the fitted model
  (``y* = X beta + sum_l Z_l u_l* + e*``), refitted in one batch run of the engine
  (:func:`mlmeta.refit.fit_outcomes`).
* Cluster bootstrap: top-level clusters drawn with replacement (each copy a new
  cluster), refitted.
* Permutation test (metafor's ``permutest``): the rows of the moderators are
  permuted, the model refitted, and the observed Wald statistics compared with
  their permutation distribution; ``p = (1 + #{T* >= T}) / (n + 1)``.

Every replicate draws its random numbers from ``SeedSequence(seed).spawn`` (the
parametric bootstrap's outcomes are all drawn before the refits), so results do not
depend on the number of threads, nor on an ``executor=`` (a concurrent.futures
executor or a Dask client) that runs the refits in chunks of replicates.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
from scipy import sparse

from mlmeta import _dist
from mlmeta import _executor
from mlmeta.design import build_design
from mlmeta.model import NestedModel
from mlmeta.optimize import fit_nested
from mlmeta.refit import fit_outcomes, simulate_outcomes
from mlmeta.summary import confidence_level
from mlmeta.validate import n_jobs as _n_jobs

__all__ = ["bootstrap", "permutation_test"]


def _sd_table(re_cov_stack, groups, structs):
    """Replicates of the SDs and correlations of every level: dict label -> array."""
    out = {}
    for g, s in zip(groups, structs):
        S = re_cov_stack[g]
        sd = np.sqrt(np.clip(np.einsum("rii->ri", S), 0, None))
        names = s.effect_names
        for i, nm in enumerate(names):
            out[f"{g}: sd({nm})"] = sd[:, i]
        for i in range(len(names)):
            for j in range(i + 1, len(names)):
                with np.errstate(divide="ignore", invalid="ignore"):
                    out[f"{g}: corr({names[i]},{names[j]})"] = S[:, i, j] / (sd[:, i] * sd[:, j])
    return out


def _summarise(estimates, replicates, level):
    alpha = (100.0 - confidence_level(level)) / 200.0
    rows = []
    for name, est in estimates.items():
        r = np.asarray(replicates[name], dtype=float)
        r = r[np.isfinite(r)]
        lo, hi = (np.quantile(r, [alpha, 1 - alpha]) if r.size else (np.nan, np.nan))
        rows.append((name, est, float(np.mean(r)) if r.size else np.nan,
                     float(np.std(r, ddof=1)) if r.size > 1 else np.nan, lo, hi, r.size))
    return pd.DataFrame(rows, columns=["param", "estimate", "boot_mean", "boot_se", "lower",
                                       "upper", "n_ok"]).set_index("param")


def _resample_clusters(model, rng):
    """Design of one cluster-bootstrap replicate (sorted rows of the fitted design)."""
    d = model.design
    starts = d.group_start[0]
    J = d.n_clusters
    draw = rng.integers(0, J, J)
    rows = np.concatenate([np.arange(starts[j], starts[j + 1]) for j in draw])
    copy = np.repeat(np.arange(J), np.diff(starts)[draw])
    # drawn clusters are new groups at every nested level; crossed groups stay shared
    groups = [g[rows] + copy * (int(g.max()) + 1) if lvl < d.n_tree else g[rows]
              for lvl, g in enumerate(d.groups)]
    Lam = None
    var = d.variance[rows] if d.variance is not None and d.Lambda is None else None
    if d.Lambda is not None:
        Lam = sparse.block_diag([d.Lambda[starts[j]:starts[j + 1], starts[j]:starts[j + 1]]
                                 for j in draw], format="csr")
    if model.residual == "profiled":
        var = None
    design = build_design(d.y[rows], d.X[rows], [z[rows] for z in d.Z], groups, var, V=Lam, n_tree=d.n_tree)
    return design


def _cluster_replicate(model, theta, groups, ss):
    """One cluster-bootstrap replicate from seed ``ss``: (beta, {group: Sigma}), or None
    when the refit does not converge."""
    design = _resample_clusters(model, np.random.default_rng(ss))
    m = NestedModel(design, model.structs, model.method, residual=model.residual,
                    fe_constraints=model.fe_constraints)
    rec = fit_nested(m, theta0=theta, em_iter=0, safeguard=False)
    if not rec.converged:
        return None
    ev = m.evaluate(rec.theta)
    beta = ev.beta if m.fe_constraints is None else m.fe_constraints.expand(ev.beta, ev.cov_beta)[0]
    scale = ev.sigma2 if m.residual == "profiled" else 1.0
    return beta, {g: S * scale for g, S in zip(groups, m.Sigma_list(rec.theta))}


def _cluster_chunk(model, seeds, theta, groups):
    """One executor task: cluster-bootstrap replicates of a chunk of seeds."""
    return [_cluster_replicate(model, theta, groups, ss) for ss in seeds]


def _replicates(fn, chunk_fn, model, seeds, args, n_jobs, executor):
    """``[fn(model, *args, ss) for ss in seeds]``: in this process's threads, or in
    contiguous chunks of seeds (``chunk_fn``) on ``executor``; in seed order either way."""
    if executor is None:
        with ThreadPoolExecutor(max_workers=n_jobs) as ex:
            return list(ex.map(lambda ss: fn(model, *args, ss), seeds))
    parts = [seeds[a:b] for a, b in _executor.chunks(len(seeds), executor)]
    return [o for part in _executor.run(executor, chunk_fn, model, parts, *args) for o in part]


def bootstrap(res, n=1000, *, kind="parametric", level=95.0, seed=None, n_jobs=None, executor=None):
    """Bootstrap percentile intervals for the fixed effects and the random-effects
    SDs/correlations. Returns (table, replicates): a DataFrame with estimate,
    bootstrap mean and SE, percentile interval and the number of usable replicates,
    and a dict of the replicate arrays.

    ``executor``: a concurrent.futures executor or a Dask client running the refits in
    chunks of replicates (``n_jobs`` threads within each, default 1); the same seed gives
    the same numbers as a serial run."""
    if kind not in ("parametric", "cluster"):
        raise ValueError("kind must be 'parametric' or 'cluster'")
    if not (isinstance(n, (int, np.integer)) and n >= 2):
        raise ValueError("n must be an integer >= 2")
    _executor.check(executor)
    groups = [t.group for t in res.frame.terms]
    structs = res.model.structs
    estimates = dict(res.params.items())
    estimates.update({k: float(v[0]) for k, v in
                      _sd_table({g: res.re_cov[g].values[None] for g in groups}, groups,
                                structs).items()})
    n_jobs = _n_jobs(1 if executor is not None and n_jobs is None else n_jobs)
    if kind == "parametric":
        m = res.model
        fc = m.fe_constraints
        X = res.frame.X
        Y = simulate_outcomes(m, X @ res.params.values, n, theta=res.theta, seed=seed)
        if fc is not None:              # the design's metric: y - X beta_0, coefficients gamma
            Y = Y - (X @ fc.beta0)[:, None]
        out = fit_outcomes(m, Y, theta0=res.theta, n_jobs=n_jobs, executor=executor)
        beta = out["beta"] if fc is None else fc.beta0 + out["beta"] @ fc.N.T
        conv = out["converged"]
        reps = {nm: np.where(conv, beta[:, i], np.nan) for i, nm in enumerate(res.fe_names)}
        sd = _sd_table(dict(zip(groups, out["Sigma"])), groups, structs)
        reps.update({k: np.where(conv, v, np.nan) for k, v in sd.items()})
    else:
        seeds = np.random.SeedSequence(seed).spawn(n)
        out = _replicates(_cluster_replicate, _cluster_chunk, res.model, seeds,
                          (np.asarray(res.theta, dtype=float), groups), n_jobs, executor)
        ok = [o for o in out if o is not None]
        reps = {nm: np.array([o[0][i] for o in ok]) for i, nm in enumerate(res.fe_names)}
        sd = _sd_table({g: np.array([o[1][g] for o in ok]) for g in groups}, groups, structs)
        reps.update(sd)
    return _summarise(estimates, reps, level), reps


def _wald(beta, cov, idx):
    b = beta[idx]
    V = cov[np.ix_(idx, idx)]
    return float(b @ np.linalg.solve(V, b))


def _permutation_replicate(model, theta, idx, ss):
    """|z| of every coefficient and the moderators' Wald statistic after permuting the
    rows of X with seed ``ss``."""
    d = model.design
    var = d.variance if (d.Lambda is None and model.residual == "known") else None
    perm = np.random.default_rng(ss).permutation(d.n_obs)
    design = build_design(d.y, d.X[perm], d.Z, d.groups, var, V=d.Lambda, n_tree=d.n_tree)
    m = NestedModel(design, model.structs, model.method, residual=model.residual)
    rec = fit_nested(m, theta0=theta, em_iter=0, safeguard=False)
    ev = m.evaluate(rec.theta)
    se = np.sqrt(np.diag(ev.cov_beta))
    return np.abs(ev.beta / se), _wald(ev.beta, ev.cov_beta, idx)


def _permutation_chunk(model, seeds, theta, idx):
    """One executor task: permutation replicates of a chunk of seeds."""
    return [_permutation_replicate(model, theta, idx, ss) for ss in seeds]


def permutation_test(res, n=1000, *, seed=None, n_jobs=None, executor=None):
    """metafor's ``permutest``: permute the rows of the moderators, refit, and compare
    the omnibus Wald statistic of the moderators (Q_M) and each |z| with their
    permutation distributions. Returns a DataFrame (statistic, permutation p-value)
    with the omnibus test first.

    ``executor``: a concurrent.futures executor or a Dask client running the refits in
    chunks of permutations (``n_jobs`` threads within each, default 1); the same seed
    gives the same numbers as a serial run."""
    if not (isinstance(n, (int, np.integer)) and n >= 1):
        raise ValueError("n must be a positive integer")
    _executor.check(executor)
    n_jobs = _n_jobs(1 if executor is not None and n_jobs is None else n_jobs)
    names = list(res.fe_names)
    idx = [i for i, nm in enumerate(names) if nm != "_cons"]
    if not idx:
        raise ValueError("the model has no moderators to permute")
    if res.model.fe_constraints is not None:
        raise ValueError("permutation tests with fixed-effect constraints are not defined")
    obs_z = np.abs(res.zvalues.values)
    obs_q = _wald(res.params.values, res.cov_params().values, idx)
    seeds = np.random.SeedSequence(seed).spawn(n)
    out = _replicates(_permutation_replicate, _permutation_chunk, res.model, seeds,
                      (np.asarray(res.theta, dtype=float), idx), n_jobs, executor)
    z_perm = np.array([o[0] for o in out])
    q_perm = np.array([o[1] for o in out])
    rows = [("Q_M (moderators)", obs_q, (1 + np.sum(q_perm >= obs_q - 1e-12)) / (n + 1),
             float(_dist.chi2_sf(obs_q, len(idx))))]
    for i, nm in enumerate(names):
        if nm == "_cons":
            continue              # a constant column is unchanged by permuting rows
        rows.append((nm, float(res.zvalues.values[i]),
                     (1 + np.sum(z_perm[:, i] >= obs_z[i] - 1e-12)) / (n + 1),
                     float(res.pvalues.values[i])))
    return pd.DataFrame(rows, columns=["term", "statistic", "p_perm", "p_asymptotic"]).set_index("term")
