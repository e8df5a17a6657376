"""Fit one model specification many times: :class:`Model` and :func:`fit_batch`.

``Model`` parses the formula and builds the sorted, precomputed design once;
``model.fit(y=..., variance=...)`` refits with a new outcome or new sampling
variances without re-parsing. ``fit_batch(model, Y)`` fits every column of ``Y``
(simulated replicates, bootstrap outcomes) with the whole optimisation (EM and
Newton steps) in compiled code, the GIL released, and the columns shared out
over threads (see :mod:`mlmeta._core._batch`).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pandas as pd

from mlmeta.api import build_model, constrained_design
from mlmeta.design import build_design
from mlmeta.mixed import MixedResults, build_mixed_model
from mlmeta.model import NestedModel
from mlmeta.optimize import fit_nested, start_theta
from mlmeta.results import MeregressResults

__all__ = ["Model", "fit_batch", "BatchResults"]

_KIND = {"identity": 0, "independent": 1, "exchangeable": 2, "unstructured": 3}


class Model:
    """A parsed model, ready to be fitted to new outcomes or sampling variances.

    ``mlmeta.Model(formula, data, variance="var")`` (or ``se=``, ``V=``) is a
    meta-regression; without sampling variances it is a mixed model on raw data
    (the residual variance estimated, as :func:`mlmeta.mixed`).
    """

    def __init__(self, formula, data, *, se=None, variance=None, V=None, method="reml",
                 covariance=None, constraints=None, collinear=False):
        self.formula = formula
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
        return int(self.model.n_obs)

    def _used(self, values, what):
        """Values over the used rows, given over them or over every data row."""
        a = np.asarray(values, dtype=float)
        if a.shape[0] == self.frame.sample.shape[0]:
            a = a[self.frame.sample]
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
        design = build_design(yc, Xc, frame.Z, frame.groups, v, V=V)
        model = NestedModel(design, self.model.structs, self.method,
                            residual="profiled" if self.mixed else "known")
        model.fe_constraints = fc
        return model, frame

    def fit(self, y=None, *, variance=None, se=None, **options):
        """Fit to a new outcome and/or new sampling variances (or SEs); returns the
        same results object as :func:`mlmeta.meregress` / :func:`mlmeta.mixed`."""
        if se is not None:
            if variance is not None:
                raise ValueError("give variance= or se=, not both")
            variance = self._used(se, "se") ** 2
        if variance is not None and self.mixed:
            raise ValueError("a mixed model on raw data has no sampling variances")
        model, frame = self._rebuilt(y, variance)
        record = fit_nested(model, **options)
        cls = MixedResults if self.mixed else MeregressResults
        return cls(model, frame, record, depvar=self.parsed.response,
                   options={"formula": self.formula})

    def simulate(self, n, *, seed=None, theta=None, beta=None):
        """Outcomes simulated from the model (n columns, rows as the used data):
        y = X beta + sum_l Z_l u_l + e with u ~ N(0, Sigma_l) per group and
        e ~ N(0, Lambda) (or N(0, sigma^2 I) for a mixed model). Defaults: the
        estimates of a fit to the model's own data."""
        rng = np.random.default_rng(seed)
        if theta is None or beta is None:
            res = self.fit()
            theta = res.theta if theta is None else theta
            beta = res.params.values if beta is None else beta
        m = self.model
        d = m.design
        sig2 = m.evaluate(np.asarray(theta)).sigma2 if self.mixed else 1.0
        Ys = np.repeat((self.frame.X @ np.asarray(beta))[d.perm][:, None], n, axis=1)
        for Z, g, G, T in zip(d.Z, d.groups, d.n_groups, m.T_list(np.asarray(theta))):
            L = np.sqrt(sig2) * T                  # any square root of Sigma_l works: T T' = Sigma_l
            u = rng.standard_normal((G, T.shape[0], n))
            u = np.einsum("ij,gjn->gin", L, u)
            Ys += np.einsum("ri,rin->rn", Z, u[g])
        if self.mixed:
            Ys += np.sqrt(sig2) * rng.standard_normal(Ys.shape)
        elif d.Lambda is not None:
            e = rng.standard_normal(Ys.shape)
            starts = d.group_start[0]
            for j in range(d.n_clusters):
                a, b = int(starts[j]), int(starts[j + 1])
                C = np.linalg.cholesky(d.Lambda[a:b, a:b].toarray())
                Ys[a:b] += C @ e[a:b]
        else:
            Ys += np.sqrt(d.variance)[:, None] * rng.standard_normal(Ys.shape)
        out = np.empty_like(Ys)
        out[d.perm] = Ys
        return out


@dataclasses.dataclass
class BatchResults:
    """Fits of many outcome vectors: one row per column of Y."""

    params: pd.DataFrame
    bse: pd.DataFrame
    llf: np.ndarray
    theta: np.ndarray
    converged: np.ndarray
    n_iter: np.ndarray
    n_evals: np.ndarray
    re_cov: dict
    scale: np.ndarray | None = None       # residual variances (mixed models)

    def conf_int(self, alpha=0.05):
        """Wald intervals per fit: (lower, upper) DataFrames."""
        from scipy import stats

        z = stats.norm.ppf(1 - alpha / 2)
        return self.params - z * self.bse, self.params + z * self.bse


def compiled_inputs(m: NestedModel):
    """The arguments of ``fit_many`` after (Yw, theta0) and before the optimiser
    settings, for a model whose structures are linear in theta (kept on the model)."""
    cached = getattr(m, "_compiled_inputs", None)
    if cached is None:
        cached = m._compiled_inputs = _compiled_inputs(m)
    return cached


