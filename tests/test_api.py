"""meregress / multilevel: options, results API and bad input."""

import json
import warnings

import numpy as np
import pandas as pd
import pytest

import mlmeta

FORMULA = "stdmdiff ~ 1 + (1 | district) + (1 | district:school)"


@pytest.fixture(scope="module")
def fit(schoolcal):
    return mlmeta.meregress(FORMULA, schoolcal, variance="var")


def test_results_api(fit):
    assert fit.method == "reml" and fit.nobs == 56 and fit.converged
    assert fit.n_iter >= 0
    ci = fit.conf_int(level=90)
    z = 1.6448536269514722
    assert ci.loc["_cons", "lower"] == pytest.approx(fit.params["_cons"] - z * fit.bse["_cons"])
    assert fit.conf_int(alpha=0.1).equals(ci)          # statsmodels' spelling
    assert fit.cov_params().loc["_cons", "_cons"] == pytest.approx(fit.bse["_cons"] ** 2)
    assert fit.aic == pytest.approx(-2 * fit.llf + 2 * 3)
    assert fit.bic == pytest.approx(-2 * fit.llf + np.log(56) * 3)
    assert fit.sample.shape == (56,) and fit.sample.all()
    assert set(fit.re_cov) == {"district", "district:school"}
    json.dumps(fit.to_dict())
    assert "Log restricted-likelihood" in str(fit.summary())
    assert "<table" in fit.summary()._repr_html_()


def test_summary_switches_and_variance(fit):
    s = fit.summary(variance=True, fixed=False, group=False).as_text()
    assert "var(_cons)" in s and "Coefficient" not in s and "Grouping information" not in s
    assert "[90% conf. interval]" in fit.summary(level=90).as_text()


def test_se_and_variance_agree(schoolcal, fit):
    res = mlmeta.meregress(FORMULA, schoolcal, se="se")
    assert res.llf == pytest.approx(fit.llf, rel=1e-10)
    arr = mlmeta.meregress(FORMULA, schoolcal, variance=schoolcal["var"].to_numpy())
    assert arr.llf == pytest.approx(fit.llf, rel=1e-12)


def test_ml_differs_from_reml(schoolcal, fit):
    ml = mlmeta.meregress(FORMULA, schoolcal, variance="var", method="ml")
    assert ml.method == "ml"
    assert ml.llf == pytest.approx(-8.394935571262973, rel=1e-8)
    assert "Log likelihood" in ml.summary().as_text()


def test_row_order_and_relabelling_do_not_matter(schoolcal, fit):
    rng = np.random.default_rng(0)
    shuffled = schoolcal.iloc[rng.permutation(len(schoolcal))].copy()
    shuffled["district"] = shuffled["district"] * 3 + 1000
    res = mlmeta.meregress(FORMULA, shuffled, variance="var")
    assert res.llf == pytest.approx(fit.llf, rel=1e-10)
    assert res.params["_cons"] == pytest.approx(fit.params["_cons"], rel=1e-8)


def test_em_only_and_verbose(schoolcal, capsys):
    res = mlmeta.meregress(FORMULA, schoolcal, variance="var", em_only=True, verbose=True)
    out = capsys.readouterr().out
    assert "Performing EM optimization" in out and "EM iteration 0" in out
    assert res.llf == pytest.approx(-7.958724033710965, abs=1e-6)
    mlmeta.meregress(FORMULA, schoolcal, variance="var", verbose=True)
    out = capsys.readouterr().out
    assert "Performing gradient-based optimization" in out and "Iteration" in out


def test_missing_values_dropped_and_reported(schoolcal, fit):
    df = schoolcal.copy()
    df.loc[[3, 10], "var"] = np.nan
    df.loc[20, "stdmdiff"] = np.nan
    with pytest.warns(mlmeta.MissingDataWarning, match="3 of 56"):
        res = mlmeta.meregress(FORMULA, df, variance="var")
    assert res.nobs == 53 and res.n_dropped == 3
    assert not res.sample[[3, 10, 20]].any() and res.sample.sum() == 53
    assert any("3 observations dropped" in n for n in res.notes)
    assert "3 observations dropped" in res.summary().as_text()


