"""Integer codes for the groups of a grouping term (one or several variables) and the
labels of its groups."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

__all__ = ["GroupLabels", "factorize", "group_codes"]


def factorize(values) -> tuple[np.ndarray, int]:
    """Integer codes (sorted order when the values are orderable) and their count."""
    if isinstance(values, np.ndarray) and values.dtype.kind in "iu" and values.size:
        low = values.min()
        span = int(values.max()) - int(low)
        if span <= 4 * values.size:  # small range: rank the values through a table
            shifted = (values - low).astype(np.intp)
            present = np.zeros(span + 1, dtype=bool)
            present[shifted] = True
            rank = np.cumsum(present) - 1
            return rank[shifted].astype(np.int64), int(rank[-1]) + 1
        uniques, codes = np.unique(values, return_inverse=True)
        return codes.astype(np.int64, copy=False), len(uniques)
    try:
        codes, uniques = pd.factorize(values, sort=True)
    except TypeError:
        codes, uniques = pd.factorize(values, sort=False)
    return codes.astype(np.int64, copy=False), len(uniques)


class GroupLabels(Sequence):
    """The label of each group code: the group variables' values at the group's first
    row (a scalar, or a tuple for several variables). Taken from the data at once (copies),
    made into Python objects on first use (a fit with 10^6 groups never needs them)."""

    def __init__(self, values: list, first: np.ndarray):
        self._cols = [v[first] if isinstance(v, np.ndarray) else v.iloc[first] for v in values]
        self._n, self._list = int(first.shape[0]), None

    def _labels(self) -> list:
        if self._list is None:
            cols = [c.tolist() for c in self._cols]
            self._list = cols[0] if len(cols) == 1 else list(zip(*cols))
            self._cols = None
        return self._list

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        return self._labels()[i]

    def __iter__(self):
        return iter(self._labels())

    def __eq__(self, other):
        return list(self) == list(other) if isinstance(other, (Sequence, GroupLabels)) else NotImplemented

    def __repr__(self) -> str:
        return f"GroupLabels({self._labels()!r})"

    def __getstate__(self):
        return {"_cols": None, "_n": self._n, "_list": self._labels()}


def group_codes(coded: list) -> tuple[np.ndarray, GroupLabels, np.ndarray]:
    """Codes 0..G-1 for the combinations of the group variables, labels, first row of
    each group; ``coded`` holds (values, codes, count) per variable (see :func:`factorize`)."""
    _, codes, n_groups = coded[0]
    for _, inner, n_inner in coded[1:]:
        codes, n_groups = factorize(codes * n_inner + inner)
    n_obs = codes.shape[0]
    first = np.empty(n_groups, dtype=np.int64)
    first[codes[::-1]] = np.arange(n_obs - 1, -1, -1, dtype=np.int64)
    return codes, GroupLabels([v for v, _, _ in coded], first), first
