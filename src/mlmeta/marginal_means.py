"""Estimated marginal means and their pairwise comparisons (R's emmeans).

Reference grid (emmeans' default): every level of every categorical variable of the
fixed part, each numeric variable at its mean over the rows the model used (or at the
values of ``at=``). With ``x_g`` the row of the fixed design at grid point g, the
marginal mean of a level combination c of the ``specs`` variables averages the grid
points of c with equal weights (whatever the cell counts):

    l_c = mean_{g in c} x_g,    emmean_c = l_c' beta,    se_c = sqrt(l_c' V l_c)

V is the covariance of the fit's coefficients (the Kenward-Roger adjusted one with
``ddf="kenward-roger"``); df is that of the contrast l_c under the fit's df rule
(Satterthwaite or Kenward-Roger for mixed models, inf for z tests, the smallest df of
the coefficients involved for meta-regressions with ``test="t"``). Intervals are
emmean -+ t_{df, 1 - alpha/2} se. Pairs are the differences l_a - l_b for a before b, with
p values adjusted for the family of k means and m = k (k - 1) / 2 comparisons:

    tukey: P(Q_{k, df} > sqrt(2) |t|) (studentized range);  scheffe: P(F_{k-1, df} > t^2 / (k-1));
    bonferroni: min(1, m p);  sidak: 1 - (1 - p)^m;  holm: step-down Bonferroni;  none: p.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from mlmeta import _dist
from mlmeta.fixed_terms import categorical_levels, used_data

__all__ = ["emmeans", "EMMeans", "ADJUSTMENTS"]

ADJUSTMENTS = ("tukey", "scheffe", "bonferroni", "sidak", "holm", "none")


def _variables(res, sub):
    """(categorical variable -> levels, numeric variable -> mean) of the fixed part."""
    spec = res.frame.fixed_spec
    names = [v for v in spec.variables_by_source.get("data", set()) if v in sub.columns]
    cats = categorical_levels(res)
    factors, numerics = {}, {}
    for v in sorted(names, key=list(sub.columns).index):
        col = sub[v]
        if v in cats:
            factors[v] = list(cats[v])
        elif (any(v in expr and expr != v for expr in cats)
              or not pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col)):
            factors[v] = sorted(pd.unique(col.dropna()).tolist())
        else:
            numerics[v] = float(np.mean(col.to_numpy(dtype=float)))
    return factors, numerics


def _label(values) -> str:
    return " ".join(str(v) for v in values)


class EMMeans:
    """Estimated marginal means of a fit (R's emmeans); returned by :func:`emmeans`.

    The mean of a level combination c is ``l_c' beta`` with ``l_c`` the average of the
    fixed-design rows of its reference-grid points (equal weights), its standard error
    ``sqrt(l_c' V l_c)`` and its df that of the contrast ``l_c`` under the fit's df rule
    (see :func:`emmeans`).

    Attributes
    ----------
    table : pandas.DataFrame
        Indexed by the levels of ``specs``: emmean, se, df, lower, upper.
    L : pandas.DataFrame
        The linear function ``l_c`` of the coefficients behind each mean.
    grid : pandas.DataFrame
        The reference grid, one row per grid point.
    specs : list of str
        The variables whose levels index the means.
    level : float
        Confidence level of the intervals, in percent.

    Examples
    --------
    >>> import mlmeta
    >>> dat = mlmeta.datasets.load("berkey")
    >>> res = mlmeta.meregress("yi ~ 0 + outcome + (0 + outcome | trial)", dat, variance="vi")
    >>> em = mlmeta.emmeans(res, "outcome")
    >>> em.table.round(4)
             emmean      se   df   lower   upper
    outcome
    AL      -0.3254  0.0879  inf -0.4975 -0.1532
    PD       0.3446  0.0546  inf  0.2375  0.4516
    >>> em.pairs().round(4)
              estimate      se   df       t  pvalue
    contrast
    AL - PD    -0.6699  0.0697  inf -9.6144     0.0
    """

    def __init__(self, res, specs, L, grid, level):
        self.specs = list(specs)
        self._res = res
        self.level = level
        self.grid = grid
        self.L = L
        b = res.params.to_numpy()
        V = res.cov_params().to_numpy()
        M = L.to_numpy()
        est = M @ b
        se = np.sqrt(np.clip(np.einsum("ia,ab,ib->i", M, V, M), 0.0, None))
        df = self._df(M)
        crit = _dist.t_ppf(0.5 + level / 200.0, df)
        self.table = pd.DataFrame({"emmean": est, "se": se, "df": df,
                                   "lower": est - crit * se, "upper": est + crit * se}, index=L.index)

    def _df(self, M):
        if self._res._z_tests:
            return np.full(M.shape[0], np.inf)
        return np.asarray(self._res._row_df(M), dtype=float)

    def pairs(self, adjust: str = "tukey") -> pd.DataFrame:
        """Pairwise differences of the means (emmeans' ``pairs``).

        Each pair ``a - b`` (a listed before b) is the contrast ``l_a - l_b``, tested by
        ``t = (l_a - l_b)' beta / se`` on the df of that contrast; with k means and
        ``m = k (k - 1) / 2`` pairs the p-values are adjusted for the family:

        * ``"tukey"``: ``P(Q_{k, df} > sqrt(2) |t|)`` (studentized range);
        * ``"scheffe"``: ``P(F_{k-1, df} > t^2 / (k - 1))``;
        * ``"bonferroni"``: ``min(1, m p)``; ``"sidak"``: ``1 - (1 - p)^m``;
        * ``"holm"``: step-down Bonferroni; ``"none"``: p.

        Parameters
        ----------
        adjust : {"tukey", "scheffe", "bonferroni", "sidak", "holm", "none"}
            Multiplicity adjustment of the p-values.

        Returns
        -------
        pandas.DataFrame
            estimate, se, df, t, pvalue, indexed by ``"a - b"``;
            ``attrs["adjust"]`` names the adjustment.

        Raises
        ------
        ValueError
            For an unknown ``adjust`` or fewer than two means.
        """
        from scipy import stats
        adjust = str(adjust).lower()
        if adjust not in ADJUSTMENTS:
            raise ValueError(f"adjust must be one of {ADJUSTMENTS}, got {adjust!r}")
        M = self.L.to_numpy()
        k = M.shape[0]
        if k < 2:
            raise ValueError("pairwise comparisons need at least two means")
        labels = [_label(i if isinstance(i, tuple) else (i,)) for i in self.L.index]
        pairs = list(itertools.combinations(range(k), 2))
        C = np.array([M[a] - M[b] for a, b in pairs])
        b = self._res.params.to_numpy()
        V = self._res.cov_params().to_numpy()
        est = C @ b
        se = np.sqrt(np.clip(np.einsum("ia,ab,ib->i", C, V, C), 0.0, None))
        df = self._df(C)
        with np.errstate(divide="ignore", invalid="ignore"):
            t = est / se
        p = 2 * _dist.t_sf(np.abs(t), df)
        m = len(pairs)
        if adjust == "tukey":
            p = stats.studentized_range.sf(np.sqrt(2) * np.abs(t), k, df)
        elif adjust == "scheffe":
            p = _dist.f_sf(t ** 2 / (k - 1), k - 1, df)
        elif adjust == "bonferroni":
            p = np.minimum(1.0, m * p)
        elif adjust == "sidak":
            p = 1 - (1 - p) ** m
        elif adjust == "holm":
            order = np.argsort(p, kind="stable")
            stepped = np.minimum(1.0, np.maximum.accumulate(p[order] * (m - np.arange(m))))
            p = np.empty(m)
            p[order] = stepped
        index = pd.Index([f"{labels[a]} - {labels[b]}" for a, b in pairs], name="contrast")
        out = pd.DataFrame({"estimate": est, "se": se, "df": df, "t": t, "pvalue": p}, index=index)
        out.attrs["adjust"] = adjust
        return out

    def __repr__(self):
        with pd.option_context("display.width", 120):
            return f"{self.table!r}\n\nConfidence level used: {self.level:g} %"


def emmeans(res, specs, ddf=None, *, at=None, level: float = 95.0, data=None) -> EMMeans:
    """Estimated marginal means of a :func:`mixed` or :func:`meregress` fit (R's ``emmeans``).

    Reference grid (emmeans' default): every level of every categorical variable of
    the fixed part, each numeric variable at its mean over the rows the model used
    (or at the values of ``at=``). With ``x_g`` the row of the fixed design at grid
    point g, the marginal mean of a level combination c of the ``specs`` variables
    averages the grid points of c with equal weights, whatever the cell counts:

    ``l_c = mean_{g in c} x_g``,  ``emmean_c = l_c' beta``,  ``se_c = sqrt(l_c' V l_c)``

    with V the covariance of the coefficients (the Kenward-Roger adjusted one with
    ``ddf="kenward-roger"``). The df is that of the contrast ``l_c`` under the fit's df
    rule: Satterthwaite or Kenward-Roger for mixed models, inf for z tests, the
    smallest df of the coefficients involved for meta-regressions with ``test="t"``.
    Intervals are ``emmean -+ t_{df, 1 - alpha/2} se``.

    Parameters
    ----------
    res : MeregressResults or MixedResults
        The fit.
    specs : str or list of str
        A categorical variable of the fixed part, or a list of them (their level
        combinations, the first varying fastest as in emmeans).
    ddf : {None, "satterthwaite", "kenward-roger", "z"}
        Mixed models only: the df rule (default the fit's ``test``; R's emmeans uses
        Kenward-Roger for ``lmer`` fits). A meta-regression's ``test=`` decides.
    at : dict, optional
        Variable -> value or list of values: numeric variables at these values instead
        of their mean; categorical variables restricted to these levels.
    level : float
        Confidence level in percent.
    data : pandas.DataFrame, optional
        The data of the fit, when the results do not hold it.

    Returns
    -------
    EMMeans
        ``table`` of the means; ``pairs()`` for their pairwise comparisons.

    Raises
    ------
    ValueError
        If ``specs`` or ``at`` name a variable that is not in the fixed part or a
        level it does not have, or ``ddf`` is given for a meta-regression.

    See Also
    --------
    MixedResults.anova : F tests of the formula terms.

    Examples
    --------
    A mixed model with a between-group factor; marginal means on Kenward-Roger df:

    >>> import mlmeta
    >>> data, _, _ = mlmeta.simulate.lmm(20, 1, 15, group_sd=0.5, seed=1)
    >>> data["dose"] = data["Group"].map(lambda g: ["low", "mid", "high"][g % 3])
    >>> fit = mlmeta.mixed("DV ~ IV1 + dose + (IV1 | Group)", data)
    >>> em = mlmeta.emmeans(fit, "dose", ddf="kenward-roger")
    >>> em.table.round(3)
          emmean     se      df  lower  upper
    dose
    high   0.773  0.282  12.018  0.159  1.388
    low    0.385  0.281  11.998 -0.227  0.998
    mid    0.302  0.281  11.973 -0.311  0.915
    >>> em.pairs(adjust="tukey").round(3)
                estimate     se      df      t  pvalue
    contrast
    high - low     0.388  0.408  12.014  0.950   0.620
    high - mid     0.471  0.409  11.993  1.153   0.502
    low - mid      0.083  0.407  11.986  0.205   0.977
    """
    specs = [specs] if isinstance(specs, str) else list(specs)
    if not specs:
        raise ValueError("specs must name at least one variable")
    if getattr(res.model, "residual", None) == "profiled":
        res = res.with_ddf(ddf) if ddf is not None else res
    elif ddf is not None:
        raise ValueError("ddf= applies to mixed models; a meta-regression's marginal means use "
                         "the fit's test= ('z' or 't')")
    sub = used_data(res, data)
    factors, numerics = _variables(res, sub)
    values = {v: list(lv) for v, lv in factors.items()}
    values.update({v: [m] for v, m in numerics.items()})
    for v, val in (at or {}).items():
        if v not in values:
            raise ValueError(f"at= names {v!r}, which is not a variable of the fixed part "
                             f"({sorted(values)})")
        val = list(val) if isinstance(val, (list, tuple, np.ndarray, pd.Series)) else [val]
        if v in factors:
            bad = [x for x in val if x not in factors[v]]
            if bad:
                raise ValueError(f"at= gives levels {bad} of {v!r}, whose levels are {factors[v]}")
        values[v] = val
    for s in specs:
        if s not in values:
            raise ValueError(f"specs names {s!r}, which is not a variable of the fixed part "
                             f"({sorted(values)})")
    order = list(values)
    grid = pd.DataFrame(list(itertools.product(*(values[v] for v in order))), columns=order)
    X = res._new_matrix(res.frame.fixed_spec, res.fe_names, grid, "fixed part")
    combos = list(itertools.product(*(values[s] for s in reversed(specs))))
    rows, index = [], []
    for combo in combos:
        key = dict(zip(reversed(specs), combo))
        mask = np.ones(len(grid), dtype=bool)
        for s, v in key.items():
            mask &= (grid[s] == v).to_numpy()
        rows.append(X[mask].mean(axis=0))
        index.append(tuple(key[s] for s in specs))
    idx = (pd.Index([i[0] for i in index], name=specs[0]) if len(specs) == 1
           else pd.MultiIndex.from_tuples(index, names=specs))
    L = pd.DataFrame(np.array(rows), index=idx, columns=res.fe_names)
    return EMMeans(res, specs, L, grid, level)
