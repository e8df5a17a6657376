"""Bundled datasets: shapes, columns, types, a few values, and data integrity."""

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import minimize_scalar

from mlmeta import datasets

COLUMNS = {
    "pupiliq": ["study", "author", "year", "weeks", "setting", "tester",
                "nexper", "ncontrol", "stdmdiff", "se", "var"],
    "schoolcal": ["district", "school", "study", "stdmdiff", "var", "se", "year", "year_c"],
    "berkey": ["trial", "author", "year", "ni", "outcome", "yi", "vi", "v1i", "v2i"],
}
SHAPES = {"pupiliq": (19, 11), "schoolcal": (56, 8), "berkey": (10, 9)}
INTEGER = {
    "pupiliq": ["study", "year", "weeks", "nexper", "ncontrol"],
    "schoolcal": ["district", "school", "study", "year", "year_c"],
    "berkey": ["trial", "year", "ni"],
}
TEXT = {"pupiliq": ["author", "setting", "tester"], "schoolcal": [],
        "berkey": ["author", "outcome"]}


def test_names():
    assert datasets.names() == ["berkey", "pupiliq", "schoolcal"]


@pytest.mark.parametrize("name", sorted(COLUMNS))
def test_shape_columns_types(name):
    df = datasets.load(name)
    assert isinstance(df, pd.DataFrame)
    assert df.shape == SHAPES[name]
    assert list(df.columns) == COLUMNS[name]
    for col in INTEGER[name]:
        assert pd.api.types.is_integer_dtype(df[col]), col
    for col in TEXT[name]:
        assert pd.api.types.is_string_dtype(df[col]), col
    for col in set(COLUMNS[name]) - set(INTEGER[name]) - set(TEXT[name]):
        assert pd.api.types.is_float_dtype(df[col]), col
    assert not df.isna().any().any()


@pytest.mark.parametrize("name", sorted(COLUMNS))
def test_load_returns_a_fresh_copy(name):
    a = datasets.load(name)
    a.iloc[0, 0] = -999
    assert datasets.load(name).iloc[0, 0] != -999


@pytest.mark.parametrize("name", sorted(COLUMNS))
def test_per_dataset_docstrings(name):
    text = datasets.describe(name)
    assert "Source" in text and "Variables" in text
    for col in COLUMNS[name]:
        assert col in text, col
    pd.testing.assert_frame_equal(getattr(datasets, name)(), datasets.load(name))


def test_unknown_name():
    with pytest.raises(ValueError, match="berkey, pupiliq, schoolcal"):
        datasets.load("nope")
    with pytest.raises(ValueError, match="available"):
        datasets.describe("nope")


def test_pupiliq_values():
    df = datasets.load("pupiliq")
    assert list(df.study) == list(range(1, 20))
    first = df.iloc[0]
    assert (first.author, first.year, first.weeks, first.nexper, first.ncontrol) == \
        ("Rosenthal et al.", 1974, 2, 77, 339)
    assert (first.stdmdiff, first.se) == (0.03, 0.125)
    assert df.weeks.tolist() == [2, 21, 19, 0, 0, 3, 17, 24, 0, 1, 0, 0, 1, 2, 17, 5, 1, 2, 7]
    assert set(df.setting) == {"group", "indiv"} and set(df.tester) == {"aware", "blind"}
    assert df.stdmdiff.max() == 1.18
    np.testing.assert_allclose(df["var"], df.se ** 2, rtol=1e-12)
    # published 3-decimal standard errors
    np.testing.assert_array_equal(np.round(df.se, 3), df.se)


def test_schoolcal_values():
    df = datasets.load("schoolcal")
    assert df.district.nunique() == 11
    assert df.groupby("district").size().agg(["min", "max"]).tolist() == [3, 11]
    assert list(df.study) == list(range(1, 57))
    # school ids restart in every district; district:school identifies a school
    assert (df.groupby("district").school.min() == 1).all()
    assert not df.school.is_unique
    assert not df.duplicated(["district", "school"]).any()
    assert (df.year_c == df.year - 1990).all()
    np.testing.assert_allclose(df.se, np.sqrt(df["var"]), rtol=1e-15)
    first = df.iloc[0]
    assert (first.district, first.school, first.stdmdiff, first["var"], first.year) == \
        (11, 1, -0.18, 0.118, 1976)


def test_berkey_values():
    df = datasets.load("berkey")
    assert df.outcome.tolist() == ["PD", "AL"] * 5
    assert df.trial.tolist() == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert df.loc[0, ["yi", "vi", "v1i", "v2i"]].tolist() == [0.47, 0.0075, 0.0075, 0.003]
    # v1i/v2i are the rows of each trial's symmetric 2x2 sampling covariance matrix
    for _, g in df.groupby("trial"):
        S = g[["v1i", "v2i"]].to_numpy()
        np.testing.assert_array_equal(S, S.T)
        np.testing.assert_array_equal(np.diag(S), g.vi.to_numpy())


def _reml_random_effects(y, v, X):
    """REML fit of y = X b + u + e, u ~ N(0, tau2), e ~ N(0, v), by a 1-D search."""

    def negll(tau2):
        w = 1.0 / (v + tau2)
        XtWX = X.T @ (w[:, None] * X)
        b = np.linalg.solve(XtWX, X.T @ (w * y))
        r = y - X @ b
        return 0.5 * (np.sum(np.log(v + tau2)) + r @ (w * r) + np.linalg.slogdet(XtWX)[1])

    tau2 = minimize_scalar(negll, bounds=(0.0, 1.0), method="bounded",
                           options={"xatol": 1e-12}).x
    w = 1.0 / (v + tau2)
    XtWX = X.T @ (w[:, None] * X)
    return np.linalg.solve(XtWX, X.T @ (w * y)), tau2


def test_pupiliq_reproduces_stata_manual():
    """Stata: meta summarize theta .0836939 / tau2 .0188289; meta regress weeks -.0157453."""
    df = datasets.load("pupiliq")
    y, v = df.stdmdiff.to_numpy(), df.se.to_numpy() ** 2
    b, tau2 = _reml_random_effects(y, v, np.ones((len(y), 1)))
    assert b[0] == pytest.approx(0.0836939, abs=5e-8)
    assert tau2 == pytest.approx(0.0188289, abs=5e-8)
    b, tau2 = _reml_random_effects(y, v, np.column_stack([df.weeks, np.ones(len(y))]))
    assert b[0] == pytest.approx(-0.0157453, abs=5e-8)
    assert b[1] == pytest.approx(0.1941769, abs=5e-8)
    assert tau2 == pytest.approx(0.011166, abs=5e-7)
