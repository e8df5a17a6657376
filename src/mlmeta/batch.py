"""Fit one model specification many times: :class:`Model` and :func:`fit_batch`.

``Model`` parses the formula and builds the sorted, precomputed design once;
``model.fit(y=..., variance=...)`` refits with a new outcome or new sampling
variances without re-parsing. ``fit_batch(model, Y)`` fits every column of ``Y``
(simulated replicates, bootstrap outcomes) with the whole optimisation (EM and
Newton steps) in compiled code, the GIL released, and the columns shared out
over threads (see :mod:`mlmeta._core._engine`), or over the workers of an
``executor`` (processes, a Dask cluster). Models pickle (the compiled problem is
rebuilt on first use), so they travel to other processes.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from mlmeta import _dist
from mlmeta import _executor
from mlmeta._errors import warn
from mlmeta._threads import blas_threads, fit_threads, one_blas_thread
from mlmeta.api import build_model, constrained_design
from mlmeta.design import build_design
from mlmeta.mixed import MixedResults, build_mixed_model, check_outcome
from mlmeta.model import NestedModel
from mlmeta.optimize import fit_model
from mlmeta.refit import concat_fits, fit_outcomes, simulate_outcomes
from mlmeta.rotation import rotated_twin
from mlmeta.summary import confidence_level
from mlmeta.results import MeregressResults
from mlmeta.validate import aligned
from mlmeta.validate import safeguard as _safeguard
from mlmeta.validate import n_jobs as _n_jobs

__all__ = ["Model", "fit_batch", "BatchResults"]

class Model:
    """A parsed model, ready to be fitted to new outcomes or sampling variances.

    The formula is parsed and the sorted, precomputed design built once; each
    :meth:`fit` then only swaps in the outcome (or the sampling variances) and runs
    the compiled engine. With ``se=``, ``variance=`` or ``V=`` the model is a
    meta-regression (:func:`meregress`); without, a mixed model on raw data with
    the residual variance estimated (:func:`mixed`).

    Parameters
    ----------
    formula : str
        Model formula, as :func:`meregress`.
    data : pandas.DataFrame
        The data; its used rows fix the design.
    se, variance, V : optional
        Sampling standard errors, variances or covariance (at most one).
    method : {"reml", "ml"}
        Estimation method.
    covariance, constraints, collinear
        As in :func:`meregress`.

    Attributes
    ----------
    formula : str
        The formula.
    data : pandas.DataFrame
        The data, handed to every fit's results (for :meth:`~MeregressResults.anova`,
        marginal means and plots by data column).
    method : str
        "reml" or "ml".
    mixed : bool
        True for a mixed model on raw data (no sampling variances).
    nobs : int
        Rows used by the model.

    Raises
    ------
    ValueError
        For the input problems :func:`meregress` and :func:`mixed` reject.

    See Also
    --------
    fit_batch : fit many outcome vectors in one call of the compiled engine.

    Notes
    -----
    A model pickles (the compiled problem is rebuilt on first use after unpickling),
    so it can be sent to worker processes or a Dask cluster (``executor=``).

    Examples
    --------
    >>> import mlmeta
    >>> df = mlmeta.datasets.load("schoolcal")
    >>> M = mlmeta.Model("stdmdiff ~ 1 + (1 | district) + (1 | district:school)", df,
    ...                  variance="var")
    >>> print(f"{M.fit().llf:.4f}")
    -7.9587
    >>> Y = M.simulate(4, seed=1)           # 4 outcome vectors from the fitted model
    >>> Y.shape
    (56, 4)
    >>> print(f"{M.fit(y=Y[:, 0]).params['_cons']:.4f}")
    0.1114
    """

    def __init__(self, formula, data, *, se=None, variance=None, V=None, method="reml",
                 covariance=None, constraints=None, collinear=False):
        self.formula = formula
        self.data = data
        self.method = method
        self._covariance = covariance
        self._constraints = constraints
        self.mixed = se is None and variance is None and V is None
        if self.mixed:
            self.model, self.frame, self.parsed = build_mixed_model(
                formula, data, method=method, covariance=covariance, constraints=constraints,
                collinear=collinear)
        else:
            self.model, self.frame, self.parsed = build_model(
                formula, data, se=se, variance=variance, V=V, method=method,
                covariance=covariance, constraints=constraints, collinear=collinear)

    @property
    def nobs(self) -> int:
        """Number of rows the model uses."""
        return int(self.model.n_obs)

    def _aligned(self, values, what):
        """Rows over every data row or over the used ones: arrays by position, a pandas
        Series or DataFrame aligned on the data's index (see :func:`mlmeta.validate.aligned`)."""
        index, sample = self.frame.data_index, self.frame.sample
        if index is not None and isinstance(values, (pd.Series, pd.DataFrame)):
            used = len(values) != len(index) and len(values) == self.nobs
            values = aligned(values, index[sample] if used else index, what)
        a = np.asarray(values, dtype=float)
        if a.ndim and a.shape[0] == sample.shape[0]:
            a = a[sample]
        return a

    def _used(self, values, what):
        """Values over the used rows, given over them or over every data row."""
        a = self._aligned(values, what)
        if a.ndim != 1:
            raise ValueError(f"{what} must be one-dimensional, got shape {a.shape}")
        if a.shape[0] != self.nobs:
            raise ValueError(f"{what} has {a.shape[0]} rows; the model uses {self.nobs} of "
                             f"{self.frame.sample.shape[0]} data rows")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{what} has missing or infinite values")
        return a

    def _rebuilt(self, y=None, variance=None):
        frame = self.frame
        if y is not None:
            frame = dataclasses.replace(frame, y=self._used(y, "y"))
        yc, Xc, fc = constrained_design(frame, self._constraints)
        if y is not None and self.mixed:
            check_outcome(yc, Xc, self.parsed.response)
        d = self.model.design
        if variance is not None:
            v = self._used(variance, "variance")
            if not np.all(v > 0):
                raise ValueError("sampling variances must be positive")
        elif d.Lambda is not None:
            v = None
        else:
            v = None if self.mixed else d.variance[np.argsort(d.perm)]
        V = None
        if variance is None and d.Lambda is not None:
            inv = np.argsort(d.perm)
            V = d.Lambda[inv][:, inv]
        design = build_design(yc, Xc, frame.Z, frame.groups, v, V=V, n_tree=frame.n_tree)
        model = NestedModel(design, self.model.structs, self.method,
                            residual="profiled" if self.mixed else "known", fe_constraints=fc,
                            cluster_labels=self.model.cluster_labels)
        return model, frame

    @one_blas_thread
    def fit(self, y=None, *, variance=None, se=None, **options):
        """Fit to the model's data, or to a new outcome and/or new sampling variances.

        Parameters
        ----------
        y : array-like or pandas.Series, optional
            New outcome: one value per used row, or per data row (a Series is
            aligned on the data's index). Default: the data's outcome.
        variance, se : array-like, optional
            New sampling variances or standard errors (meta-regressions only).
        **options
            Optimiser options of :func:`meregress` (``em_iter``, ``maxiter``,
            ``tol``, ``safeguard``, ...).

        Returns
        -------
        MeregressResults or MixedResults
            The same results object as :func:`meregress` / :func:`mixed`.

        Raises
        ------
        ValueError
            For values of the wrong length, missing or infinite values,
            non-positive variances, both ``variance`` and ``se``, or sampling
            variances for a mixed model.

        Examples
        --------
        >>> import mlmeta
        >>> df = mlmeta.datasets.load("schoolcal")
        >>> M = mlmeta.Model("stdmdiff ~ 1 + (1 | district)", df, variance="var")
        >>> res = M.fit(variance=2 * df["var"])       # twice the sampling variances
        >>> print(f"{res.params['_cons']:.4f}")
        0.1996
        """
        if se is not None:
            if variance is not None:
                raise ValueError("give variance= or se=, not both")
            variance = self._used(se, "se") ** 2
        if variance is not None and self.mixed:
            raise ValueError("a mixed model on raw data has no sampling variances")
        model, frame = self._rebuilt(y, variance)
        record = fit_model(model, **options)
        cls = MixedResults if self.mixed else MeregressResults
        return cls(model, frame, record, depvar=self.parsed.response,
                   options={"formula": self.formula}, data=self.data)

    def simulate(self, n, *, seed=None, theta=None, beta=None):
        """Outcomes simulated from the model, one column per replicate.

        ``y = X beta + sum_l Z_l u_l + e`` with ``u_l ~ N(0, Sigma_l)`` per group and
        ``e ~ N(0, Lambda)`` (``N(0, sigma^2 I)`` for a mixed model).

        Parameters
        ----------
        n : int
            Number of replicates.
        seed : int, numpy.random.SeedSequence or numpy.random.Generator, optional
            Seed of the draws.
        theta, beta : array-like, optional
            Covariance parameters (estimation metric) and fixed effects; default the
            estimates of a fit to the model's own data.

        Returns
        -------
        numpy.ndarray
            (nobs, n) outcomes, rows as the used data rows.

        Examples
        --------
        >>> import mlmeta
        >>> df = mlmeta.datasets.load("schoolcal")
        >>> M = mlmeta.Model("stdmdiff ~ 1 + (1 | district)", df, variance="var")
        >>> M.simulate(3, seed=0).shape
        (56, 3)
        """
        if theta is None or beta is None:
            res = self.fit()
            theta = res.theta if theta is None else theta
            beta = res.params.values if beta is None else beta
        return simulate_outcomes(self.model, self.frame.X @ np.asarray(beta), n, theta=theta,
                                 seed=seed)


