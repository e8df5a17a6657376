"""What postestimation tests and statistics return: printed result objects.

* :class:`Heterogeneity` -- Stata's ``estat heterogeneity``;
* :class:`WaldTest` -- Stata's ``test`` of linear hypotheses;
* :class:`TTestTable` -- t tests of coefficients or contrasts (a DataFrame with
  statsmodels' ``ContrastResults`` names);
* :class:`StoredResults` -- Stata's ``e()``.

Each prints as its text table (also at the REPL) and exports HTML, Markdown and
LaTeX (see :mod:`mlmeta.display`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from mlmeta.summary import CoefTable, Display, FixedRow, Section, Table, TextDisplay

__all__ = ["Heterogeneity", "WaldTest", "TTestTable", "StoredResults", "hypothesis_label"]


def hypothesis_label(row, names, r) -> str:
    """``"x1 - 2*x2 = 0.5"`` for the hypothesis row' beta = r."""
    terms = " + ".join(n if c == 1 else f"-{n}" if c == -1 else f"{c:g}*{n}"
                       for c, n in zip(row, names) if c != 0)
    return f"{terms.replace('+ -', '- ')} = {r:g}"


# --------------------------------------------------------------------------- #
# result containers
# --------------------------------------------------------------------------- #
@dataclass(repr=False)
class Heterogeneity(Display):
    """Heterogeneity statistics (Stata's ``estat heterogeneity``), in percent.

    I2_Q: Cochran's ``max(0, (Q_M - df) / Q_M)``. I2: level -> Higgins-Thompson
    ``tau_l^2 / (sum_k tau_k^2 + s^2)``, I2_total ``sum tau^2 / (sum tau^2 + s^2)``
    with the typical sampling variance ``s2``; None with ``note`` saying why when
    the statistic is not defined. Prints (and shows at the REPL) as Stata's table."""

    I2_Q: float
    Q_M: float
    df: int
    I2: dict | None
    I2_total: float | None
    s2: float | None
    note: str = ""

    def as_text(self) -> str:
        out = ["Method: Cochran", "Joint:", f"  I2 (%) = {self.I2_Q:.2f}", ""]
        out.append("Method: Higgins-Thompson")
        if self.I2 is None:
            out.append(f"  not defined: {self.note}")
        else:
            for name, v in self.I2.items():
                out += [f"{name}:", f"  I2 (%) = {v:.2f}"]
            out += ["Total:", f"  I2 (%) = {self.I2_total:.2f}"]
        return "\n".join(out)

    def tables(self) -> list[Table]:
        rows = [Section("Cochran"), ["Joint", f"{self.I2_Q:.2f}"], Section("Higgins-Thompson")]
        notes = [f"Q_M = {self.Q_M:.2f} on {self.df} df."]
        if self.I2 is None:
            notes.append(f"Higgins-Thompson I2 not defined: {self.note}")
        else:
            rows += [[name, f"{v:.2f}"] for name, v in self.I2.items()]
            rows.append(["Total", f"{self.I2_total:.2f}"])
        return [Table(["", "I2 (%)"], rows, "Heterogeneity", notes)]


@dataclass(repr=False)
class WaldTest(Display):
    """Wald test of ``L beta = r``: ``chi2 = (L b - r)' (L V L')^-1 (L b - r)`` on
    q = rows(L) df; with ``test="t"``: ``F = chi2 / q`` on (q, df_denom). Prints (and
    shows at the REPL) as Stata's ``test``."""

    L: pd.DataFrame
    rhs: np.ndarray
    statistic: float
    df: int
    pvalue: float
    test: str = "chi2"
    df_denom: float | None = None

    def _labels(self) -> list[str]:
        return [hypothesis_label(row, self.L.columns, r) for row, r in zip(self.L.values, self.rhs)]

    def _stats(self) -> list[tuple[str, str]]:
        if self.test == "chi2":
            return [(f"chi2({self.df})", f"{self.statistic:.2f}"), ("Prob > chi2", f"{self.pvalue:.4f}")]
        return [(f"F({self.df}, {self.df_denom:g})", f"{self.statistic:.2f}"),
                ("Prob > F", f"{self.pvalue:.4f}")]

    def as_text(self) -> str:
        lines = [f" ({i:2d})  {lab}" for i, lab in enumerate(self._labels(), start=1)]
        return "\n".join(lines + [""] + [f"{k:>20} = {v:>8}" for k, v in self._stats()])

    def tables(self) -> list[Table]:
        rows = [[f"({i})", lab] for i, lab in enumerate(self._labels(), start=1)]
        return [Table(["", "Hypothesis"], rows, "Wald test"),
                Table(["", ""], [list(r) for r in self._stats()])]


@dataclass
class StoredResults:
    """Stored results in the spirit of Stata's ``e()``.

    scalars: N, k, k_f, k_r, k_rs, k_rc, rank, df_m, ic, converged, ll, chi2, p,
    Q_M, df_Q_M, p_Q_M. ``b``/``V``: fixed effects and variance parameters in the
    estimation metric (log SD, atanh correlation); ``b_report``/``V_report`` the
    same in the reporting metric (SD, correlation), by the delta method. Index:
    (equation, name). ``e["ll"]`` reads a scalar or a macro."""

    scalars: dict
    macros: dict
    b: pd.Series
    V: pd.DataFrame
    b_report: pd.Series
    V_report: pd.DataFrame
    sample: np.ndarray = field(repr=False, default=None)

    def __getitem__(self, key):
        if key in self.scalars:
            return self.scalars[key]
        if key in self.macros:
            return self.macros[key]
        if key in ("b", "V", "b_report", "V_report", "sample"):
            return getattr(self, key)
        raise KeyError(key)


class TTestTable(pd.DataFrame):
    """t tests, one row per coefficient or hypothesis ``L beta = r``: columns ``coef``
    (L b), ``std_err``, ``t``, ``df``, ``pvalue``, ``lower``, ``upper``.

    It is a DataFrame, with the names of statsmodels' ``ContrastResults`` as well:
    ``effect``, ``sd``, ``tvalue``, ``df_denom`` (arrays), ``conf_int()`` (k x 2) and
    ``summary()`` (the coefficient table, printed as Stata's), plus ``as_markdown()``
    and ``as_latex()``."""

    _metadata = ["level"]

    @property
    def _constructor(self):
        return TTestTable

    @property
    def effect(self) -> np.ndarray:
        return self["coef"].to_numpy()

    @property
    def sd(self) -> np.ndarray:
        return self["std_err"].to_numpy()

    @property
    def tvalue(self) -> np.ndarray:
        return self["t"].to_numpy()

    @property
    def df_denom(self) -> np.ndarray:
        return self["df"].to_numpy()

    def conf_int(self) -> np.ndarray:
        """(k, 2) array of the intervals' lower and upper limits."""
        return self[["lower", "upper"]].to_numpy()

    def summary(self) -> TextDisplay:
        """The tests as Stata's coefficient table with a df column."""
        rows = [FixedRow(str(k), r.coef, r.std_err, r.t, r.pvalue, r.lower, r.upper)
                for k, r in self.iterrows()]
        table = CoefTable(rows, stat="t", df=list(self["df"]), level=getattr(self, "level", 95.0))
        rule = "-" * table.width()
        text = "\n".join([rule] + table.text_lines("") + [rule]) + "\n"
        return TextDisplay(text, [table.table("", "t tests")])

    def as_markdown(self) -> str:
        return self.summary().as_markdown()

    def as_latex(self) -> str:
        return self.summary().as_latex()
