"""Influence diagnostics by deletion: metafor's for meta-regressions, lme4's for mixed models.

Notation: ``b`` and ``Var(b)`` are the full-data estimates, ``b_(-c)``, ``theta_(-c)`` the
estimates without unit c (one row, or every row of one cluster), rows ``S_c`` the rows of
c, ``V`` the marginal covariance ``Lambda + sum_l Z_l Sigma_l Z_l'`` and ``M_c(theta)`` its
``S_c`` block at ``theta`` (full-data structure). Each deletion fit is a warm-started
refit of the reduced data (:mod:`mlmeta.deletion`); the variance components are
re-estimated in every one of them (``reestimate=True``), the default of both metafor
(``cooks.distance.rma.mv`` and friends) and lme4 (``influence.merMod``).

Meta-regression (:func:`mlmeta.meregress`), as metafor for ``rma.mv``:

    cooks_distance  (b - b_(-c))' Var(b)^-1 (b - b_(-c))
    dfbetas:k       (b_k - b_(-c),k) / sqrt(Var_theta_(-c)(b)_kk)   (full-data Var at theta_(-c))
    hat             H_ii,  H = X (X'V^-1X)^-1 X'V^-1                (``hatvalues``; rows only)
    rstudent        r_i / sqrt(M_i(theta_(-i)) + x_i' Var(b_(-i)) x_i),  r_i = y_i - x_i'b_(-i)
                    (``rstudent(...)$z``; rows only)
    X2              r_c' (M_c(theta_(-c)) + X_c Var(b_(-c)) X_c')^-1 r_c       (clusters only;
                    ``rstudent(..., cluster=)$cluster$X2``)

Mixed model on raw data (:func:`mlmeta.mixed`), as lme4's ``influence.merMod``
(``groups=`` the cluster, or one row at a time) and its methods:

    cooks_distance  (m - p) / (m p) (b_(-c) - b)' Var(b)^-1 (b_(-c) - b)
                    (m deleted units, p coefficients: ``cooks.distance(influence(fit))``)
    dfbetas:k       (b_(-c),k - b_k) / sqrt(Var(b_(-c))_kk)   (the deletion fit's own Var;
                    note the sign, opposite to metafor's)
    hat             diagonal of the conditional hat matrix, y-hat = X b + Z u-hat = H y:
                    H_ii = 1 - sigma^2 P_ii, P = V^-1 - V^-1 X (X'V^-1X)^-1 X'V^-1
                    (``hatvalues(fit)``; no refits)
    rstudent        e_i / (sigma sqrt(1 - H_ii)),  e = y - X b - Z u-hat = sigma^2 P y
                    (``rstudent(fit)``: lme4's internally studentized residual, no refits)
    X2              metafor's cluster statistic above, with the deletion fit's residual
                    variance in M_c (lme4 has none)
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from mlmeta._errors import ConvergenceWarning
from mlmeta.deletion import deletion_fits
from mlmeta.validate import cluster_values
from mlmeta.validate import n_jobs as _n_jobs

__all__ = ["influence", "hat_diagonals", "marginal_weights"]


def _inverse_blocks(model, theta):
    """(start, stop, V_j^-1) per top-level cluster of the sorted design."""
    for a, b, V in model.marginal_blocks(theta):
        C = np.linalg.cholesky(V)
        Ci = np.linalg.solve(C, np.eye(b - a))
        yield a, b, Ci.T @ Ci


def marginal_weights(model, theta) -> np.ndarray:
    """diag(V^-1) over the sorted design rows: metafor's ``weights(fit)`` for ``rma.mv``
    are these divided by their sum."""
    w = np.empty(model.design.n_obs)
    for a, b, Vi in _inverse_blocks(model, theta):
        w[a:b] = np.diag(Vi)
    return w


def hat_diagonals(model, theta):
    """Over the sorted design rows: the marginal hat values ``H_ii`` of
    ``H = X (X'V^-1X)^-1 X'V^-1``, ``P_ii`` of ``P = V^-1 - V^-1 X (X'V^-1X)^-1 X'V^-1``,
    and ``P y = V^-1 (y - X b)``."""
    d = model.design
    ev = model.evaluate(theta)
    A = ev.cov_beta                      # (X'V^-1X)^-1, V absolute (times sigma^2 if profiled)
    h, P, Py = (np.empty(d.n_obs) for _ in range(3))
    r = d.y - d.X @ ev.beta
    for a, b, Vi in _inverse_blocks(model, theta):
        WX = Vi @ d.X[a:b]
        h[a:b] = np.einsum("ij,jk,ik->i", d.X[a:b], A, WX)
        P[a:b] = np.diag(Vi) - np.einsum("ij,jk,ik->i", WX, A, WX)
        Py[a:b] = Vi @ r[a:b]            # P y = V^-1 r: X'V^-1 r = 0 at the GLS estimate
    return h, P, Py


def _block(model, rows, theta, sigma2):
    """M_c(theta): the marginal covariance of the sorted rows ``rows`` (any rows, not
    necessarily one cluster), times sigma2 when the residual variance is profiled."""
    d = model.design
    if d.Lambda is not None:
        M = d.Lambda[rows][:, rows].toarray()
    elif d.variance is not None:
        M = np.diag(d.variance[rows])
    else:
        M = np.eye(rows.shape[0])
    for Z, g, S in zip(d.Z, d.groups, model.Sigma_list(theta)):
        Zc = Z[rows]
        M += (Zc @ S @ Zc.T) * (g[rows][:, None] == g[rows][None, :])
    return sigma2 * M if model.residual == "profiled" else M


def _units(res, cluster, data):
    """The deletion units: (list of sorted-row arrays, index labelling them)."""
    d = res.model.design
    if cluster is None:
        index = res._data_index()[np.asarray(res.sample, dtype=bool)]
        inv = np.argsort(d.perm)              # frame row -> sorted row
        return [inv[i:i + 1] for i in range(d.n_obs)], index
    codes, index = cluster_values(res, cluster, data)
    if len(index) < 2:
        raise ValueError(f"cluster {cluster!r} has a single cluster: deleting it leaves no data")
    sorted_codes = codes[d.perm]
    order = np.argsort(sorted_codes, kind="stable")
    bounds = np.searchsorted(sorted_codes[order], np.arange(len(index) + 1))
    return [order[bounds[u]:bounds[u + 1]] for u in range(len(index))], index


def _expand(model, gamma, cov):
    fc = model.fe_constraints
    return (gamma, cov) if fc is None else fc.expand(gamma, cov)


def influence(res, cluster=None, *, data=None, reestimate=True, n_jobs=None, tol=1e-10,
              maxiter=200) -> pd.DataFrame:
    """Influence diagnostics of every row, or of every cluster (module docstring).

    Parameters
    ----------
    res : a :func:`mlmeta.meregress` or :func:`mlmeta.mixed` result.
    cluster : None (one row at a time), a grouping term of the model, a column of
        ``data``, or an array with one value per data row or per used row: the units
        deleted together.
    data : the data the model was fitted to (only to take ``cluster`` from a column).
    reestimate : re-estimate the variance components in each deletion fit (default, as
        metafor and lme4) or hold them at the full-data estimates (metafor's
        ``reestimate=FALSE``).
    n_jobs : threads for the deletion fits (None: all cores).
    tol, maxiter : Newton tolerance and iteration limit of each deletion fit.

    Returns
    -------
    DataFrame. Rows: one per used data row (the data's index) with columns
    ``cooks_distance``, ``hat``, ``rstudent``, ``dfbetas:<coef>``; or one per cluster
    (labelled, sorted) with ``cooks_distance``, ``X2``, ``dfbetas:<coef>``. A unit whose
    deletion leaves the fixed effects unidentified has NaN values (as metafor).
    ``attrs["not_converged"]`` lists units whose deletion fit did not converge (also
    warned about) and ``attrs["failed"]`` those with NaN values.
    """
    if not isinstance(reestimate, (bool, np.bool_)):
        raise ValueError(f"reestimate must be True or False, got {reestimate!r}")
    model, theta = res.model, np.asarray(res.theta, dtype=float)
    units, index = _units(res, cluster, data)
    fits = deletion_fits(model, theta, units, reestimate=bool(reestimate), tol=tol,
                         maxiter=maxiter, n_jobs=_n_jobs(n_jobs))
    cooks, X2, dfbetas, sign = _deletion_statistics(model, theta, units, fits)
    dfb = {f"dfbetas:{nm}": dfbetas[:, k] for k, nm in enumerate(res.fe_names)}
    if cluster is None:
        rows = np.concatenate(units)             # the sorted row of each data row
        hat, rstudent = (v[rows] for v in _row_statistics(model, theta))
        if model.residual != "profiled":        # metafor: r / se, and one row's X2 = (r / se)^2
            rstudent = sign * np.sqrt(X2)
        out = pd.DataFrame({"cooks_distance": cooks, "hat": hat, "rstudent": rstudent, **dfb},
                           index=index)
    else:
        out = pd.DataFrame({"cooks_distance": cooks, "X2": X2, **dfb}, index=index)
    labels = list(out.index)
    out.attrs["failed"] = [labels[u] for u, f in enumerate(fits) if f is None]
    out.attrs["not_converged"] = [labels[u] for u, f in enumerate(fits)
                                  if f is not None and not f.converged]
    out.attrs["reestimate"] = bool(reestimate)
    if out.attrs["not_converged"]:
        warnings.warn(f"{len(out.attrs['not_converged'])} deletion fit(s) did not converge "
                      f"(first: {out.attrs['not_converged'][:3]}); see attrs['not_converged']",
                      ConvergenceWarning, stacklevel=3)
    return out


def _deletion_statistics(model, theta, units, fits):
    """Per unit: Cook's distance, X2, dfbetas (rows: units; columns: coefficients) and
    the sign of the first deleted residual (module docstring for the formulas)."""
    profiled = model.residual == "profiled"
    d = model.design
    ev = model.evaluate(theta)
    gamma, cov = ev.beta, ev.cov_beta
    b, _ = _expand(model, gamma, cov)
    m, p = len(units), gamma.shape[0]
    cov_inv = np.linalg.inv(cov)
    cooks, X2, sign = np.full(m, np.nan), np.full(m, np.nan), np.full(m, np.nan)
    dfbetas = np.full((m, b.shape[0]), np.nan)
    for u, (rows, f) in enumerate(zip(units, fits)):
        if f is None:
            continue
        delta = gamma - f.gamma
        cooks[u] = delta @ cov_inv @ delta
        b_del, cov_del = _expand(model, f.gamma, f.cov)
        if profiled:       # lme4: (b_(-c) - b) / se of the deletion fit
            num, var = b_del - b, np.diag(cov_del)
        else:              # metafor: (b - b_(-c)) / se of the full data at theta_(-c)
            num, var = b - b_del, np.diag(_expand(model, gamma, model.evaluate(f.theta).cov_beta)[1])
        with np.errstate(divide="ignore", invalid="ignore"):
            dfbetas[u] = num / np.sqrt(var)
        Xc = d.X[rows]
        r = d.y[rows] - Xc @ f.gamma
        C = _block(model, rows, f.theta, f.sigma2) + Xc @ f.cov @ Xc.T
        X2[u] = r @ np.linalg.solve(C, r)
        sign[u] = np.sign(r[0])
    if profiled:
        cooks *= (m - p) / (m * p)
    return cooks, X2, dfbetas, sign


def _row_statistics(model, theta):
    """Per sorted row, without refits: the hat value (metafor's marginal one, or lme4's
    conditional one for a profiled residual) and, for a profiled residual, lme4's
    rstudent (NaN otherwise: metafor's needs the deletion fits)."""
    h, P, Py = hat_diagonals(model, theta)
    if model.residual != "profiled":
        return h, np.full(h.shape[0], np.nan)
    sigma2 = model.evaluate(theta).sigma2
    hat = 1.0 - sigma2 * P
    with np.errstate(divide="ignore", invalid="ignore"):
        return hat, np.sqrt(sigma2) * Py / np.sqrt(1.0 - hat)     # e = sigma^2 P y