@dataclasses.dataclass
class BatchResults:
    """Fits of many outcome vectors (:func:`fit_batch`): one row per column of Y.

    Attributes
    ----------
    params, bse : pandas.DataFrame
        Fixed effects and their standard errors, one row per fit.
    llf : numpy.ndarray
        Log-likelihoods (NaN where a fit failed).
    theta : numpy.ndarray
        (n_fits, n_theta) covariance parameters in the estimation metric.
    converged : numpy.ndarray of bool
        Whether each fit met the convergence criterion.
    n_iter, n_evals : numpy.ndarray
        Newton iterations and objective evaluations per fit.
    re_cov : dict
        Grouping term -> (n_fits, q, q) random-effects covariance matrices
        (relative to sigma^2 for mixed models: multiply by ``scale``).
    scale : numpy.ndarray or None
        Residual variances (mixed models), else None.

    Examples
    --------
    >>> import mlmeta
    >>> df = mlmeta.datasets.load("schoolcal")
    >>> M = mlmeta.Model("stdmdiff ~ 1 + (1 | district) + (1 | district:school)", df,
    ...                  variance="var")
    >>> batch = mlmeta.fit_batch(M, M.simulate(4, seed=1), n_jobs=1)
    >>> batch.params.round(4)
        _cons
    0  0.1114
    1  0.1715
    2  0.1939
    3  0.1971
    >>> batch.re_cov["district"].shape
    (4, 1, 1)
    """

    params: pd.DataFrame
    bse: pd.DataFrame
    llf: np.ndarray
    theta: np.ndarray
    converged: np.ndarray
    n_iter: np.ndarray
    n_evals: np.ndarray
    re_cov: dict
    scale: np.ndarray | None = None       # residual variances (mixed models)

    def conf_int(self, level=95.0, *, alpha=None):
        """Wald intervals ``params -+ z bse`` per fit at ``level`` percent.

        Parameters
        ----------
        level : float
            Confidence level in percent.
        alpha : float, optional
            ``1 - level / 100``, as statsmodels spells it.

        Returns
        -------
        tuple of pandas.DataFrame
            (lower, upper), each shaped like :attr:`params`.
        """

        z = _dist.norm_ppf(0.5 + confidence_level(level, alpha) / 200.0)
        return self.params - z * self.bse, self.params + z * self.bse


