"""Postestimation: heterogeneity (Stata manual example 3), BLUPs, predictions,
residuals, Wald tests with containment df, profile likelihood and stored results.

metafor values come from tests/reference/make_postestimation_references.R
(stored in postestimation_reference.json); the tests never need R.
"""

import warnings

import numpy as np
import pandas as pd
import pytest

import mlmeta
from printed import close
from dense import dense_V
from references import load

REF = load("postestimation_reference")
MAIN = "stdmdiff ~ 1 + (1 | district) + (1 | district:school)"
YEAR = "stdmdiff ~ year_c + (1 | district) + (1 | district:school)"
SLOPES = "stdmdiff ~ year_c + (1 + year_c || district) + (1 | district:school)"




@pytest.fixture(scope="module")
def main(fitted):
    return fitted(MAIN, "schoolcal", se="se")


@pytest.fixture(scope="module")
def year(fitted):
    return fitted(YEAR, "schoolcal", variance="var")


@pytest.fixture(scope="module")
def slopes(fitted):
    return fitted(SLOPES, "schoolcal", variance="var")


def _metafor_label(label):
    return "/".join(str(x) for x in label) if isinstance(label, tuple) else str(label)


# -- heterogeneity ---------------------------------------------------------------
def test_example3_heterogeneity(main):
    h = main.heterogeneity()
    assert close(h.I2_Q, 90.50)
    assert close(h.I2["district"], 63.32)
    assert close(h.I2["district:school"], 31.86)
    assert close(h.I2_total, 95.19)
    text = str(h)
    for line in ("Method: Cochran", "I2 (%) = 90.50", "Method: Higgins-Thompson",
                 "I2 (%) = 63.32", "I2 (%) = 31.86", "Total:", "I2 (%) = 95.19"):
        assert line in text


@pytest.mark.parametrize("case", ["main", "year"])
def test_heterogeneity_matches_formula_in_r(case, main, year):
    res, ref = {"main": main, "year": year}[case], REF[case]["I2"]
    h = res.heterogeneity()
    assert h.I2_Q == pytest.approx(ref["I2_Q"], abs=1e-8)
    assert h.s2 == pytest.approx(ref["s2"], rel=1e-10)
    assert [h.I2["district"], h.I2["district:school"]] == pytest.approx(ref["I2"], abs=1e-5)
    assert h.I2_total == pytest.approx(ref["total"], abs=1e-5)


def test_heterogeneity_relevel(main):
    h = main.heterogeneity(relevel="district:school")
    assert list(h.I2) == ["district:school"]
    assert close(h.I2_total, 95.19)
    with pytest.raises(ValueError, match="unknown level"):
        main.heterogeneity(relevel="school")


def test_heterogeneity_with_slopes_is_not_defined(slopes):
    h = slopes.heterogeneity()
    assert h.I2 is None and h.I2_total is None
    assert "random slopes" in h.note and "district" in h.note
    assert close(h.I2_Q, 90.19)          # Cochran's I2_Q depends only on the fixed part
    assert "not defined" in str(h)


# -- random effects ----------------------------------------------------------------
@pytest.mark.parametrize("case", ["main", "year"])
def test_blups_match_metafor_ranef(case, main, year):
    res = {"main": main, "year": year}[case]
    re = res.random_effects()
    for ours, theirs in (("district", "district"), ("district:school", "district/school")):
        ref = REF[case]["ranef"][theirs]
        got = re[ours]
        labels = [_metafor_label(i) for i in got.index]
        order = [ref["label"].index(lab) for lab in labels]
        assert len(order) == len(ref["label"])
        assert got.blup.values == pytest.approx(np.array(ref["pred"])[order], abs=1e-5)
        assert got.se.values == pytest.approx(np.array(ref["se"])[order], abs=1e-5)
        assert got.lower.values == pytest.approx(np.array(ref["pi_lb"])[order], abs=1e-5)
        assert got.upper.values == pytest.approx(np.array(ref["pi_ub"])[order], abs=1e-5)


