"""Tests for formula parsing and model-frame construction."""

import warnings

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlmeta import BoundaryWarning, ConvergenceWarning, MissingDataWarning
from mlmeta.formula import ModelFrame, ParsedFormula, RandomTerm, build_model_frame, parse_formula


def frame(formula, data, **kwargs):
    return build_model_frame(parse_formula(formula), data, **kwargs)


@pytest.fixture
def schools():
    """Three districts with schools numbered 1..3 in each (ids local to the district)."""
    rng = np.random.default_rng(1)
    n = 36
    district = np.repeat([10, 20, 30], 12)
    school = np.tile(np.repeat([1, 2, 3], 4), 3)
    return pd.DataFrame(
        {
            "y": rng.normal(size=n),
            "x": rng.normal(size=n),
            "year": np.tile([0.0, 1.0, 2.0, 3.0], 9),
            "f": np.tile(["a", "b", "c"], 12),
            "district": district,
            "school": school,
            "v": rng.uniform(0.1, 1.0, size=n),
        }
    )


# --------------------------------------------------------------------------- #
# parse_formula
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "formula, rhs, correlated",
    [
        ("y ~ (1 | g)", "1", True),
        ("y ~ (1 + x | g)", "1 + x", True),
        ("y ~ (1 + x || g)", "1 + x", False),
        ("y ~ (0 + x | g)", "0 + x", True),
        ("y ~ (-1 + x | g)", "-1 + x", True),
        ("y ~ (x | g)", "x", True),
        ("y ~ ((1 | g))", "1", True),
    ],
)
def test_bar_forms(formula, rhs, correlated):
    parsed = parse_formula(formula)
    assert parsed == ParsedFormula("y", "1", (RandomTerm("g", ("g",), rhs, correlated),))


def test_nesting_expansion():
    parsed = parse_formula("y ~ x + (1 + x || a/b/c)")
    assert [t.group for t in parsed.random] == ["a", "a:b", "a:b:c"]
    assert [t.group_vars for t in parsed.random] == [("a",), ("a", "b"), ("a", "b", "c")]
    assert {t.rhs for t in parsed.random} == {"1 + x"}
    assert not any(t.correlated for t in parsed.random)


def test_colon_group_and_order():
    parsed = parse_formula("y ~ (1 | district) + (1 + x | district:school)")
    assert parsed.random == (
        RandomTerm("district", ("district",), "1", True),
        RandomTerm("district:school", ("district", "school"), "1 + x", True),
    )


@pytest.mark.parametrize(
    "formula, fixed",
    [
        ("y ~ (1 | g)", "1"),
        ("y ~ x + (1 | g)", "x"),
        ("y ~ (1 | g) + x + z", "x + z"),
        ("y ~ 0 + x + (1 | g)", "0 + x"),
        ("y ~ x - 1 + (1 | g)", "x - 1"),
        ("y ~ -1 + x + (1 | g)", "-1 + x"),
        ("y ~ I(x**2) + (1|g)", "I(x**2)"),
        ("y ~ C(f) * x + (1 | g)", "C(f) * x"),
        ("y ~ (a + b):c + (1 | g)", "(a + b):c"),
        ("y ~ x", "x"),
        ("`my y` ~ x + (1 | `my g`)", "x"),
    ],
)
def test_fixed_part(formula, fixed):
    assert parse_formula(formula).fixed_rhs == fixed


def test_backtick_names():
    parsed = parse_formula("`my y` ~ x + (1 | `my g`)")
    assert parsed.response == "my y"
    assert parsed.random[0].group_vars == ("my g",)


