"""The terms of a fit's fixed part and the data behind them (for ANOVA tables and
marginal means).

A formula term (``agec``, ``Sex``, ``agec:Sex``) owns the columns of X that formulaic made
for it; its factors are the expressions it multiplies, each numerical or categorical
(formulaic's encoder state). Categorical factors must use formulaic's default treatment
coding (R's ``contr.treatment``) or full dummy coding, which is what the type-III
construction of lmerTest starts from.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = ["FixedTerm", "fixed_terms", "used_data", "column_index", "categorical_levels"]

_INTERCEPT = "Intercept"


@dataclass(frozen=True)
class FixedTerm:
    """One term of the fixed part.

    label: the term as written by formulaic (``agec:Sex``); columns: positions in the
    results' ``fe_names``; factors: its factor expressions; numerics: those of them that
    are numerical; degree: the number of factors."""

    label: str
    columns: tuple
    factors: tuple
    numerics: tuple

    @property
    def degree(self) -> int:
        return len(self.factors)


def used_data(res, data=None) -> pd.DataFrame:
    """The rows of the fit's data that the model used, on a fresh index (unused categories
    dropped, as the model frame does). ``data`` overrides the data stored on the results."""
    data = getattr(res, "data", None) if data is None else data
    if data is None:
        raise ValueError("the results do not hold their data; pass data= (the data the model "
                         "was fitted to)")
    df = data if isinstance(data, pd.DataFrame) else pd.DataFrame(data)
    if len(df) != res.sample.shape[0]:
        raise ValueError(f"data has {len(df)} rows but the model was fitted to "
                         f"{res.sample.shape[0]}")
    sub = df.iloc[np.flatnonzero(res.sample)].reset_index(drop=True)
    for name in sub.columns:
        if isinstance(sub[name].dtype, pd.CategoricalDtype):
            sub[name] = sub[name].cat.remove_unused_categories()
    return sub


def _fe_name(formulaic_name: str) -> str:
    return "_cons" if formulaic_name == _INTERCEPT else formulaic_name


def column_index(res) -> dict:
    """formulaic column name -> position in ``res.fe_names`` (omitted columns absent)."""
    pos = {n: i for i, n in enumerate(res.fe_names)}
    names = res.frame.fixed_spec.column_names
    return {c: pos[_fe_name(c)] for c in names if _fe_name(c) in pos}


def categorical_levels(res, treatment: bool = False) -> dict:
    """Categorical factor expression -> its levels (formulaic's encoder state). With
    ``treatment=True``, raises for a contrast coding other than treatment with the
    default base (the coding lmerTest's type-III construction starts from)."""
    out = {}
    for expr, (kind, state) in res.frame.fixed_spec.encoder_state.items():
        if getattr(kind, "value", kind) != "categorical":
            continue
        contrasts = state.get("contrasts")
        coding = getattr(contrasts, "contrasts", None)
        if treatment and coding is not None and not (type(coding).__name__ == "TreatmentContrasts"
                                       and type(coding.base).__name__ == "Sentinel"):
            raise ValueError(f"factor {expr!r} is coded by {coding!r}; type-III tests and marginal "
                             f"means are built from the default treatment coding: write the "
                             f"factor without a contrast or base")
        out[expr] = list(state.get("categories", getattr(contrasts, "levels", [])))
    return out


def fixed_terms(res) -> list[FixedTerm]:
    """The terms of the fixed part (the intercept excluded), in formulaic's order, each
    with the positions of its columns in ``res.fe_names``."""
    spec = res.frame.fixed_spec
    names = spec.column_names
    where = column_index(res)
    cats = categorical_levels(res, treatment=True)
    out = []
    for term, idx in spec.term_indices.items():
        factors = tuple(str(f.expr) for f in term.factors)
        if factors in ((), ("1",)):
            continue
        cols = tuple(where[names[i]] for i in idx if names[i] in where)
        numerics = tuple(f for f in factors if f not in cats)
        out.append(FixedTerm(str(term), cols, factors, numerics))
    return out