def test_blup_index_and_diagnostic_se(main, schoolcal):
    re = main.random_effects()
    school = re["district:school"]
    assert school.index.names == ["district", "school"]
    assert school.loc[(11, 1), "effect"] == "_cons"
    # Var(u_hat) = Sigma - PEV = D Z' P Z D with P = V^-1 - V^-1 X H^-1 X' V^-1 (dense)
    d = main.model.design
    Sig = main.model.Sigma_list(main.theta)
    V = dense_V(d.Z, d.groups, Sig, d.variance)
    Vi = np.linalg.inv(V)
    P = Vi - Vi @ d.X @ np.linalg.solve(d.X.T @ Vi @ d.X, d.X.T @ Vi)
    for lvl, name in enumerate(main.group_names):
        B = np.zeros((d.n_obs, d.n_groups[lvl]))
        B[np.arange(d.n_obs), d.groups[lvl]] = 1.0
        var_u = Sig[lvl][0, 0] ** 2 * np.einsum("ig,ij,jg->g", B, P, B)
        assert re[name].se_diag.values == pytest.approx(np.sqrt(var_u), rel=1e-8)
        u = Sig[lvl][0, 0] * B.T @ P @ d.y
        assert re[name].blup.values == pytest.approx(u, abs=1e-10)


def test_blups_with_slopes(slopes):
    re = slopes.random_effects(level=90)["district"]
    assert list(re.effect.unique()) == ["year_c", "_cons"]
    assert len(re) == 2 * 11
    S = slopes.re_cov["district"].values
    for eff, k in (("year_c", 0), ("_cons", 1)):
        sub = re[re.effect == eff]
        assert (sub.se ** 2 + sub.se_diag ** 2).values == pytest.approx(np.full(11, S[k, k]), rel=1e-8)
        assert (sub.upper - sub.blup).values == pytest.approx(1.6448536269514722 * sub.se.values)


# -- predictions and residuals ---------------------------------------------------------
@pytest.mark.parametrize("case", ["main", "year"])
def test_fitted_and_residuals_match_metafor(case, main, year, schoolcal):
    res, ref = {"main": main, "year": year}[case], REF[case]
    assert res.predict("xb").values == pytest.approx(ref["fitted_marginal"], abs=1e-6)
    fitted = res.predict("fitted")
    assert fitted.values == pytest.approx(ref["fitted_conditional"], abs=1e-6)
    resid = res.predict("residuals")
    assert (fitted + resid).values == pytest.approx(schoolcal.stdmdiff.values, abs=1e-12)
    marg = res.predict("residuals_marginal")
    assert marg.values == pytest.approx(ref["rstandard"]["resid"], abs=1e-6)
    assert res.predict("rstandard").values == pytest.approx(ref["rstandard"]["z"], abs=1e-5)


def test_predict_keeps_data_rows(schoolcal):
    df = schoolcal.copy()
    df.loc[5, "year_c"] = np.nan
    with pytest.warns(mlmeta.MissingDataWarning):
        res = mlmeta.meregress(YEAR, df, variance="var")
    for kind in ("xb", "fitted", "residuals", "rstandard"):
        p = res.predict(kind)
        assert len(p) == len(df) and np.isnan(p[5]) and np.isfinite(p.drop(5)).all()
    xb = res.predict("xb")
    expected = res.params["_cons"] + res.params["year_c"] * df.year_c
    assert xb.drop(5).values == pytest.approx(expected.drop(5).values)


def test_per_row_outputs_carry_the_data_index(schoolcal):
    """Per-row predictions are indexed like the data (NaN for the dropped row), so they
    align with the data whatever its index."""
    df = schoolcal.copy()
    df.index = [f"s{i:02d}" for i in range(len(df))][::-1]
    df.loc["s50", "year_c"] = np.nan
    with pytest.warns(mlmeta.MissingDataWarning):
        res = mlmeta.meregress(YEAR, df, variance="var")
    for kind in ("xb", "fitted", "residuals", "residuals_marginal", "rstandard"):
        p = res.predict(kind)
        assert p.index.equals(df.index)
        assert np.isnan(p["s50"]) and np.isfinite(p.drop("s50")).all()
    xb = res.predict("xb", stdp=True)
    assert xb.index.equals(df.index)
    expected = res.params["_cons"] + res.params["year_c"] * df.year_c
    assert (xb["xb"] - expected).drop("s50").abs().max() < 1e-12
    pi = res.predict_interval()
    assert pi.index.equals(df.index) and np.isnan(pi.loc["s50", "pred"])
    resid = res.predict("residuals")
    fitted = res.predict("fitted")
    assert ((fitted + resid) - df.stdmdiff).drop("s50").abs().max() < 1e-12


def test_predict_newdata_matches_metafor(year):
    ref = REF["year"]["predict_new"]
    new = pd.DataFrame({"year_c": ref["year_c"]}, index=["a", "b", "c"])
    p = year.predict("xb", newdata=new, stdp=True)
    assert list(p.index) == ["a", "b", "c"]
    assert p.xb.values == pytest.approx(ref["pred"], abs=1e-6)
    assert p.stdp.values == pytest.approx(ref["se"], abs=1e-6)


