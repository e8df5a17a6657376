"""ANOVA tables of the fixed effects: one F (or chi2) test per formula term.

Hypotheses (lmerTest's constructions, reproduced so the tables match its numbers):

* Type III (``get_contrasts_type3``): with X the treatment-coded design and
  ``rdX = [1, X_t1, X_t2, ...]`` the over-parameterised one (every level of every
  factor in every term, formulaic's ``ensure_full_rank=False``), ``L = (X^+ rdX)'``
  expresses each rdX column in X's coefficients. Terms are visited from the highest
  order down; the columns of a term contained in others (its variables a proper subset
  of theirs, with the same numeric variables) are replaced by their residuals on the
  containing terms' columns (least squares over the rows of L). The rows of L of X's
  own columns, restricted to a term's columns and transposed, are that term's contrast
  matrix (rows of zeros dropped). Entries are rounded to 7 significant digits
  (R's ``zapsmall``). With at most one term or one coefficient, Type I is used.
* Type I (``get_contrasts_type1``): the Doolittle factorisation ``X'X = L U`` (no
  pivoting, X's columns in formula order with the intercept first); a term's rows of
  L' are its sequential contrasts.

Tests:

* mixed models: F with Satterthwaite df (lmerTest's ``contestMD``) or Kenward-Roger F
  (scaled) and df (pbkrtest's ``KRmodcomp``, as lmerTest's ``anova(ddf="Kenward-Roger")``);
* meta-regressions: the Wald test of the results (``wald_test``): chi2 on q df
  (``test="z"``) or F = chi2 / q on (q, smallest df of the coefficients involved)
  (``test="t"``), metafor's ``anova(res, btt=)`` / ``anova(res, X=)``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from mlmeta.fixed_terms import column_index, fixed_terms, used_data
from mlmeta.plain_terms import CONTEXT, for_formulaic

__all__ = ["anova", "type1_contrasts", "type3_contrasts", "zapsmall"]

_DDF = {"satterthwaite": "satterthwaite", "kenward-roger": "kenward-roger", "kr": "kenward-roger",
        "kenward_roger": "kenward-roger"}


def zapsmall(x, digits: int = 7) -> np.ndarray:
    """R's ``zapsmall``: round to ``digits`` significant digits of the largest |x|."""
    x = np.asarray(x, dtype=float)
    mx = float(np.max(np.abs(x))) if x.size else 0.0
    d = max(0, digits - int(np.ceil(np.log10(mx)))) if mx > 0 else digits
    return np.round(x, d) + 0.0


def _doolittle(A, eps=1e-6):
    """Unit lower-triangular L of A = L U without pivoting (lmerTest's ``doolittle``;
    entries below ``eps`` in absolute value set to 0)."""
    n = A.shape[0]
    L, U = np.eye(n), np.zeros((n, n))
    for i in range(n):
        U[i, :] = A[i, :] - L[i, :i] @ U[:i, :]
        if i + 1 < n:
            col = A[i + 1:, i] - L[i + 1:, :i] @ U[:i, i]
            L[i + 1:, i] = 0.0 if abs(U[i, i]) < eps else col / U[i, i]
    L[np.abs(L) < eps] = 0.0
    return L


def _formula_order(res):
    """Positions in ``fe_names`` of X's columns in formulaic's order (intercept first)."""
    return list(column_index(res).values())


def type1_contrasts(res) -> dict:
    """Term label -> sequential (Type I) contrast matrix over ``res.fe_names``."""
    order = _formula_order(res)
    X = np.asarray(res.frame.X)[:, order]
    p = X.shape[1]
    terms = fixed_terms(res)
    Lt = _doolittle(X.T @ X).T if p > 1 else np.ones((1, 1))
    pos = {c: k for k, c in enumerate(order)}
    out = {}
    for t in terms:
        rows = Lt[[pos[c] for c in t.columns]]
        M = np.zeros((len(t.columns), p))
        M[:, order] = rows
        out[t.label] = M
    return out


def _contains(inner, outer) -> bool:
    """lmerTest's ``term_contain``: inner's factors a proper subset of outer's, with the
    same numeric factors."""
    a, b = set(inner.factors), set(outer.factors)
    return a < b and set(inner.numerics) == set(outer.numerics)


