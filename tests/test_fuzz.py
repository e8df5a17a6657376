"""The random-design harness (tools/fuzz.py) on a short run: every fit ends ok or with a
ValueError naming bad input; no crash, hang, silent NaN, wrong or missed optimum
against the dense likelihood."""

import importlib.util
from pathlib import Path

TOOL = Path(__file__).resolve().parent.parent / "tools" / "fuzz.py"


def test_random_designs_against_dense_likelihood(capsys):
    spec = importlib.util.spec_from_file_location("fuzz", TOOL)
    fuzz = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fuzz)
    rc = fuzz.main(["--fits", "60", "--batch", "30", "--seed", "7", "--timeout", "120"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "crash 0, hang 0, error 0, nan 0, wrong 0, below 0" in out
