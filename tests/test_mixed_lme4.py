"""mlmeta.mixed against lme4 and lmerTest on the repeated-measures design of the
simulation study (stored references made by tests/reference/make_mixed_references.R).

Log-likelihoods are compared in lme4's convention (``res.llf_lme4``: the REML
criterion without mlmeta's +1/2 log|X'X| term). The reference optimum of a case is
the better of lme4's default fit and a tight bobyqa refit. Where lme4 stops at a
lower optimum (on the boundary), mlmeta must reach a higher one, and a dense
likelihood computed here confirms both values.
"""

import warnings

import numpy as np
import pandas as pd
import pytest

import mlmeta
from mlmeta import ConvergenceWarning
from mlmeta.satterthwaite import satterthwaite_df
from mlmeta.simulate import lmm
from references import case_data, data_path, load

REF = load("mixed_reference")
CASES = {c["name"]: c for c in REF["cases"]}
# lme4 (default and refit) stops at a boundary point with a lower likelihood here.
LME4_LOWER = {"g30_o5_sd0.25_s10_full_reml", "g10_o5_sd1_s11_full_reml", "g30_o5_sd0.1_s12_full_ml"}

_FITS = {}


def _names(c):
    return ["_cons" if n == "(Intercept)" else n for n in c["refit"]["names"]]


def _best(c):
    return c["refit"] if c["refit"]["llf"] >= c["default"]["llf"] else c["default"]


def _fit(name):
    if name not in _FITS:
        c = CASES[name]
        data = case_data(c["data"])
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            res = mlmeta.mixed(c["formula"], data, method=c["method"])
        _FITS[name] = (res, data, [w for w in rec])
    return _FITS[name]


def _dense_llf(data, names, method, Sigma, sigma2, full):
    """lme4-convention log-likelihood at (Sigma, sigma^2), cluster by cluster."""
    X = np.column_stack([np.ones(len(data)), data[["IV1", "IV2", "IV3"]].to_numpy()])
    Z = X if full else X[:, :1]
    y = data["DV"].to_numpy()
    n, p = X.shape
    logdet, H, Xy, yy = 0.0, np.zeros((p, p)), np.zeros(p), 0.0
    for g in np.unique(data["Group"]):
        m = (data["Group"] == g).to_numpy()
        V = sigma2 * np.eye(m.sum()) + Z[m] @ Sigma @ Z[m].T
        L = np.linalg.cholesky(V)
        Xw = np.linalg.solve(L, X[m])
        yw = np.linalg.solve(L, y[m])
        logdet += 2 * np.log(np.diag(L)).sum()
        H += Xw.T @ Xw
        Xy += Xw.T @ yw
        yy += yw @ yw
    beta = np.linalg.solve(H, Xy)
    rss = yy - Xy @ beta
    if method == "ml":
        return -0.5 * (n * np.log(2 * np.pi) + logdet + rss)
    return -0.5 * ((n - p) * np.log(2 * np.pi) + logdet + rss + np.linalg.slogdet(H)[1])


def _ours(res, c):
    names = _names(c)
    re_names = names if c["model"] == "full" else ["_cons"]
    G = res.re_cov["Group"].loc[re_names, re_names].to_numpy()
    return names, G


