"""Argument checks shared across mlmeta: one rule per argument, one message.

* :func:`n_jobs`: the number of threads of ``n_jobs=`` (None or -1: all cores).
* :func:`safeguard`: the ``safeguard=`` option of the optimiser (True, False, "auto").
* :func:`aligned`: pandas objects aligned on the data's index, arrays by position.
* :func:`reserved_name`: moderators may not be called like the intercept.
* :func:`cluster_values`: a ``cluster=`` argument as codes over the rows used by a fit.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

__all__ = ["n_jobs", "safeguard", "aligned", "reserved_name", "cluster_values", "RESERVED_NAMES"]

RESERVED_NAMES = ("_cons", "Intercept")  # mlmeta's (Stata's) and formulaic's intercept labels


def n_jobs(value) -> int:
    """Number of threads for ``n_jobs=``: None or -1 mean all cores, else a positive integer."""
    if value is None or (_is_int(value) and value == -1):
        return int(os.cpu_count() or 1)
    if _is_int(value) and value >= 1:
        return int(value)
    raise ValueError(f"n_jobs must be a positive integer, or None or -1 for all cores; got {value!r}")


def safeguard(value) -> bool | str:
    """The ``safeguard=`` option: True, False or "auto" (returned as bool or "auto")."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, str) and value == "auto":
        return "auto"
    raise ValueError(f"safeguard must be True, False or 'auto'; got {value!r}")


def aligned(values, index: pd.Index, what: str):
    """``values`` with pandas objects (Series, DataFrame) put in the order of ``index``.

    A pandas object whose index has the labels of ``index`` (in any order) is
    reindexed on it, as pandas aligns; one with the default index 0..n-1 (as
    ``pd.Series(array)`` makes) is taken by position; any other index raises
    ValueError. Anything else (lists, numpy arrays) is returned unchanged, to be
    taken by position. Returns a numpy array for a pandas object.
    """
    if not isinstance(values, (pd.Series, pd.DataFrame)):
        return values
    own = values.index
    if own.equals(index):
        return values.to_numpy()
    if len(own) == len(index) and own.is_unique and index.is_unique and own.isin(index).all():
        return values.reindex(index).to_numpy()
    if own.equals(pd.RangeIndex(len(own))):
        return values.to_numpy()
    missing = list(own[~own.isin(index)][:3])
    detail = f" (labels not in the data: {missing})" if missing else ""
    raise ValueError(
        f"{what} is a pandas {type(values).__name__} whose index does not match the data's index"
        f"{detail}; give it the data's index, or pass .to_numpy() to take it by position")


def reserved_name(name: str, where: str) -> None:
    """Refuse a moderator named like the intercept (Stata refuses a variable named _cons)."""
    if name in RESERVED_NAMES:
        raise ValueError(
            f"column {name!r} in {where} has the name of the intercept (reported as '_cons'); "
            f"rename the column, e.g. data.rename(columns={{{name!r}: '{name.lstrip('_')}_x'}})")


def cluster_values(res, cluster, data=None):
    """``(codes, index)`` of a ``cluster=`` argument over the rows a fit used (model-frame
    order): ``codes`` numbers the clusters 0..J-1 in the order of ``index``, their labels.

    ``cluster`` is a grouping term of the model (its labels; a tuple-labelled term gives
    a MultiIndex over its variables), a column of ``data``, or values with one entry
    per data row or per used row (a pandas Series aligned on the data's index). Labels
    are sorted when they can be compared."""
    frame = res.frame
    terms = list(frame.terms)
    names = [t.group for t in terms]
    if isinstance(cluster, str) and cluster in names:
        lvl = names.index(cluster)
        used, codes = np.unique(np.asarray(frame.groups[lvl]), return_inverse=True)
        labels = [frame.group_labels[lvl][c] for c in used]
        if labels and isinstance(labels[0], tuple):
            return codes, pd.MultiIndex.from_tuples(labels, names=list(terms[lvl].group_vars))
        return codes, pd.Index(labels, name=cluster)
    sample = np.asarray(frame.sample, dtype=bool)
    index = frame.data_index if frame.data_index is not None else pd.RangeIndex(sample.shape[0])
    if isinstance(cluster, str):
        if data is None:
            raise ValueError(f"cluster={cluster!r} is not a grouping term of the model ({names}); "
                             f"pass data= to take it from a column of the data")
        if cluster not in data:
            raise ValueError(f"unknown column {cluster!r} in data")
        values, name = data[cluster], cluster
    else:
        values, name = cluster, getattr(cluster, "name", None)
    if isinstance(values, (pd.Series, pd.DataFrame)) and len(values) == sample.shape[0]:
        values = aligned(values, index, "cluster")
    values = np.asarray(values)
    if values.ndim != 1:
        raise ValueError(f"cluster must be one-dimensional, got shape {values.shape}")
    if values.shape[0] == sample.shape[0]:
        values = values[sample]
    elif values.shape[0] != int(sample.sum()):
        raise ValueError(f"cluster has {values.shape[0]} values; expected one per data row "
                         f"({sample.shape[0]}) or per row used in the fit ({int(sample.sum())})")
    if pd.isna(values).any():
        raise ValueError("cluster has missing values in rows used by the model")
    try:
        codes, labels = pd.factorize(values, sort=True)
    except TypeError:
        codes, labels = pd.factorize(values, sort=False)
    return np.asarray(codes, dtype=np.intp), pd.Index(labels, name=name)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
