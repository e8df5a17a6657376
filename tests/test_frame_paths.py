"""The model frame's numpy paths (plain numeric designs, integer group codes,
single-column rank checks, lazily built formula specs) against the general
formulaic / pandas paths they stand in for."""

import dataclasses
import pickle
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.linalg
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

import mlmeta
import mlmeta.formula as fm
import mlmeta.groups as grp
from mlmeta.design import build_design
from mlmeta.gram import is_tall, well_conditioned_gram


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(11)
    n = 48
    return pd.DataFrame({
        "y": rng.normal(size=n),
        "x": rng.normal(size=n),
        "xi": rng.integers(-3, 4, n),
        "x32": rng.normal(size=n).astype(np.float32),
        "xu": rng.integers(0, 9, n).astype(np.uint16),
        "big": rng.integers(2**60, 2**61, n),
        "center": rng.normal(size=n),
        "const": np.full(n, 2.0),
        "zero": np.zeros(n),
        "xdup": None,
        "f": np.tile(["a", "b", "c"], 16),
        "b": rng.integers(0, 2, n).astype(bool),
        "d": np.repeat([7, -2, 40, 3], 12),
        "s": np.tile(np.repeat([1, 2, 3], 4), 4),
        "ds": np.repeat(["u", "w", "v", "t"], 12),
        "v": rng.uniform(0.1, 1.0, n),
        "fo": np.tile(np.array(["b", "a", "Z", "ä", "10", "9"], dtype=object), 8),
        "fc": pd.Categorical(np.tile(["lo", "hi", "mid", "hi"], 12), categories=["mid", "lo", "none", "hi"]),
        "fs": pd.Series(np.tile(["q", "p"], 24), dtype="str"),
        "fS": pd.Series(np.tile(["q", "p"], 24), dtype="string"),
        "one": np.full(n, "k", dtype=object),
        "fv": np.where(np.isin(np.arange(n), [0, 9]), "gone", np.tile(["b", "a"], 24)).astype(object),
        "mixed": np.tile(np.array(["a", 1], dtype=object), 24),
    }).assign(xdup=lambda df: 2 * df.x)


def _with_missing(df):
    out = df.copy()
    out.loc[[0, 9], "x"] = np.nan
    out.loc[[4], "y"] = np.nan
    out.loc[[30], "v"] = np.nan
    out["d"] = out["d"].astype(float)
    out.loc[[17], "d"] = np.nan
    out.loc[[1, 2], "fo"] = None
    out.loc[[3], "fc"] = np.nan
    out.index = np.arange(len(out))[::-1] * 3
    return out


PLAIN = [
    "y ~ 1 + (1 | d) + (1 | d:s)",
    "y ~ (1 | d)",
    "y ~ x + (1 | d)",
    "y ~ x + xi + xu + x32 + (1 | d/s)",
    "y ~ 0 + x + (1 | d)",
    "y ~ x - 1 + (1 + x | d)",
    "y ~ xi + x + xi + (1 + x || d) + (1 | d:s)",
    "y ~ big + center + (1 | ds)",
    "y ~ x + const + (1 | d)",
    "y ~ x + xdup + (1 | d)",
    "y ~ 1 + 1 + (0 + x | d)",
    "y ~ `x` + (1 | d)",
    "y ~ f + (1 | d)",
    "y ~ x + (0 + f | d:s)",
    "y ~ 0 + f + (1 | d)",
    "y ~ x + f + ds + (1 | d)",
    "y ~ 0 + x + fo + f + (1 | d)",
    "y ~ 0 + fc + x + fs + (1 | d)",
    "y ~ fc - 1 + (1 | d)",
    "y ~ fs + fo + (0 + ds | d)",
    "y ~ ds + xdup + x + (1 | d)",
    "y ~ fv + (0 + fv | d)",         # with missing values, level 'gone' is in dropped rows only
    "y ~ fS + x + (1 | d)",          # pandas' string dtype (pd.NA): categorical too
]
GENERAL = [
    "y ~ b + (1 | d)",
    "y ~ x:xi + (1 | d)",
    "y ~ np.log(v) + (1 | d)",
    "y ~ C(xi) + x + (1 + x | d)",
    "y ~ f:x + (1 | d)",
    "y ~ C(f) + (1 | d)",
    "y ~ C(f) + fS + (1 | d)",
]
# categorical columns formulaic evaluates: one level, levels that are not all strings
FALLBACK = ["y ~ x + one + (1 | d)", "y ~ 0 + one + (1 | d)", "y ~ mixed + (1 | d)"]


def _general(monkeypatch):
    monkeypatch.setattr(fm, "plain_columns", lambda formula, columns: None)


