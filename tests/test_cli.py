"""The command-line interface: ``mlmeta fit ...`` / ``python -m mlmeta``."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pandas as pd
import pytest

import mlmeta
from mlmeta.cli import EXAMPLES, main

SCHOOLCAL_FORMULA = "stdmdiff ~ 1 + (1 | district) + (1 | district:school)"
LLF_SCHOOLCAL = -7.9587239          # Stata / metafor, 3-level REML


def bundled_csv(tmp_path_factory, name):
    """The bundled data set ``name`` written to a CSV file, as a user would have it."""
    path = tmp_path_factory.mktemp("data") / f"{name}.csv"
    mlmeta.datasets.load(name).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def schoolcal_csv(tmp_path_factory):
    return bundled_csv(tmp_path_factory, "schoolcal")


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------- #
# successful fits

def test_example_schoolcal(capsys):
    code, out, err = run(capsys, "fit", "--example", "schoolcal")
    assert code == 0, err
    assert "Log restricted-likelihood" in out
    assert "-7.958724" in out
    assert ".1847132" in out
    assert "district:school" in out
    assert err == ""


def test_data_file_and_formula(capsys, schoolcal_csv):
    code, out, err = run(capsys, "fit", str(schoolcal_csv), SCHOOLCAL_FORMULA, "--variance", "var")
    assert code == 0, err
    assert ".1847132" in out and "Log restricted-likelihood" in out


def test_se_and_ml(capsys, schoolcal_csv):
    code, out, err = run(capsys, "fit", str(schoolcal_csv), SCHOOLCAL_FORMULA,
                         "--se", "se", "--method", "ml")
    assert code == 0, err
    assert "Multilevel ML meta-analysis" in out
    assert "Log likelihood" in out and "restricted" not in out


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_is_the_bundled_data_set(capsys, tmp_path_factory, name):
    """--example NAME fits the bundled data set NAME: the same results as its CSV copy
    given as a data file with the example's formula and sampling option."""
    formula, kind, column, _ = EXAMPLES[name]
    code, example, err = run(capsys, "fit", "--example", name, "--json")
    assert code == 0, err
    code, from_file, err = run(capsys, "fit", str(bundled_csv(tmp_path_factory, name)), formula,
                               f"--{kind}", column, "--json")
    assert code == 0, err
    assert json.loads(example) == json.loads(from_file)
    assert json.loads(example)["nobs"] == len(mlmeta.datasets.load(name))


def test_example_pupiliq(capsys):
    code, out, err = run(capsys, "fit", "--example", "pupiliq")
    assert code == 0, err
    assert "Number of obs     =         19" in out
    assert "study" in out


def test_variance_components_and_level(capsys):
    code, out, err = run(capsys, "fit", "--example", "schoolcal", "--variance-components",
                         "--level", "90")
    assert code == 0, err
    assert "var(_cons)" in out and "sd(_cons)" not in out
    assert "[90% conf. interval]" in out


def test_covariance_option(capsys):
    code, out, err = run(capsys, "fit", "--example", "schoolcal",
                         "stdmdiff ~ year_c + (1 + year_c | district) + (1 | district:school)",
                         "--covariance", "district=independent")
    assert code == 0, err
    assert "district: Independent" in out
    assert "corr(" not in out


