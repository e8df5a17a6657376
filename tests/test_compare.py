"""Model comparison: likelihood-ratio tests and information criteria (Stata manual
example 4), estimates tables (example 7); metafor values from
tests/reference/postestimation_reference.json."""

import numpy as np
import pytest

import mlmeta
from references import load

REF = load("postestimation_reference")


def close(value, printed, slack=1e-15):
    """|value - printed| <= half a unit in the last printed decimal (+ slack)."""
    decimals = len(f"{printed}".split(".")[1]) if "." in f"{printed}" else 0
    return abs(value - printed) <= 0.5 * 10 ** (-decimals) + slack


@pytest.fixture(scope="module")
def example4(fitted):
    fit = lambda f: fitted(f, "schoolcal", se="se")  # noqa: E731
    return {
        "main_model": fit("stdmdiff ~ 1 + (1 | district) + (1 | district:school)"),
        "dist_effect": fit("stdmdiff ~ 1 + (1 | study)"),
        "school_effect": fit("stdmdiff ~ 1 + (1 | district)"),
    }


@pytest.fixture(scope="module")
def ml_fits(fitted):
    fit = lambda f: fitted(f, "schoolcal", variance="var", method="ml")  # noqa: E731
    return (fit("stdmdiff ~ 1 + (1 | district) + (1 | district:school)"),
            fit("stdmdiff ~ year_c + (1 | district) + (1 | district:school)"))


# -- likelihood-ratio tests ------------------------------------------------------
@pytest.mark.parametrize("reduced, printed, key", [("school_effect", 48.52, "lrt_school"),
                                                   ("dist_effect", 17.77, "lrt_dist")])
def test_example4_lrtest(example4, reduced, printed, key):
    lr = mlmeta.lrtest(example4["main_model"], example4[reduced], names=("main_model", reduced))
    assert close(lr.statistic, printed) and lr.df == 1
    assert close(lr.pvalue, 0.0000)
    ref = REF["example4"][key]
    assert lr.statistic == pytest.approx(ref["LRT"], abs=1e-6)
    assert lr.pvalue == pytest.approx(ref["pval"], rel=1e-5)
    assert lr.boundary and lr.pvalue_mixture == pytest.approx(0.5 * lr.pvalue)
    text = str(lr)
    assert f"Assumption: {reduced} nested within main_model" in text
    assert f"LR chi2(1) = {printed:8.2f}" in text and "Prob > chi2 =   0.0000" in text
    assert "the boundary of the parameter space" in text and "reported test is conservative" in text
    assert "LR tests based on REML are valid only when the fixed-effects" in text


def test_lrtest_orders_models(example4):
    a = mlmeta.lrtest(example4["school_effect"], example4["main_model"], names=("s", "m"))
    b = mlmeta.lrtest(example4["main_model"], example4["school_effect"], names=("m", "s"))
    assert a.statistic == b.statistic and a.names == b.names == ("m", "s")


def test_lrtest_ml_moderator_matches_metafor(ml_fits):
    reduced, full = ml_fits
    lr = mlmeta.lrtest(full, reduced)
    ref = REF["ml"]["lrt_year"]
    assert lr.statistic == pytest.approx(ref["LRT"], abs=1e-6)
    assert lr.pvalue == pytest.approx(ref["pval"], abs=1e-6)
    assert not lr.boundary and lr.pvalue_mixture is None
    assert "REML" not in str(lr)


def test_lrtest_refusals(example4, ml_fits, schoolcal):
    main = example4["main_model"]
    year = mlmeta.meregress("stdmdiff ~ year_c + (1 | district) + (1 | district:school)",
                            schoolcal, se="se")
    with pytest.raises(ValueError, match="fixed-effects specification is identical"):
        mlmeta.lrtest(year, main)
    with pytest.raises(ValueError, match="REML"):
        mlmeta.lrtest(ml_fits[0], main)
    with pytest.raises(ValueError, match="same number of parameters"):
        mlmeta.lrtest(example4["dist_effect"], example4["school_effect"])
    other = mlmeta.meregress("stdmdiff ~ 1 + (1 | district)", schoolcal.iloc[:50], se="se")
    with pytest.raises(ValueError, match="same observations"):
        mlmeta.lrtest(main, other)