@pytest.mark.parametrize("kwargs,match", [
    ({}, "exactly one of se="),
    ({"se": "se", "variance": "var"}, "exactly one of se="),
    ({"variance": "nosuchcol"}, "nosuchcol"),
    ({"variance": "var", "method": "mle"}, "method"),
    ({"variance": "var", "covariance": {"school": "unstructured"}}, "not in the formula"),
    ({"variance": "var", "covariance": {"district": "banded"}}, "unknown covariance structure"),
    ({"variance": "var", "em_iter": -1}, "em_iter"),
    ({"variance": "var", "tol": 0}, "tol"),
])
def test_bad_options(schoolcal, kwargs, match):
    with pytest.raises(ValueError, match=match):
        mlmeta.meregress(FORMULA, schoolcal, **kwargs)


@pytest.mark.parametrize("column,value,match", [
    ("var", 0.0, "sampling variances must be positive"),
    ("var", -0.1, "sampling variances must be positive"),
    ("se", 0.0, "sampling standard errors must be positive"),
    ("var", np.inf, "inf"),
    ("stdmdiff", -np.inf, "inf"),
])
def test_bad_values(schoolcal, column, value, match):
    df = schoolcal.copy()
    df.loc[5, column] = value
    kw = {"se": "se"} if column == "se" else {"variance": "var"}
    with pytest.raises(ValueError, match=match):
        mlmeta.meregress(FORMULA, df, **kw)


@pytest.mark.parametrize("formula,match", [
    ("stdmdiff ~ 1", "no random-effects term"),
    ("stdmdiff ~ nosuch + (1 | district)", "nosuch"),
    ("stdmdiff ~ (1 | district", "parenthes"),
    ("stdmdiff 1 + (1 | district)", "~"),
    ("stdmdiff ~ 1 + (1 + year_c | district:school)", "no variation within"),
])
def test_bad_formulas(schoolcal, formula, match):
    with pytest.raises(ValueError, match=match):
        mlmeta.meregress(formula, schoolcal, variance="var")


def test_one_group_rejected(schoolcal):
    df = schoolcal[schoolcal.district == schoolcal.district.iloc[0]]
    with pytest.raises(ValueError, match="only 1 group"):
        mlmeta.meregress(FORMULA, df, variance="var")


def test_constant_or_collinear_moderator_omitted(schoolcal):
    df = schoolcal.assign(k=1.0)
    with pytest.warns(UserWarning, match="k omitted because of collinearity .constant"):
        res = mlmeta.meregress("stdmdiff ~ k + (1 | district)", df, variance="var")
    assert res.omitted == ["k"] and list(res.params.index) == ["_cons"]
    with pytest.warns(UserWarning, match="year omitted because of collinearity"):
        res = mlmeta.meregress("stdmdiff ~ year_c + year + (1 | district)", schoolcal, variance="var")
    assert res.omitted == ["year"]


def test_too_few_observations():
    df = pd.DataFrame({"y": [0.1, 0.2, 0.3, 0.5], "x": [1.0, 2.0, 4.0, 3.0], "z": [0.0, 1.0, 0.0, 5.0],
                       "v": [0.1] * 4, "g": [1, 1, 2, 2]})
    with pytest.raises(ValueError, match="at least one more observation"):
        mlmeta.meregress("y ~ x + z + x:z + (1 | g)", df, variance="v")


def test_multilevel_validation(schoolcal):
    with pytest.raises(ValueError, match="without random-effects terms"):
        mlmeta.multilevel("stdmdiff ~ (1 | district)", schoolcal, levels=["district"], variance="var")
    with pytest.raises(ValueError, match="levels="):
        mlmeta.multilevel("stdmdiff ~ 1", schoolcal, levels=[], variance="var")
    with pytest.raises(ValueError, match="repeats"):
        mlmeta.multilevel("stdmdiff ~ 1", schoolcal, levels=["district", "district"], variance="var")


def test_boundary_variance_is_reported(schoolcal):
    """A level with no variation left is estimated at 0 and flagged, not hidden."""
    rng = np.random.default_rng(1)
    n = 200
    g = np.repeat(np.arange(40), 5)
    df = pd.DataFrame({"y": rng.normal(0, 0.3, n), "v": np.full(n, 0.09), "g": g, "h": np.arange(n)})
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        res = mlmeta.meregress("y ~ 1 + (1 | g) + (1 | g:h)", df, variance="v")
    rows = res.re_params()
    assert rows.boundary.any()
    assert any(issubclass(x.category, mlmeta.BoundaryWarning) for x in w)
    assert "(b)" in res.summary().as_text()


