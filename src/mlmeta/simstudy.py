"""Simulation studies of analysis strategies for repeated-measures data.

For every cell of a design grid and every replicate r = 0..n_sim-1, one dataset is
drawn by :func:`mlmeta.simulate.lmm` (J = ``n_groups`` groups of ``n_obs`` rows,
``n_coef`` covariates, group coefficients ~ N(beta, group_sd^2), noise N(0, noise_sd^2);
``null=True`` sets the true slopes to 0) and analysed by each strategy::

    mixed_full       mixed(DV ~ IV1 + .. + IVk + (IV1 + .. + IVk | Group)), Satterthwaite t
    mixed_intercept  mixed(DV ~ IV1 + .. + IVk + (1 | Group)), Satterthwaite t
    ols_cluster      ols(DV ~ IV1 + .. + IVk, cluster=Group), CR1S, t on J - p df
    two_stage_ols    two_stage(..., second_stage="ols"), one-sample t on J - 1 df
    two_stage_meta   two_stage(..., second_stage="meta"), REML, t on J - 1 df

Metrics per fit, with b the estimates, beta the truth, se and t = b / se over the
p = k + 1 coefficients (the first three are the study's of Jolly's essay)::

    coef_abs_err = sum |b - beta|        se_sum = sum se        t_sum = sum |t|
    fit_success  = the fit converged without error (mixed: no convergence failure)
    singular     = a random-effects covariance is singular (mixed models only)
    n_covered    = #{coefficients whose 95% CI contains beta};  coverage = n_covered / p
    n_reject     = #{slopes with p-value < alpha};  reject_rate = n_reject / k
                   (the false-positive rate when ``null=True``, power otherwise)

Seeding: replicate r of a cell uses ``np.random.SeedSequence(seed, spawn_key=(key(cell), r))``
with ``key`` a hash of the cell's parameters, so every replicate's data (and result)
is the same whatever the order, the parallelism, the other cells of the grid, or an
interrupted and resumed run.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import itertools
import os
import sys
import time
import warnings

import numpy as np
import pandas as pd

from mlmeta import _dist
from mlmeta import _executor
from mlmeta._threads import blas_threads, fit_threads

__all__ = ["run", "cells", "replicate", "summarize", "plot", "STRATEGIES", "ESSAY_GRID",
           "ESSAY_STRATEGIES"]

STRATEGIES = ("mixed_full", "mixed_intercept", "ols_cluster", "two_stage_ols", "two_stage_meta")
ESSAY_STRATEGIES = ("mixed_full", "mixed_intercept", "ols_cluster", "two_stage_ols")
ESSAY_GRID = {"n_groups": [10, 30, 100], "n_obs": [5, 25, 100], "group_sd": [0.1, 0.25, 1.0, 2.0, 4.0]}
GRID_KEYS = ("n_groups", "n_obs", "group_sd", "n_coef", "noise_sd", "null")
GRID_DEFAULTS = {"n_coef": 3, "noise_sd": 1.0, "null": False}
OPTIONS = {"alpha": 0.05, "ols_type": "CR1S", "mixed_df": "satterthwaite", "meta_test": "t",
           "meta_method": "reml", "mixed_safeguard": "auto", "blas_threads": 1}
METRICS = ("coef_abs_err", "se_sum", "t_sum", "fit_success", "converged", "singular",
           "n_covered", "coverage", "n_reject", "reject_rate")


# -- design ---------------------------------------------------------------------
def cells(grid) -> list:
    """The cells of a design grid: the cartesian product of its values.

    Parameters
    ----------
    grid : dict
        Lists over ``n_groups``, ``n_obs``, ``group_sd`` (required) and ``n_coef``,
        ``noise_sd``, ``null``; a scalar is a one-value list.

    Returns
    -------
    list of dict
        One dict per cell, in the grid's key order, completed with the defaults
        n_coef=3, noise_sd=1, null=False.

    Raises
    ------
    ValueError
        For unknown keys or a missing required key.

    Examples
    --------
    >>> from mlmeta import simstudy
    >>> len(simstudy.cells(simstudy.ESSAY_GRID))
    45
    >>> simstudy.cells({"n_groups": 10, "n_obs": 5, "group_sd": [0.1, 1]})[1]
    {'n_groups': 10, 'n_obs': 5, 'group_sd': 1.0, 'n_coef': 3, 'noise_sd': 1.0, 'null': False}
    """
    grid = dict(grid)
    bad = set(grid) - set(GRID_KEYS)
    if bad:
        raise ValueError(f"unknown grid keys {sorted(bad)}; use {list(GRID_KEYS)}")
    for k in ("n_groups", "n_obs", "group_sd"):
        if k not in grid:
            raise ValueError(f"the grid needs {k!r}")
    lists = {k: (list(v) if isinstance(v, (list, tuple, np.ndarray, range)) else [v])
             for k, v in grid.items()}
    for k, v in GRID_DEFAULTS.items():
        lists.setdefault(k, [v])
    keys = list(lists)
    out = []
    for combo in itertools.product(*(lists[k] for k in keys)):
        c = dict(zip(keys, combo))
        out.append({"n_groups": int(c["n_groups"]), "n_obs": int(c["n_obs"]),
                    "group_sd": float(c["group_sd"]), "n_coef": int(c["n_coef"]),
                    "noise_sd": float(c["noise_sd"]), "null": bool(c["null"])})
    return out


def cell_label(cell) -> str:
    """A stable text key of a cell: its parameters in GRID_KEYS order."""
    return ",".join(f"{k}={cell[k]!r}" for k in GRID_KEYS)


def _cell_key(cell) -> int:
    return int.from_bytes(hashlib.sha256(cell_label(cell).encode()).digest()[:4], "little")


def replicate_seed(seed, cell, rep) -> np.random.SeedSequence:
    """The SeedSequence of replicate ``rep`` of ``cell``."""
    return np.random.SeedSequence(int(seed), spawn_key=(_cell_key(cell), int(rep)))


# -- one replicate -------------------------------------------------------------------
def _singular(res, tol=1e-4) -> bool:
    """lme4's isSingular in an order-free form: a relative factor T_l (Sigma_l =
    sigma^2 T_l T_l') has a singular value below ``tol``."""
    return any(np.linalg.svd(T, compute_uv=False).min() < tol for T in res.model.T_list(res.theta))