def test_json(capsys):
    code, out, err = run(capsys, "fit", "--example", "schoolcal", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["llf"] == pytest.approx(LLF_SCHOOLCAL, abs=1e-6)
    assert d["params"]["_cons"] == pytest.approx(0.1847132, abs=1e-6)
    assert d["nobs"] == 56 and d["method"] == "reml" and d["converged"] is True
    assert d["formula"] == SCHOOLCAL_FORMULA
    # no moderators: the model Wald test is missing and must be null, not NaN
    assert d["wald_chi2"] is None
    assert [r["param"] for r in d["re_params"]] == ["sd(_cons)", "sd(_cons)"]
    assert "NaN" not in out and "Infinity" not in out


def test_json_is_strict_with_level_and_variances(capsys):
    code, out, err = run(capsys, "fit", "--example", "pupiliq", "--json", "--level", "90",
                         "--variance-components")
    assert code == 0, err
    d = json.loads(out, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    lo, hi = d["conf_int"]["_cons"]
    b, se = d["params"]["_cons"], d["bse"]["_cons"]
    assert hi - lo == pytest.approx(2 * 1.6448536 * se, rel=1e-6)
    assert lo < b < hi
    assert d["level"] == 90
    assert d["re_params"][0]["param"].startswith("var(")


def test_verbose_log(capsys):
    code, out, err = run(capsys, "fit", "--example", "schoolcal", "--verbose")
    assert code == 0, err
    assert "EM iteration" in out
    # the log comes first, then the estimation table
    assert out.index("Iteration") < out.index("Number of obs")


def test_verbose_json_keeps_stdout_clean(capsys):
    code, out, err = run(capsys, "fit", "--example", "schoolcal", "--verbose", "--json")
    assert code == 0
    assert json.loads(out)["nobs"] == 56
    assert "Iteration" in err


def test_warnings_are_short(capsys):
    # correlated random slope: the correlation runs to the boundary
    code, out, err = run(capsys, "fit", "--example", "schoolcal",
                         "stdmdiff ~ year_c + (1 + year_c | district) + (1 | district:school)",
                         "--method", "ml")
    assert code == 0
    for line in err.splitlines():
        assert line.startswith("mlmeta: warning: ")
    assert "Traceback" not in err


def test_help_and_version(capsys):
    assert main(["--version"]) == 0
    assert "mlmeta" in capsys.readouterr().out
    assert main(["fit", "--help"]) == 0
    assert "--variance" in capsys.readouterr().out
    assert main([]) == 2


# --------------------------------------------------------------------------- #
# errors: message on stderr, exit status 2, no traceback

def check_error(capsys, argv, *fragments):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert err.startswith("mlmeta: error: ")
    assert "Traceback" not in err
    for frag in fragments:
        assert frag in err, err
    return err


def test_error_unknown_column(capsys, schoolcal_csv):
    check_error(capsys, ["fit", str(schoolcal_csv), "stdmdiff ~ nosuchvar + (1 | district)",
                         "--variance", "var"], "unknown column", "nosuchvar")


def test_error_unknown_variance_column(capsys, schoolcal_csv):
    check_error(capsys, ["fit", str(schoolcal_csv), SCHOOLCAL_FORMULA, "--variance", "vi"],
                "unknown column", "vi")


def test_error_bad_formula(capsys, schoolcal_csv):
    check_error(capsys, ["fit", str(schoolcal_csv), "stdmdiff ~ 1 + (1 | district",
                         "--variance", "var"], "parenthes")
    check_error(capsys, ["fit", str(schoolcal_csv), "stdmdiff 1 + (1 | district)",
                         "--variance", "var"], "~")


def test_error_missing_file(capsys, tmp_path):
    missing = tmp_path / "nope.csv"
    check_error(capsys, ["fit", str(missing), SCHOOLCAL_FORMULA, "--variance", "var"],
                "no such file", "nope.csv")


def test_error_unreadable_csv(capsys, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"")
    check_error(capsys, ["fit", str(bad), SCHOOLCAL_FORMULA, "--variance", "var"],
                "cannot read", "bad.csv")
    check_error(capsys, ["fit", str(tmp_path), SCHOOLCAL_FORMULA, "--variance", "var"],
                "directory")


def test_error_both_se_and_variance(capsys, schoolcal_csv):
    check_error(capsys, ["fit", str(schoolcal_csv), SCHOOLCAL_FORMULA, "--variance", "var",
                         "--se", "se"], "--se", "--variance")


def test_error_neither_se_nor_variance(capsys, schoolcal_csv):
    check_error(capsys, ["fit", str(schoolcal_csv), SCHOOLCAL_FORMULA], "--variance", "--se")


def test_error_options(capsys, schoolcal_csv):
    base = ["fit", str(schoolcal_csv), SCHOOLCAL_FORMULA, "--variance", "var"]
    check_error(capsys, base + ["--method", "gmm"], "--method")
    check_error(capsys, base + ["--covariance", "district"], "TERM=TYPE")
    check_error(capsys, base + ["--covariance", "district=bogus"], "bogus")
    check_error(capsys, base + ["--covariance", "nosuchterm=identity"], "nosuchterm")
    check_error(capsys, base + ["--level", "150"], "--level")
    check_error(capsys, ["fit", "--example", "nosuch"], "--example")
    check_error(capsys, ["fit", str(schoolcal_csv)], "formula")


def test_error_nonpositive_variances(capsys, tmp_path):
    df = pd.DataFrame({"y": [0.1, 0.2, 0.3, 0.4], "v": [0.01, 0.0, 0.02, 0.03],
                       "g": [1, 1, 2, 2]})
    path = tmp_path / "d.csv"
    df.to_csv(path, index=False)
    check_error(capsys, ["fit", str(path), "y ~ 1 + (1 | g)", "--variance", "v"], "positive")


# --------------------------------------------------------------------------- #
# as a program

def test_python_m_mlmeta():
    proc = subprocess.run([sys.executable, "-m", "mlmeta", "fit", "--example", "schoolcal"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Log restricted-likelihood" in proc.stdout
    assert ".1847132" in proc.stdout


def test_python_m_mlmeta_error():
    proc = subprocess.run([sys.executable, "-m", "mlmeta", "fit", "no_such_file.csv",
                           "y ~ 1 + (1 | g)", "--se", "se"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.startswith("mlmeta: error: ")
    assert "Traceback" not in proc.stderr


def test_json_output_program():
    proc = subprocess.run([sys.executable, "-m", "mlmeta", "fit", "--example", "schoolcal",
                           "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert math.isclose(json.loads(proc.stdout)["llf"], LLF_SCHOOLCAL, abs_tol=1e-6)
