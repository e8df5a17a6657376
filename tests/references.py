"""The stored reference values in tests/reference/ (made by the scripts there; the
tests never need R).

``load(name)`` is the parsed ``tests/reference/<name>.json``, read once per session
and shared by every caller: treat it as read-only. ``data_path(name)`` is a file under
``tests/reference/data/``; ``case_data(spec)`` the data a stored case names (a bundled
data set, or a CSV under ``tests/reference/data/`` by its repository-relative path);
``read_exact(path)`` a CSV with its floating-point columns parsed exactly (every
stored CSV a case names is read so).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

REFERENCE = Path(__file__).resolve().parent / "reference"
DATA = REFERENCE / "data"
_STORED_PREFIX = Path("tests", "reference", "data")


@functools.cache
def load(name: str):
    """The parsed ``tests/reference/<name>.json`` (cached; callers must not mutate it)."""
    return json.loads((REFERENCE / f"{name}.json").read_text())


def data_path(name: str) -> Path:
    """``tests/reference/data/<name>``; the file must exist."""
    path = DATA / name
    if not path.is_file():
        raise FileNotFoundError(f"no reference data file {path}")
    return path


def case_data(spec: str):
    """The data a stored case names: ``"tests/reference/data/<file>.csv"`` (as the JSON
    stores it, relative to the repository root) or the name of a bundled data set."""
    import mlmeta

    if "/" not in spec:
        return mlmeta.datasets.load(spec)
    path = Path(spec)
    if path.parent != _STORED_PREFIX:
        raise ValueError(f"reference data must live in {_STORED_PREFIX}/, got {spec!r}")
    return read_exact(data_path(path.name))


def read_exact(path):
    """The CSV at ``path`` with its floating-point columns parsed by Python's ``float``
    (correctly rounded): the same values with every pandas version (the C parser of
    pandas before 3.1 reads some 17-digit values one unit in the last place off, and
    the hard stored cases follow the last digits)."""
    import numpy as np
    import pandas as pd

    data = pd.read_csv(path)
    raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    for col in data.columns:
        if data[col].dtype.kind == "f":
            data[col] = np.array([float(x) if x else np.nan for x in raw[col]])
    return data
