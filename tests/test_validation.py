"""Argument and data validation: identifiability, index alignment, shared argument rules, names."""

import os
import warnings

import numpy as np
import pandas as pd
import pytest

import mlmeta
from dense import dense_loglik, dense_V
from mlmeta import MissingDataWarning
from mlmeta.batch import Model, fit_batch
from mlmeta.formula import build_model_frame, parse_formula
from mlmeta.validate import aligned, n_jobs, safeguard
from references import data_path, load

F_META = "stdmdiff ~ year_c + (1 | district) + (1 | district:school)"


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@pytest.fixture(scope="module")
def penicillin():
    """lme4's Penicillin data (24 plates crossed with 6 samples, one row per plate:sample),
    written by reference/make_validation_references.R."""
    return pd.read_csv(data_path("penicillin.csv"))


LME4 = load("validation_reference")


def _grouped(seed=0, n_groups=10, per_group=4):
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(n_groups), per_group)
    return pd.DataFrame({"y": rng.normal(size=g.size) + rng.normal(size=n_groups)[g], "g": g,
                         "c": np.tile(np.arange(per_group), n_groups), "x": rng.normal(size=g.size)})


# --------------------------------------------------------------------------- #
# 1. a level with one row per group cannot be separated from the residual
# --------------------------------------------------------------------------- #


def test_one_row_per_group_refused_like_lme4(penicillin):
    f = "diameter ~ 1 + (1 | plate) + (1 | plate:sample)"
    assert ("number of levels of each grouping factor must be < number of observations"
            in LME4["one_row_per_group_error"])
    with pytest.raises(ValueError, match=r"random term \(1 \| plate:sample\) has one observation per "
                                         r"group \(144 groups, 144 observations\)"):
        mlmeta.mixed(f, penicillin)
    with pytest.raises(ValueError, match="one observation per group"):
        Model(f, penicillin)
    # with known sampling variances such a level is the usual multilevel meta-analysis
    res = _quiet(mlmeta.meregress, f, penicillin.assign(v=1.0), variance="v")
    assert np.isfinite(res.llf)


def test_penicillin_crossed_fits_and_one_factor_model_matches_lme4(penicillin):
    res = mlmeta.mixed("diameter ~ 1 + (1 | plate) + (1 | sample)", penicillin)
    assert res.converged and list(res.groups.nesting) == ["top", "crossed"]
    ll, s2 = LME4["plate_only"]["loglik_reml"], LME4["plate_only"]["sigma2"]
    res = mlmeta.mixed("diameter ~ 1 + (1 | plate)", penicillin)
    assert res.llf_lme4 == pytest.approx(ll, abs=1e-5)
    assert res.scale == pytest.approx(s2, rel=1e-5)


def test_repeated_local_ids_are_crossed_and_the_note_says_how_to_nest():
    d = _grouped(per_group=8).assign(c=np.tile(np.repeat([0, 1, 2, 3], 2), 10))
    res = _quiet(mlmeta.mixed, "y ~ 1 + (1 | g) + (1 | c)", d)
    assert any("write the term with | g:c" in n for n in res.notes)
    nested = _quiet(mlmeta.mixed, "y ~ 1 + (1 | g) + (1 | g:c)", d)
    assert not any("crossed" in n for n in nested.notes)


def test_groups_with_single_rows_but_fewer_groups_than_rows_are_fitted():
    d = _grouped()
    d = d.drop(index=[1, 2, 3])                # group 0 has one row, the others four
    res = _quiet(mlmeta.mixed, "y ~ x + (1 | g)", d)
    assert np.isfinite(res.llf)


# --------------------------------------------------------------------------- #
# 2. pandas arguments are aligned on the data's index
# --------------------------------------------------------------------------- #


@pytest.fixture
def shuffled(schoolcal):
    """schoolcal with its index labels permuted (rows stay in the file's order)."""
    perm = np.random.default_rng(5).permutation(len(schoolcal))
    return schoolcal.set_index(pd.Index(perm + 1000))