def _fit(strategy, data, k, opts):
    """(estimates, se, df, converged, singular) in intercept-first order."""
    from mlmeta.mixed import mixed
    from mlmeta.ols import ols
    from mlmeta.twostage import two_stage

    ivs = [f"IV{i + 1}" for i in range(k)]
    fixed = "DV ~ " + (" + ".join(ivs) if ivs else "1")
    order = ["_cons"] + ivs
    if strategy in ("mixed_full", "mixed_intercept"):
        re = "(" + (" + ".join(ivs) if (ivs and strategy == "mixed_full") else "1") + " | Group)"
        how = opts["mixed_df"]
        res = mixed(f"{fixed} + {re}", data, safeguard=opts["mixed_safeguard"],
                    test="satterthwaite" if how == "satterthwaite" else "z")
        if how == "satterthwaite":
            df = res.df[order].to_numpy()
        elif how == "residual":
            df = np.full(len(order), res.nobs - len(order), dtype=float)
        else:
            df = np.full(len(order), np.inf)
        return (res.params[order].to_numpy(), res.bse[order].to_numpy(), df, res.converged,
                _singular(res))
    if strategy == "ols_cluster":
        res = ols(fixed, data, cluster="Group", type=opts["ols_type"])
        conv = True
    elif strategy == "two_stage_ols":
        res = two_stage(fixed, data, "Group", second_stage="ols")
        conv = True
    elif strategy == "two_stage_meta":
        res = two_stage(fixed, data, "Group", second_stage="meta", method=opts["meta_method"],
                        test=opts["meta_test"])
        conv = res.converged
    else:
        raise ValueError(f"unknown strategy {strategy!r}; strategies are {STRATEGIES}")
    return res.params[order].to_numpy(), res.bse[order].to_numpy(), res.df[order].to_numpy(), conv, np.nan


def _metrics(b, se, df, beta, alpha):
    with np.errstate(divide="ignore", invalid="ignore"):
        t = b / se
    crit = _dist.t_ppf(1 - alpha / 2, df)
    covered = np.abs(b - beta) <= crit * se
    pval = 2 * _dist.t_sf(np.abs(t), df)
    k = len(b) - 1
    n_rej = int(np.sum(pval[1:] < alpha))
    return {"coef_abs_err": float(np.sum(np.abs(b - beta))), "se_sum": float(np.sum(se)),
            "t_sum": float(np.sum(np.abs(t))), "n_covered": int(covered.sum()),
            "coverage": float(covered.mean()), "n_reject": n_rej,
            "reject_rate": n_rej / k if k else np.nan}