def _build(formula, df, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            mf = fm.build_model_frame(fm.parse_formula(formula), df, extra={"variance": "v"}, **kwargs)
        except ValueError as exc:
            return ("error", str(exc)), [str(w.message) for w in caught]
    return mf, [str(w.message) for w in caught]


def _spec_matrix(spec, df):
    """A spec re-applied to a few rows, as predictions do."""
    return spec.get_model_matrix(fm.for_formulaic(df.iloc[5:9]), na_action="ignore")


def _assert_same_frame(a, b, df):
    assert a.fe_names == b.fe_names and a.re_names == b.re_names
    for u, v in [(a.y, b.y), (a.X, b.X), (a.sample, b.sample), *zip(a.Z, b.Z), *zip(a.groups, b.groups)]:
        assert u.dtype == v.dtype and u.shape == v.shape
        np.testing.assert_array_equal(u, v)
    assert a.X.flags.f_contiguous and all(z.flags.f_contiguous for z in a.Z)
    assert a.group_labels == b.group_labels
    assert [type(x) for L in a.group_labels for x in L] == [type(x) for L in b.group_labels for x in L]
    assert (a.n_dropped, a.omitted, a.notes, a.terms) == (b.n_dropped, b.omitted, b.notes, b.terms)
    np.testing.assert_array_equal(a.extra["variance"], b.extra["variance"])
    assert repr(a.fixed_spec) == repr(b.fixed_spec)
    pd.testing.assert_frame_equal(_spec_matrix(a.fixed_spec, df), _spec_matrix(b.fixed_spec, df))
    assert len(a.re_specs) == len(b.re_specs)
    for sa, sb in zip(a.re_specs, b.re_specs):
        assert repr(sa) == repr(sb)
        pd.testing.assert_frame_equal(_spec_matrix(sa, df), _spec_matrix(sb, df))


@pytest.mark.parametrize("missing", [False, True])
@pytest.mark.parametrize("formula", PLAIN + GENERAL + FALLBACK)
def test_numpy_design_matches_formulaic(formula, missing, data, monkeypatch):
    df = _with_missing(data) if missing else data
    fast, fast_warnings = _build(formula, df)
    if not isinstance(fast, tuple):     # numpy built the specs' parts exactly where it should
        specs = [fast.__dict__["_fixed_spec"], *fast.__dict__["_re_specs"]]
        parts = [formula.split("~")[1].split("(")[0]] + [f"({t.rhs} |" for t in fast.terms]
        for spec, part in zip(specs, parts):
            expected = formula in PLAIN or (formula in GENERAL + FALLBACK and part.startswith("("))
            assert isinstance(spec, fm.DeferredSpec) == expected, part
    _general(monkeypatch)
    slow, slow_warnings = _build(formula, df)
    assert fast_warnings == slow_warnings
    if isinstance(slow, tuple):
        assert fast == slow
    else:
        _assert_same_frame(fast, slow, df)


@pytest.mark.parametrize("formula", ["y ~ x + const + (1 | d)", "y ~ x + xdup + (1 | d)",
                                     "y ~ zero + (1 | d)", "y ~ 0 + zero + (1 | d)"])
def test_numpy_design_collinearity_errors(formula, data, monkeypatch):
    fast, _ = _build(formula, data, collinear_fixed="error")
    _general(monkeypatch)
    slow, _ = _build(formula, data, collinear_fixed="error")
    assert isinstance(fast, tuple) and fast == slow


def test_which_formulas_skip_formulaic(data):
    cols = {name: data[name] for name in data.columns}
    for formula in PLAIN:
        parsed = fm.parse_formula(formula)
        for rhs in [parsed.fixed_rhs] + [t.rhs for t in parsed.random]:
            assert fm.plain_columns(fm._parse_rhs(rhs, "test"), cols) is not None, rhs
    for rhs in ["b", "x:xi", "np.log(v)", "C(xi)", "f:x", "C(f)"]:
        assert fm.plain_columns(fm._parse_rhs(rhs, "test"), cols) is None, rhs


def test_specs_built_on_first_use(data):
    mf = fm.build_model_frame(fm.parse_formula("y ~ x + xi + (1 + x | d)"), data)
    assert isinstance(mf.__dict__["_fixed_spec"], fm.DeferredSpec)
    copy = pickle.loads(pickle.dumps(mf))
    replaced = dataclasses.replace(mf, y=mf.y * 2)
    spec = mf.fixed_spec
    assert mf.fixed_spec is spec                     # built once, then stored
    assert list(spec.get_model_matrix(data.iloc[:2]).columns) == ["Intercept", "x", "xi"]
    assert repr(copy.fixed_spec) == repr(spec) and repr(replaced.re_specs) == repr(mf.re_specs)
    shared = fm.build_model_frame(fm.parse_formula("y ~ 1 + (1 + x | d/s)"), data)
    specs = shared.re_specs                          # one spec per distinct random formula
    assert specs[0] is specs[1] and shared.re_specs is specs


# --------------------------------------------------------------------------- #
# group codes
# --------------------------------------------------------------------------- #


def _pandas_codes(values):
    codes, uniques = pd.factorize(pd.Series(values), sort=True)
    return codes.astype(np.int64), len(uniques)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-2**62, 2**62), min_size=1, max_size=40),
       st.sampled_from([np.int64, np.int32, np.uint8, np.uint64, np.int8]),
       st.booleans())
