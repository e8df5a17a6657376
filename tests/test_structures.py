"""Covariance structures, custom patterns and fixed-effect constraints (Stata's
manual examples 6 and 7) and fits checked against a dense brute-force likelihood."""

import numpy as np
import pandas as pd
import pytest

import mlmeta
from printed import close
from references import data_path, load

SLOPE = "stdmdiff ~ year_c + (1 + year_c | district) + (1 | district:school)"


def _district(res):
    rows = res.re_params()
    return rows[rows.group == "district"].set_index("param")


def test_example6_custom_A(schoolcal):
    res = mlmeta.meregress(SLOPE, schoolcal, variance="var",
                           covariance={"district": [[None, .5], [.5, None]]})
    assert close(res.params["year_c"], 0.007) and close(res.bse["year_c"], 0.011)
    assert close(res.params["_cons"], 0.170) and close(res.bse["_cons"], 0.082)
    d = _district(res)
    assert close(d.estimate["sd(year_c)"], 0.026) and close(d.estimate["sd(_cons)"], 0.116)
    assert d.estimate["corr(year_c,_cons)"] == 0.5 and d.fixed["corr(year_c,_cons)"]
    assert close(res.re_params().estimate.iloc[-1], 0.180)
    text = res.summary().as_text()
    assert "district: Custom" in text and "(*) fixed during estimation" in text and ".5*" in text


def test_example6_custom_B_and_recovariance(schoolcal):
    res = mlmeta.meregress(SLOPE, schoolcal, variance="var",
                           covariance={"district": [["a", .5], [.5, "a"]]})
    assert close(res.params["year_c"], 0.010) and close(res.bse["year_c"], 0.012)
    assert close(res.params["_cons"], 0.154) and close(res.bse["_cons"], 0.076)
    d = _district(res)
    assert list(d.index) == ["sd(year_c _cons)", "corr(year_c,_cons)"]
    assert close(d.estimate["sd(year_c _cons)"], 0.033)
    assert close(res.re_params().estimate.iloc[-1], 0.181)
    S = res.recovariance("district")
    assert close(S.loc["year_c", "year_c"], .0010852) and close(S.loc["_cons", "_cons"], .0010852)
    assert close(S.loc["_cons", "year_c"], .0005426)
    assert S.attrs["fixed"] == ["corr(year_c,_cons) = 0.5"]
    assert close(res.recovariance("district:school").iloc[0, 0], .0326401)
    C = res.recovariance("district", correlation=True)
    assert C.loc["year_c", "_cons"] == pytest.approx(0.5)
    v = res.re_params(variance=True)
    assert "var(year_c _cons)" in list(v.param) and "cov(year_c,_cons)" in list(v.param)
    # equal SDs hold exactly
    Sig = res.re_cov["district"].values
    assert Sig[0, 0] == Sig[1, 1]


def test_example7_sensitivity(schoolcal):
    pats = [[[None, r], [r, None]] for r in (0.0, 0.4, 0.8)]
    fits = mlmeta.sensitivity(SLOPE, schoolcal, term="district", covariances=pats, variance="var")
    printed = {0: (0.006, 0.011, 0.181, 0.090), 1: (0.007, 0.011, 0.172, 0.083),
               2: (0.007, 0.011, 0.164, 0.078)}
    for k, res in enumerate(fits):
        b1, s1, b0, s0 = printed[k]
        assert close(res.params["year_c"], b1) and close(res.bse["year_c"], s1)
        assert close(res.params["_cons"], b0) and close(res.bse["_cons"], s0)
        assert res.recovariance("district", correlation=True).iloc[0, 1] == pytest.approx([0.0, .4, .8][k])


@pytest.mark.parametrize("pattern,match", [
    ([[None, .5]], "2 x 2"),
    ([[None, .5], [.4, None]], "symmetric"),
    ([[-1.0, None], [None, None]], "negative"),
    ([[None, 1.0], [1.0, None]], r"\(-1, 1\)"),
    ([["a", None], [None, None]], "used only once"),
    ([["a", "a"], ["a", None]], "both a standard deviation and a correlation"),
    ([[None, "x"], ["x", None]], "used only once"),
    ([[None, {}], [{}, None]], "neither a number"),
])
def test_custom_validation(schoolcal, pattern, match):
    with pytest.raises(ValueError, match=match):
        mlmeta.meregress(SLOPE, schoolcal, variance="var", covariance={"district": pattern})


def test_custom_fixed_pattern_not_psd():
    from mlmeta.covstruct import make_structure
    with pytest.raises(ValueError, match="positive semi-definite"):
        make_structure([[None, .9, -.9], [.9, None, .9], [-.9, .9, None]], ["a", "b", "_cons"])


def test_custom_fixed_sd_and_labels_hold(schoolcal):
    res = mlmeta.meregress(SLOPE, schoolcal, variance="var",
                           covariance={"district": [[0.02, None], [None, None]]})
    assert np.sqrt(res.re_cov["district"].values[0, 0]) == pytest.approx(0.02, rel=1e-12)
    d = _district(res)
    assert d.fixed["sd(year_c)"] and not d.fixed["sd(_cons)"]


def test_no_constant_options(schoolcal):
    res = mlmeta.meregress("stdmdiff ~ 0 + year_c + (0 + year_c | district) + (1 | district:school)",
                           schoolcal, variance="var")
    assert list(res.params.index) == ["year_c"]
    assert list(res.re_cov["district"].index) == ["year_c"]