def _dense_llf(res, variance):
    d = res.frame
    V = dense_V(d.Z, d.groups, [S.values for S in res.re_cov.values()], variance)
    return dense_loglik(d.y, d.X, V, res.method)[0]


def test_variance_series_aligned_on_index(shuffled):
    var = shuffled["var"].sample(frac=1.0, random_state=1)     # same labels, other order
    ref = _quiet(mlmeta.meregress, F_META, shuffled, variance="var")
    res = _quiet(mlmeta.meregress, F_META, shuffled, variance=var)
    assert res.llf == pytest.approx(ref.llf, rel=1e-10)
    assert res.llf == pytest.approx(_dense_llf(res, shuffled["var"].to_numpy()), rel=1e-9)
    # a plain array is taken by position
    pos = _quiet(mlmeta.meregress, F_META, shuffled, variance=var.to_numpy())
    assert pos.llf == pytest.approx(_dense_llf(pos, var.to_numpy()), rel=1e-9)
    assert abs(pos.llf - ref.llf) > 1e-3
    se = np.sqrt(var)
    assert _quiet(mlmeta.meregress, F_META, shuffled, se=se).llf == pytest.approx(ref.llf, rel=1e-10)


def test_series_with_foreign_index_refused(shuffled):
    var = pd.Series(shuffled["var"].to_numpy(), index=np.arange(len(shuffled)) + 5)
    with pytest.raises(ValueError, match="variance is a pandas Series whose index does not match "
                                         "the data's index"):
        mlmeta.meregress(F_META, shuffled, variance=var)
    M = Model(F_META, shuffled, variance="var")
    with pytest.raises(ValueError, match="y is a pandas Series whose index does not match"):
        M.fit(y=pd.Series(shuffled["stdmdiff"].to_numpy(), index=np.arange(len(shuffled)) + 5))


def test_model_fit_aligns_series(shuffled):
    M = Model(F_META, shuffled, variance="var")
    y = (shuffled["stdmdiff"] * 2).sample(frac=1.0, random_state=2)
    v = (shuffled["var"] * 1.5).sample(frac=1.0, random_state=3)
    a = _quiet(M.fit, y=y, variance=v)
    ref = _quiet(mlmeta.meregress, F_META, shuffled.assign(stdmdiff=shuffled.stdmdiff * 2,
                                                           var=shuffled["var"] * 1.5), variance="var")
    assert a.llf == pytest.approx(ref.llf, rel=1e-10)
    assert a.llf == pytest.approx(_dense_llf(a, shuffled["var"].to_numpy() * 1.5), rel=1e-9)
    # arrays stay positional
    b = _quiet(M.fit, y=y.to_numpy())
    assert b.llf != pytest.approx(_quiet(M.fit, y=shuffled["stdmdiff"] * 2).llf, rel=1e-6)


def test_mixed_model_fit_aligns_series_dense_reference():
    d = _grouped(seed=3).set_index(pd.Index(np.arange(40)[::-1] * 10))
    M = Model("y ~ x + (1 | g)", d)
    y = (d.y + d.x).sample(frac=1.0, random_state=4)
    res = _quiet(M.fit, y=y)
    S = res.re_cov["g"].values
    V = dense_V(res.frame.Z, res.frame.groups, [S], np.full(40, res.scale))
    ll_dense = dense_loglik((d.y + d.x).to_numpy(), res.frame.X, V, "reml")[0]
    assert res.llf == pytest.approx(ll_dense, rel=1e-9)
    ref = _quiet(mlmeta.mixed, "y ~ x + (1 | g)", d.assign(y=d.y + d.x))
    assert res.llf == pytest.approx(ref.llf, rel=1e-10)
    # a Series over the used rows only (after dropping a missing value) is aligned too
    dm = d.assign(x=d.x.where(np.arange(40) != 7))
    Mm = _quiet(Model, "y ~ x + (1 | g)", dm)
    used = (dm.y + 1.0)[dm.x.notna()].sample(frac=1.0, random_state=6)
    refm = _quiet(mlmeta.mixed, "y ~ x + (1 | g)", dm.assign(y=dm.y + 1.0))
    assert _quiet(Mm.fit, y=used).llf == pytest.approx(refm.llf, rel=1e-10)