def _batchable(model: Model):
    """None when new outcome vectors can be fitted on the model's own problem, else why not."""
    if not model.model.problem.new_outcomes and rotated_twin(model.model) is None:
        return "a full sampling covariance V"
    if model.model.fe_constraints is not None:
        return "fixed-effect constraints"
    return None


def fit_batch(model: Model, Y, *, n_jobs=None, em_iter=20, maxiter=1000, tol=1e-6,
              theta0=None, executor=None, safeguard=False) -> BatchResults:
    """Fit every column of ``Y`` with the model's design and sampling variances.

    The whole optimisation (EM, then Newton steps) runs in the compiled engine with
    the GIL released, reusing the model's precomputed design; the columns are shared
    out over ``n_jobs`` Python threads. Each column starts where its single fit
    starts, and its EM hands over to Newton once a positive definite Hessian puts the
    optimum close by (not necessarily after ``em_iter`` iterations, the most it runs).
    A fit costs tens of microseconds for a model
    of the size of schoolcal, so thousands of replicates (simulation studies,
    parametric bootstraps) take well under a second. Models whose outcome cannot be
    swapped in the precomputed problem (a full ``V`` coupling rows, fixed-effect
    constraints) are refitted column by column with :meth:`Model.fit`, which runs
    the same engine. Each fit is then checked as a single fit is (the stationarity
    check; a fit that still has not converged is made again by :meth:`Model.fit`'s route
    and the better one kept). The extra starts of a single fit are off by default (a
    simulation study fits thousands of outcomes, each several times faster without
    them); with ``safeguard=True`` or ``"auto"`` (as in :func:`mlmeta.meregress`) a
    column gets the fit :meth:`Model.fit` would give it.

    With an ``executor`` the columns are cut into a few contiguous chunks per worker,
    each fitted there (with ``n_jobs`` threads, default 1) and the model sent once per
    chunk (once per worker on Dask); every column is fitted as in a serial run, so the
    results are the same numbers whatever the executor and its number of workers.

    Parameters
    ----------
    model : Model
        The parsed model.
    Y : array-like
        (rows, replicates) outcomes, rows as the used data rows or as all data rows;
        a vector is one replicate.
    n_jobs : int, optional
        Threads; default all cores.
    em_iter, maxiter, tol : int, int, float
        EM iterations (at most), Newton iterations and gradient tolerance of each fit.
    theta0 : array-like, optional
        Start of every fit (estimation metric); default each column's own moment start,
        the one of its single fit.
    safeguard : {False, "auto", True}
        Extra starts for each fit, as in :func:`mlmeta.meregress` (default: none).
    executor : concurrent.futures.Executor or distributed.Client, optional
        Runs the chunks of columns on its workers (threads, processes, a Dask
        cluster); the model is pickled to them. Default: this process's threads.

    Returns
    -------
    BatchResults
        One row per column. A fit that fails (the objective undefined at its
        optimum) has NaN estimates and ``converged=False``.

    Raises
    ------
    ValueError
        If ``Y`` is not 1-D or 2-D, has the wrong number of rows, or has missing or
        infinite values, or if ``executor`` has no ``submit`` method.

    Examples
    --------
    >>> import mlmeta
    >>> df = mlmeta.datasets.load("schoolcal")
    >>> M = mlmeta.Model("stdmdiff ~ 1 + (1 | district) + (1 | district:school)", df,
    ...                  variance="var")
    >>> Y = M.simulate(200, seed=1)
    >>> batch = mlmeta.fit_batch(M, Y, n_jobs=2)
    >>> bool(batch.converged.all()), batch.params.shape
    (True, (200, 1))
    >>> print(f"{batch.params['_cons'].mean():.2f}")          # the truth is 0.18
    0.18

    The same fits on two worker processes give the same numbers:

    >>> from concurrent.futures import ProcessPoolExecutor
    >>> with ProcessPoolExecutor(2) as ex:
    ...     on_pool = mlmeta.fit_batch(M, Y, executor=ex)
    >>> bool((on_pool.params == batch.params).all().all())
    True
    """
    _executor.check(executor)
    n_jobs = _n_jobs(1 if executor is not None and n_jobs is None else n_jobs)
    if np.ndim(Y) not in (1, 2):
        raise ValueError(f"Y must be a vector or a 2-D array (rows x replicates), got shape {np.shape(Y)}")
    Y = model._aligned(Y, "Y")
    Y = Y[:, None] if Y.ndim == 1 else Y
    if Y.shape[0] != model.nobs:
        raise ValueError(f"Y has {Y.shape[0]} rows; the model uses {model.nobs} rows")
    if not np.all(np.isfinite(Y)):
        raise ValueError("Y has missing or infinite values")
    options = (n_jobs, em_iter, maxiter, tol, theta0, _safeguard(safeguard))
    if executor is None:
        out = _fit_columns(model, Y, options)
    else:
        m = Y.shape[1]
        parts = [Y[:, a:b] for a, b in _executor.chunks(m, executor)]
        out = concat_fits(_executor.run(executor, _fit_columns_apart, model, parts, options))
    failed = int(np.sum(~np.isfinite(out["llf"])))
    if failed:
        warn(f"{failed} of {Y.shape[1]} fits failed (NaN estimates, converged=False): the objective "
             f"is undefined, or cannot be computed accurately, at their optimum; Model.fit on such "
             f"an outcome says why", UserWarning)
    names = model.frame.fe_names
    groups = [t.group for t in model.frame.terms]
    profiled = model.model.residual == "profiled"
    return BatchResults(params=pd.DataFrame(out["beta"], columns=names),
                        bse=pd.DataFrame(out["se"], columns=names), llf=out["llf"],
                        theta=out["theta"], converged=out["converged"], n_iter=out["n_iter"],
                        n_evals=out["n_evals"], re_cov=dict(zip(groups, out["Sigma"])),
                        scale=out["sigma2"] if profiled and "sigma2" in out else None)