def replicate(cell, rep, seed, strategies=STRATEGIES, options=None, detail=False) -> list:
    """Simulate replicate ``rep`` of ``cell`` and fit each strategy.

    Parameters
    ----------
    cell : dict
        One cell of :func:`cells`.
    rep : int
        Replicate number (with ``seed`` and the cell, it fixes the data).
    seed : int
        Base seed of the study.
    strategies : tuple of str
        Names from :data:`STRATEGIES`.
    options : dict, optional
        Overrides of the study's options (see :func:`run`).
    detail : bool
        Add per-coefficient columns true_*, est_*, se_*.

    Returns
    -------
    list of dict
        One row per strategy: the cell, the metrics of the module docstring, the
        error message of a failed fit (a failure is a result, not a crash) and the
        seconds taken.

    Examples
    --------
    >>> from mlmeta import simstudy
    >>> cell = simstudy.cells({"n_groups": 10, "n_obs": 5, "group_sd": 1.0})[0]
    >>> rows = simstudy.replicate(cell, 0, seed=0, strategies=("ols_cluster", "two_stage_ols"))
    >>> [(r["strategy"], round(r["coef_abs_err"], 4), r["n_covered"]) for r in rows]
    [('ols_cluster', 1.088, 4), ('two_stage_ols', 1.6024, 4)]
    """
    from mlmeta.simulate import lmm

    opts = dict(OPTIONS, **(options or {}))
    rng = np.random.default_rng(replicate_seed(seed, cell, rep))
    k = cell["n_coef"]
    data, _, beta = lmm(cell["n_obs"], k, cell["n_groups"], group_sd=cell["group_sd"],
                        noise_sd=cell["noise_sd"], null=cell["null"], seed=rng)
    rows = []
    for s in strategies:
        row = {**cell, "cell": cell_label(cell), "sim": int(rep), "strategy": s}
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                b, se, df, conv, sing = _fit(s, data, k, opts)
            row.update(_metrics(b, se, df, beta, opts["alpha"]))
            row.update(fit_success=bool(conv and np.all(np.isfinite(se))), converged=bool(conv),
                       singular=sing, error="")
        except Exception as exc:                      # a failed fit is a result, not a crash
            b = se = np.full(k + 1, np.nan)
            row.update({m: np.nan for m in METRICS}, fit_success=False, converged=False,
                       error=f"{type(exc).__name__}: {exc}"[:200])
        row["seconds"] = time.perf_counter() - t0
        if detail:
            for i, nm in enumerate(["Intercept"] + [f"IV{j + 1}" for j in range(k)]):
                row[f"true_{nm}"], row[f"est_{nm}"], row[f"se_{nm}"] = beta[i], b[i], se[i]
        rows.append(row)
    return rows


def _run_chunk(cell, reps, seed, strategies, options, detail):
    """One unit of work: some replicates of one cell (module-level so it pickles)."""
    out = []
    with blas_threads(dict(OPTIONS, **(options or {}))["blas_threads"]), fit_threads(1):
        for rep, strats in reps:
            out.extend(replicate(cell, rep, seed, strats or strategies, options, detail))
    return out