@pytest.mark.parametrize(
    "formula, message",
    [
        ("y x + (1|g)", r"no '~'"),
        ("~ x", r"empty response"),
        ("y ~ x ~ z", r"more than one '~'"),
        ("y ~ x + (1 | g", r"unbalanced parentheses.*'\('"),
        ("y ~ x) + (1 | g)", r"unbalanced parentheses.*'\)'"),
        ("y ~ ( | g)", r"empty left side of the bar in random term '\( \| g\)'"),
        ("y ~ (1 | )", r"empty grouping term.*'\(1 \| \)'"),
        ("y ~ (1 | g-h)", r"bad grouping variable 'g-h'"),
        ("y ~ (1 | a/)", r"bad grouping variable ''"),
        ("y ~ (1 | a:a)", r"bad grouping term 'a:a'"),
        ("y ~ x | g", r"'\|' outside parentheses in 'x \| g'"),
        ("y | z ~ x", r"'\|' outside parentheses"),
        ("y ~ x * (1 | g)", r"random term inside 'x \* \(1 \| g\)' must be added on its own"),
        ("y ~ x - (1 | g)", r"cannot be subtracted"),
        ("y ~ (1 | a | b)", r"exactly one '\|'"),
        ("y ~ x + ", r"empty term after '\+'"),
        ("log(y) ~ x", r"response 'log\(y\)' must be a single column name"),
        ("y ~ x + (1 | g) + (x | g)", r"grouping term 'g' appears in more than one.*\(1 \+ x \|\| g\)"),
        ("y ~ (1 | a/b) + (1 | a)", r"grouping term 'a' appears in more than one"),
        ("y ~ x : : z", r"cannot parse the fixed part 'x : : z'"),
        ("y ~ x + (1 + : | g)", r"cannot parse the random-effects formula"),
    ],
)
def test_formula_errors(formula, message):
    with pytest.raises(ValueError, match=message):
        parse_formula(formula)


# --------------------------------------------------------------------------- #
# build_model_frame: design matrices
# --------------------------------------------------------------------------- #


def test_fixed_design_intercept_last(schools):
    mf = frame("y ~ x + f + (1 | district)", schools)
    assert isinstance(mf, ModelFrame)
    assert mf.fe_names == ["x", "f[T.b]", "f[T.c]", "_cons"]
    assert mf.X.flags.f_contiguous and mf.X.dtype == np.float64
    np.testing.assert_array_equal(mf.X[:, 0], schools.x)
    np.testing.assert_array_equal(mf.X[:, 1], schools.f == "b")
    np.testing.assert_array_equal(mf.X[:, 3], 1.0)
    np.testing.assert_array_equal(mf.y, schools.y)
    assert mf.response == "y" and mf.n_dropped == 0 and mf.sample.all()


def test_fixed_design_interaction_and_transform(schools):
    mf = frame("y ~ x:f + I(x**2) + (1 | district)", schools)
    assert mf.fe_names[-1] == "_cons"
    j = mf.fe_names.index("I(x ** 2)")
    np.testing.assert_allclose(mf.X[:, j], schools.x**2)
    k = mf.fe_names.index("x:f[b]")
    np.testing.assert_allclose(mf.X[:, k], schools.x * (schools.f == "b"))


@pytest.mark.parametrize("fixed", ["0 + x + f", "x + f - 1"])
def test_no_intercept(schools, fixed):
    mf = frame(f"y ~ {fixed} + (1 | district)", schools)
    assert "_cons" not in mf.fe_names
    assert mf.fe_names == ["x", "f[a]", "f[b]", "f[c]"]


def test_random_design(schools):
    mf = frame("y ~ 1 + (1 + year || district) + (0 + f | district:school)", schools)
    assert mf.re_names == [["year", "_cons"], ["f[a]", "f[b]", "f[c]"]]
    assert all(Z.flags.f_contiguous and Z.dtype == np.float64 for Z in mf.Z)
    np.testing.assert_array_equal(mf.Z[0][:, 0], schools.year)
    np.testing.assert_array_equal(mf.Z[0][:, 1], 1.0)
    np.testing.assert_array_equal(mf.Z[1].sum(axis=1), 1.0)
    assert mf.terms[0].correlated is False and mf.terms[1].correlated is True
    assert mf.fe_names == ["_cons"]
    assert len(mf.re_specs) == 2


def test_implicit_random_intercept(schools):
    mf = frame("y ~ x + (year | district)", schools)
    assert mf.re_names == [["year", "_cons"]]


def test_zero_column_random_term(schools):
    with pytest.raises(ValueError, match=r"random term \(0 \| district\) has no columns"):
        frame("y ~ x + (0 | district)", schools)


def test_specs_reapply(schools):
    mf = frame("y ~ x + f + (1 + year | district)", schools)
    X_new = mf.fixed_spec.get_model_matrix(schools.iloc[:2])
    assert list(X_new.columns) == ["Intercept", "x", "f[T.b]", "f[T.c]"]


def test_data_as_dict(schools):
    mf = frame("y ~ x + (1 | district)", {c: schools[c].to_numpy() for c in schools})
    np.testing.assert_array_equal(mf.y, schools.y)


# --------------------------------------------------------------------------- #
# groups and nesting
# --------------------------------------------------------------------------- #