def test_predict_errors(year):
    with pytest.raises(ValueError, match="kind"):
        year.predict("blup")
    with pytest.raises(ValueError, match="stdp"):
        year.predict("fitted", stdp=True)
    with pytest.raises(ValueError, match="newdata"):
        year.predict("fitted", newdata=pd.DataFrame({"year_c": [1.0]}))
    with pytest.raises(ValueError, match="year_c"):
        year.predict("xb", newdata=pd.DataFrame({"x": [1.0]}))


def test_prediction_interval_matches_metafor(main, year):
    ref = REF["main"]["predict"]
    pi = main.predict_interval()
    row = pi.iloc[0]
    for ours, theirs in (("pred", "pred"), ("se", "se"), ("ci_lower", "ci_lb"),
                         ("ci_upper", "ci_ub"), ("pi_lower", "pi_lb"), ("pi_upper", "pi_ub")):
        assert row[ours] == pytest.approx(ref[theirs], abs=1e-6)
    assert row.tau2 == pytest.approx(sum(REF["main"]["sigma2"]), rel=1e-6)
    ref = REF["year"]["predict_new"]
    pi = year.predict_interval(pd.DataFrame({"year_c": ref["year_c"]}))
    for ours, theirs in (("pred", "pred"), ("se", "se"), ("ci_lower", "ci_lb"),
                         ("ci_upper", "ci_ub"), ("pi_lower", "pi_lb"), ("pi_upper", "pi_ub")):
        assert pi[ours].values == pytest.approx(ref[theirs], abs=1e-6)


def test_prediction_interval_with_slopes_and_sampling_variance(slopes):
    new = pd.DataFrame({"year_c": [-10.0, 0.0, 5.0]})
    pi = slopes.predict_interval(new, level=90, sampling_variance=0.05)
    S3 = slopes.re_cov["district"].values            # (year_c, _cons)
    s2 = slopes.re_cov["district:school"].values[0, 0]
    z = np.c_[new.year_c, np.ones(3)]
    tau2 = np.einsum("ij,jk,ik->i", z, S3, z) + s2
    assert pi.tau2.values == pytest.approx(tau2)
    half = 1.6448536269514722 * np.sqrt(pi.se ** 2 + tau2 + 0.05)
    assert (pi.pi_upper - pi.pred).values == pytest.approx(half.values)
    assert pi.tau2.iloc[0] != pytest.approx(pi.tau2.iloc[1])   # slopes change the variance


# -- Wald tests, containment df -------------------------------------------------------------
def test_containment_df_and_t_test_match_metafor(year):
    ref = REF["year"]
    df = year.containment_df()
    assert df.to_dict() == ref["ddf_contain"]
    t = year.t_test()
    assert t.df.to_dict() == ref["ddf_contain"]
    assert t.pvalue.values == pytest.approx([ref["t_pval"][n] for n in year.fe_names], abs=1e-6)


def test_wald_test_matches_metafor_anova(year):
    ref = REF["year"]["wald"]
    w = year.wald_test(ref["hypotheses"])
    assert w.statistic == pytest.approx(ref["chi2"], rel=1e-6)
    assert w.df == ref["df"] and w.pvalue == pytest.approx(ref["pval"], rel=1e-6)
    f = year.wald_test(ref["hypotheses"], test="t")
    assert f.statistic == pytest.approx(ref["F"], rel=1e-6)
    assert (f.df, f.df_denom) == (ref["df_num"], ref["df_den"])
    assert f.pvalue == pytest.approx(ref["pval_F"], rel=1e-6)
    one = year.wald_test("year_c", test="t")
    ref1 = REF["year"]["wald_year_t"]
    assert one.statistic == pytest.approx(ref1["F"], rel=1e-6) and one.df_denom == ref1["df_den"]
    assert "Prob > F" in str(f) and "chi2(2)" in str(w)


def test_wald_test_matrix_form_and_errors(year):
    w = year.wald_test("year_c = 0")
    m = year.wald_test([[1.0, 0.0]])
    assert m.statistic == pytest.approx(w.statistic)
    assert w.statistic == pytest.approx(year.zvalues["year_c"] ** 2)
    r = year.wald_test([[0.0, 1.0]], rhs=0.1)
    assert r.statistic == pytest.approx(((year.params["_cons"] - 0.1) / year.bse["_cons"]) ** 2)
    with pytest.raises(ValueError, match="unknown coefficient"):
        year.wald_test("weeks = 0")
    with pytest.raises(ValueError, match="linearly dependent"):
        year.wald_test("year_c = 0, 2*year_c = 0")
    with pytest.raises(ValueError, match="test"):
        year.wald_test("year_c", test="F")