def _compiled_inputs(m: NestedModel):
    d = m.design
    K = d.kernel
    w = d.weights
    Zw = [np.ascontiguousarray(z * w[:, None]) for z in d.Z]
    zw_off = np.concatenate([[0], np.cumsum([z.size for z in Zw])]).astype(np.intp)
    node_r0 = np.zeros(K.n_nodes, dtype=np.intp)
    node_r1 = np.zeros(K.n_nodes, dtype=np.intp)
    for lvl in range(d.n_levels):
        node_r0[d.node_of_group[lvl]] = d.group_start[lvl][:-1]
        node_r1[d.node_of_group[lvl]] = d.group_start[lvl][1:]
    kinds = np.array([_KIND[s.kind] for s in m.structs], dtype=np.intp)
    th_off = np.array([sl.start for sl in m.theta_slices], dtype=np.intp)
    scale = float(np.sqrt(np.median(d.variance))) if d.variance is not None else 1.0
    return (np.asfortranarray(m._M), m.lower, m.upper, kinds, th_off,
            np.asarray(d.n_groups, dtype=float), np.concatenate([z.ravel() for z in Zw]), zw_off,
            np.ascontiguousarray(d.Xw), node_r0, node_r1, m.method == "reml",
            m.residual == "profiled", float(d.logdet_Lambda), float(d.logdet_XtX), scale)


def compiled_ok(m: NestedModel, own_outcome: bool = False):
    """None when the compiled optimiser covers the model, else the reason it does not.
    ``own_outcome``: only the design's own outcome is fitted (not new outcome vectors,
    which a design whitened by a full V cannot take in compiled code)."""
    if any(s.kind not in _KIND for s in m.structs):
        return "a custom covariance structure"
    if m.design.Lambda is not None and not own_outcome:
        return "a full sampling covariance V"
    return None


def _batchable(model: Model):
    why = compiled_ok(model.model)
    if why is None and model.model.fe_constraints is not None:
        return "fixed-effect constraints"
    return why


def fit_batch(model: Model, Y, *, n_jobs=None, em_iter=20, maxiter=200, tol=1e-6,
              theta0=None) -> BatchResults:
    """Fit every column of ``Y`` (rows as the used data rows, or as all data rows)
    with the model's design and sampling variances.

    The optimisation runs in compiled code with the GIL released; columns are
    shared out over ``n_jobs`` Python threads (default: all cores). Models the compiled
    path does not cover (custom structures, full V, constraints) are fitted with
    :meth:`Model.fit` column by column.
    """
    Y = np.asarray(Y, dtype=float)
    if Y.ndim == 1:
        Y = Y[:, None]
    if Y.shape[0] == model.frame.sample.shape[0] and Y.shape[0] != model.nobs:
        Y = Y[model.frame.sample]
    if Y.shape[0] != model.nobs:
        raise ValueError(f"Y has {Y.shape[0]} rows; the model uses {model.nobs} rows")
    if not np.all(np.isfinite(Y)):
        raise ValueError("Y has missing or infinite values")
    n_jobs = int(n_jobs or os.cpu_count() or 1)
    m = model.model
    d = m.design
    names = model.frame.fe_names
    groups = [t.group for t in model.frame.terms]
    why = _batchable(model)
    if why is not None:
        fits = [model.fit(Y[:, j], em_iter=em_iter, maxiter=maxiter, tol=tol, safeguard=False)
                for j in range(Y.shape[1])]
        return BatchResults(
            params=pd.DataFrame([f.params.values for f in fits], columns=names),
            bse=pd.DataFrame([f.bse.values for f in fits], columns=names),
            llf=np.array([f.llf for f in fits]), theta=np.array([f.theta for f in fits]),
            converged=np.array([f.converged for f in fits]),
            n_iter=np.array([f.n_iter for f in fits]),
            n_evals=np.array([f.fit_record.n_evals for f in fits]),
            re_cov={g: np.array([f.re_cov[g].values for f in fits]) for g in groups})
    from mlmeta._core._batch import fit_many

    w = d.weights
    Yw = np.ascontiguousarray((Y[d.perm] * w[:, None]).T)
    if theta0 is None:
        base = start_theta(m)
        theta0 = np.repeat(base[None, :], Y.shape[1], axis=0)
    theta0 = np.ascontiguousarray(np.broadcast_to(np.asarray(theta0, dtype=float),
                                                  (Y.shape[1], m.n_theta)))
    out = fit_many(d.kernel, Yw, theta0, *compiled_inputs(m), int(em_iter), int(maxiter), float(tol),
                   n_jobs)
    theta, sig2 = out["theta"], out["sigma2"]
    # Sigma_l = T_l T_l' with T = M theta (linear structures), for every fit at once
    T_flat = theta @ np.asarray(m._M).T
    re_cov = {}
    for g, q, o in zip(groups, d.kernel.q, d.kernel.t_off):
        T = T_flat[:, o:o + q * q].reshape(-1, q, q).transpose(0, 2, 1)   # column-major blocks
        re_cov[g] = T @ T.transpose(0, 2, 1)
    if m.residual == "profiled":
        # theta is relative to the residual SD: Sigma_l = sigma^2 T_l T_l'
        for g in groups:
            re_cov[g] = re_cov[g] * sig2[:, None, None]
    return BatchResults(params=pd.DataFrame(out["beta"], columns=names),
                        bse=pd.DataFrame(out["se"], columns=names), llf=-0.5 * out["deviance"],
                        theta=theta, converged=out["converged"], n_iter=out["n_iter"],
                        n_evals=out["n_evals"],
                        re_cov=re_cov, scale=sig2 if m.residual == "profiled" else None)