# -- storage -------------------------------------------------------------------------
class _Store:
    """Rows saved incrementally to CSV (appended) or parquet (rewritten)."""

    def __init__(self, path, seed):
        self.path, self.seed = path, int(seed)
        self.kind = (None if path is None
                     else "parquet" if str(path).endswith((".parquet", ".pq")) else "csv")
        self.previous = pd.DataFrame()     # everything in the file (parquet: also what we wrote)
        self.pending = []
        self.last = time.monotonic()
        if path is not None and os.path.exists(path) and os.path.getsize(path) > 0:
            self.previous = pd.read_parquet(path) if self.kind == "parquet" else pd.read_csv(path)
            if "seed" in self.previous and len(self.previous) and (self.previous["seed"] != self.seed).any():
                raise ValueError(f"{path} holds results of another seed "
                                 f"({sorted(self.previous['seed'].unique())}); use another path")
        self.initial = self.previous       # what the file held before this run

    def done(self):
        if self.previous.empty:
            return set()
        p = self.previous
        return set(zip(p["cell"], p["sim"].astype(int), p["strategy"]))

    def add(self, rows, force=False):
        if self.path is None:
            return
        for r in rows:
            r["seed"] = self.seed
        if self.kind == "csv":
            frame = pd.DataFrame(rows)
            new = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
            if not new:
                cols = pd.read_csv(self.path, nrows=0).columns
                if list(cols) != list(frame.columns):
                    raise ValueError(f"{self.path} has other columns than these results "
                                     "(another detail= setting?); use another path")
            with open(self.path, "a") as fh:
                fh.write(frame.to_csv(index=False, header=new))
                fh.flush()
            return
        self.pending.extend(rows)
        if force or time.monotonic() - self.last > 10:
            self.flush()

    def flush(self):
        if self.kind != "parquet" or not self.pending:
            return
        frame = pd.concat([self.previous, pd.DataFrame(self.pending)], ignore_index=True)
        tmp = f"{self.path}.tmp"
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, self.path)
        self.previous, self.pending, self.last = frame, [], time.monotonic()


# -- progress ------------------------------------------------------------------------
class _Progress:
    def __init__(self, total, enabled):
        self.total, self.n, self.t0 = total, 0, time.monotonic()
        self.bar = None
        self.enabled = enabled and total > 0
        if self.enabled:
            try:
                from tqdm.auto import tqdm
                self.bar = tqdm(total=total, unit="rep", desc="simstudy")
            except ImportError:
                self.bar = None

    def update(self, n):
        self.n += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            return
        el = time.monotonic() - self.t0
        eta = el / self.n * (self.total - self.n) if self.n else float("nan")
        sys.stderr.write(f"\rsimstudy: {self.n}/{self.total} replicates ({100 * self.n / self.total:.0f}%), "
                         f"elapsed {el:.0f}s, eta {eta:.0f}s ")
        sys.stderr.flush()

    def close(self):
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            sys.stderr.write("\n")