# -- profile likelihood --------------------------------------------------------------------
@pytest.mark.parametrize("case", ["main", "year"])
def test_profile_ci_matches_metafor_confint(case, main, year):
    res = {"main": main, "year": year}[case]
    ci = res.profile_ci()
    for (_, row), ref in zip(ci.iterrows(), REF[case]["confint"]):
        est, lo, hi = ref["sigma2"]
        assert row.estimate == pytest.approx(est, rel=1e-6)
        assert row.lower == pytest.approx(lo, abs=1e-6)
        assert row.upper == pytest.approx(hi, abs=1e-6)
        assert [row.sd_lower, row.sd_upper] == pytest.approx(ref["sigma"][1:], abs=1e-6)


def test_profile_matches_metafor(main):
    for ref in REF["main"]["profile"]:
        term = ref["level"].replace("/", ":")
        prof = main.profile(term, values=ref["sigma2"])
        assert prof.llf.values == pytest.approx(ref["ll"], abs=1e-7)


def test_profile_default_grid(main):
    prof = main.profile("district", n=15)
    assert len(prof) >= 15
    assert prof.llf.max() == pytest.approx(main.llf, abs=1e-9)
    assert prof.sigma2.values[prof.llf.argmax()] == pytest.approx(main.theta[0] ** 2)
    assert prof.attrs["param"] == ("district", "var(_cons)")
    with pytest.raises(ValueError, match="cannot profile"):
        main.profile("school")


def test_profile_ci_lower_limit_zero(slopes):
    ci = slopes.profile_ci()
    assert list(ci.param) == ["var(year_c)", "var(_cons)", "var(_cons)"]
    row = ci.iloc[0]
    assert row.lower == 0.0 and row.upper > row.estimate
    # at the upper limit the profile has dropped by chi2_1(.95)/2
    prof = slopes.profile(("district", "year_c"), values=[row.upper])
    assert slopes.llf - prof.llf.iloc[0] == pytest.approx(0.5 * 3.841458820694124, abs=1e-6)


# -- stored results -------------------------------------------------------------------------
def test_stored_results(slopes, main):
    e = slopes.e
    assert e is slopes.e
    assert (e["N"], e["k"], e["k_f"], e["k_r"], e["k_rs"], e["k_rc"]) == (56, 5, 2, 3, 3, 0)
    assert e["df_m"] == 1 and e["converged"] == 1 and e["rank"] == 5
    assert e["ll"] == slopes.llf and e["chi2"] == slopes.wald_chi2 and e["Q_M"] == slopes.Q_M
    assert e["method"] == "REML" and e["ivars"] == "district district:school"
    assert list(e.b.index[:2]) == [("stdmdiff", "year_c"), ("stdmdiff", "_cons")]
    assert e.b[("district", "lnsd(_cons)")] == pytest.approx(np.log(np.sqrt(
        slopes.re_cov["district"].loc["_cons", "_cons"])))
    assert e.V.iloc[:2, :2].values == pytest.approx(slopes.cov_params().values)
    assert np.all(e.V.iloc[:2, 2:].values == 0)
    re = slopes.re_params()
    assert e.b_report.iloc[2:].values == pytest.approx(re.estimate.values)
    assert np.sqrt(np.diag(e.V_report.values))[2:] == pytest.approx(re.std_err.values.astype(float))
    em = main.estat()
    assert (em["k"], em["k_r"], em["df_m"]) == (3, 2, 0) and em["chi2"] is None
    with pytest.raises(KeyError):
        em["nope"]


