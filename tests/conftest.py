import os
import sys

sys.path.insert(0, os.path.dirname(__file__))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def schoolcal():
    """The bundled schoolcal data (Stata manual examples 2-7)."""
    import mlmeta

    return mlmeta.datasets.load("schoolcal")
