"""Two-stage (summary-statistics) regression for repeated-measures data.

First stage: OLS in every group g = 1..J separately (n_g rows, p coefficients),

    b_g = (X_g'X_g)^-1 X_g'y_g,   s_g^2 = |y_g - X_g b_g|^2 / (n_g - p),
    S_g = s_g^2 (X_g'X_g)^-1      (sampling covariance of b_g),

computed for all groups at once (group sums by ``np.add.reduceat``, batched solves).
Groups whose X_g'X_g is singular (fewer rows than coefficients, or a covariate
constant within the group) are left out with a warning.

Second stage ``"ols"`` (the summary-statistics approach; pymer4's ``Lm2``): a
one-sample t test of each coefficient across groups,

    beta = mean_g b_g,   Var(beta) = Cov_g(b_g) / J   (sample covariance, J - 1 divisor),
    t = beta / se  on  J - 1 df.

Second stage ``"meta"``: a multivariate random-effects meta-analysis of the b_g
with their sampling covariances,

    b_g ~ N(beta, Sigma + S_g),   Sigma unstructured (p x p), S_g known,

fitted by REML (or ML) with Sigma = L L' (L lower triangular, so a singular Sigma is
reachable). With V_g = Sigma + S_g, H = sum_g V_g^-1, beta = H^-1 sum_g V_g^-1 b_g and
r_g = b_g - beta, the criterion (mlmeta's convention, as metafor's rma.mv) is

    -2 ll_ML   = J p log 2 pi + sum_g log|V_g| + sum_g r_g' V_g^-1 r_g
    -2 ll_REML = (J - 1) p log 2 pi + sum_g log|V_g| + sum_g r_g' V_g^-1 r_g + log|H| - p log J

with gradient d(-2 ll)/dSigma = D = sum_g (V_g^-1 - V_g^-1 r_g r_g' V_g^-1) [- sum_g V_g^-1 H^-1 V_g^-1
for REML], so d/dL = 2 D L. Var(beta) = H^-1; t tests on J - 1 df (``test="t"``) or
z tests (``test="z"``, metafor's default). Only groups with n_g > p (s_g^2 defined)
enter the meta-analysis.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from mlmeta._errors import ConvergenceWarning, warn
from mlmeta.formula import parse_formula
from mlmeta.ols import LinearResults, labelled_frame
from mlmeta.summary import fmt_g

__all__ = ["two_stage", "TwoStageResults", "first_stage", "mv_meta"]

LOG2PI = float(np.log(2.0 * np.pi))


def first_stage(y, X, codes, n_groups=None):
    """Per-group OLS for rows with group codes 0..J-1 (any row order).

    Returns a dict: ``b`` (J, p), ``XtX`` (J, p, p), ``n`` (J,), ``df`` (n_g - p),
    ``sigma2`` (J,; NaN when n_g <= p), ``S`` (J, p, p) sampling covariances and
    ``ok`` (J,) whether X_g'X_g is non-singular (``b``, ``S`` are NaN otherwise)."""
    y = np.asarray(y, dtype=float)
    X = np.asarray(X, dtype=float)
    codes = np.asarray(codes)
    J = int(codes.max()) + 1 if n_groups is None else int(n_groups)
    order = np.argsort(codes, kind="stable")
    Xs, ys, cs = X[order], y[order], codes[order]
    n = np.bincount(cs, minlength=J)
    if (n == 0).any():
        raise ValueError("every group code 0..J-1 needs at least one row")
    starts = np.concatenate([[0], np.cumsum(n)[:-1]])
    p = X.shape[1]
    XtX = np.add.reduceat(Xs[:, :, None] * Xs[:, None, :], starts, axis=0)
    Xty = np.add.reduceat(Xs * ys[:, None], starts, axis=0)
    ev = np.linalg.eigvalsh(XtX)
    top = np.abs(ev).max(axis=1)
    ok = (n >= p) & (ev[:, 0] > 1e-10 * np.where(top > 0, top, 1.0))
    b = np.full((J, p), np.nan)
    XtXi = np.full((J, p, p), np.nan)
    if ok.any():
        XtXi[ok] = np.linalg.inv(XtX[ok])
        b[ok] = np.einsum("gab,gb->ga", XtXi[ok], Xty[ok])
    r = ys - np.einsum("ia,ia->i", Xs, b[cs])
    rss = np.add.reduceat(r * r, starts)
    df = n - p
    with np.errstate(invalid="ignore", divide="ignore"):
        sigma2 = np.where(ok & (df > 0), rss / np.where(df > 0, df, 1), np.nan)
    S = sigma2[:, None, None] * XtXi
    return {"b": b, "XtX": XtX, "n": n, "df": df, "sigma2": sigma2, "S": S, "ok": ok}