def type3_contrasts(res, data=None) -> dict:
    """Term label -> Type III contrast matrix over ``res.fe_names`` (see module docstring)."""
    from formulaic import ModelSpec

    terms = fixed_terms(res)
    p = len(res.fe_names)
    if p <= 1 or len(terms) <= 1:
        return type1_contrasts(res)
    sub = used_data(res, data)
    spec = res.frame.fixed_spec
    try:
        full = ModelSpec(formula=spec.formula, ensure_full_rank=False).get_model_matrix(
            for_formulaic(sub), context=CONTEXT, na_action="ignore")
    except Exception as exc:   # formulaic raises several types
        raise ValueError(f"cannot rebuild the fixed part on the data: {exc}") from None
    rdX = full.to_numpy(dtype=float)
    rd_names = ["_cons" if str(c) == "Intercept" else str(c) for c in full.columns]
    X = np.asarray(res.frame.X, dtype=float)
    L = zapsmall((np.linalg.pinv(X) @ rdX).T)                # rdX columns x coefficients
    for t in sorted(terms, key=lambda t: -t.degree):         # stable: highest order first
        outer = [c for u in terms if _contains(t, u) for c in u.columns]
        if outer:
            A, Y = L[:, outer], L[:, list(t.columns)]
            coef = np.linalg.lstsq(A, Y, rcond=None)[0]
            L[:, list(t.columns)] = zapsmall(Y - A @ coef)
    # rows of the rdX columns that are X's own columns (treatment coding: "x[T.a]" is "x[a]")
    keep = []
    for j, name in enumerate(res.fe_names):
        k = rd_names.index(name.replace("[T.", "[")) if name.replace("[T.", "[") in rd_names else None
        if k is None or not np.allclose(rdX[:, k], X[:, j]):
            raise ValueError(f"cannot match coefficient {name!r} to a column of the full-dummy "
                             f"design: type-III contrasts need treatment-coded factors")
        keep.append(k)
    L = L[keep]                                               # coefficients x coefficients
    out = {}
    for t in terms:
        M = L[:, list(t.columns)].T
        out[t.label] = M[np.abs(M).sum(axis=1) > 1e-8]
    return out


def anova(res, type=3, ddf=None, data=None) -> pd.DataFrame:
    """ANOVA table of the fixed effects, one row per formula term (see the module docstring).

    Parameters
    ----------
    res : results of :func:`mlmeta.mixed` or :func:`mlmeta.meregress`.
    type : 3 (``"III"``) or 1 (``"I"``).
    ddf : mixed models: ``"satterthwaite"`` (default, or the fit's ``test`` when it is
        ``"kenward-roger"``) or ``"kenward-roger"`` (REML fits). Meta-regressions use the
        fit's ``test`` (chi2 for ``"z"``, F for ``"t"``) and take no ``ddf``.
    data : the data of the fit, when the results do not hold it (Type III only).

    Returns
    -------
    DataFrame indexed by term: ``F, df_num, df_den, pvalue`` (mixed models and ``test="t"``
    meta-regressions) or ``chi2, df_num, pvalue`` (``test="z"``).
    """
    kind = {3: 3, "3": 3, "III": 3, 1: 1, "1": 1, "I": 1}.get(type)
    if kind is None:
        raise ValueError(f"type must be 3 ('III') or 1 ('I'), got {type!r}")
    contrasts = type3_contrasts(res, data) if kind == 3 else type1_contrasts(res)
    mixed = getattr(res.model, "residual", None) == "profiled"
    rows = {}
    if mixed:
        if ddf is None:
            ddf = "kenward-roger" if res.test == "kenward-roger" else "satterthwaite"
        rule = _DDF.get(str(ddf).lower())
        if rule is None:
            raise ValueError(f"ddf must be 'satterthwaite' or 'kenward-roger', got {ddf!r}")
        if rule == "kenward-roger":
            from mlmeta.kenward_roger import kenward_roger

            kr = kenward_roger(res)
            for label, L in contrasts.items():
                t = kr.f_test(L)
                rows[label] = (t["F"], t["df_num"], t["df_den"], t["pvalue"])
        else:
            from mlmeta.satterthwaite import satterthwaite_ftest

            for label, L in contrasts.items():
                t = satterthwaite_ftest(res, L)
                rows[label] = (t["F"], t["df_num"], t["df_den"], t["pvalue"])
        method = "Satterthwaite's" if rule == "satterthwaite" else "Kenward-Roger's"
        table = pd.DataFrame.from_dict(rows, orient="index", columns=["F", "df_num", "df_den", "pvalue"])
    else:
        if ddf is not None:
            raise ValueError("ddf= applies to mixed models; a meta-regression's ANOVA uses the "
                             "fit's test= ('z': chi2, 't': F on its dfs= rule)")
        t_test = res.test == "t"
        for label, L in contrasts.items():
            w = res.wald_test(L, test="t" if t_test else "z")
            rows[label] = ((w.statistic, w.df, w.df_denom, w.pvalue) if t_test
                           else (w.statistic, w.df, w.pvalue))
        cols = ["F", "df_num", "df_den", "pvalue"] if t_test else ["chi2", "df_num", "pvalue"]
        method = "Wald " + ("F" if t_test else "chi2")
        table = pd.DataFrame.from_dict(rows, orient="index", columns=cols)
    table["df_num"] = table["df_num"].astype(int)
    table.index.name = "term"
    table.attrs["heading"] = f"Type {'III' if kind == 3 else 'I'} analysis of variance ({method} method)"
    return table
