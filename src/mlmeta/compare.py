"""Comparing fitted models: likelihood-ratio tests, information criteria and
side-by-side estimates tables (Stata's ``lrtest``, ``estimates stats``,
``estimates table``).

Likelihood-ratio test of a reduced model nested in a full one:

    LR = 2 (ll_full - ll_reduced),   df = k_full - k_reduced,   p = P(chi2_df > LR)

with k the number of estimated parameters (fixed effects plus covariance
parameters). When the null sets one variance to zero (with its covariances),
the variance lies on the boundary of the parameter space and LR follows the
50:50 mixture of chi2_{df-1} and chi2_df (Self and Liang 1987; chi2_0 is a point
mass at 0), so

    p_mixture = 0.5 P(chi2_{df-1} > LR) + 0.5 P(chi2_df > LR),

half the conservative p-value when df = 1. When several variances are set to
zero at once the weights of the mixture depend on the information matrix and
only the conservative p-value is given.

Which variances the null sets to zero is read off the two models' random
parts, not off parameter counts or structure names: a free standard deviation
of the full model is on the boundary when every effect it belongs to has a
variance of exactly zero in the reduced model -- its grouping term is absent
(no term of the reduced model partitions the observations the same way), the
effect is absent from that term (no column of the reduced term's random design
equals the effect's column), or the reduced structure fixes its SD at 0. A
null that only imposes equality constraints (unstructured -> exchangeable,
independent -> identity) or fixes correlations inside (-1, 1) (unstructured ->
independent) is an interior null: plain chi2(df) p-value, no mixture, no
boundary note (metafor's ``anova(full, reduced)`` gives the same p-value).

Information criteria, with N observations (``n=`` overrides, as Stata's
``estimates stats, n()``; with REML the manual uses n - p) and k parameters:

    AIC = -2 ll + 2 k                   BIC  = -2 ll + k ln N
    AICc = AIC + 2 k (k + 1) / (N - k - 1)    CAIC = -2 ll + k (ln N + 1)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from mlmeta import _dist
from mlmeta.summary import Display, Section, Table, abbrev, factor_level, fmt_g

__all__ = ["lrtest", "LRTest", "compare", "estimates_table", "EstimatesTable"]

_NOTE_BOUNDARY = ("Note: The reported degrees of freedom assumes the null hypothesis is not on "
                  "the boundary of the parameter space. If this is not true, then the reported "
                  "test is conservative.")
_NOTE_REML = ("Note: LR tests based on REML are valid only when the fixed-effects "
              "specification is identical for both models.")


def _wrap(text, width=78, indent=6):
    words, lines, line = text.split(), [], ""
    for w in words:
        if line and len(line) + 1 + len(w) > width:
            lines.append(line)
            line = " " * indent + w
        else:
            line = f"{line} {w}" if line else w
    return lines + [line]


def _free_sds(struct):
    """The free standard deviations of a structure: for each, the effects sharing it."""
    is_fixed = getattr(struct, "is_fixed", None)
    return [eff for i, (kind, eff) in enumerate(struct.report_params())
            if kind == "sd" and not (is_fixed is not None and is_fixed(i))]


def _zero_sd_effects(struct, theta):
    """Effects whose SD the structure fixes at exactly 0 (whatever theta is)."""
    is_fixed = getattr(struct, "is_fixed", None)
    if is_fixed is None:
        return set()
    values = struct.report_values(theta)
    return {e for i, ((kind, eff), v) in enumerate(zip(struct.report_params(), values))
            if kind == "sd" and is_fixed(i) and v == 0 for e in eff}


def _random_terms(res):
    """Per grouping term: (codes of its groups over the model frame's rows, in order
    of first appearance; random design (n, q); structure; effects fixed at SD 0)."""
    frame, model = res.frame, res.model
    theta = np.asarray(res.theta, dtype=float)
    out = []
    for groups, Z, struct, sl in zip(frame.groups, frame.Z, model.structs, model.theta_slices):
        codes = pd.factorize(pd.Series(np.asarray(groups)))[0]
        out.append((codes, np.asarray(Z, dtype=float).reshape(len(codes), -1), struct,
                    _zero_sd_effects(struct, theta[sl])))
    return out


def _n_boundary(full, reduced):
    """How many free SDs of ``full`` the reduced model sets to zero (module docstring)."""
    red = _random_terms(reduced)
    count = 0
    for codes, Z, struct, _ in _random_terms(full):
        # the reduced model's effects with a free variance over the same groups
        kept = [Zr[:, m] for cr, Zr, _, zr in red if np.array_equal(cr, codes)
                for m in range(Zr.shape[1]) if m not in zr]
        for eff in _free_sds(struct):
            if not any(np.array_equal(col, Z[:, k]) for k in eff for col in kept):
                count += 1
    return count


def _fixed_design(res):
    return pd.DataFrame(np.asarray(res.frame.X), columns=res.fe_names)


def _same_fixed_part(a, b):
    if sorted(a.fe_names) != sorted(b.fe_names):
        return False
    Xa, Xb = _fixed_design(a), _fixed_design(b)[a.fe_names]
    return Xa.shape == Xb.shape and np.allclose(Xa.values, Xb.values, rtol=1e-12, atol=0)


@dataclass(repr=False)
class LRTest(Display):
    """Result of :func:`lrtest`; prints (and shows at the REPL) as Stata's ``lrtest``.

    ``as_html()``, ``as_markdown()`` and ``as_latex()`` render the same test as a
    table with its notes.

    Attributes
    ----------
    statistic : float
        ``LR = 2 (ll_full - ll_reduced)``.
    df : int
        Difference in the number of parameters.
    pvalue : float
        ``P(chi2_df > LR)``.
    pvalue_mixture : float or None
        With one variance on the boundary under the null, the 50:50 mixture
        p-value ``0.5 P(chi2_{df-1} > LR) + 0.5 P(chi2_df > LR)``; else None.
    boundary : bool
        Whether the null sets a variance to zero.
    names : tuple of str
        (full, reduced) model names.
    notes : list of str
        Notes printed under the test.

    Examples
    --------
    >>> import mlmeta
    >>> df = mlmeta.datasets.load("schoolcal")
    >>> full = mlmeta.meregress("stdmdiff ~ 1 + (1 | district) + (1 | district:school)",
    ...                         df, variance="var")
    >>> reduced = mlmeta.meregress("stdmdiff ~ 1 + (1 | district)", df, variance="var")
    >>> lr = mlmeta.lrtest(full, reduced)
    >>> print(f"LR = {lr.statistic:.2f} on {lr.df} df, boundary: {lr.boundary}")
    LR = 48.52 on 1 df, boundary: True
    """

    statistic: float
    df: int
    pvalue: float
    pvalue_mixture: float | None
    boundary: bool
    names: tuple
    notes: list = field(default_factory=list)

    def as_text(self) -> str:
        full, reduced = self.names
        out = ["Likelihood-ratio test", f"Assumption: {reduced} nested within {full}", "",
               f"{f'LR chi2({self.df})':>14} = {self.statistic:8.2f}",
               f"{'Prob > chi2':>14} = {self.pvalue:8.4f}"]
        if self.pvalue_mixture is not None:
            out.append(f"{'Prob > chibar2':>14} = {self.pvalue_mixture:8.4f}   "
                       f"({self._mixture()})")
        out.append("")
        for note in self.notes:
            out += _wrap(note)
        return "\n".join(out)

    def _mixture(self) -> str:
        return f"50:50 mixture of chi2({self.df - 1}) and chi2({self.df})"

    def tables(self) -> list[Table]:
        full, reduced = self.names
        rows = [[f"LR chi2({self.df})", f"{self.statistic:.2f}"], ["Prob > chi2", f"{self.pvalue:.4f}"]]
        if self.pvalue_mixture is not None:
            rows.append([f"Prob > chibar2 ({self._mixture()})", f"{self.pvalue_mixture:.4f}"])
        notes = [f"Assumption: {reduced} nested within {full}."] + list(self.notes)
        return [Table(["", ""], rows, "Likelihood-ratio test", notes)]


def lrtest(full, reduced, names=("full", "reduced")) -> LRTest:
    """Likelihood-ratio test of ``reduced`` nested in ``full`` (see the module
    docstring for the statistic and the boundary mixture).

    The models are ordered by their number of parameters (the one with more is
    the full model).

    Parameters
    ----------
    full, reduced : MeregressResults
        Two fits to the same data by the same method.
    names : tuple of str
        Names of the two models in the output.

    Returns
    -------
    LRTest

    Raises
    ------
    ValueError
        For models fitted to different data or by different methods (ML vs REML),
        REML models whose fixed parts differ (their restricted likelihoods are not
        comparable), and models with the same number of parameters.

    Examples
    --------
    Is the school level needed? Its variance is 0 under the null, on the boundary,
    so the 50:50 mixture p-value applies:

    >>> import mlmeta
    >>> df = mlmeta.datasets.load("schoolcal")
    >>> full = mlmeta.meregress("stdmdiff ~ 1 + (1 | district) + (1 | district:school)",
    ...                         df, variance="var")
    >>> reduced = mlmeta.meregress("stdmdiff ~ 1 + (1 | district)", df, variance="var")
    >>> print(mlmeta.lrtest(full, reduced))
    Likelihood-ratio test
    Assumption: reduced nested within full
    <BLANKLINE>
        LR chi2(1) =    48.52
       Prob > chi2 =   0.0000
    Prob > chibar2 =   0.0000   (50:50 mixture of chi2(0) and chi2(1))
    <BLANKLINE>
    Note: The reported degrees of freedom assumes the null hypothesis is not on
          the boundary of the parameter space. If this is not true, then the
          reported test is conservative.
    Note: LR tests based on REML are valid only when the fixed-effects
          specification is identical for both models.
    """
    if full.method != reduced.method:
        raise ValueError(f"cannot compare a {full.method.upper()} fit with a "
                         f"{reduced.method.upper()} fit; refit both with the same method")
    if (full.nobs != reduced.nobs or full.depvar != reduced.depvar
            or not np.array_equal(full.sample, reduced.sample)
            or not np.allclose(full.frame.y, reduced.frame.y, rtol=0, atol=0)):
        raise ValueError("the models were not fitted to the same observations")
    same_fixed = _same_fixed_part(full, reduced)
    if full.method == "reml" and not same_fixed:
        raise ValueError("LR tests based on REML are valid only when the fixed-effects "
                         "specification is identical for both models; refit both with method='ml'")
    names = tuple(names)
    if full.df_modelwc < reduced.df_modelwc:
        full, reduced, names = reduced, full, names[::-1]
    df = int(full.df_modelwc - reduced.df_modelwc)
    if df == 0:
        raise ValueError("the models have the same number of parameters, so neither is "
                         "nested in the other")
    stat = 2.0 * (full.llf - reduced.llf)
    p = float(_dist.chi2_sf(stat, df))
    d_sd = _n_boundary(full, reduced)
    boundary = d_sd >= 1
    notes = []
    p_mix = None
    if stat < 0:
        notes.append("Note: the reduced model has the higher log likelihood; check that it is "
                     "nested in the full model.")
    if boundary:
        notes.append(_NOTE_BOUNDARY)
        if d_sd == 1:
            low = _dist.chi2_sf(stat, df - 1) if df > 1 else float(stat < 0)
            p_mix = float(0.5 * low + 0.5 * p)
        else:
            notes.append(f"Note: the null sets {d_sd} variances to zero; the weights of the "
                         f"chi-bar-squared distribution depend on the information matrix, so "
                         f"only the conservative p-value is reported.")
    if full.method == "reml":
        notes.append(_NOTE_REML)
    return LRTest(float(stat), df, p, p_mix, boundary, names, notes)


def _names(results, names):
    if names is None:
        return [f"model{i + 1}" for i in range(len(results))]
    names = [str(n) for n in names]
    if len(names) != len(results):
        raise ValueError(f"{len(names)} names for {len(results)} models")
    return names


def compare(*results, names=None, n=None) -> pd.DataFrame:
    """Information criteria of fitted models (Stata's ``estimates stats, all``).

    Columns N, ll, df, AIC, BIC, AICc, CAIC (formulas in the module docstring);
    ``df`` counts fixed effects and covariance parameters, ``n`` replaces the
    number of observations in BIC, AICc and CAIC (for REML the manual uses
    n - p).

    Parameters
    ----------
    *results : MeregressResults
        Fitted models.
    names : list of str, optional
        Row labels (default model1, model2, ...).
    n : int, optional
        Number of observations N used in the criteria.

    Returns
    -------
    pandas.DataFrame
        One row per model.

    Raises
    ------
    ValueError
        Without models, or with a wrong number of names.

    Examples
    --------
    >>> import mlmeta
    >>> df = mlmeta.datasets.load("schoolcal")
    >>> full = mlmeta.meregress("stdmdiff ~ 1 + (1 | district) + (1 | district:school)",
    ...                         df, variance="var")
    >>> reduced = mlmeta.meregress("stdmdiff ~ 1 + (1 | district)", df, variance="var")
    >>> mlmeta.compare(full, reduced, names=["three-level", "two-level"]).round(3)
                  N      ll  df     AIC     BIC    AICc    CAIC
    model
    three-level  56  -7.959   3  21.917  27.994  22.379  30.994
    two-level    56 -32.216   2  68.433  72.484  68.659  74.484
    """
    if not results:
        raise ValueError("give at least one fitted model")
    rows = []
    for res in results:
        N = res.nobs if n is None else n
        k, ll = res.df_modelwc, res.llf
        aicc = -2 * ll + 2 * k + 2 * k * (k + 1) / (N - k - 1) if N - k - 1 > 0 else np.nan
        rows.append((N, ll, k, -2 * ll + 2 * k, -2 * ll + k * np.log(N), aicc,
                     -2 * ll + k * (np.log(N) + 1)))
    return pd.DataFrame(rows, index=pd.Index(_names(results, names), name="model"),
                        columns=["N", "ll", "df", "AIC", "BIC", "AICc", "CAIC"])


_FMT = re.compile(r"^%-?(\d+)\.(\d+)([fgeFGE])c?$")


def _formatter(fmt):
    m = _FMT.match(fmt)
    if not m:
        raise ValueError(f"fmt must be a Stata numeric format such as '%8.3f' or '%9.0g', got {fmt!r}")
    width, dec, kind = int(m.group(1)), int(m.group(2)), m.group(3).lower()
    if kind == "f":
        return width, lambda x: "." if x is None or not np.isfinite(x) else f"{x:.{dec}f}"
    if kind == "e":
        return width, lambda x: "." if x is None or not np.isfinite(x) else f"{x:.{dec}e}"
    return width, lambda x: fmt_g(x, width)


_STATS = {"b": "coefficient", "se": "standard error", "z": "z statistic", "p": "p-value"}


@dataclass(repr=False)
class EstimatesTable(Display):
    """Side-by-side estimates (:func:`estimates_table`).

    ``str()`` (and the REPL) renders Stata's layout; ``as_html()``, ``as_markdown()``
    and ``as_latex()`` the same table with labels in full (factors and random-effects
    equations as sections, the model statistics after the estimates).

    Attributes
    ----------
    table : pandas.DataFrame
        Rows (variable, stat), one column per model (NaN where a model lacks the
        variable); random-effects rows are named ``group:param``.
    stats : tuple of str
        The statistics shown under each coefficient.
    scalars : pandas.DataFrame
        Model statistics (N, ll, aic, bic) shown at the bottom.
    fmt : str
        Stata format of the cells.
    equations : dict
        Variable -> (equation, name), for the layout with random effects.

    Examples
    --------
    >>> import mlmeta
    >>> df = mlmeta.datasets.load("schoolcal")
    >>> full = mlmeta.meregress("stdmdiff ~ 1 + (1 | district) + (1 | district:school)",
    ...                         df, variance="var")
    >>> reduced = mlmeta.meregress("stdmdiff ~ 1 + (1 | district)", df, variance="var")
    >>> tab = mlmeta.estimates_table(full, reduced, names=["three", "two"])
    >>> tab.table.round(4)
                    three    two
    variable stat
    _cons    b     0.1847  0.196
             se    0.0846  0.090
    >>> print(tab.as_markdown())
    **Estimates**
    <BLANKLINE>
    | Variable | three | two |
    |:---|---:|---:|
    | \\_cons | .1847132 | .1960299 |
    | (se) | .0845559 | .0899834 |
    <BLANKLINE>
    Legend: b/se
    """

    table: pd.DataFrame
    stats: tuple
    scalars: pd.DataFrame
    fmt: str
    equations: dict = field(default_factory=dict)     # variable -> (equation, name)

    def as_text(self) -> str:
        width, f = _formatter(self.fmt)
        models = list(self.table.columns)
        names = [self.equations.get(v, (None, v))[1] for v in self.table.index.get_level_values(0)]
        lw = max(12, *(len(n) + 1 for n in names)) if names else 12
        cw = max(width + 2, 10, *(len(abbrev(m, 12)) + 2 for m in models))
        line = "-" * (lw + 1) + "+" + "-" * (cw * len(models) + 2)
        out = ["-" * len(line), f"{'Variable':>{lw}} |" +
               "".join(f"{abbrev(m, 12):>{cw}}" for m in models), line]
        eq = None
        for (var, st), row in self.table.iterrows():
            v_eq, name = self.equations.get(var, (None, var))
            if self.equations and st == self.stats[0] and v_eq != eq:
                eq = v_eq
                out.append(f"{eq:<{lw}} |")
            label = name if st == self.stats[0] else ""
            cells = "".join(f"{f(v):>{cw}}" if np.isfinite(v) else " " * cw for v in row.values)
            out.append(f"{label:>{lw}} |{cells}")
        if len(self.scalars):
            out.append(line)
            for name, row in self.scalars.iterrows():
                cells = "".join(f"{fmt_g(v, 9):>{cw}}" for v in row.values)
                out.append(f"{name:>{lw}} |{cells}")
        out.append("-" * len(line))
        out.append(f"{'Legend: ' + '/'.join(self.stats):>{len(line)}}")
        return "\n".join(out)

    def tables(self) -> list[Table]:
        """One row per (variable, statistic), labels in full: equations (random=True)
        and factors as sections, the scalars after the estimates."""
        _, f = _formatter(self.fmt)
        rows, section = [], None
        for (var, st), row in self.table.iterrows():
            v_eq, name = self.equations.get(var, (None, var))
            head, lab = (v_eq, name) if self.equations else factor_level(name)
            if st == self.stats[0] and head is not None and head != section:
                rows.append(Section(head))
            if st == self.stats[0]:
                section = head
            label = lab if st == self.stats[0] else f"({st})"
            rows.append([label] + [f(v) if np.isfinite(v) else "" for v in row.values])
        rows += [[name] + [fmt_g(v, 9) for v in row.values] for name, row in self.scalars.iterrows()]
        return [Table(["Variable", *self.table.columns], rows, "Estimates",
                      ["Legend: " + "/".join(self.stats)])]


def estimates_table(*results, names=None, keep=None, stats=("b", "se"), fmt="%9.0g",
                    random=False, scalars=()) -> EstimatesTable:
    """Estimates of several models side by side (Stata's ``estimates table``).

    ``keep``: variables to show, in order (``"stdmdiff:year_c"`` and ``"year_c"``
    both work); default: every fixed effect in order of first appearance.
    ``stats``: any of ``"b"``, ``"se"``, ``"z"``, ``"p"`` shown under each
    coefficient. ``random=True`` adds the random-effects parameters (SDs and
    correlations, labelled ``group:sd(_cons)``). ``scalars``: any of ``"N"``,
    ``"ll"``, ``"aic"``, ``"bic"`` shown at the bottom. ``fmt``: a Stata
    format for the cells (``"%8.3f"``).

    Parameters
    ----------
    *results : MeregressResults
        Fitted models.
    names : list of str, optional
        Column labels.
    keep : str or list of str, optional
        Variables to show.
    stats : tuple of str
        Statistics under each coefficient.
    fmt : str
        Stata numeric format of the cells.
    random : bool
        Add the random-effects parameters.
    scalars : tuple of str
        Model statistics at the bottom.

    Returns
    -------
    EstimatesTable
        ``table`` holds the numbers; ``str()`` renders Stata's layout.

    Raises
    ------
    ValueError
        Without models, for unknown stats, formats or variables.

    Examples
    --------
    >>> import mlmeta
    >>> df = mlmeta.datasets.load("schoolcal")
    >>> full = mlmeta.meregress("stdmdiff ~ 1 + (1 | district) + (1 | district:school)",
    ...                         df, variance="var")
    >>> reduced = mlmeta.meregress("stdmdiff ~ 1 + (1 | district)", df, variance="var")
    >>> print(mlmeta.estimates_table(full, reduced, names=["three", "two"], fmt="%8.4f",
    ...                              scalars=("ll",)))
    ------------------------------------
        Variable |     three       two
    -------------+----------------------
           _cons |    0.1847    0.1960
                 |    0.0846    0.0900
    -------------+----------------------
              ll | -7.958724 -32.21648
    ------------------------------------
                            Legend: b/se
    """
    if not results:
        raise ValueError("give at least one fitted model")
    bad = [s for s in stats if s not in _STATS]
    if bad or not stats:
        raise ValueError(f"stats must be a non-empty subset of {list(_STATS)}, got {list(stats)}")
    _formatter(fmt)
    labels = _names(results, names)
    per_model, equations = [], {}
    for res in results:
        d = {nm: (float(res.params[nm]), float(res.bse[nm])) for nm in res.fe_names}
        if random:
            equations.update({nm: (res.depvar, nm) for nm in res.fe_names})
            for _, r in res.re_params().iterrows():
                se = np.nan if pd.isna(r.std_err) else float(r.std_err)
                d[f"{r.group}:{r.param}"] = (float(r.estimate), se)
                equations[f"{r.group}:{r.param}"] = (r.group, r.param)
        per_model.append((res, d))
    order = list(dict.fromkeys(k for _, d in per_model for k in d))
    if keep is not None:
        keep = [keep] if isinstance(keep, str) else list(keep)
        wanted = []
        for k in keep:
            if k not in order and ":" in k and k.split(":", 1)[1] in order \
                    and k.split(":", 1)[0] in {r.depvar for r in results}:
                k = k.split(":", 1)[1]
            if k not in order:
                raise ValueError(f"{k!r} is in none of the models; variables are {order}")
            wanted.append(k)
        order = wanted
    rows, index = [], []
    for var in order:
        for st in stats:
            vals = []
            for _, d in per_model:
                if var not in d:
                    vals.append(np.nan)
                    continue
                b, se = d[var]
                z = b / se if np.isfinite(se) and se > 0 else np.nan
                p = 2.0 * _dist.norm_sf(abs(z)) if np.isfinite(z) else np.nan
                vals.append({"b": b, "se": se, "z": z, "p": p}[st])
            rows.append(vals)
            index.append((var, st))
    table = pd.DataFrame(rows, index=pd.MultiIndex.from_tuples(index, names=["variable", "stat"]),
                         columns=labels)
    sc = {"N": lambda r: r.nobs, "ll": lambda r: r.llf, "aic": lambda r: r.aic, "bic": lambda r: r.bic}
    bad = [s for s in scalars if s not in sc]
    if bad:
        raise ValueError(f"scalars must be among {list(sc)}, got {bad}")
    sdf = pd.DataFrame([[float(sc[s](r)) for r in results] for s in scalars],
                       index=list(scalars), columns=labels)
    return EstimatesTable(table, tuple(stats), sdf, fmt, equations)