# -- models with an estimated residual variance ------------------------------------------------
def test_mixed_model_uses_absolute_variances(schoolcal):
    m = mlmeta.mixed("stdmdiff ~ year_c + (1 | district)", schoolcal)
    S = m.re_cov["district"].values[0, 0]
    re = m.random_effects()["district"]
    assert (re.se ** 2 + re.se_diag ** 2).values == pytest.approx(np.full(11, S), rel=1e-8)
    pi = m.predict_interval(pd.DataFrame({"year_c": [0.0]}))
    assert pi.tau2.iloc[0] == pytest.approx(S)
    z = m.predict("rstandard")
    resid = m.predict("residuals_marginal")
    xse = m.predict("xb", stdp=True).stdp
    assert (resid / z).values == pytest.approx(np.sqrt(m.scale + S - xse ** 2).values)
    with pytest.raises(ValueError, match="known sampling variances"):
        m.heterogeneity()
    with pytest.raises(ValueError, match="known sampling variances"):
        m.profile()
    # profile intervals on the SD scale, sigma included (lme4's; tested in test_mixed_profile)
    assert list(m.profile_ci().param) == ["sd(_cons)", "sd(Residual)"]


# -- profile likelihood of correlated random effects (Berkey et al. 1998) -------------
PROFILE_REF = load("profile_reference")


def _berkey(case, fitted):
    f = "yi ~ 0 + outcome + (0 + outcome | trial)"
    if case == "un_V":
        dat = mlmeta.datasets.load("berkey")
        blocks = [np.column_stack([g.v1i.values, g.v2i.values])
                  for _, g in dat.groupby("trial", sort=True)]
        return fitted(f, "berkey", V=blocks)
    cov = "exchangeable" if case == "cs_diag" else "unstructured"
    return fitted(f, "berkey", variance="vi", covariance=cov)


@pytest.mark.parametrize("case", ["un_V", "un_diag", "cs_diag"])
def test_profile_ci_of_correlated_effects_matches_metafor(case, fitted):
    """Unstructured and exchangeable levels: each variance and the correlation, as
    metafor's confint(rma.mv(..., struct = "UN" / "CS"))."""
    ref = PROFILE_REF[case]
    res = _berkey(case, fitted)
    assert res.llf == pytest.approx(ref["llf"], abs=1e-7)
    ci = res.profile_ci()
    var, rho = ci[ci.param.str.startswith("var")], ci[ci.param.str.startswith("corr")]
    ref_var = [c for c in ref["confint"].values() if c["names"] != "rho"]
    ref_rho = [c for c in ref["confint"].values() if c["names"] == "rho"]
    assert len(var) == len(ref_var) and len(rho) == len(ref_rho) == 1
    for (_, row), r in zip(var.iterrows(), ref_var):      # AL then PD in both
        assert row.estimate == pytest.approx(r["estimate"][0], rel=1e-4)
        assert row.lower == pytest.approx(r["lower"][0], rel=1e-4, abs=1e-7)
        assert row.upper == pytest.approx(r["upper"][0], rel=1e-4)
        assert row.sd_upper == pytest.approx(r["upper"][1], rel=1e-4)
    row, r = rho.iloc[0], ref_rho[0]
    assert row.estimate == pytest.approx(r["estimate"], abs=1e-5)
    assert row.lower == pytest.approx(r["lower"], abs=1e-4)
    assert row.upper == pytest.approx(r["upper"], abs=1e-4)
    assert np.isnan(row.sd)


def test_profile_of_a_correlation(fitted):
    res = _berkey("un_diag", fitted)
    label = [p for p in res.profile_ci().param if p.startswith("corr")][0]
    prof = res.profile(("trial", label), values=[-0.5, 0.0, 0.5, 0.9])
    assert list(prof.columns) == ["rho", "llf"]
    assert (prof.llf <= res.llf + 1e-9).all()
    at_est = res.profile(("trial", label), values=[prof.attrs["estimate"]])
    assert at_est.llf.iloc[0] == pytest.approx(res.llf, abs=1e-7)


# -- containment df with random slopes, residual df (metafor's dfs=) -------------------
DF_REF = load("df_reference")


def _df_case(case, dfs):
    """The mlmeta fits of make_df_references.R's metafor cases, test="t"."""
    kw = {"test": "t", "dfs": dfs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mlmeta.BoundaryWarning)   # schoolcal: corr = +1
        if case == "schoolcal_gen":
            return mlmeta.meregress("stdmdiff ~ year_c + (1 + year_c | district) "
                                    "+ (1 | district:school)", mlmeta.datasets.load("schoolcal"),
                                    variance="var", **kw)
        if case == "berkey_un":
            dat = mlmeta.datasets.load("berkey")
            blocks = [np.column_stack([g.v1i.values, g.v2i.values])
                      for _, g in dat.groupby("trial", sort=True)]
            return mlmeta.meregress("yi ~ outcome + (0 + outcome | trial)", dat, V=blocks, **kw)
        dat = pd.DataFrame(DF_REF["data"]["synth_un"])
        return mlmeta.meregress("y ~ type + w + (0 + type | study) + (1 | study:esid)", dat,
                                variance="v", **kw)


