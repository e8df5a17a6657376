"""The multilevel Egger-type test against metafor (rma.mv with sqrt(vi) as a moderator) and
clubSandwich (coef_test with CR2). References: tests/reference/make_influence.R."""

import numpy as np
import pytest

import mlmeta
from references import load

REF = load("influence_reference")["egger"]
RTOL = 1e-6          # metafor's and mlmeta's REML optima agree to ~1e-8


def berkey_V(dat):
    return [g[["v1i", "v2i"]].to_numpy() for _, g in dat.groupby("trial", sort=True)]


def _fit(case, fitted, **kw):
    if "variance" in case:
        return fitted(case["formula"], case["data"], variance=case["variance"], method=case["method"],
                      **kw)
    dat = mlmeta.datasets.load(case["data"])
    return mlmeta.meregress(case["formula"], dat, V=berkey_V(dat), method=case["method"], **kw)


@pytest.mark.parametrize("name", sorted(REF))
def test_z_test_matches_metafor(name, fitted):
    case = REF[name]
    e = _fit(case, fitted).egger_test(predictor=case["predictor"])
    ref = case["z"]
    assert e.test == "z" and e.df is None and e.robust is None
    for key in ("coef", "se", "statistic", "pvalue"):
        assert getattr(e, key) == pytest.approx(ref[key], rel=RTOL), key
    assert e.fit.params[case["predictor"]] == e.coef


@pytest.mark.parametrize("name", sorted(REF))
@pytest.mark.parametrize("dfs", ["contain", "residual"])
def test_t_test_matches_metafor(name, dfs, fitted):
    case = REF[name]
    res = _fit(case, fitted, test="t", dfs=dfs)
    e = res.egger_test(predictor=case["predictor"])
    ref = case[f"t_{dfs}"]
    assert e.test == "t" and e.df == ref["df"]
    assert e.statistic == pytest.approx(ref["statistic"], rel=RTOL)
    assert e.pvalue == pytest.approx(ref["pvalue"], rel=RTOL)
    # test="t" on a z-test fit uses the fit's df rule too
    z_fit = _fit(case, fitted, dfs=dfs)
    assert z_fit.egger_test(predictor=case["predictor"], test="t").pvalue == pytest.approx(e.pvalue)


@pytest.mark.parametrize("name", sorted(REF))
def test_cr2_matches_clubsandwich(name, fitted):
    case = REF[name]
    e = _fit(case, fitted).egger_test("CR2", predictor=case["predictor"], cluster=case["cluster"])
    ref = case["CR2"]
    assert e.test == "t" and e.robust == "CR2" and e.cluster == case["cluster"]
    for key in ("coef", "se", "statistic", "df", "pvalue"):
        assert getattr(e, key) == pytest.approx(ref[key], rel=RTOL), key
    # the top-level grouping is the default cluster
    default = _fit(case, fitted).egger_test("CR2", predictor=case["predictor"])
    assert default.pvalue == pytest.approx(e.pvalue, rel=1e-12)


def test_limit_estimate_and_display(fitted):
    res = fitted("stdmdiff ~ 1 + (1 | district) + (1 | district:school)", "schoolcal", variance="var")
    e = res.egger_test(level=90)
    assert e.fit.fe_names == ["sei", "_cons"]
    assert e.limit == e.fit.params["_cons"]
    ci = e.fit.conf_int(90).loc["_cons"]
    assert e.limit_ci == (ci.lower, ci.upper)
    text = str(e)
    assert "funnel plot asymmetry: z = -1.1784, p = 0.2386" in text
    assert "limit estimate (as sei -> 0)" in text and "90% CI" in text
    assert repr(e) == text
    robust = res.egger_test("CR2")
    assert "t(4.693) = -1.3954" in str(robust) and "clusters: district" in str(robust)
    berkey = mlmeta.meregress("yi ~ 0 + outcome + (0 + outcome | trial)",
                              mlmeta.datasets.load("berkey"), variance="vi")
    assert berkey.egger_test().limit is None


def test_bad_input(fitted):
    res = fitted("stdmdiff ~ 1 + (1 | district) + (1 | district:school)", "schoolcal", variance="var")
    with pytest.raises(ValueError, match="predictor"):
        res.egger_test(predictor="ni")
    with pytest.raises(ValueError, match="robust"):
        res.egger_test(robust="CR1")
    with pytest.raises(ValueError, match="only used with robust"):
        res.egger_test(cluster="district")
    with pytest.raises(ValueError, match="test must be"):
        res.egger_test(test="satterthwaite")
    mixed = fitted("stdmdiff ~ 1 + (1 | district)", "schoolcal", kind="mixed")
    with pytest.raises(ValueError, match="known sampling variances"):
        mixed.egger_test()
    dat = mlmeta.datasets.load("schoolcal").assign(v=0.1)
    with pytest.raises(ValueError, match="same sampling variance"):
        mlmeta.meregress("stdmdiff ~ 1 + (1 | district)", dat, variance="v").egger_test()
    dat = mlmeta.datasets.load("schoolcal").assign(sei=lambda d: d.year_c)
    named = mlmeta.meregress("stdmdiff ~ sei + (1 | district)", dat, variance="var")
    with pytest.raises(ValueError, match="already has a moderator named 'sei'"):
        named.egger_test()
    constrained = fitted("stdmdiff ~ year_c + (1 | district)", "schoolcal", variance="var",
                         constraints=["year_c = 0"])
    with pytest.raises(ValueError, match="constraints"):
        constrained.egger_test()
    collinear = mlmeta.meregress("stdmdiff ~ se + (1 | district)", mlmeta.datasets.load("schoolcal"),
                                 variance="var")
    with pytest.raises(ValueError, match="collinear"):
        collinear.egger_test()
    assert np.isfinite(res.egger_test(predictor="vi").statistic)