def test_group_codes_with_repeated_inner_ids(schools):
    mf = frame("y ~ x + (1 | district) + (1 | district:school)", schools)
    np.testing.assert_array_equal(mf.groups[0], np.repeat([0, 1, 2], 12))
    np.testing.assert_array_equal(mf.groups[1], np.repeat(np.arange(9), 4))
    assert mf.groups[1].dtype == np.int64
    assert mf.group_labels[0] == [10, 20, 30]
    assert mf.group_labels[1] == [(d, s) for d in (10, 20, 30) for s in (1, 2, 3)]
    same = frame("y ~ x + (1 | district/school)", schools)
    np.testing.assert_array_equal(same.groups[1], mf.groups[1])


def test_repeating_inner_ids_are_crossed_with_a_note(schools):
    mf = frame("y ~ x + (1 | district) + (1 | school)", schools)
    assert mf.n_tree == 1 and mf.nesting == [None, "crossed"]
    assert [t.group for t in mf.terms] == ["district", "school"]
    assert len(mf.crossing) == 1
    assert "school is crossed with district" in mf.crossing[0]
    assert "| district:school" in mf.crossing[0]


def test_nesting_with_unique_inner_ids(schools):
    data = schools.assign(school=schools.district * 100 + schools.school)
    mf = frame("y ~ x + (1 | district) + (1 | school)", data)
    assert len(mf.group_labels[1]) == 9
    assert mf.group_labels[1][:3] == [1001, 1002, 1003]


def test_string_group_ids(schools):
    data = schools.assign(district=schools.district.map({10: "north", 20: "east", 30: "west"}))
    mf = frame("y ~ x + (1 | district)", data)
    assert mf.group_labels[0] == ["east", "north", "west"]
    np.testing.assert_array_equal(mf.groups[0], np.repeat([1, 0, 2], 12))


def test_fewer_than_two_groups(schools):
    data = schools[schools.district == 10]
    with pytest.raises(ValueError, match=r"level 'district' has only 1 group"):
        frame("y ~ x + (1 | district)", data)


def test_slope_without_within_group_variation(schools):
    data = schools.assign(dx=schools.district / 10.0)
    with pytest.raises(
        ValueError,
        match=r"random slope on 'dx' at level 'district' has no variation within its groups; "
        r"it cannot be separated from the random intercept",
    ):
        frame("y ~ x + (1 + dx | district)", data)
    # without a random intercept the same column is fine
    mf = frame("y ~ x + (0 + dx | district)", data)
    assert mf.re_names == [["dx"]]


# --------------------------------------------------------------------------- #
# missing values, infinities, columns
# --------------------------------------------------------------------------- #


def test_missing_rows_dropped_everywhere(schools):
    data = schools.copy()
    data["f"] = data["f"].astype(object)
    data.loc[2, "x"] = np.nan
    data.loc[5, "f"] = None
    data.loc[7, "school"] = np.nan
    data.loc[9, "v"] = np.nan
    data.loc[11, "y"] = np.nan
    se = np.sqrt(schools.v.to_numpy())
    se[13] = np.nan
    with pytest.warns(MissingDataWarning, match=r"dropped 6 of 36 rows") as record:
        mf = frame(
            "y ~ x + f + (1 | district) + (1 | district:school)",
            data,
            extra={"variance": "v", "se": se, "weights": None},
        )
    text = str(record[0].message)
    for name in ["'x'", "'f'", "'school'", "'v'", "'y'", "'se'"]:
        assert name in text
    keep = np.ones(36, dtype=bool)
    keep[[2, 5, 7, 9, 11, 13]] = False
    np.testing.assert_array_equal(mf.sample, keep)
    assert mf.n_dropped == 6
    np.testing.assert_array_equal(mf.y, schools.y[keep])
    np.testing.assert_array_equal(mf.X[:, 0], schools.x[keep])
    np.testing.assert_array_equal(mf.extra["variance"], schools.v[keep])
    np.testing.assert_array_equal(mf.extra["se"], se[keep])
    assert set(mf.extra) == {"variance", "se"}
    assert mf.X.shape[0] == mf.Z[1].shape[0] == mf.groups[1].shape[0] == 30


def test_pd_na_in_nullable_column(schools):
    data = schools.assign(x=pd.array(schools.x.tolist()[:-1] + [None], dtype="Float64"))
    with pytest.warns(MissingDataWarning, match=r"dropped 1 of 36"):
        mf = frame("y ~ x + (1 | district)", data)
    assert not mf.sample[-1] and mf.X.shape == (35, 2)