@pytest.mark.filterwarnings("ignore::mlmeta.BoundaryWarning")     # corr = 1 at the optimum
def test_lrtest_correlation_only_is_not_on_the_boundary(fitted):
    f = "stdmdiff ~ year_c + (1 + year_c {} district) + (1 | district:school)"
    unstr = fitted(f.format("|"), "schoolcal", variance="var")
    indep = fitted(f.format("||"), "schoolcal", variance="var")
    lr = mlmeta.lrtest(unstr, indep)
    assert lr.df == 1 and not lr.boundary and lr.pvalue_mixture is None
    assert "boundary" not in str(lr)


def test_lrtest_several_variances_give_conservative_p_only(schoolcal, fitted):
    full = fitted("stdmdiff ~ year_c + (1 + year_c || district) + (1 | district:school)",
                  "schoolcal", variance="var")
    reduced = mlmeta.meregress("stdmdiff ~ year_c + (1 | district:school)", schoolcal, variance="var")
    lr = mlmeta.lrtest(full, reduced)
    assert lr.df == 2 and lr.boundary and lr.pvalue_mixture is None
    assert any("only the conservative p-value" in note for note in lr.notes)


# -- nulls on the boundary or in the interior: metafor's anova(full, reduced) on Berkey ----------
# tests/reference/lrtest_robust_reference.json, made by make_lrtest_robust_references.R: REML
# fits with V = vcalc(vi, cluster = trial, obs = outcome, rho = 0.6).
LR_REF = load("lrtest_robust_reference")
LR_CASES = {c["name"]: c for c in LR_REF["lrtest"]}


def _berkey_fit(fitted, side):
    """The full or reduced model of a stored case (``side``: its "full" or "reduced" entry)."""
    spec = side["mlmeta"]
    V = mlmeta.vcalc("vi", "trial", rho=0.6, data=mlmeta.datasets.load("berkey")).toarray()
    kw = {"covariance": {"trial": spec["covariance"]}} if "covariance" in spec else {}
    return fitted(spec["formula"], "berkey", V=V, **kw)


# an SD fixed at 0 makes the level's covariance matrix singular: mlmeta says so
_SINGULAR = pytest.mark.filterwarnings("ignore::mlmeta.BoundaryWarning")


@pytest.mark.parametrize("name", [pytest.param(n, marks=_SINGULAR) if "fixed_zero" in n else n
                                  for n in LR_CASES])
def test_lrtest_nested_structures_match_metafor(name, fitted):
    """Equality constraints (UN -> CS, DIAG -> ID) and a correlation fixed at 0
    (UN -> DIAG) are interior nulls: the plain chi2 p-value, no mixture, no boundary
    note. A variance fixed at 0 (tau2(PD) = 0) or a level removed is a boundary null:
    metafor's chi2 p-value plus the 50:50 chi-bar-square mixture."""
    case = LR_CASES[name]
    full, reduced = _berkey_fit(fitted, case["full"]), _berkey_fit(fitted, case["reduced"])
    assert full.llf == pytest.approx(case["full"]["llf"], rel=1e-8, abs=1e-8)
    assert reduced.llf == pytest.approx(case["reduced"]["llf"], rel=1e-8, abs=1e-8)
    assert (full.df_modelwc, reduced.df_modelwc) == (case["full"]["parms"], case["reduced"]["parms"])
    lr = mlmeta.lrtest(full, reduced)
    assert lr.df == case["df"] == 1
    assert lr.statistic == pytest.approx(case["LRT"], abs=1e-6)
    assert lr.pvalue == pytest.approx(case["pval"], rel=1e-5)
    assert lr.boundary is case["boundary"]
    text = str(lr)
    if case["boundary"]:
        assert lr.pvalue_mixture == pytest.approx(0.5 * lr.pvalue)
        assert "Prob > chibar2" in text and "the boundary of the parameter space" in text
    else:
        assert lr.pvalue_mixture is None
        assert "chibar2" not in text and "boundary" not in text and "set to zero" not in text
        assert [n for n in lr.notes if "REML" not in n] == []


def test_lrtest_unstructured_vs_exchangeable_printed(fitted):
    """The reported case: LRT 0.5661, p 0.4518 (metafor), not the mixture's 0.2259."""
    case = LR_CASES["un_vs_cs"]
    lr = mlmeta.lrtest(_berkey_fit(fitted, case["reduced"]), _berkey_fit(fitted, case["full"]),
                       names=("cs", "un"))
    assert lr.names == ("un", "cs")
    assert round(lr.statistic, 4) == 0.5661 and round(lr.pvalue, 4) == 0.4518
    assert round(case["LRT"], 4) == 0.5661 and round(case["pval"], 4) == 0.4518
    assert "Prob > chi2 =   0.4518" in str(lr)