def _column_fit(model: Model, y, groups, options) -> dict:
    """One column of a batch by :meth:`Model.fit`; NaN estimates and converged=False when
    the fit is refused (its objective fails or is inaccurate at the optimum)."""
    try:
        f = model.fit(y, **options)
    except ValueError:
        m = model.model
        p, k = len(model.frame.fe_names), m.n_theta
        return dict(beta=np.full(p, np.nan), se=np.full(p, np.nan), llf=np.nan,
                    theta=np.full(k, np.nan), converged=False, n_iter=0, n_evals=0,
                    Sigma=[np.full((s.q, s.q), np.nan) for s in m.structs])
    return dict(beta=f.params.values, se=f.bse.values, llf=f.llf, theta=f.theta,
                converged=f.converged, n_iter=f.n_iter, n_evals=f.fit_record.n_evals,
                Sigma=[f.re_cov[g].values for g in groups])


def _fit_columns(model: Model, Y, options) -> dict:
    """Fits of the columns of Y (one task of :func:`fit_batch`): a dict of per-column
    arrays beta, se, llf, theta, converged, n_iter, n_evals, Sigma (per level) and, from
    the engine's batch path, sigma2. BLAS runs at one thread (the same numbers wherever
    the task runs)."""
    with blas_threads(1):
        return _fit_columns_here(model, Y, options)