def test_no_warning_without_missing(schools):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mf = frame("y ~ x + (1 | district)", schools)
    assert mf.n_dropped == 0


def test_unused_category_after_dropping(schools):
    data = schools.assign(f=pd.Categorical(schools.f), x=schools.x.where(schools.f != "c"))
    with pytest.warns(MissingDataWarning):
        mf = frame("y ~ x + f + (1 | district)", data)
    assert mf.fe_names == ["x", "f[T.b]", "_cons"]


def test_all_rows_missing(schools):
    with pytest.warns(MissingDataWarning), pytest.raises(ValueError, match=r"no rows to fit"):
        frame("y ~ x + (1 | district)", schools.assign(x=np.nan))


@pytest.mark.parametrize("column", ["y", "x", "v"])
def test_infinite_values(schools, column):
    data = schools.copy()
    data.loc[4, column] = -np.inf
    with pytest.raises(ValueError, match=rf"column '{column}' contains infinite values"):
        frame("y ~ x + (1 | district)", data, extra={"variance": "v"})


@pytest.mark.parametrize(
    "formula, extra, message",
    [
        ("y ~ x + nope + (1 | district)", None,
         r"unknown column 'nope' in the fixed part; available columns: 'y', 'x'"),
        ("y ~ np.log(nope) + (1 | district)", None, r"unknown column 'nope'"),
        ("y ~ x + (1 + nope | district)", None, r"unknown column 'nope' in random term"),
        ("y ~ x + (1 | nope)", None, r"unknown column 'nope' in the grouping term 'nope'"),
        ("y ~ x + (1 | district:nope)", None, r"unknown column 'nope'"),
        ("nope ~ x + (1 | district)", None, r"unknown column 'nope' in the response"),
        ("y ~ x + (1 | district)", {"variance": "nope"}, r"unknown column 'nope' in variance='nope'"),
        ("y ~ x + (1 | district)", {"se": np.ones(5)}, r"se has length 5 but data has 36 rows"),
        ("f ~ x + (1 | district)", None, r"response 'f' must be numeric"),
    ],
)
def test_column_errors(schools, formula, extra, message):
    with pytest.raises(ValueError, match=message):
        frame(formula, schools, extra=extra)


def test_transform_of_column_with_missing_is_dropped(schools):
    data = schools.assign(w=schools.x.abs() + 1)
    data.loc[0, "w"] = np.nan
    with pytest.warns(MissingDataWarning, match=r"'w' \(1\)"):
        mf = frame("y ~ center(w) + np.log(w) + (1 | district)", data)
    assert mf.X.shape == (35, 3)


# --------------------------------------------------------------------------- #
# rank
# --------------------------------------------------------------------------- #


def test_collinear_moderators(schools):
    data = schools.assign(x2=2 * schools.x - schools.year)
    mf = frame("y ~ x + year + x2 + (1 | district)", data)
    assert mf.fe_names == ["x", "year", "_cons"] and mf.omitted == ["x2"]
    assert mf.X.shape[1] == 3
    assert "x2 omitted because of collinearity" in mf.notes[0]
    with pytest.raises(ValueError, match=r"rank deficient.*'x2' is a linear combination of earlier columns"):
        build_model_frame(parse_formula("y ~ x + year + x2 + (1 | district)"), data,
                          collinear_fixed="error")


def test_constant_moderator(schools):
    mf = frame("y ~ x + c + (1 | district)", schools.assign(c=3.0))
    assert mf.omitted == ["c"] and "constant" in mf.notes[0]
    with pytest.raises(ValueError, match=r"rank deficient.*'c' is constant"):
        build_model_frame(parse_formula("y ~ x + c + (1 | district)"), schools.assign(c=3.0),
                          collinear_fixed="error")
    mf = frame("y ~ 0 + x + c + (1 | district)", schools.assign(c=3.0))
    assert mf.fe_names == ["x", "c"]


def test_more_columns_than_rows(schools):
    data = schools.iloc[:3].assign(district=[1, 2, 2], x2=[1.0, 5.0, 2.0], x3=[0.0, 1.0, 7.0])
    mf = frame("y ~ x + x2 + x3 + (1 | district)", data)
    assert len(mf.omitted) == 1 and mf.X.shape[1] == 3