def test_integer_codes_match_pandas(values, dtype, narrow):
    info = np.iinfo(dtype)
    raw = np.array(values, dtype=object)
    if narrow:
        raw = raw % 7
    a = np.array([min(max(int(v), info.min), info.max) for v in raw], dtype=dtype)
    codes, count = grp.factorize(a)
    want, want_count = _pandas_codes(a)
    assert codes.dtype == np.int64 and count == want_count
    np.testing.assert_array_equal(codes, want)


def test_group_codes_numpy_and_series_inputs_agree():
    rng = np.random.default_rng(2)
    outer = rng.choice([5, -3, 10**12, 7], size=60)
    inner = rng.integers(0, 4, 60)
    labels = rng.choice(["p", "q", "r"], size=60).astype(object)
    for columns in ([outer], [outer, inner], [outer, labels, inner]):
        coded_np = [(c, *grp.factorize(c)) for c in columns]
        series = [pd.Series(c) for c in columns]
        coded_pd = [(s, *_pandas_codes(s)) for s in series]
        a, b = grp.group_codes(coded_np), grp.group_codes(coded_pd)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[2], b[2])
        assert a[1] == b[1]
        assert [type(x) for x in a[1]] == [type(x) for x in b[1]]


# --------------------------------------------------------------------------- #
# rank checks
# --------------------------------------------------------------------------- #


def _qr_dependent(X):
    """The pivoted-QR route of the rank check, for any number of columns."""
    norms = np.linalg.norm(X, axis=0)
    Xs = X / np.where(norms > 0, norms, 1.0)
    R, _ = scipy.linalg.qr(Xs, mode="r", pivoting=True)
    d = np.abs(np.diag(R))
    rank = int(np.sum(d > fm._RANK_TOL * d[0])) if d.size and d[0] > 0 else 0
    if rank == X.shape[1]:
        return []
    (R0,) = scipy.linalg.qr(Xs, mode="r")
    d0 = np.abs(np.diag(R0))
    return sorted(np.argsort(d0, kind="stable")[: X.shape[1] - rank].tolist())


@pytest.mark.parametrize("column", [np.zeros(6), np.ones(6), np.full(6, 1e-300),
                                    np.array([0.0, 0, 0, 5e-324, 0, 0]), np.arange(6.0) - 2.5,
                                    np.array([0.0, 0, 0, 0, 0, -3.0]), np.full(6, 1e200)])
def test_single_column_rank_check_matches_qr(column):
    X = column[:, None]
    with np.errstate(over="ignore", invalid="ignore"):   # norms of huge columns overflow
        assert fm._dependent_columns(X) == _qr_dependent(X)


def _tall(kind, n=5000, seed=3):
    rng = np.random.default_rng(seed)
    x1, x2 = rng.standard_normal(n), rng.standard_normal(n)
    one = np.ones(n)
    return {
        "independent": np.column_stack([x1, x2, one]),
        "offset 1e7": np.column_stack([x1 + 1e7, x2, one]),        # badly conditioned, full rank
        "exact combination": np.column_stack([x1, x2, x1 - 2 * x2]),
        "combination + 1e-9": np.column_stack([x1, x2, x1 - 2 * x2 + 1e-9 * rng.standard_normal(n)]),
        "combination + 1e-4": np.column_stack([x1, x2, x1 - 2 * x2 + 1e-4 * rng.standard_normal(n)]),
        "combination + 0.5": np.column_stack([x1, x2, x1 - 2 * x2 + 0.5 * rng.standard_normal(n)]),
        "constant twice": np.column_stack([x1, one, 3 * one]),
        "zero column": np.column_stack([x1, np.zeros(n), one]),
        "huge": np.column_stack([1e200 * x1, x2, one]),
        "tiny": np.column_stack([1e-200 * x1, x2, one]),
    }[kind]


@pytest.mark.parametrize("kind", ["independent", "offset 1e7", "exact combination",
                                  "combination + 1e-9", "combination + 1e-4", "combination + 0.5",
                                  "constant twice",
                                  "zero column", "huge", "tiny"])
def test_tall_rank_check_matches_qr(kind):
    """Tall designs may be cleared by the Gram matrix's test instead of a QR factorisation:
    the answer is the pivoted QR's, and the test clears only clearly independent columns."""
    X = _tall(kind)
    with np.errstate(over="ignore", invalid="ignore"):
        assert fm._dependent_columns(X) == _qr_dependent(X)
        clear = is_tall(X) and well_conditioned_gram(X) is not None
    # near-dependent (condition above 1e3) or underflowing columns are left to the QR
    assert clear == (kind in ("independent", "combination + 0.5"))