def _vech_index(p):
    return np.tril_indices(p)


def _mv_objective(lvec, b, S, reml, idx, want_grad=True):
    J, p = b.shape
    L = np.zeros((p, p))
    L[idx] = lvec
    Sigma = L @ L.T
    V = Sigma + S
    C = np.linalg.cholesky(V)
    Ci = np.linalg.inv(C)
    Vi = np.swapaxes(Ci, 1, 2) @ Ci
    H = Vi.sum(axis=0)
    h = np.einsum("gab,gb->a", Vi, b)
    CH = np.linalg.cholesky(H)
    Hi = np.linalg.inv(CH)
    Hi = Hi.T @ Hi
    beta = Hi @ h
    r = b - beta
    Vr = np.einsum("gab,gb->ga", Vi, r)
    dev = 2.0 * np.log(np.diagonal(C, axis1=1, axis2=2)).sum() + float(np.einsum("ga,ga->", r, Vr))
    if reml:
        dev += (J - 1) * p * LOG2PI + 2.0 * np.log(np.diag(CH)).sum() - p * np.log(J)
    else:
        dev += J * p * LOG2PI
    out = {"dev": float(dev), "beta": beta, "Hinv": Hi, "Sigma": Sigma, "L": L}
    if want_grad:
        D = (Vi - np.einsum("ga,gb->gab", Vr, Vr)).sum(axis=0)
        if reml:
            D -= np.einsum("gab,bc,gcd->ad", Vi, Hi, Vi)
        out["grad"] = (2.0 * D @ L)[idx]
    return out


def mv_meta(b, S, method="reml", maxiter=500, tol=1e-8):
    """Multivariate random-effects meta-analysis of J vectors ``b`` (J, p) with known
    sampling covariances ``S`` (J, p, p): REML/ML estimate of the unstructured
    between-group covariance Sigma (module docstring).

    Returns a dict with beta, cov (H^-1), Sigma, llf, converged, n_iter, grad_max."""
    from scipy import optimize
    b = np.asarray(b, dtype=float)
    S = np.asarray(S, dtype=float)
    J, p = b.shape
    if J < 2:
        raise ValueError("the meta-analytic second stage needs at least 2 groups")
    reml = str(method).lower() == "reml"
    idx = _vech_index(p)
    scale = np.sqrt(np.clip(np.diag(np.cov(b, rowvar=False).reshape(p, p)), 1e-12, None))
    # Work in standardised coordinates so the optimiser sees O(1) parameters.
    bs, Ss = b / scale, S / np.outer(scale, scale)

    def fun(lv):
        try:
            o = _mv_objective(lv, bs, Ss, reml, idx)
        except np.linalg.LinAlgError:
            return np.inf, np.zeros_like(lv)
        return o["dev"], o["grad"]

    M = np.cov(bs, rowvar=False).reshape(p, p) - Ss.mean(axis=0)
    w, U = np.linalg.eigh(0.5 * (M + M.T))
    Sigma0 = (U * np.maximum(w, 0.05)) @ U.T
    starts = [np.linalg.cholesky(Sigma0)[idx], np.linalg.cholesky(0.1 * np.eye(p))[idx]]
    best = None
    for l0 in starts:
        res = optimize.minimize(fun, l0, jac=True, method="L-BFGS-B",
                                options={"maxiter": maxiter, "gtol": tol * 1e-2, "ftol": 1e-15})
        if best is None or res.fun < best.fun - 1e-9:
            best = res
    o = _mv_objective(best.x, bs, Ss, reml, idx)
    gmax = float(np.max(np.abs(o["grad"]))) if o["grad"].size else 0.0
    # A zero column of L leaves the gradient along it exactly zero: boundary fits pass.
    converged = bool(np.isfinite(o["dev"]) and gmax <= 1e-4 * max(1.0, abs(o["dev"])))
    D = np.diag(scale)
    ll = -0.5 * o["dev"]
    # llf in the original units: log|V_g| and log|H| shift by constants of the rescaling.
    lds = 2.0 * np.log(scale).sum()
    ll -= 0.5 * (J * lds - (lds if reml else 0.0))
    return {"beta": o["beta"] * scale, "cov": D @ o["Hinv"] @ D, "Sigma": D @ o["Sigma"] @ D,
            "llf": float(ll), "converged": converged, "n_iter": int(best.nit), "grad_max": gmax}