def _ref_vector(ref, key, names):
    """A metafor per-coefficient vector reordered to mlmeta's coefficient order."""
    return np.array([dict(zip(ref["names"], ref[key]))[n] for n in names])


@pytest.mark.parametrize("case", ["schoolcal_gen", "berkey_un", "synth_un"])
def test_containment_and_residual_df_match_metafor_with_random_slopes(case):
    """metafor's dfs="contain" counts the (x, study) cells of a slope term `~ x | study`
    as containing x (schoolcal: year_c has 10 df, not 54; the synthetic factor slope:
    type 57 = 60 cells - 3, not 119), and dfs="residual" is k - p; p-values, intervals
    and anova(X=) F tests (per contrast and joint) follow them."""
    ref = DF_REF["meta"][case]
    for dfs in ("contain", "residual"):
        res = _df_case(case, dfs)
        names = res.fe_names
        assert set(names) == set(ref["names"])
        assert res.llf == pytest.approx(ref["ll"], abs=1e-6)
        assert res.params.values == pytest.approx(_ref_vector(ref, "beta", names), rel=1e-5, abs=1e-8)
        ddf = _ref_vector(ref, f"ddf_{dfs}", names)
        assert list(res.df) == list(ddf)
        assert list(res.t_test().df) == list(ddf)
        if dfs == "contain":
            assert list(res.containment_df()) == list(ddf)
        assert res.pvalues.values == pytest.approx(_ref_vector(ref, f"pval_{dfs}", names), rel=1e-4)
        ci = res.conf_int()
        assert ci.lower.values == pytest.approx(_ref_vector(ref, f"ci_lb_{dfs}", names), rel=1e-4)
        assert ci.upper.values == pytest.approx(_ref_vector(ref, f"ci_ub_{dfs}", names), rel=1e-4)
        order = [ref["names"].index(n) for n in names]
        for c in ref["contrasts"]:
            L = np.array(c["L"], dtype=float)[order][None, :]
            w = res.wald_test(L, test="t")
            assert w.df_denom == c[f"ddf_{dfs}"]
            assert w.statistic == pytest.approx(c[f"F_{dfs}"], rel=1e-4)
            assert w.pvalue == pytest.approx(c[f"p_{dfs}"], rel=1e-4)
            t = res.t_test(L)
            assert t.df.iloc[0] == c[f"ddf_{dfs}"]
            assert t.t.iloc[0] ** 2 == pytest.approx(c[f"F_{dfs}"], rel=1e-4)
            assert t.pvalue.iloc[0] == pytest.approx(c[f"p_{dfs}"], rel=1e-4)
        j = ref["joint"]
        L = np.array(j["L"], dtype=float)[:, order]
        w = res.wald_test(L, test="t")
        assert (w.df, w.df_denom) == (L.shape[0], j[f"ddf_{dfs}"])
        assert w.statistic == pytest.approx(j[f"F_{dfs}"], rel=1e-4)
        assert w.pvalue == pytest.approx(j[f"p_{dfs}"], rel=1e-4)
        assert "P>|t|" in res.summary().as_text()


def test_t_test_takes_hypotheses(year):
    """t_test("x = 0") (and a matrix with rhs) gives one row per hypothesis; a number
    as the only positional argument is still the level."""
    one = year.t_test("year_c = 0")
    assert list(one.index) == ["year_c = 0"]
    row, ref = one.iloc[0], year.t_test().loc["year_c"]
    for col in ("coef", "std_err", "t", "df", "pvalue", "lower", "upper"):
        assert row[col] == pytest.approx(ref[col])
    two = year.t_test("year_c + _cons = 0.1, year_c = 0")
    L = np.array([[1.0, 1.0], [1.0, 0.0]])
    est = L @ year.params.values
    se = np.sqrt(np.diag(L @ year.cov_params().values @ L.T))
    assert two.coef.values == pytest.approx(est)
    assert two.t.values == pytest.approx((est - [0.1, 0.0]) / se)
    cdf = year.containment_df()
    assert list(two.df) == [cdf.min(), cdf["year_c"]]
    m = year.t_test([[1.0, 1.0]], rhs=0.1)
    assert m.t.iloc[0] == pytest.approx(two.t.iloc[0])
    assert year.t_test(90).equals(year.t_test(level=90))
    with pytest.raises(ValueError, match="unknown coefficient"):
        year.t_test("nothere = 0")