def test_fixed_effect_constraints(schoolcal):
    df = schoolcal.copy()
    rng = np.random.default_rng(0)
    df["z"], df["w"] = rng.normal(size=56), rng.normal(size=56)
    f = "stdmdiff ~ year_c + z + w + (1 | district) + (1 | district:school)"
    res = mlmeta.meregress(f, df, variance="var", constraints=["z = w", "year_c = 0.01"])
    assert res.params["z"] == pytest.approx(res.params["w"], abs=1e-14)
    assert res.params["year_c"] == pytest.approx(0.01, abs=1e-14)
    assert res.bse["year_c"] == 0.0
    # the same fit by hand: y - 0.01 year_c on (z + w)
    df2 = df.assign(zw=df.z + df.w, y2=df.stdmdiff - 0.01 * df.year_c)
    ref = mlmeta.meregress("y2 ~ zw + (1 | district) + (1 | district:school)", df2, variance="var")
    assert res.llf == pytest.approx(ref.llf, rel=1e-9)
    assert res.params["z"] == pytest.approx(ref.params["zw"], rel=1e-7)
    assert res.bse["z"] == pytest.approx(ref.bse["zw"], rel=1e-6)
    text = res.summary().as_text()
    assert "( 1)  z - w = 0" in text and "(constrained)" in text
    same = mlmeta.meregress(f, df, variance="var",
                            constraints=(np.array([[0, 1, -1, 0], [1, 0, 0, 0]]), np.array([0, .01])))
    assert same.llf == pytest.approx(res.llf, rel=1e-12)
    with pytest.raises(ValueError, match="not a fixed effect"):
        mlmeta.meregress(f, df, variance="var", constraints=["q = 1"])
    with pytest.raises(ValueError, match="redundant or contradictory"):
        mlmeta.meregress(f, df, variance="var", constraints=["z = w", "w = z"])


def test_collinear_moderator_omitted(schoolcal):
    df = schoolcal.assign(x2=schoolcal.year_c * 2 + 1)
    with pytest.warns(UserWarning, match="x2 omitted because of collinearity"):
        res = mlmeta.meregress("stdmdiff ~ year_c + x2 + (1 | district)", df, variance="var")
    assert res.omitted == ["x2"] and "x2" not in res.params.index
    assert "(omitted)" in res.summary().as_text()


# ---- each structure against an independent dense brute-force optimum -------------
STRUCTURES = load("dense_structures")


@pytest.mark.parametrize("case", sorted(c for c in STRUCTURES
                                  if not c.startswith(("custom3", "schoolcal"))))
def test_structures_match_dense_optimum(case):
    """Optima under pairs of structures against the brute-force dense likelihood's,
    stored by reference/make_dense_optima.py."""
    k3, k2, method = case.split("-")
    ref = STRUCTURES[case]
    df = pd.read_csv(data_path("structures_synthetic.csv"))
    cov3 = [["a", None, None], [None, "a", None], [None, None, "a"]] if k3 == "custom" else k3
    res = mlmeta.meregress("y ~ x1 + x2 + (1 + x1 + x2 | g) + (1 + x1 | g:h)", df, variance="v",
                           method=method, covariance={"g": cov3, "g:h": k2})
    assert res.llf >= ref["llf"] - 1e-6
    assert res.llf == pytest.approx(ref["llf"], abs=1e-6)
    np.testing.assert_allclose(res.re_cov["g"].values, ref["Sigma_g"], rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(res.re_cov["g:h"].values, ref["Sigma_gh"], rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(res.params[["x1", "x2", "_cons"]].values, ref["beta"], rtol=1e-4,
                               atol=1e-6)


CUSTOM3 = [[None, .9, .9], [.9, None, None], [.9, None, None]]


@pytest.mark.parametrize("method", ["reml", "ml"])
def test_custom_pattern_whose_fixed_correlations_conflict_with_the_data(method):
    """Fixed correlations (0.9, 0.9) that rule out the data's correlation of the third
    pair: the averaged EM projection is not a positive definite matrix; the fit stays in
    the feasible set and reaches the dense-likelihood optimum (it raised before)."""
    ref = STRUCTURES[f"custom3-fixedcorr-{method}"]
    df = pd.read_csv(data_path("custom3_synthetic.csv"))
    res = mlmeta.meregress("y ~ x1 + x2 + (1 + x1 + x2 | g)", df, variance="v", method=method,
                           covariance={"g": CUSTOM3})
    assert res.converged
    assert res.llf >= ref["llf"] - 1e-7
    assert res.llf == pytest.approx(ref["llf"], abs=1e-6)
    np.testing.assert_allclose(res.theta, ref["theta"], rtol=1e-4, atol=1e-6)


def test_covariance_argument_forms(schoolcal, fitted):
    """A string names the structure of the only grouping term; with several terms it
    must be a mapping, and anything else is a clear error."""
    dat = mlmeta.datasets.load("berkey")
    f = "yi ~ 0 + outcome + (0 + outcome | trial)"
    a = fitted(f, "berkey", variance="vi", covariance="exchangeable")
    b = mlmeta.meregress(f, dat, variance="vi", covariance={"trial": "exchangeable"})
    assert a.llf == b.llf
    two = "stdmdiff ~ year_c + (1 + year_c | district) + (1 | district:school)"
    with pytest.raises(ValueError, match="which grouping term"):
        mlmeta.meregress(two, schoolcal, variance="var", covariance="independent")
    with pytest.raises(ValueError, match="must map grouping terms"):
        mlmeta.meregress(two, schoolcal, variance="var", covariance=["independent"])
