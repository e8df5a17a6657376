"""Deletion refits: a fitted model refitted without some of its rows, many times.

Influence diagnostics (:mod:`mlmeta.influence`) need the model fitted once per deleted
row or cluster. Each reduced model is built from the fitted model's own sorted design
(rows already in cluster order, so nothing is parsed, re-encoded or re-sorted; the
sampling covariance is the matching sub-block of the known ``Lambda``) and fitted by the
same compiled engine, warm-started from the full-data estimates with Newton steps only
(no EM, no extra starts): deleting one unit moves the optimum a little, and Newton
converges to it in a few steps.

Variance components are re-estimated in every deletion fit (``reestimate=True``,
metafor's and lme4's default) or held at the full-data estimates (``reestimate=False``,
metafor's ``reestimate=FALSE``; the fixed effects are then the GLS estimates of the
reduced data at theta-hat, and a profiled residual variance is re-profiled).

A covariance parameter estimated at (or within 1e-4 typical sampling SDs of) a lower
bound of zero -- a variance on the boundary -- is started from a tenth of the reduced
model's moment start instead: near zero the deviance is flat in it (it depends on
theta^2), so a warm start there could not leave the boundary even when the deletion
moves the optimum inside.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mlmeta._threads import blas_threads, parallel_calls
from mlmeta.design import build_design
from mlmeta.model import NestedModel
from mlmeta.optimize import fit_nested, start_theta

__all__ = ["DeletionFit", "reduced_model", "deletion_fits"]

_AT_ZERO = 1e-4      # an SD below this fraction of the typical sampling SD counts as zero


@dataclass
class DeletionFit:
    """One deletion refit.

    Attributes
    ----------
    theta : covariance parameters of the reduced fit.
    gamma : fixed effects in the design's coefficients (the constrained ones when the
        model has fixed-effect constraints).
    cov : Var(gamma) of the reduced fit, (X' V^-1 X)^-1 over the remaining rows (times
        the residual variance when it is profiled).
    sigma2 : the reduced fit's residual variance when it is profiled, else 1.
    converged : whether the Newton iterations met their tolerance.
    """

    theta: np.ndarray
    gamma: np.ndarray
    cov: np.ndarray
    sigma2: float
    converged: bool


def reduced_model(model: NestedModel, keep: np.ndarray) -> NestedModel | None:
    """The model on the sorted design rows ``keep`` (a boolean mask), or None when the
    remaining rows cannot identify the fixed effects (too few rows, or a design matrix
    X that loses rank, e.g. a factor level seen only in the deleted rows)."""
    d = model.design
    keep = np.asarray(keep, dtype=bool)
    n, p = int(keep.sum()), d.n_fe
    need = p + (1 if model.residual == "profiled" else 0)
    if n <= need or n == 0:
        return None
    X = d.X[keep]
    if p and np.linalg.matrix_rank(X) < p:
        return None
    V = variance = None
    if d.Lambda is not None:
        rows = np.flatnonzero(keep)
        V = d.Lambda[rows][:, rows]
    elif d.variance is not None:
        variance = d.variance[keep]
    design = build_design(d.y[keep], X, [Z[keep] for Z in d.Z], [g[keep] for g in d.groups],
                          variance, V=V)
    return NestedModel(design, model.structs, model.method, residual=model.residual)


def _warm_start(reduced: NestedModel, theta) -> np.ndarray:
    """theta-hat, with parameters held at a lower bound of zero lifted (module docstring)."""
    theta = np.array(theta, dtype=float)
    stuck = (reduced.lower == 0.0) & (theta <= _AT_ZERO * reduced.scale)
    if stuck.any():
        lift = 0.1 * start_theta(reduced)
        theta[stuck] = np.maximum(lift[stuck], 0.0)
    return theta


def _refit(model, keep, theta, reestimate, tol, maxiter):
    reduced = reduced_model(model, keep)
    if reduced is None:
        return None
    converged = True
    try:
        if reestimate and reduced.n_theta:
            rec = fit_nested(reduced, theta0=_warm_start(reduced, theta), em_iter=0,
                             maxiter=maxiter, tol=tol, safeguard=False)
            theta, converged = rec.theta, bool(rec.converged)
        ev = reduced.evaluate(theta)
    except FloatingPointError:
        return None
    sigma2 = float(ev.sigma2) if model.residual == "profiled" else 1.0
    return DeletionFit(theta=np.asarray(theta, dtype=float).copy(), gamma=ev.beta,
                       cov=ev.cov_beta, sigma2=sigma2, converged=converged)


def deletion_fits(model: NestedModel, theta, drops, *, reestimate=True, tol=1e-10, maxiter=200,
                  n_jobs=1) -> list:
    """Fit ``model`` once without each set of rows in ``drops``.

    Parameters
    ----------
    model : the fitted model; theta : its estimates (the warm start).
    drops : sequence of integer arrays of sorted design rows (``model.design`` order).
    reestimate : re-estimate theta in each refit (True) or hold it at ``theta``.
    tol, maxiter : the Newton iterations' tolerance (see :func:`mlmeta.optimize.fit_nested`)
        and iteration limit.
    n_jobs : threads (the engine releases the GIL while it fits).

    Returns a list of :class:`DeletionFit`, None where a reduced model could not be
    built or its objective is undefined.
    """
    n = model.design.n_obs
    theta = np.asarray(theta, dtype=float)

    def one(rows):
        keep = np.ones(n, dtype=bool)
        keep[rows] = False
        return _refit(model, keep, theta, reestimate, tol, maxiter)

    with blas_threads(1):     # tiny factorisations: threaded BLAS only adds overhead
        return parallel_calls(one, [(np.asarray(r, dtype=np.intp),) for r in drops], int(n_jobs))