@pytest.mark.parametrize("name", sorted(CASES))
def test_loglik_and_estimates(name):
    c = CASES[name]
    res, data, _ = _fit(name)
    best = _best(c)
    names, G = _ours(res, c)
    assert res.converged
    if name in LME4_LOWER:
        assert res.llf_lme4 > best["llf"] + 1e-3
        # both values confirmed by an independent dense computation
        full = c["model"] == "full"
        ours = _dense_llf(data, names, c["method"], G, res.scale, full)
        theirs = _dense_llf(data, names, c["method"], np.reshape(best["re_cov"], G.shape), best["sigma2"],
                            full)
        assert abs(ours - res.llf_lme4) < 1e-8
        assert abs(theirs - best["llf"]) < 1e-6
        return
    assert abs(res.llf_lme4 - best["llf"]) < 1e-6
    assert res.llf_lme4 > best["llf"] - 1e-9          # never below lme4
    np.testing.assert_allclose(res.params[names], best["fixef"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(res.bse[names], np.sqrt(np.diag(best["vcov"])), rtol=1e-5)
    np.testing.assert_allclose(res.scale, best["sigma2"], rtol=1e-5)
    scale = max(1.0, float(np.abs(best["re_cov"]).max()))
    np.testing.assert_allclose(G, np.reshape(best["re_cov"], G.shape), rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("name", sorted(CASES))
def test_llf_convention(name):
    c = CASES[name]
    res, _, _ = _fit(name)
    if c["method"] == "ml":
        assert res.llf == res.llf_lme4
    else:
        assert abs(res.llf - res.llf_lme4 - 0.5 * res.model.design.logdet_XtX) < 1e-9


@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items()
                                        if any("failed to converge" in m for m in c["default"]["warnings"])))
def test_converges_where_lme4_warns(name):
    c = CASES[name]
    res, _, rec = _fit(name)
    assert res.converged
    assert not any(issubclass(w.category, ConvergenceWarning) for w in rec)
    assert res.llf_lme4 >= c["default"]["llf"] - 1e-9


@pytest.mark.parametrize("name", sorted(n for n in CASES if n not in LME4_LOWER))
def test_satterthwaite_df_vs_lmertest(name):
    c = CASES[name]
    res, _, _ = _fit(name)
    best = _best(c)
    df = satterthwaite_df(res)[_names(c)].to_numpy()
    ref = np.asarray(best["df_satterthwaite"])
    # Interior optima: the df do not depend on the parameterisation of the variance
    # parameters. Singular fits: lme4's theta (intercept-first Cholesky) and mlmeta's
    # differ, and so can the Hessian on the boundary.
    tol = 1e-4 if not best["singular"] else 5e-3
    np.testing.assert_allclose(df, ref, rtol=tol)


def test_satterthwaite_contrasts_and_table():
    res, _, _ = _fit("essay_s1_full_reml")
    from mlmeta.satterthwaite import SatterthwaitePieces, satterthwaite
    pieces = SatterthwaitePieces(res)
    eye = np.eye(res.n_fe)
    np.testing.assert_allclose(pieces.df(eye), satterthwaite_df(res).to_numpy())
    np.testing.assert_allclose(pieces.V, res.cov_params().to_numpy(), rtol=1e-12)
    tbl = satterthwaite(res)
    assert list(tbl.columns) == ["coef", "std err", "df", "t", "P>|t|", "lower", "upper"]
    assert (tbl["df"] > 40).all() and (tbl["df"] < 60).all()
    c = np.array([[1.0, -1.0, 0.0, 0.0]])
    assert 40 < pieces.df(c)[0] < 200


def test_nonprofiled_gradient_matches_differences():
    """The kernel gradient used for the Hessian is d dev(theta, sigma^2) / d theta
    (``model.evaluate(theta, gradient=True, sigma2=s2).grad``)."""
    res, _, _ = _fit("essay_s2_full_reml")
    model, theta = res.model, res.theta
    rng = np.random.default_rng(0)
    th = theta + 0.05 * rng.standard_normal(theta.shape)
    s2 = res.scale * 1.3

    def dev(t):                                   # the deviance at sigma^2 = s2, not profiled
        return model.evaluate(t, sigma2=s2).deviance

    g = model.evaluate(th, gradient=True, sigma2=s2).grad
    h = 1e-5
    fd = np.array([(dev(th + h * e) - dev(th - h * e)) / (2 * h) for e in np.eye(th.size)])
    np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-4)
    # at the optimum the non-profiled deviance equals the profiled one
    assert abs(model.evaluate(theta, sigma2=res.scale).deviance + 2 * res.llf) < 1e-8


def test_stored_data_is_the_simulator_output():
    for c in REF["cases"][::4]:
        stored = case_data(c["data"])
        data, _, _ = lmm(int(c["obs_per_group"]), 3, int(c["groups"]), group_sd=c["group_sd"],
                         seed=int(c["seed"]))
        np.testing.assert_allclose(stored.to_numpy(dtype=float), data.to_numpy(dtype=float), rtol=1e-15)


def test_singular_fit_is_reported_like_lme4():
    """lme4 calls this fit singular (a rank-deficient 4 x 4 covariance, no zero SD)."""
    path = data_path("mixed_essay_sd0.1_s6.csv")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        res = mlmeta.mixed("DV ~ IV1 + IV2 + IV3 + (IV1 + IV2 + IV3 | Group)", pd.read_csv(path))
    assert any("singular" in b for b in res.boundary)
    assert any(issubclass(x.category, mlmeta.BoundaryWarning) for x in w)
    # t tests on Satterthwaite df by default (lmerTest's summary)
    assert (res.df > 1).all() and np.isfinite(res.df).all()
    assert "P>|t|" in res.summary().as_text()