# -- information criteria ---------------------------------------------------------------
def test_example4_information_criteria(example4):
    """Stata's log-likelihoods differ from metafor's and the dense likelihood's by
    up to ~1.5e-7 (see test_manual_examples.py), so criteria (-2 ll + ...) are
    compared at printed precision with a slack of 5e-7; metafor's within 1e-6."""
    names = list(example4)
    table = mlmeta.compare(*example4.values(), names=names, n=55)
    printed = {
        "main_model": (-7.958724, 3, 21.91745, 27.93945, 22.38804, 30.93945),
        "dist_effect": (-16.8455, 2, 37.691, 41.70566, 37.92177, 43.70566),
        "school_effect": (-32.21648, 2, 68.43295, 72.44762, 68.66372, 74.44762),
    }
    assert list(table.index) == names
    for name, values in printed.items():
        row = table.loc[name]
        assert row.N == 55
        for col, v in zip(["ll", "df", "AIC", "BIC", "AICc", "CAIC"], values):
            assert close(row[col], v, slack=5e-7), (name, col, row[col], v)
        ref = REF["example4"][name]          # metafor uses n - p = 55 for REML
        for col in ("AIC", "BIC", "AICc"):
            assert row[col] == pytest.approx(ref[col], abs=1e-6)


def test_compare_defaults(ml_fits):
    table = mlmeta.compare(*ml_fits)
    assert list(table.index) == ["model1", "model2"]
    assert (table.N == 56).all()
    for (_, row), key in zip(table.iterrows(), ["main_ml", "year_ml"]):
        ref = REF["ml"][key]
        for col in ("AIC", "BIC", "AICc"):
            assert row[col] == pytest.approx(ref[col], abs=1e-6)
    with pytest.raises(ValueError):
        mlmeta.compare()
    with pytest.raises(ValueError, match="names"):
        mlmeta.compare(*ml_fits, names=["a"])


# -- estimates table ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def example7(schoolcal):
    f = "stdmdiff ~ year_c + (1 + year_c | district) + (1 | district:school)"
    return [mlmeta.meregress(f, schoolcal, variance="var",
                             covariance={"district": [[None, r], [r, None]]})
            for r in (0.0, 0.4, 0.8)]


def test_example7_estimates_table(example7):
    t = mlmeta.estimates_table(*example7, names=["corr0", "corr4", "corr8"],
                               keep=["stdmdiff:year_c", "stdmdiff:_cons"], fmt="%8.3f")
    printed = {("year_c", "b"): [0.006, 0.007, 0.007], ("year_c", "se"): [0.011, 0.011, 0.011],
               ("_cons", "b"): [0.181, 0.172, 0.164], ("_cons", "se"): [0.090, 0.083, 0.078]}
    assert list(t.table.index) == list(printed)
    for key, values in printed.items():
        assert [round(v, 3) for v in t.table.loc[key]] == values
    lines = str(t).splitlines()
    assert lines[1].split() == ["Variable", "|", "corr0", "corr4", "corr8"]
    assert lines[3].split() == ["year_c", "|", "0.006", "0.007", "0.007"]
    assert lines[4].split() == ["|", "0.011", "0.011", "0.011"]
    assert lines[5].split() == ["_cons", "|", "0.181", "0.172", "0.164"]
    assert lines[6].split() == ["|", "0.090", "0.083", "0.078"]
    assert lines[-1].strip() == "Legend: b/se"


def test_estimates_table_options(example7, ml_fits):
    t = mlmeta.estimates_table(*ml_fits, stats=("b", "se", "z", "p"), random=True,
                               scalars=("N", "ll", "aic"))
    assert np.isnan(t.table.loc[("year_c", "b"), "model1"])
    year = ml_fits[1]
    assert t.table.loc[("year_c", "p"), "model2"] == pytest.approx(year.pvalues["year_c"])
    assert ("district:sd(_cons)", "b") in t.table.index
    assert t.scalars.loc["ll", "model2"] == year.llf
    text = str(t)
    assert "district:school" in text and "Legend: b/se/z/p" in text
    with pytest.raises(ValueError, match="none of the models"):
        mlmeta.estimates_table(*ml_fits, keep=["weeks"])
    with pytest.raises(ValueError, match="stats"):
        mlmeta.estimates_table(*ml_fits, stats=("b", "t"))
    with pytest.raises(ValueError, match="format"):
        mlmeta.estimates_table(*ml_fits, fmt="3f")