def _meta_meregress(b, S, names, method):
    """The same model fitted by :func:`mlmeta.meregress` on the stacked coefficients
    (``b ~ 0 + coef + (0 + coef | grp)`` with ``V`` = blockdiag(S_g))."""
    from scipy import sparse

    from mlmeta.api import meregress

    J, p = b.shape
    keys = [f"c{k}" for k in range(p)]
    long = pd.DataFrame({"b": b.reshape(-1), "coef": np.tile(keys, J), "grp": np.repeat(np.arange(J), p)})
    V = sparse.block_diag(list(S), format="csr")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = meregress("b ~ 0 + coef + (0 + coef | grp)", long, V=V, method=method)
    labels = [f"coef[{k}]" for k in keys]
    if list(fit.params.index) != labels:
        labels = [f"coef[T.{k}]" for k in keys]
    Sigma = fit.re_cov["grp"].loc[labels, labels].to_numpy()
    return {"beta": fit.params[labels].to_numpy(), "cov": fit.cov_params().loc[labels, labels].to_numpy(),
            "Sigma": Sigma, "llf": float(fit.llf), "converged": bool(fit.converged),
            "n_iter": int(fit.n_iter), "grad_max": float(fit.fit_record.grad_max)}


class TwoStageResults(LinearResults):
    """Two-stage regression results (statsmodels-style names).

    Attributes: ``params``, ``bse``, ``tvalues``, ``pvalues``, ``df`` (J - 1, or inf
    for z tests), ``conf_int()``, ``cov_params()``, ``nobs``, ``n_groups`` (groups in
    the second stage), ``second_stage``, ``first_stage`` (DataFrame of b_g, one row per
    group), ``first_stage_cov`` (J, p, p) S_g, ``sigma2`` (per-group s_g^2),
    ``dropped`` (labels of groups left out). For ``"meta"``: ``re_cov`` (Sigma),
    ``llf``, ``converged``, ``method``.

    Examples
    --------
    >>> import mlmeta
    >>> data, _, _ = mlmeta.simulate.lmm(10, 1, 8, seed=2)
    >>> fit = mlmeta.two_stage("DV ~ IV1", data, group="Group")
    >>> fit
    <TwoStageResults ols J=8 n=80 p=2>
    >>> fit.first_stage.head(3).round(3)
             IV1  _cons
    Group
    1     -0.083  0.225
    2      0.550  0.782
    3      0.130  0.149
    """

    def __init__(self, params, cov, names, df, nobs, *, second_stage, first, labels, used, dropped,
                 depvar=None, meta=None, method=None, group_name=None):
        super().__init__(params, cov, names, df, nobs, depvar=depvar)
        self.second_stage = second_stage
        self.first_stage = pd.DataFrame(first["b"], index=pd.Index(labels, name=group_name), columns=names)
        self.first_stage_cov = first["S"]
        self.sigma2 = pd.Series(first["sigma2"], index=self.first_stage.index, name="sigma2")
        self.group_sizes = pd.Series(first["n"], index=self.first_stage.index, name="n")
        self.used = np.asarray(used, dtype=bool)
        self.n_groups = int(self.used.sum())
        self.dropped = list(dropped)
        self.group_name = group_name
        self.method = method
        self.converged = True if meta is None else meta["converged"]
        self.llf = None if meta is None else meta["llf"]
        self.re_cov = None if meta is None else pd.DataFrame(meta["Sigma"], index=names, columns=names)
        self._meta = meta

    @property
    def _title(self):
        return "Two-stage regression" + (", meta second stage" if self.second_stage == "meta" else "")

    def _header_items(self):
        n = self.group_sizes[self.used]
        grp = f"Groups ({self.group_name})" if self.group_name else "Groups"
        items = [("Number of obs", f"{self.nobs:>9,}"), (grp, f"{self.n_groups:>9,}"),
                 ("Obs per group", f"{int(n.min())}/{n.mean():.1f}/{int(n.max())}")]
        if self.llf is not None:
            lab = "Log restr. lik." if self.method == "reml" else "Log likelihood"
            items.append((lab, f"{fmt_g(self.llf, 10):>9}"))
        return items

    def _footer(self):
        J = self.n_groups
        dft = "z tests" if np.isinf(self.df).all() else f"t tests on J - 1 = {J - 1} df"
        if self.second_stage == "ols":
            out = [f"Second stage: one-sample {dft} of the {J} first-stage OLS coefficients."]
        else:
            sd = np.sqrt(np.clip(np.diag(self.re_cov.to_numpy()), 0, None))
            out = [f"Second stage: multivariate {self.method.upper()} meta-analysis of the first-stage "
                   f"coefficients ({dft}).",
                   "Between-group SDs: "
                   + ", ".join(f"{nm} {fmt_g(s, 9)}" for nm, s in zip(self.fe_names, sd))]
            if not self.converged:
                out.append("Warning: the second-stage optimisation did not converge.")
        if self.dropped:
            out.append(f"{len(self.dropped)} group(s) left out (singular first-stage design or n_g <= p).")
        return out

    def __repr__(self):
        return f"<TwoStageResults {self.second_stage} J={self.n_groups} n={self.nobs} p={self.n_fe}>"