# --------------------------------------------------------------------------- #
# results
# --------------------------------------------------------------------------- #


def test_result_tables_are_stable_and_match_scipy(schoolcal, fitted):
    res = fitted("stdmdiff ~ year_c + (1 | district) + (1 | district:school)", "schoolcal", variance="var")
    ev = res.model.evaluate(res.theta)
    res.re_params()                                  # many further evaluations of the model
    np.testing.assert_array_equal(res.params.values, ev.beta)
    np.testing.assert_array_equal(res.cov_params().values, ev.cov_beta)
    z = res.zvalues.values
    np.testing.assert_array_equal(res.pvalues.values, 2 * stats.norm.sf(np.abs(z)))
    assert list(res.params.index) == list(res.bse.index) == ["year_c", "_cons"]
    assert (res.params.name, res.bse.name, res.zvalues.name, res.pvalues.name) == \
        ("coef", "std err", "z", "P>|z|")
    # statsmodels' name of the statistics: z statistics here
    pd.testing.assert_series_equal(res.tvalues, res.zvalues)
    t = mlmeta.meregress("stdmdiff ~ year_c + (1 | district) + (1 | district:school)",
                         schoolcal, variance="var", test="t")
    assert t.pvalues.name == "P>|t|" and t.tvalues.name == "t"
    np.testing.assert_array_equal(t.pvalues.values,
                                  2 * stats.t.sf(np.abs(t.zvalues.values), t.df.values))


# --------------------------------------------------------------------------- #
# nested design
# --------------------------------------------------------------------------- #


def test_design_local_inner_ids_split_by_parent():
    rng = np.random.default_rng(8)
    outer = np.repeat([0, 1, 2], 4)
    local = np.tile([0, 0, 1, 1], 3)                 # ids repeat in every outer group
    unique = outer * 2 + local
    y, X, v = rng.normal(size=12), np.ones((12, 1)), rng.uniform(0.2, 1, 12)
    Z = [np.ones((12, 1)), np.ones((12, 1))]
    a = build_design(y, X, Z, [outer, local], v)
    b = build_design(y, X, Z, [outer, unique], v)
    assert a.n_groups == b.n_groups == [3, 6]
    for u, w in zip(a.groups + a.group_start, b.groups + b.group_start):
        np.testing.assert_array_equal(u, w)
    assert a.logdet_Lambda == b.logdet_Lambda
    np.testing.assert_array_equal(a.Xw, b.Xw)


@pytest.mark.parametrize("kind", ["independent", "offset 1e7", "combination + 0.5"])
def test_log_det_of_a_tall_design_matches_its_qr(kind):
    """log|X'X| of a tall design from the Gram matrix's Cholesky factor where it is well
    conditioned, from the QR factorisation otherwise: the same to 1e-12 (relative)."""
    from mlmeta.design import _logdet_gram

    X = _tall(kind)
    R = np.linalg.qr(X, mode="r")
    exact = 2.0 * float(np.sum(np.log(np.abs(np.diag(R)))))
    assert _logdet_gram(X) == pytest.approx(exact, rel=1e-12, abs=1e-10)
    assert (well_conditioned_gram(X) is not None) == (kind != "offset 1e7")


def test_pandas_string_columns_fit_and_predict_as_categorical():
    """pandas' ``string`` dtype (missing values pd.NA) is a categorical column like ``str``
    or object ones: the same fit, predictions on new data of any of these dtypes, the same
    ANOVA (formulaic alone reads such a column as numbers and fails)."""
    dat = mlmeta.datasets.load("berkey")
    f = "yi ~ 0 + outcome + (0 + outcome | trial)"
    base = mlmeta.meregress(f, dat.astype({"outcome": object}), variance="vi")
    new = dat.head(4)
    for dtype in ("string", "str"):
        res = mlmeta.meregress(f, dat.astype({"outcome": dtype}), variance="vi")
        assert list(res.params.index) == list(base.params.index)
        np.testing.assert_array_equal(res.params.values, base.params.values)
        for nd in (new.astype({"outcome": dtype}), new.astype({"outcome": object})):
            np.testing.assert_allclose(res.predict(newdata=nd).values,
                                       base.predict(newdata=new).values, rtol=1e-14)
    mixed = dat.assign(arm=np.repeat(["a", "b"], len(dat) // 2)).astype({"arm": "string"})
    res = mlmeta.meregress("yi ~ outcome + arm + (1 | trial)", mixed, variance="vi")
    assert "arm[T.b]" in res.params.index
    assert res.anova().shape[0] == 2