# -- one df rule per model: Satterthwaite everywhere (lmerTest's contest) --------------
DF_REF = load("df_reference")
DF_FORMULAS = {"mixed_slope": "y ~ x1 + x2 + f + (1 + x1 | subj)",
               "sleepstudy": "Reaction ~ Days + (1 + Days | Subject)",
               "nested": "y ~ x + z + (1 | school) + (1 | school:class)"}
_DF_FITS = {}


def _df_fit(case):
    if case not in _DF_FITS:
        data = pd.DataFrame(DF_REF["data"][case])
        _DF_FITS[case] = mlmeta.mixed(DF_FORMULAS[case], data)
    return _DF_FITS[case]


def _in_our_order(res, ref, row):
    order = [ref["names"].index(n) for n in res.fe_names]
    return np.asarray(row, dtype=float)[..., order]


@pytest.mark.parametrize("case", sorted(DF_FORMULAS))
def test_t_test_and_wald_test_use_satterthwaite_df_as_lmerTest(case):
    """summary, t_test and wald_test(test="t") of a mixed model share one df rule:
    Satterthwaite df per contrast (lmerTest's contest1D) and the multi-df F test of
    lmerTest's contest(fit, L, joint=TRUE); F, df and p to 1e-4 relative (p-values
    below 1e-6 to 1e-10 absolute: there a 1e-5 relative difference in df, both sides
    numerical Hessians, moves p by more than 1e-4 relative)."""
    ref = DF_REF["mixed"][case]
    res = _df_fit(case)
    names = res.fe_names
    assert set(names) == set(ref["names"])
    assert res.params.values == pytest.approx(_in_our_order(res, ref, ref["beta"]), rel=1e-5)
    df_ref = _in_our_order(res, ref, ref["df"])
    assert res.df.values == pytest.approx(df_ref, rel=1e-4)
    assert res.t_test().df.values == pytest.approx(df_ref, rel=1e-4)
    assert res.t_test().pvalue.values == pytest.approx(res.pvalues.values, rel=1e-10)
    for c in ref["contrasts"]:
        L = _in_our_order(res, ref, c["L"])[None, :]
        t = res.t_test(L).iloc[0]
        assert t.coef == pytest.approx(c["estimate"], rel=1e-5)
        assert t.std_err == pytest.approx(c["se"], rel=1e-4)
        assert t.df == pytest.approx(c["df"], rel=1e-4)
        assert t.pvalue == pytest.approx(c["p"], rel=1e-4, abs=1e-10)
        w = res.wald_test(L, test="t")
        assert w.df_denom == pytest.approx(c["df"], rel=1e-4)
        assert w.statistic == pytest.approx(c["t"] ** 2, rel=1e-4)
        assert w.pvalue == pytest.approx(c["p"], rel=1e-4, abs=1e-10)
    for j in ref["joint"]:
        L = _in_our_order(res, ref, j["L"])
        w = res.wald_test(L, rhs=j["rhs"], test="t")
        assert w.df == j["ndf"]
        assert w.statistic == pytest.approx(j["F"], rel=1e-4)
        assert w.df_denom == pytest.approx(j["ddf"], rel=1e-4)
        assert w.pvalue == pytest.approx(j["p"], rel=1e-4, abs=1e-10)


def test_mixed_t_test_hypothesis_string():
    """t_test("x = 0") works on mixed models and agrees with summary()'s row."""
    res = _df_fit("mixed_slope")
    one = res.t_test("x1 = 0")
    assert list(one.index) == ["x1 = 0"]
    assert one.df.iloc[0] == pytest.approx(res.df["x1"], rel=1e-10)
    assert one.pvalue.iloc[0] == pytest.approx(res.pvalues["x1"], rel=1e-10)
    ci = res.conf_int().loc["x1"]
    assert (one.lower.iloc[0], one.upper.iloc[0]) == pytest.approx((ci.lower, ci.upper))
    two = res.t_test("x1 - x2 = 0, x1 = 0.2")
    ref = DF_REF["mixed"]["mixed_slope"]["contrasts"][2]          # x1 - x2
    assert two.df.iloc[0] == pytest.approx(ref["df"], rel=1e-4)
    assert two.df.iloc[1] == pytest.approx(res.df["x1"], rel=1e-10)
