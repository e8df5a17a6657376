"""Design matrices of plain terms built with numpy, as formulaic builds them.

A formula part made only of the intercept, plain numeric columns (numpy integer or
float dtype) and plain categorical columns (strings, or a pandas categorical of
strings), each term a single column read as is, is evaluated here instead of by
formulaic, with formulaic's columns, names and order:

* a numeric column ``x`` gives the column ``x``;
* a categorical column ``f`` (pandas' ``string`` dtype included, which formulaic reads
  as categorical once it holds objects: :func:`for_formulaic`) with levels
  l_1 < ... < l_m (sorted strings, or the used categories in their order) gives the
  indicator columns ``f[T.l_2]`` ... ``f[T.l_m]`` (treatment contrasts, l_1 the
  reference) when the intercept is already spanned by an earlier term (the intercept
  itself, or an earlier categorical term), and ``f[l_1]`` ... ``f[l_m]`` (all levels)
  otherwise;
* terms in formulaic's order (the intercept first, then the terms as written).

The formulaic ModelSpec (re-applied by predictions) is built only when it is read,
from a small frame holding every level of each categorical column
(:class:`DeferredSpec`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np
import pandas as pd
from formulaic import Formula

__all__ = ["FORMULAIC_INTERCEPT", "CONTEXT", "DeferredSpec", "for_formulaic", "plain_columns",
           "plain_design"]

FORMULAIC_INTERCEPT = "Intercept"
CONTEXT = {"np": np, "numpy": np}
_PLAIN_NAME = re.compile(r"[^\W\d]\w*")  # identifiers, non-ASCII letters included


class DeferredSpec:
    """A formulaic ModelSpec built once, on first use, by evaluating ``formula`` on a few
    stored rows holding every level of its categorical columns (specs of plain terms
    depend on dtypes and levels, not on values)."""

    __slots__ = ("formula", "row", "spec")

    def __init__(self, formula: Formula, row: dict):
        self.formula, self.row, self.spec = formula, row, None

    def build(self):
        if self.spec is None:
            n = max((len(v) for v in self.row.values()), default=1)
            data = pd.DataFrame(self.row, index=pd.RangeIndex(n))
            self.spec = self.formula.get_model_matrix(data, context=CONTEXT, na_action="ignore").model_spec
        return self.spec


def _na_strings(dtype) -> bool:
    """pandas' ``string`` dtype (missing values pd.NA), which formulaic takes for numbers."""
    return isinstance(dtype, pd.StringDtype) and dtype.na_value is pd.NA


def for_formulaic(data: pd.DataFrame) -> pd.DataFrame:
    """``data`` with its pandas ``string`` columns (pd.NA) as object columns, which
    formulaic reads as categorical, as it reads pandas' ``str`` columns."""
    cols = [c for c in data.columns if _na_strings(data[c].dtype)]
    return data.astype({c: object for c in cols}) if cols else data


def _is_categorical(dtype) -> bool:
    """Objects, strings or a pandas categorical: formulaic's categorical kind."""
    return isinstance(dtype, (pd.CategoricalDtype, pd.StringDtype)) or (
        isinstance(dtype, np.dtype) and dtype.kind == "O")


def plain_columns(formula: Formula, columns: Mapping) -> list | None:
    """The column read by each term of a formula made only of the intercept (None) and
    plain numeric or categorical columns (no transform, no interaction), in formulaic's
    column order; None when formulaic must evaluate the formula."""
    out = []
    for term in formula:
        if len(term.factors) != 1:
            return None
        factor = term.factors[0]
        name, method = str(factor.expr), factor.eval_method.value
        if method == "literal" and name == "1" and str(term) == "1":
            out.append(None)
            continue
        if (method != "lookup" or str(term) != name or name == FORMULAIC_INTERCEPT
                or not _PLAIN_NAME.fullmatch(name) or name not in columns):
            return None
        dtype = columns[name].dtype
        if not ((isinstance(dtype, np.dtype) and dtype.kind in "iuf") or _is_categorical(dtype)):
            return None
        out.append(name)
    return out


def _levels(column: pd.Series, rows: np.ndarray | None):
    """(codes over the used rows, levels, levels as a column of the column's dtype) of a
    categorical column whose levels are all strings; None otherwise (formulaic decides)."""
    dtype = column.dtype
    if isinstance(dtype, pd.CategoricalDtype):
        cats = dtype.categories
        if not all(isinstance(c, str) for c in cats):
            return None
        codes = column.cat.codes.to_numpy()
        if rows is not None:
            codes = codes[rows]
        used = np.zeros(len(cats), dtype=bool)
        used[codes] = True
        new = np.cumsum(used) - 1
        levels = [c for c, u in zip(cats, used) if u]
        kept = pd.Categorical(levels, categories=levels, ordered=dtype.ordered)
        return new[codes], levels, kept
    values = column.to_numpy(dtype=object)
    if rows is not None:
        values = values[rows]
    if pd.api.types.infer_dtype(values, skipna=False) != "string":
        return None
    codes, levels = pd.factorize(values, sort=True)
    return codes, levels.tolist(), pd.Series(levels.tolist(), dtype=object if _na_strings(dtype) else dtype)


def plain_design(formula: Formula, plain: list, columns: Mapping, rows: np.ndarray, n_dropped: int):
    """The design of a formula of :func:`plain_columns` over ``rows`` (all rows when
    ``n_dropped`` is 0): (float matrix in F order, formulaic's column names, a
    :class:`DeferredSpec`, whether the intercept is a column), or None where a
    categorical column has a level that is not a string, or fewer than two levels
    (formulaic decides those)."""
    n_obs = rows.shape[0]
    blocks, names, row = [], [], {}
    spanned = False                 # whether the intercept is in the span of the terms so far
    for name in plain:
        if name is None:
            blocks.append(np.ones((n_obs, 1)))
            names.append(FORMULAIC_INTERCEPT)
            spanned = True
            continue
        column = columns[name]
        if not _is_categorical(column.dtype):
            values = column.to_numpy()
            blocks.append((values[rows] if n_dropped else values).astype(np.float64)[:, None])
            names.append(name)
            row[name] = values[rows[:1]]
            continue
        coded = _levels(column, rows if n_dropped else None)
        if coded is None or len(coded[1]) < 2:
            return None
        codes, levels, kept = coded
        first = 1 if spanned else 0
        block = np.zeros((n_obs, len(levels) - first))
        hit = codes >= first
        block[np.flatnonzero(hit), codes[hit] - first] = 1.0
        blocks.append(block)
        names += [f"{name}[T.{lv}]" if spanned else f"{name}[{lv}]" for lv in levels[first:]]
        row[name] = kept
        spanned = True
    n = max((len(v) for v in row.values()), default=1)
    for key, values in row.items():     # every stored column as long as the longest
        if len(values) < n:
            row[key] = (pd.Series(values).take(np.minimum(np.arange(n), len(values) - 1))
                        .reset_index(drop=True))
    M = np.asfortranarray(np.hstack(blocks)) if blocks else np.empty((n_obs, 0), order="F")
    return M, names, DeferredSpec(formula, row), None in plain