def test_fit_batch_aligns_dataframe(shuffled):
    M = Model(F_META, shuffled, variance="var")
    Y = pd.DataFrame({"a": shuffled.stdmdiff, "b": shuffled.stdmdiff * 2}).sample(frac=1.0, random_state=7)
    br = fit_batch(M, Y, n_jobs=1)
    ref = fit_batch(M, np.c_[shuffled.stdmdiff, shuffled.stdmdiff * 2], n_jobs=1)
    np.testing.assert_allclose(br.llf, ref.llf, rtol=1e-12)


def test_aligned_rules():
    index = pd.Index([30, 10, 20])
    s = pd.Series([1.0, 2.0, 3.0], index=[10, 20, 30])
    np.testing.assert_array_equal(aligned(s, index, "v"), [3.0, 1.0, 2.0])
    np.testing.assert_array_equal(aligned(s.to_numpy(), index, "v"), [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(aligned(pd.Series([1.0, 2.0, 3.0]), index, "v"), [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"labels not in the data: \[40\]"):
        aligned(pd.Series([1.0, 2.0, 3.0], index=[10, 20, 40]), index, "v")
    with pytest.raises(ValueError, match="does not match"):
        aligned(pd.Series([1.0, 2.0], index=[10, 20]), index, "v")


# --------------------------------------------------------------------------- #
# 3. constant outcomes
# --------------------------------------------------------------------------- #


def test_constant_outcome_is_a_clear_error():
    d = _grouped()
    with pytest.raises(ValueError, match=r"the outcome 'y' is constant \(3\): the residual variance "
                                         r"cannot be estimated"):
        mlmeta.mixed("y ~ x + (1 | g)", d.assign(y=3.0))
    with pytest.raises(ValueError, match="fitted exactly by the fixed effects"):
        mlmeta.mixed("y ~ x + (1 | g)", d.assign(y=1.0 + 2.0 * d.x))
    M = Model("y ~ x + (1 | g)", d)
    with pytest.raises(ValueError, match="is constant"):
        M.fit(y=np.full(40, 2.0))


def test_outcomes_beyond_double_precision_are_refused_in_mixed():
    d = _grouped()
    rng = np.random.default_rng(5)
    for scale, what in ((1e200, "overflow"), (1e-200, "underflow")):
        with pytest.raises(ValueError, match=rf"the outcome 'y' reaches magnitude .*e[+-]200: sums of "
                                             rf"its squares would {what}"):
            mlmeta.mixed("y ~ x + (1 | g)", d.assign(y=scale * rng.normal(size=len(d))))
    # far inside the range the fit is the unscaled one, rescaled (dense likelihood)
    base = _quiet(mlmeta.mixed, "y ~ x + (1 | g)", d)
    big = _quiet(mlmeta.mixed, "y ~ x + (1 | g)", d.assign(y=d.y * 1e100))
    np.testing.assert_allclose(big.params / 1e100, base.params, rtol=1e-7)
    assert abs(big.llf - (base.llf - (len(d) - 2) * np.log(1e100))) < 1e-6 * abs(big.llf)


# --------------------------------------------------------------------------- #
# 3b. sampling variances and outcomes at the edge of double precision
# --------------------------------------------------------------------------- #


def test_a_tiny_sampling_variance_names_its_row(schoolcal):
    df = schoolcal.set_axis([f"r{i}" for i in range(len(schoolcal))])
    d = df.copy()
    d.loc["r3", "var"] = 1e-300
    with pytest.raises(ValueError, match=r"1 row\(s\) have sampling variances more than 1e\+10 "
                                         r"times smaller than the median sampling variance .*rows "
                                         r"'r3' \(1.0e-300\)"):
        mlmeta.meregress(F_META, d, variance="var")
    V = np.diag(d["var"].to_numpy())
    with pytest.raises(ValueError, match=r"rows 'r3' \(1.0e-300\)"):
        mlmeta.meregress(F_META, d, V=V)


def test_a_small_sampling_variance_within_range_fits_as_the_dense_likelihood(schoolcal):
    """One variance 1e-8 times the median: the fit is right (dense likelihood at the
    estimates), and stable in the variance's limit (estimates as at 1e-6)."""
    d = schoolcal.copy()
    med = float(d["var"].median())
    fits = {}
    for r in (1e-6, 1e-8):
        d.loc[3, "var"] = med * r
        res = _quiet(mlmeta.meregress, F_META, d, variance="var")
        assert res.converged
        m = res.model
        V = dense_V(m.design.Z, m.design.groups, m.Sigma_list(res.theta), m.design.variance)
        ll, beta, _ = dense_loglik(m.design.y, m.design.X, V)
        assert abs(res.llf - ll) < 1e-7 * abs(ll)
        fits[r] = res
    np.testing.assert_allclose(fits[1e-8].params, fits[1e-6].params, rtol=1e-5)


def test_an_outcome_too_large_for_its_sampling_variances_is_a_clear_error(schoolcal):
    with pytest.raises(ValueError, match="in units of its sampling standard deviations, is too large"):
        mlmeta.meregress(F_META, schoolcal.assign(stdmdiff=schoolcal.stdmdiff * 1e200), variance="var")
    # outcome and variances rescaled together: the same fit (REML llf shifts by -(n - p) log c)
    base = mlmeta.meregress(F_META, schoolcal, variance="var")
    c = 1e150
    res = mlmeta.meregress(F_META, schoolcal.assign(stdmdiff=schoolcal.stdmdiff * c,
                                                    var=schoolcal["var"] * c * c), variance="var")
    np.testing.assert_allclose(res.params / c, base.params, rtol=1e-7)
    np.testing.assert_allclose(res.bse / c, base.bse, rtol=1e-6)
    assert abs(res.llf - (base.llf - (len(schoolcal) - 2) * np.log(c))) < 1e-9 * abs(res.llf)


@pytest.mark.parametrize("where", ["rows", "district"])
def test_heterogeneity_beyond_double_precision_is_a_clear_error(schoolcal, where):
    rng = np.random.default_rng(1)
    d = schoolcal.copy()
    sd = np.sqrt(d["var"].to_numpy())
    u = rng.normal(size=len(d)) if where == "rows" else \
        d.district.map(dict(zip(d.district.unique(), rng.normal(size=d.district.nunique()))))
    d["stdmdiff"] = d["stdmdiff"] + 1e8 * sd * np.asarray(u, float)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(ValueError, match="cannot be computed accurately at the estimates.*The "
                                             "outcome varies about .* times more"):
            mlmeta.meregress(F_META, d, variance="var")


# --------------------------------------------------------------------------- #
# 4. shared argument rules
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("value", ["yes", "true", 1, 0, None, 2.0])
def test_safeguard_values_refused(value):
    with pytest.raises(ValueError, match="safeguard must be True, False or 'auto'"):
        mlmeta.mixed("y ~ x + (1 | g)", _grouped(), safeguard=value)


@pytest.mark.parametrize("value", [True, False, "auto", np.True_])
def test_safeguard_values_accepted(value):
    assert safeguard(value) in (True, False, "auto")
    assert np.isfinite(_quiet(mlmeta.mixed, "y ~ x + (1 | g)", _grouped(), safeguard=value).llf)


def test_n_jobs_rule():
    cores = os.cpu_count() or 1
    assert n_jobs(None) == n_jobs(-1) == cores
    assert n_jobs(3) == 3 and n_jobs(np.int64(2)) == 2
    for bad in (0, -2, 1.5, "2", True):
        with pytest.raises(ValueError, match="n_jobs must be a positive integer, or None or -1"):
            n_jobs(bad)


def test_n_jobs_minus_one_everywhere(schoolcal, fitted):
    res = fitted(F_META, "schoolcal", variance="var")
    a = res.permutation_test(19, seed=1, n_jobs=-1)
    b = res.permutation_test(19, seed=1, n_jobs=1)
    pd.testing.assert_frame_equal(a, b)
    for kind in ("parametric", "cluster"):
        ta, _ = _quiet(res.bootstrap, 20, kind=kind, seed=2, n_jobs=-1)
        tb, _ = _quiet(res.bootstrap, 20, kind=kind, seed=2, n_jobs=1)
        pd.testing.assert_frame_equal(ta, tb)
    M = Model(F_META, schoolcal, variance="var")
    Y = M.simulate(4, seed=3)
    np.testing.assert_allclose(fit_batch(M, Y, n_jobs=-1).llf, fit_batch(M, Y, n_jobs=1).llf, rtol=1e-12)
    for call in (lambda: res.permutation_test(5, n_jobs=0), lambda: res.bootstrap(5, n_jobs=0),
                 lambda: fit_batch(M, Y, n_jobs=0)):
        with pytest.raises(ValueError, match="n_jobs"):
            call()


def test_fit_batch_refuses_three_dimensional_y(schoolcal):
    M = Model(F_META, schoolcal, variance="var")
    with pytest.raises(ValueError, match=rf"Y must be a vector or a 2-D array .*shape \({M.nobs}, 2, 2\)"):
        fit_batch(M, np.zeros((M.nobs, 2, 2)))
    with pytest.raises(ValueError, match="y must be one-dimensional"):
        M.fit(y=np.zeros((M.nobs, 2)))


# --------------------------------------------------------------------------- #
# 5. names
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("name", ["_cons", "Intercept"])
@pytest.mark.parametrize("formula", ["y ~ {} + (1 | g)", "y ~ x + (1 + {} | g)", "y ~ np.log({}) + (1 | g)"])
def test_moderator_named_like_the_intercept_refused(name, formula):
    d = _grouped().assign(**{name: np.linspace(1, 2, 40)})
    with pytest.raises(ValueError, match=rf"column '{name}' in .* has the name of the intercept.*rename"):
        mlmeta.mixed(formula.format(name), d)


def test_intercept_named_column_is_fine_as_response_or_group():
    d = _grouped()
    res = _quiet(mlmeta.mixed, "Intercept ~ x + (1 | _cons)", d.rename(columns={"y": "Intercept",
                                                                             "g": "_cons"}))
    ref = _quiet(mlmeta.mixed, "y ~ x + (1 | g)", d)
    assert res.llf == pytest.approx(ref.llf, rel=1e-12)


def test_q_quoted_and_non_ascii_names():
    d = _grouped()
    ref = _quiet(mlmeta.mixed, "y ~ x + (1 + x | g)", d)
    q = _quiet(mlmeta.mixed, "y ~ Q('my x') + (1 + Q(\"my x\") | g)", d.rename(columns={"x": "my x"}))
    assert q.llf == pytest.approx(ref.llf, rel=1e-10)
    np.testing.assert_allclose(q.params.values, ref.params.values, rtol=1e-8)
    u = _quiet(mlmeta.mixed, "größe ~ Äx + (1 + Äx | grüppe)",
               d.rename(columns={"y": "größe", "x": "Äx", "g": "grüppe"}))
    assert u.llf == pytest.approx(ref.llf, rel=1e-10)
    assert list(u.params.index) == ["Äx", "_cons"]
    # a missing value in a Q-quoted column drops its row
    dm = d.rename(columns={"x": "my x"})
    dm.loc[5, "my x"] = np.nan
    with pytest.warns(MissingDataWarning, match="'my x'"):
        mf = build_model_frame(parse_formula("y ~ Q('my x') + (1 | g)"), dm)
    assert mf.X.shape[0] == 39


@pytest.mark.parametrize("formula", ["y ~ ``", "y ~ x + `` + (1 | g)", "`` ~ x", "y ~ x + (1 | ``)"])
def test_empty_backtick_name_refused(formula):
    with pytest.raises(ValueError, match="empty backtick name"):
        parse_formula(formula)
