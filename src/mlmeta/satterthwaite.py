"""Satterthwaite degrees of freedom for the fixed effects of a linear mixed model.

lmerTest's method. With the variance parameters phi = (theta, sigma^2) (theta
relative to sigma, as in :func:`mlmeta.mixed`), the covariance of the fixed effects
is ``V(phi) = sigma^2 H(theta)^-1``, ``H = X' V_rel^-1 X``. For a contrast c,

    df(c) = 2 (c'Vc)^2 / (g' A g),     g_k = c' (dV / dphi_k) c,

where A is the asymptotic covariance of phi: the inverse Hessian of -ll = deviance/2,
``A = 2 [d^2 dev / dphi dphi']^+`` (Moore-Penrose inverse over eigenvalues above
1e-8, as lmerTest). The deviance is not profiled over sigma^2 (beta is, at theta):

    dev(theta, s) = dof log(2 pi s) + log|C(theta)| + rss(theta) / s  [+ log|H(theta)| - log|X'X|, REML]

with dof = n - p (REML) or n (ML). Its derivatives:

    d dev/d theta     = the kernel's gradient with Phi = gamma gamma' / s [+ diag(H^-1, 0)]
    d^2 dev/d s^2      = -dof / s^2 + 2 rss / s^3
    d^2 dev/d s d theta = -(d rss / d theta) / s^2
    d^2 dev/d theta^2  = central differences of the analytic gradient (Richardson-extrapolated)

and ``dV/ds = H^-1``, ``dV/dtheta_k = s dH^-1/dtheta_k`` by Richardson-extrapolated
central differences of H^-1. Where a step leaves the parameter space (a custom level's
correlations at the edge of the positive definite set) the step is shortened, and
where either side stays outside the differences are one-sided on the other side
(second order: ``(-3 f(0) + 4 f(h) - f(2h)) / 2h``); a parameter that cannot be moved
either way (two custom correlations at their limit together) is treated as fixed: its
row and column of the Hessian and its dV are zero. At an interior optimum df does not depend on how the
variance parameters are written (lmerTest uses lme4's theta and sigma); on the
boundary it can, as the Hessian is not invariant there.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from mlmeta import _dist
from mlmeta.summary import confidence_level

__all__ = ["satterthwaite_df", "satterthwaite_Fdf", "satterthwaite", "SatterthwaitePieces",
           "nonprofiled_deviance", "satterthwaite_pieces", "satterthwaite_ftest"]

_EIG_TOL = 1e-8
_CONTRAST_EPS = float(np.sqrt(np.finfo(float).eps))   # lmerTest's contestMD eps


def nonprofiled_deviance(model, theta, s2):
    """dev(theta, sigma^2) of the module docstring (mlmeta's REML constant)."""
    return model.evaluate(theta, sigma2=s2).deviance


def _grad_theta(model, theta, s2):
    """(d dev / d theta at fixed sigma^2, Evaluation)."""
    ev = model.evaluate(theta, gradient=True, sigma2=s2)
    return ev.grad, ev


def _pieces(model, theta, s2):
    """(gradient, rss, H^-1) at theta, or None outside the parameter space."""
    try:
        g, ev = _grad_theta(model, theta, s2)
    except FloatingPointError:
        return None
    return g, ev.rss, ev.Hinv


def _derivative(model, theta, s2, k, h, at0):
    """d/d theta_k of (gradient, rss, H^-1): Richardson-extrapolated central differences
    with steps h and h/2, shortened (by 10, up to 4 times) while a step leaves the
    parameter space, else one-sided second-order differences on the side that stays in
    (``at0``: the pieces at theta). None when neither side can be differenced."""
    m = theta.shape[0]

    def at(step):
        e = np.zeros(m)
        e[k] = step
        return _pieces(model, theta + e, s2)

    for _ in range(5):
        pts = {t: at(t) for t in (h, -h, h / 2, -h / 2)}
        if all(v is not None for v in pts.values()):
            est = [tuple((a - b) / (2 * t) for a, b in zip(pts[t], pts[-t])) for t in (h, h / 2)]
            return tuple((4 * b - a) / 3 for a, b in zip(*est))
        h /= 10.0
    for sign in (1.0, -1.0):
        f1, f2 = at(sign * h), at(2 * sign * h)
        if f1 is not None and f2 is not None:
            return tuple((-3 * a + 4 * b - c) / (2 * sign * h) for a, b, c in zip(at0, f1, f2))
    return None


class SatterthwaitePieces:
    """V = sigma^2 H^-1, its derivatives dV (m+1, p, p) over (theta, sigma^2), the
    Hessian of the deviance and A = 2 Hessian^+; coefficient space of the results
    (fixed-effect constraints applied)."""

    def __init__(self, res, rel_step=1e-3):
        model = res.model
        if getattr(model, "residual", None) != "profiled":
            raise ValueError("Satterthwaite df need a mixed model with an estimated residual "
                             "variance (mlmeta.mixed)")
        theta = np.asarray(res.theta, dtype=float)
        m = theta.shape[0]
        ev0 = model.evaluate(theta)
        s = float(ev0.sigma2)
        n, p = model.n_obs, model.n_fe
        dof = n - p if model.method == "reml" else n
        hess = np.zeros((m + 1, m + 1))
        dHinv = np.zeros((m, p, p))
        at0 = _pieces(model, theta, s)
        held = []
        for k in range(m):
            d = _derivative(model, theta, s, k, rel_step * max(abs(theta[k]), 0.1), at0)
            if d is None:      # held at the edge of the parameter space: treated as fixed
                held.append(k)
                continue
            hess[:m, k], drss, dHinv[k] = d
            hess[m, k] = hess[k, m] = -drss / s ** 2
        hess[:m, :m] = 0.5 * (hess[:m, :m] + hess[:m, :m].T)
        hess[held, :] = hess[:, held] = 0.0
        hess[m, m] = -dof / s ** 2 + 2 * ev0.rss / s ** 3
        w, U = np.linalg.eigh(hess)
        pos = w > _EIG_TOL
        self.hessian = hess
        self.eigenvalues = w
        self.A = 2.0 * (U[:, pos] / w[pos]) @ U[:, pos].T
        dV = np.concatenate([s * dHinv, ev0.Hinv[None]], axis=0)
        V = s * ev0.Hinv
        fc = getattr(model, "fe_constraints", None)
        if fc is not None:
            V = fc.N @ V @ fc.N.T
            dV = np.einsum("ia,kab,jb->kij", fc.N, dV, fc.N)
        self.V, self.dV = V, dV
        self.sigma2 = s
        self.names = list(res.fe_names)

    def df(self, L):
        """Satterthwaite df of each row c of L (contrasts over the coefficients)."""
        L = np.atleast_2d(np.asarray(L, dtype=float))
        var = np.einsum("ia,ab,ib->i", L, self.V, L)
        g = np.einsum("ia,kab,ib->ik", L, self.dV, L)
        den = np.einsum("ik,kl,il->i", g, self.A, g)
        with np.errstate(divide="ignore", invalid="ignore"):
            out = np.where(den > 0, 2.0 * var ** 2 / den, np.nan)
        return out


def satterthwaite_pieces(res) -> SatterthwaitePieces:
    """The :class:`SatterthwaitePieces` of a fit, computed once and kept on the results."""
    pieces = res.__dict__.get("_satterthwaite_pieces")
    if pieces is None:
        pieces = res.__dict__["_satterthwaite_pieces"] = SatterthwaitePieces(res)
    return pieces


def satterthwaite_df(res, L=None) -> pd.Series | np.ndarray:
    """Satterthwaite df of the fixed effects of a mixed model (lmerTest's method).

    For a contrast c, ``df(c) = 2 (c'Vc)^2 / (g' A g)`` with ``V = sigma^2 H^-1`` the
    covariance of the fixed effects, ``g_k = c' (dV / dphi_k) c`` over the variance
    parameters phi = (theta, sigma^2) and A the asymptotic covariance of phi (twice
    the inverse Hessian of the deviance); see the module :mod:`mlmeta.satterthwaite`.

    Parameters
    ----------
    res : MixedResults
        A fit of :func:`mixed`.
    L : array-like, optional
        Contrast matrix (one row per contrast, columns in ``params`` order).

    Returns
    -------
    pandas.Series or numpy.ndarray
        df per coefficient (lmerTest's ``summary(fit)``), or per row of ``L``.

    Raises
    ------
    ValueError
        For a model with known sampling variances (no residual variance).

    Examples
    --------
    >>> import mlmeta
    >>> data, _, _ = mlmeta.simulate.lmm(20, 1, 15, group_sd=0.5, seed=1)
    >>> res = mlmeta.mixed("DV ~ IV1 + (IV1 | Group)", data)
    >>> mlmeta.satterthwaite_df(res).round(1)
    IV1      11.5
    _cons    13.7
    Name: df, dtype: float64
    >>> mlmeta.satterthwaite_df(res, [[1, 1]]).shape              # IV1 + _cons
    (1,)
    """
    pieces = satterthwaite_pieces(res)
    if L is not None:
        return pieces.df(L)
    eye = np.eye(len(pieces.names))
    return pd.Series(pieces.df(eye), index=pieces.names, name="df")


def _fstat_ddf(nu, tol=1e-8) -> float:
    """lmerTest's ``get_Fstat_ddf``: one nu -> nu; (nearly) equal nus -> their mean;
    any nu <= 2 -> 2; else 2E / (E - q) with E = sum nu / (nu - 2)."""
    nu = np.asarray(nu, dtype=float)
    if nu.size == 1:
        return float(nu[0])
    if np.all(np.abs(np.diff(nu)) < tol):
        return float(nu.mean())
    if np.any(nu <= 2):
        return 2.0
    E = float(np.sum(nu / (nu - 2)))
    return 2.0 * E / (E - nu.size)


def _rotated(pieces, L, eps):
    """lmerTest's ``contestMD`` rotation: the eigen-decomposition L V L' = P D P' with the
    eigenvalues above ``eps * d_1`` (q of them) -> (d, P_q' L)."""
    L = np.atleast_2d(np.asarray(L, dtype=float))
    VL = L @ pieces.V @ L.T
    d, P = np.linalg.eigh(0.5 * (VL + VL.T))
    order = np.argsort(d)[::-1]
    d, P = d[order], P[:, order]
    pos = d > max(eps * d[0], 0.0)
    return d[pos], P[:, pos].T @ L


def satterthwaite_Fdf(res, L, eps=_CONTRAST_EPS) -> float:
    """Denominator df of the F test of ``L beta = r`` (lmerTest's ``contestMD``, the
    multi-df Satterthwaite approximation).

    With the eigen-decomposition ``L V L' = P D P'`` (eigenvalues d_m above
    ``eps * d_1``, q of them), each rotated contrast ``c_m = P_m' L`` has the 1-df
    Satterthwaite df ``nu_m = 2 d_m^2 / (g_m' A g_m)``; then ddf = nu_1 when q = 1,
    the mean of the nus when they are all equal, 2 when one is <= 2, and otherwise
    ``2E / (E - q)`` with ``E = sum_m nu_m / (nu_m - 2)``."""
    pieces = satterthwaite_pieces(res)
    d, PtL = _rotated(pieces, L, eps)
    if not d.size:
        return float("nan")
    return _fstat_ddf(pieces.df(PtL))


def satterthwaite_ftest(res, L, rhs=None, eps=_CONTRAST_EPS) -> dict:
    """F test of ``L beta = rhs`` with Satterthwaite df (lmerTest's ``contestMD``):
    F = sum_m (c_m' b - r_m)^2 / d_m / q over the q rotated contrasts of
    :func:`satterthwaite_Fdf`, on (q, ddf). Returns F, df_num, df_den, pvalue."""
    pieces = satterthwaite_pieces(res)
    L = np.atleast_2d(np.asarray(L, dtype=float))
    b = np.asarray(res.params.values, dtype=float)
    if rhs is not None and np.any(np.asarray(rhs) != 0):
        b = b - np.linalg.pinv(L) @ np.broadcast_to(np.asarray(rhs, float), (L.shape[0],))
    d, PtL = _rotated(pieces, L, eps)
    q = d.size
    if q == 0:
        return {"F": np.nan, "df_num": 0, "df_den": np.nan, "pvalue": np.nan}
    F = float(np.sum((PtL @ b) ** 2 / d)) / q
    ddf = _fstat_ddf(pieces.df(PtL))
    return {"F": F, "df_num": q, "df_den": ddf, "pvalue": float(_dist.f_sf(F, q, ddf))}


def satterthwaite(res, level: float = 95.0) -> pd.DataFrame:
    """Coefficient table with t tests on Satterthwaite df (lmerTest's summary):
    coef, std err, df, t, P>|t| and the ``level`` percent confidence interval."""
    df = satterthwaite_df(res)
    b, se = res.params, res.bse
    with np.errstate(divide="ignore", invalid="ignore"):
        t = b / se
    crit = _dist.t_ppf(0.5 + confidence_level(level) / 200.0, df)
    return pd.DataFrame({"coef": b, "std err": se, "df": df, "t": t,
                         "P>|t|": 2 * _dist.t_sf(np.abs(t), df),
                         "lower": b - crit * se, "upper": b + crit * se})