def two_stage(formula, data, group, second_stage="ols", *, method="reml", test="t",
              engine="dense") -> TwoStageResults:
    """Two-stage regression: OLS per group, then a one-sample t test or a multivariate
    meta-analysis across groups (module docstring for the formulas).

    First stage, per group g: ``b_g = (X_g'X_g)^-1 X_g'y_g`` with sampling covariance
    ``S_g = s_g^2 (X_g'X_g)^-1``. Second stage ``"ols"`` (pymer4's ``Lm2``):
    ``beta = mean_g b_g``, ``Var(beta) = Cov_g(b_g) / J``, t tests on J - 1 df.
    Second stage ``"meta"``: ``b_g ~ N(beta, Sigma + S_g)`` with Sigma unstructured,
    fitted by REML or ML (module :mod:`mlmeta.twostage` for the likelihood).

    Parameters
    ----------
    formula : str
        Fixed-effects formula, e.g. ``"DV ~ IV1 + IV2"`` (no random-effects bars).
    data : pandas.DataFrame
        The data.
    group : str or array-like
        Column name of the grouping variable, or one label per data row.
    second_stage : {"ols", "meta"}
        One-sample t test across groups (df J - 1), or a multivariate
        meta-analysis of the per-group coefficients.
    method : {"reml", "ml"}
        Estimation method of the meta-analytic second stage.
    test : {"t", "z"}
        t tests on J - 1 df or z tests, for the meta-analytic second stage.
    engine : {"dense", "meregress"}
        How the meta-analytic second stage is fitted: the J small p x p blocks
        directly (:func:`mv_meta`), or the stacked model through
        :func:`mlmeta.meregress` with ``V=``; both maximise the same likelihood.

    Returns
    -------
    TwoStageResults

    Raises
    ------
    ValueError
        For random-effects terms in the formula, unknown options, or fewer than 2
        groups with an estimable first stage.

    Warns
    -----
    UserWarning
        Groups with a singular first-stage design (or no residual df, for
        ``"meta"``) are left out.

    Examples
    --------
    >>> import mlmeta
    >>> data, _, _ = mlmeta.simulate.lmm(10, 1, 8, seed=2)
    >>> mlmeta.two_stage("DV ~ IV1", data, group="Group").params.round(4)
    IV1      0.1773
    _cons    0.2682
    Name: coef, dtype: float64
    >>> meta = mlmeta.two_stage("DV ~ IV1", data, group="Group", second_stage="meta")
    >>> meta.params.round(4)
    IV1      0.1171
    _cons    0.2384
    Name: coef, dtype: float64
    """
    if second_stage not in ("ols", "meta"):
        raise ValueError(f"second_stage must be 'ols' or 'meta', got {second_stage!r}")
    if test not in ("t", "z"):
        raise ValueError(f"test must be 't' or 'z', got {test!r}")
    parsed = parse_formula(formula)
    if parsed.random:
        raise ValueError("two_stage() takes a fixed-effects formula; the grouping is given by group=")
    frame, g_all, g_name, keep = labelled_frame(parsed, data, group, "group")
    labels_rows = np.asarray(g_all)[np.flatnonzero(keep)][frame.sample]
    try:
        codes, labels = pd.factorize(pd.Series(labels_rows), sort=True)
    except TypeError:
        codes, labels = pd.factorize(pd.Series(labels_rows), sort=False)
    labels = labels.tolist()
    names = frame.fe_names
    first = first_stage(frame.y, np.asarray(frame.X), codes, len(labels))
    used = first["ok"].copy()
    if second_stage == "meta":
        used &= first["df"] > 0
    dropped = [labels[i] for i in np.flatnonzero(~used)]
    if dropped:
        shown = ", ".join(map(repr, dropped[:5])) + (", ..." if len(dropped) > 5 else "")
        why = "singular first-stage design" + (" or no residual df" if second_stage == "meta" else "")
        warn(f"{len(dropped)} group(s) left out of the second stage ({shown}): {why}", UserWarning)
    J = int(used.sum())
    if J < 2:
        raise ValueError(f"only {J} group(s) with an estimable first stage; at least 2 are needed")
    B = first["b"][used]
    kw = dict(second_stage=second_stage, first=first, labels=labels, used=used, dropped=dropped,
              depvar=parsed.response, group_name=g_name)
    nobs = int(first["n"][used].sum())
    if second_stage == "ols":
        cov = np.cov(B, rowvar=False).reshape(len(names), len(names)) / J
        return TwoStageResults(B.mean(axis=0), cov, names, float(J - 1), nobs, **kw)
    if engine not in ("dense", "meregress"):
        raise ValueError(f"engine must be 'dense' or 'meregress', got {engine!r}")
    if engine == "dense":
        meta = mv_meta(B, first["S"][used], method=method)
    else:
        meta = _meta_meregress(B, first["S"][used], names, method)
    if not meta["converged"]:
        warn("the meta-analytic second stage did not converge", ConvergenceWarning)
    df = float(J - 1) if test == "t" else np.inf
    return TwoStageResults(meta["beta"], meta["cov"], names, df, nobs, meta=meta,
                           method=str(method).lower(), **kw)