def test_t_tests_on_containment_df(schoolcal):
    """test="t": metafor's dfs="contain" (t p-values and intervals as predict.rma with t)."""
    res = mlmeta.meregress("stdmdiff ~ year_c + (1 | district) + (1 | district:school)",
                           schoolcal, variance="var", test="t")
    assert list(res.df) == [54.0, 9.0]
    assert res.pvalues["_cons"] == pytest.approx(0.0720292381523294, rel=1e-6)
    assert res.pvalues["year_c"] == pytest.approx(0.575803367109866, rel=1e-6)
    ci = res.conf_int().loc["_cons"]
    assert ci.lower == pytest.approx(-0.0199038291237027, rel=1e-5)
    assert ci.upper == pytest.approx(0.381340820021103, rel=1e-6)
    assert "P>|t|" in res.summary().as_text()
    with pytest.raises(ValueError, match="test must be"):
        mlmeta.meregress(FORMULA, schoolcal, variance="var", test="F")


def test_confidence_level_is_one_percentage_everywhere(fit, schoolcal):
    """level= (Stata's level(), a percentage) across result families; a fraction is
    refused instead of giving a meaningless interval."""
    rr = fit.robust()
    o = mlmeta.ols("stdmdiff ~ year_c", schoolcal)
    for res in (fit, rr, o):
        a, b = res.conf_int(level=99), res.conf_int()
        assert (a["upper"] - a["lower"] > b["upper"] - b["lower"]).all()
        with pytest.raises(ValueError, match="level must be a percentage"):
            res.conf_int(0.05)
    assert "[99% conf." in rr.summary(level=99) and "[90% conf." in o.summary(level=90)
    assert "[90% conf. interval]" in fit.summary(level=90).as_text()



def test_dfs_option_validates_and_is_stored(schoolcal):
    """dfs= (metafor's dfs): "contain" (default) or "residual" (k - p), stored on the
    results; values against metafor are in test_postestimation."""
    res = mlmeta.meregress(FORMULA, schoolcal, variance="var", test="t", dfs="residual")
    assert res.dfs == "residual" and list(res.df) == [55.0]
    assert list(res.residual_df()) == [55.0]
    assert res.t_test().df.iloc[0] == 55.0
    assert res.wald_test("_cons", test="t").df_denom == 55.0
    assert mlmeta.meregress(FORMULA, schoolcal, variance="var").dfs == "contain"
    with pytest.raises(ValueError, match="dfs must be"):
        mlmeta.meregress(FORMULA, schoolcal, variance="var", test="t", dfs="between")


def _zero_sd_exchangeable():
    """12 studies x 2 outcomes with no between-study variation beyond sampling error:
    the exchangeable level's SD is estimated at 0 (seed 1)."""
    rng = np.random.default_rng(1)
    df = pd.DataFrame({"study": np.repeat(np.arange(12), 2), "outcome": np.tile(["A", "B"], 12)})
    df["v"] = 0.05
    df["y"] = rng.normal(0, np.sqrt(0.05), 24) + 0.3 * (df.outcome == "B")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mlmeta.BoundaryWarning)
        return mlmeta.meregress("y ~ outcome + (0 + outcome | study)", df, variance="v",
                                covariance={"study": "exchangeable"})


def test_correlation_of_a_zero_sd_level_is_reported_as_not_identified():
    """An exchangeable level whose SD is 0: its correlation is flagged only because the
    SD is zero, and the note says so (not "corr(...) is -0" / "+0" / "+1")."""
    import dataclasses

    from mlmeta.results import MeregressResults

    res = _zero_sd_exchangeable()
    # the fit ends at the boundary point; the exact point theta = 0 has the same
    # likelihood, and there the SD is exactly 0 (and the correlation 0/0)
    at_zero = MeregressResults(res.model, res.frame,
                               dataclasses.replace(res.fit_record, theta=np.zeros(2)),
                               depvar=res.depvar, options=res.options)
    assert at_zero.llf == pytest.approx(res.llf, abs=1e-10)
    for r, exact in ((res, False), (at_zero, True)):
        rp = r.re_params()
        sd = rp[rp.param.str.startswith("sd(")]
        assert len(sd) == 1 and bool(sd.boundary.iloc[0])
        if exact:
            assert sd.estimate.iloc[0] == 0.0
        else:
            assert sd.estimate.iloc[0] < 1e-10
        label = "corr(outcome[A],outcome[B]) at level study"
        assert r.boundary == ["sd(outcome[A] outcome[B]) at level study is zero",
                              f"{label} is not identified because sd(outcome[A] outcome[B]) "
                              f"is zero"]
        text = r.summary().as_text()
        assert "is not identified because" in text
        assert not any(s in " ".join(r.boundary) for s in ("is -0", "is +0", "is +1", "is -1"))
        assert f"{label} is not identified because sd(outcome[A] outcome[B]) is zero." in r.notes
