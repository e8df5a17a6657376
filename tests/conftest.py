import os
import sys

sys.path.insert(0, os.path.dirname(__file__))


import warnings  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def schoolcal():
    """The bundled schoolcal data (Stata manual examples 2-7)."""
    import mlmeta

    return mlmeta.datasets.load("schoolcal")


def _frozen(value):
    """A hashable stand-in for a keyword argument (mappings, sequences and arrays by value)."""
    if isinstance(value, dict):
        return ("dict", tuple(sorted((str(k), _frozen(v)) for k, v in value.items())))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_frozen(v) for v in value))
    if isinstance(value, np.ndarray):
        return ("ndarray", value.shape, value.dtype.str, value.tobytes())
    hash(value)                      # anything else must be hashable itself (TypeError if not)
    return value


@pytest.fixture(scope="session")
def fitted():
    """``fitted(formula, data_name, kind="meregress", **kwargs)``: ``mlmeta.meregress``
    (or ``mlmeta.mixed`` with ``kind="mixed"``) of ``formula`` on the bundled data set
    ``data_name``, fitted once per session for each (kind, formula, data_name, kwargs).

    The result is shared by every test that asks for the same fit: treat it as
    read-only. Warnings raised by the fit are raised again on every call, so a test
    sees the same warnings whether or not the fit came from the cache."""
    import mlmeta

    fits = {"meregress": mlmeta.meregress, "mixed": mlmeta.mixed}
    cache = {}

    def fit(formula, data_name, kind="meregress", **kwargs):
        if kind not in fits:
            raise ValueError(f"kind must be one of {sorted(fits)}, got {kind!r}")
        key = (kind, formula, data_name, tuple(sorted((k, _frozen(v)) for k, v in kwargs.items())))
        if key not in cache:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                res = fits[kind](formula, mlmeta.datasets.load(data_name), **kwargs)
            cache[key] = (res, [(w.message, w.category) for w in caught])
        res, caught = cache[key]
        for message, category in caught:
            warnings.warn(message, category, stacklevel=2)
        return res

    return fit