def test_collinear_random_columns(schools):
    data = schools.assign(x2=2 * schools.x)
    with pytest.raises(ValueError, match=r"random-effects columns .* collinear.*collinear=True"):
        frame("y ~ x + (1 + x + x2 | district)", data)
    mf = build_model_frame(parse_formula("y ~ x + (1 + x + x2 | district)"), data,
                           collinear_random=True)
    assert mf.re_names[0] == ["x", "x2", "_cons"]


def test_warning_classes():
    for cls in (MissingDataWarning, ConvergenceWarning, BoundaryWarning):
        assert issubclass(cls, UserWarning)


# --------------------------------------------------------------------------- #
# properties
# --------------------------------------------------------------------------- #


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_missing=st.integers(0, 5))
def test_row_permutation_invariance(seed, n_missing):
    rng = np.random.default_rng(seed)
    n = 40
    data = pd.DataFrame(
        {
            "y": rng.normal(size=n),
            "x": rng.normal(size=n),
            "f": rng.choice(["a", "b", "c"], size=n),
            "outer": rng.integers(0, 4, size=n),
            "inner": rng.integers(0, 3, size=n),
            "v": rng.uniform(0.1, 1, size=n),
        }
    )
    data["f"] = data["f"].astype(object)
    data.loc[rng.choice(n, n_missing, replace=False), "x"] = np.nan
    perm = rng.permutation(n)
    formula = "y ~ x + f + (1 + x | outer) + (1 | outer:inner)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingDataWarning)
        try:
            a = frame(formula, data, extra={"variance": "v"})
        except ValueError:
            with pytest.raises(ValueError):
                frame(formula, data.iloc[perm], extra={"variance": "v"})
            return
        b = frame(formula, data.iloc[perm], extra={"variance": "v"})
    assert a.n_dropped == b.n_dropped == n_missing
    np.testing.assert_array_equal(b.sample, a.sample[perm])
    # position of each used permuted row in the unpermuted model frame
    rank = np.cumsum(a.sample) - 1
    idx = rank[perm[b.sample]]
    np.testing.assert_array_equal(b.y, a.y[idx])
    assert b.fe_names == a.fe_names and b.re_names == a.re_names
    np.testing.assert_array_equal(b.X, a.X[idx])
    np.testing.assert_array_equal(b.extra["variance"], a.extra["variance"][idx])
    for level in range(2):
        np.testing.assert_array_equal(b.Z[level], a.Z[level][idx])
        assert b.group_labels[level] == a.group_labels[level]
        np.testing.assert_array_equal(b.groups[level], a.groups[level][idx])


def test_positions_not_index_labels(schools):
    data = schools.set_index(np.arange(100, 136)[::-1])
    se = pd.Series(np.sqrt(schools.v.to_numpy()), index=np.arange(36))
    data.iloc[3, data.columns.get_loc("x")] = np.nan
    with pytest.warns(MissingDataWarning):
        mf = frame("y ~ x + (1 | district)", data, extra={"se": se})
    assert not mf.sample[3] and mf.sample.sum() == 35
    np.testing.assert_array_equal(mf.extra["se"], np.delete(se.to_numpy(), 3))
    np.testing.assert_array_equal(mf.y, np.delete(schools.y.to_numpy(), 3))


def test_quoted_bar_is_not_a_random_term():
    parsed = parse_formula("y ~ C(f, levels=['a|b', 'c']) + (1 | g)")
    assert parsed.fixed_rhs == "C(f, levels=['a|b', 'c'])"
    assert len(parsed.random) == 1


def test_group_labels_are_copied_at_once_and_listed_on_first_use():
    import pickle

    df = pd.DataFrame({"y": [1.0, 2.0, 3.0, 4.0, 5.0], "v": [0.1] * 5,
                       "a": [3, 3, 1, 1, 2], "b": ["x", "y", "x", "x", "y"]})
    f = build_model_frame(parse_formula("y ~ 1 + (1 | a) + (1 | a:b)"), df)
    labels = f.group_labels
    assert len(labels[1]) == 4 and labels[1]._list is None       # counted, not yet listed
    df.loc[:, "a"] = [9, 9, 9, 9, 9]                              # the data changes afterwards
    assert list(labels[0]) == [1, 2, 3]
    assert labels[1] == [(1, "x"), (2, "y"), (3, "x"), (3, "y")]
    assert labels[1][2] == (3, "x") and labels[1][-1] == (3, "y")
    again = pickle.loads(pickle.dumps(labels[1]))
    assert again == labels[1] and len(again) == 4