# -- execution -----------------------------------------------------------------------
def run(grid=None, strategies=STRATEGIES, n_sim=50, seed=0, *, executor=None, n_jobs=None, path=None,
        progress=True, chunksize=5, options=None, detail=False) -> pd.DataFrame:
    """Run a simulation study; return one row per cell x replicate x strategy.

    Parameters
    ----------
    grid : dict, optional
        Lists over n_groups, n_obs, group_sd (required) and n_coef, noise_sd, null
        (defaults 3, 1.0, False); default :data:`ESSAY_GRID`.
    strategies : tuple of str
        Names from :data:`STRATEGIES` (module docstring).
    n_sim : int
        Replicates per cell.
    seed : int
        Base seed of every replicate's SeedSequence.
    executor : optional
        None (local processes), or anything with ``submit(fn, *args)`` returning
        futures with ``.result()``: a concurrent.futures executor, a Dask
        ``distributed.Client``, ...
    n_jobs : int, optional
        Processes when ``executor`` is None (default ``os.cpu_count()``; 1 runs in
        this process).
    path : str, optional
        CSV or parquet file (by extension) receiving rows as replicates finish; a
        rerun with the same path skips the replicates already there.
    progress : bool
        Show a progress bar (tqdm if installed).
    chunksize : int
        Replicates per task.
    options : dict, optional
        Overrides of the options: alpha, ols_type, mixed_df
        ("satterthwaite", "residual" or "z"), meta_test, meta_method,
        mixed_safeguard (the ``safeguard`` of :func:`mlmeta.mixed`), blas_threads
        (BLAS threads per worker while fitting, default 1, None leaves them).
    detail : bool
        Add per-coefficient columns true_*, est_*, se_*.

    Returns
    -------
    pandas.DataFrame
        One row per cell x replicate x strategy. Columns: the cell parameters,
        ``cell`` (its label), ``sim``, ``strategy``, the metrics of the module
        docstring, ``error``, ``seconds`` and ``seed``.

    Raises
    ------
    ValueError
        For unknown strategies or options, a bad grid, or a ``path`` holding
        results of another seed.

    Examples
    --------
    >>> from mlmeta import simstudy
    >>> grid = {"n_groups": 10, "n_obs": 5, "group_sd": [0.25, 1.0]}
    >>> results = simstudy.run(grid, strategies=("mixed_intercept", "ols_cluster"), n_sim=4,
    ...                        seed=0, n_jobs=1, progress=False)
    >>> results.shape
    (16, 22)
    >>> results.groupby("strategy")["fit_success"].mean()
    strategy
    mixed_intercept    1.0
    ols_cluster        1.0
    Name: fit_success, dtype: float64
    """
    grid = ESSAY_GRID if grid is None else grid
    _executor.check(executor)
    strategies = tuple(strategies)
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad:
        raise ValueError(f"unknown strategies {bad}; choose from {STRATEGIES}")
    unknown = set(options or {}) - set(OPTIONS)
    if unknown:
        raise ValueError(f"unknown options {sorted(unknown)}; options are {sorted(OPTIONS)}")
    all_cells = cells(grid)
    store = _Store(path, seed)
    done = store.done()
    tasks = []
    for cell in all_cells:
        lab = cell_label(cell)
        todo = []
        for rep in range(int(n_sim)):
            missing = tuple(s for s in strategies if (lab, rep, s) not in done)
            if missing:
                todo.append((rep, None if missing == strategies else missing))
        for i in range(0, len(todo), max(1, int(chunksize))):
            tasks.append((cell, todo[i:i + int(chunksize)]))
    total = sum(len(t[1]) for t in tasks)
    bar = _Progress(total, progress)
    rows = []
    own = None
    try:
        n_jobs = (os.cpu_count() or 1) if n_jobs is None else int(n_jobs)
        if executor is None and (n_jobs <= 1 or len(tasks) <= 1):
            for cell, reps in tasks:
                out = _run_chunk(cell, reps, seed, strategies, options, detail)
                rows.extend(out)
                store.add(out)
                bar.update(len(reps))
        else:
            if executor is None:
                # forkserver: workers start from a clean process, with no copies of
                # the parent's thread pools (BLAS, the kernels' threads)
                import multiprocessing as mp

                ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods()
                                     else "spawn")
                own = executor = cf.ProcessPoolExecutor(max_workers=n_jobs, mp_context=ctx)
            futures = {}
            for cell, reps in tasks:
                fut = _executor.submit(executor, _run_chunk, cell, reps, seed, strategies, options,
                                       detail)
                futures[fut] = len(reps)
            for fut in _executor.completed(list(futures), executor):
                out = fut.result()
                rows.extend(out)
                store.add(out)
                bar.update(futures[fut])
    finally:
        if own is not None:
            own.shutdown(wait=True, cancel_futures=True)
        store.flush()
        bar.close()
    return _assemble(store.initial, rows, all_cells, strategies, n_sim, seed)


def _assemble(previous, rows, all_cells, strategies, n_sim, seed):
    new = pd.DataFrame(rows)
    if len(new):
        new["seed"] = int(seed)
    if len(previous) or len(new):
        frame = pd.concat([f for f in (previous, new) if len(f)], ignore_index=True)
    else:
        frame = pd.DataFrame(columns=list(GRID_KEYS) + ["cell", "sim", "strategy"])
    labels = {cell_label(c): i for i, c in enumerate(all_cells)}
    frame = frame[frame["cell"].isin(labels) & frame["strategy"].isin(strategies)
                  & (frame["sim"].astype(int) < int(n_sim))]
    frame = frame.drop_duplicates(["cell", "sim", "strategy"], keep="last")
    order = frame["cell"].map(labels) * 10 ** 6 + frame["sim"].astype(int) * 10 + \
        frame["strategy"].map({s: i for i, s in enumerate(strategies)})
    frame = frame.iloc[np.argsort(order.to_numpy(), kind="stable")].reset_index(drop=True)
    for col in ("fit_success", "converged", "null"):
        if col in frame:
            frame[col] = frame[col].astype(bool)
    return frame