def _fit_columns_apart(model: Model, Y, options) -> dict:
    """:func:`_fit_columns` on an executor's worker, beside the others: the extra starts of
    its fits at one kernel thread (:func:`mlmeta._threads.fit_threads`)."""
    with fit_threads(1):
        return _fit_columns(model, Y, options)


def _fit_columns_here(model: Model, Y, options) -> dict:
    n_jobs, em_iter, maxiter, tol, theta0, safeguard = options
    groups = [t.group for t in model.frame.terms]
    if _batchable(model) is not None:
        options = dict(em_iter=em_iter, maxiter=maxiter, tol=tol, safeguard=safeguard)
        rows = [_column_fit(model, Y[:, j], groups, options) for j in range(Y.shape[1])]
        keys = ("beta", "se", "llf", "theta", "converged", "n_iter", "n_evals")
        out = {k: np.array([r[k] for r in rows]) for k in keys}
        out["Sigma"] = [np.array([r["Sigma"][lvl] for r in rows]) for lvl in range(len(groups))]
        return out
    out = fit_outcomes(model.model, Y, theta0=theta0, em_iter=em_iter, maxiter=maxiter, tol=tol,
                       n_jobs=n_jobs, safeguard=safeguard)
    failed = ~np.isfinite(out["deviance"])
    return dict(beta=out["beta"], se=out["se"], llf=np.where(failed, np.nan, -0.5 * out["deviance"]),
                theta=out["theta"], converged=out["converged"], n_iter=out["n_iter"],
                n_evals=out["n_evals"], Sigma=out["Sigma"], sigma2=out["sigma2"])