# -- summaries and figures -------------------------------------------------------------
def summarize(results) -> pd.DataFrame:
    """Means per cell and strategy.

    Parameters
    ----------
    results : pandas.DataFrame
        The output of :func:`run`.

    Returns
    -------
    pandas.DataFrame
        Per cell and strategy: the mean metrics, fit-success / singular / coverage /
        rejection rates, mean seconds per fit and the number of replicates (n_sim).

    Examples
    --------
    >>> from mlmeta import simstudy
    >>> grid = {"n_groups": 10, "n_obs": 5, "group_sd": [0.25, 1.0]}
    >>> results = simstudy.run(grid, strategies=("mixed_intercept", "ols_cluster"), n_sim=4,
    ...                        seed=0, n_jobs=1, progress=False)
    >>> summary = simstudy.summarize(results)
    >>> summary[["group_sd", "strategy", "coverage", "n_sim"]]
       group_sd         strategy  coverage  n_sim
    0      0.25  mixed_intercept    1.0000      4
    1      0.25      ols_cluster    1.0000      4
    2      1.00  mixed_intercept    0.8125      4
    3      1.00      ols_cluster    1.0000      4
    """
    keys = [k for k in GRID_KEYS if k in results] + ["strategy"]
    num = {m: "mean" for m in ("coef_abs_err", "se_sum", "t_sum", "fit_success", "singular",
                                "coverage", "reject_rate", "seconds") if m in results}
    out = results.assign(singular=pd.to_numeric(results.get("singular"), errors="coerce"),
                         fit_success=results["fit_success"].astype(float))
    g = out.groupby(keys, sort=False)
    return g.agg(num).join(g.size().rename("n_sim")).reset_index()


def plot(results, metric="coef_abs_err", strategies=None):
    """The study's figure for one metric.

    Panels: rows = n_groups, columns = n_obs, x = group_sd; one box per strategy
    (coef_abs_err, se_sum, t_sum) or one line of means (fit_success, coverage,
    reject_rate, singular). Needs matplotlib.

    Parameters
    ----------
    results : pandas.DataFrame
        The output of :func:`run`.
    metric : str or list of str
        A metric column; a list gives a dict of figures.
    strategies : list of str, optional
        Strategies to show, in order (default: all in the results).

    Returns
    -------
    matplotlib.figure.Figure or dict

    Examples
    --------
    >>> from mlmeta import simstudy
    >>> grid = {"n_groups": 10, "n_obs": 5, "group_sd": [0.25, 1.0]}
    >>> results = simstudy.run(grid, strategies=("mixed_intercept", "ols_cluster"), n_sim=4,
    ...                        seed=0, n_jobs=1, progress=False)
    >>> fig = simstudy.plot(results, "coef_abs_err")
    >>> len(fig.axes)                         # one panel: 1 n_groups x 1 n_obs
    1
    """
    if not isinstance(metric, str):
        return {m: plot(results, m, strategies) for m in metric}
    import matplotlib.pyplot as plt

    strategies = list(strategies or pd.unique(results["strategy"]))
    rows, cols = sorted(results["n_groups"].unique()), sorted(results["n_obs"].unique())
    sds = sorted(results["group_sd"].unique())
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(3.6 * len(cols), 2.8 * len(rows)),
                             squeeze=False, sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    width = 0.8 / max(len(strategies), 1)
    box = metric in ("coef_abs_err", "se_sum", "t_sum")
    for i, ng in enumerate(rows):
        for j, no in enumerate(cols):
            ax = axes[i, j]
            sub = results[(results["n_groups"] == ng) & (results["n_obs"] == no)]
            for s_i, s in enumerate(strategies):
                col = colors[s_i % len(colors)]
                data = [pd.to_numeric(sub[(sub["strategy"] == s) & (sub["group_sd"] == sd)][metric],
                                      errors="coerce").dropna().to_numpy(float) for sd in sds]
                x = np.arange(len(sds)) + (s_i - (len(strategies) - 1) / 2) * width
                if box:
                    keep = [d if len(d) else np.array([np.nan]) for d in data]
                    bp = ax.boxplot(keep, positions=x, widths=width * 0.9, patch_artist=True,
                                    showfliers=False, manage_ticks=False)
                    for patch in bp["boxes"]:
                        patch.set_facecolor(col)
                        patch.set_alpha(0.7)
                else:
                    ax.plot(np.arange(len(sds)), [d.mean() if len(d) else np.nan for d in data],
                            marker="o", color=col, label=s)
            ax.set_xticks(np.arange(len(sds)))
            ax.set_xticklabels([f"{v:g}" for v in sds])
            if i == 0:
                ax.set_title(f"{no} obs per group")
            if j == 0:
                ax.set_ylabel(f"{ng} groups\n{metric}")
            if i == len(rows) - 1:
                ax.set_xlabel("between-group SD")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[k % len(colors)]) for k in range(len(strategies))]
    fig.legend(handles, strategies, loc="upper center", ncol=len(strategies), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return fig
