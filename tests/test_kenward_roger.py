"""Kenward-Roger inference for mixed models: pbkrtest's vcovAdj and Lb_ddf, lmerTest's
summary(ddf="Kenward-Roger") (references made by tests/reference/make_anova.R), and the
per-cluster accumulation against pbkrtest's dense n x n formulas."""

import functools
import warnings

import numpy as np
import pytest
from scipy import linalg

import mlmeta
from mlmeta import kenward_roger as krmod
from mlmeta.kenward_roger import KenwardRoger, kenward_roger, linear_basis
from references import case_data, load

REF = load("anova_reference")
CASES = sorted(REF["mixed"])


@functools.cache
def fit(name, test="satterthwaite"):
    c = REF["mixed"][name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mlmeta.mixed(c["formula"], case_data(c["data"]), test=test)


@pytest.mark.parametrize("name", CASES)
def test_adjusted_covariance_matches_pbkrtest(name):
    c = REF["mixed"][name]
    V = fit(name).cov_params(ddf="kenward-roger").loc[c["names"], c["names"]].to_numpy()
    ref = np.array(c["vcov_kr"])
    np.testing.assert_allclose(V, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    # the unadjusted one is unchanged
    np.testing.assert_allclose(fit(name).cov_params().loc[c["names"], c["names"]], c["vcov"],
                               rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("name", CASES)
def test_coefficient_table_matches_lmerTest(name):
    c = REF["mixed"][name]
    table = fit(name).t_test(ddf="kenward-roger")
    for coef, row in c["coef_kr"].items():
        for col in ("coef", "std_err", "df", "t", "pvalue"):
            np.testing.assert_allclose(table.loc[coef, col], row[col], rtol=1e-4, err_msg=f"{coef} {col}")
    # a fit with test="kenward-roger" reports the same everywhere
    res = fit(name, "kenward-roger")
    for coef, row in c["coef_kr"].items():
        np.testing.assert_allclose(res.bse[coef], row["std_err"], rtol=1e-4)
        np.testing.assert_allclose(res.df[coef], row["df"], rtol=1e-4)
        np.testing.assert_allclose(res.pvalues[coef], row["pvalue"], rtol=1e-4)
    ci = res.conf_int()
    np.testing.assert_allclose(ci.to_numpy(), fit(name).conf_int(ddf="kenward-roger").to_numpy())


def test_summary_and_views():
    res = fit("splitplot")
    kr = res.with_ddf("kenward-roger")
    assert kr is not res and kr.test == "kenward-roger" and res.test == "satterthwaite"
    assert res.with_ddf("satterthwaite") is res
    assert kr.with_ddf("satterthwaite").bse.equals(res.bse)
    assert not np.allclose(kr.bse, res.bse)
    text = str(res.summary(ddf="kenward-roger"))
    assert "Kenward-Roger degrees of freedom" in text
    assert f"{kr.bse['x']:.7f}".lstrip("0")[:6] in text
    assert "Satterthwaite degrees of freedom" in str(res.summary())


def test_joint_F_test_is_pbkrtest_KRmodcomp():
    """wald_test(test="t") under Kenward-Roger = lmerTest's anova row (scaled F, KR ddf)."""
    res = fit("splitplot", "kenward-roger")
    w = res.wald_test("A[T.lo]:B[T.trt], A[T.mid]:B[T.trt]", test="t")
    ref = REF["mixed"]["splitplot"]["anova3_kr"]["A:B"]
    np.testing.assert_allclose([w.statistic, w.df_denom, w.pvalue], [ref["F"], ref["df_den"], ref["pvalue"]],
                               rtol=1e-4)
    assert w.df == 2


def dense_vcov_adj(res):
    """pbkrtest's vcovAdj_internal on the whole n x n Sigma (sorted rows)."""
    m, d = res.model, res.model.design
    n = d.n_obs
    Sigma = np.zeros((n, n))
    for a, b, V in m.marginal_blocks(res.theta):
        Sigma[a:b, a:b] = V
    G = []
    for lvl, s in enumerate(m.structs):
        same = d.groups[lvl][:, None] == d.groups[lvl][None, :]
        G += [(d.Z[lvl] @ E @ d.Z[lvl].T) * same for E in linear_basis(s)]
    G.append(np.eye(n))
    X = d.X
    Si = linalg.inv(Sigma)
    Phi = linalg.inv(X.T @ Si @ X)
    TT = Si @ X
    HH = [g @ Si for g in G]
    OO = [h @ X for h in HH]
    r = len(G)
    P = [-(o.T @ TT) for o in OO]
    Q = [[OO[i].T @ Si @ OO[j] for j in range(r)] for i in range(r)]
    K = np.array([[np.sum(HH[i].T * HH[j]) for j in range(r)] for i in range(r)])
    IE = np.array([[K[i, j] - 2 * np.sum(Phi * Q[i][j]) + np.sum((Phi @ P[i]) * (P[j] @ Phi))
                    for j in range(r)] for i in range(r)])
    W = 2 * linalg.inv(IE)
    U = sum(W[i, j] * (Q[i][j] - P[i] @ Phi @ P[j]) for i in range(r) for j in range(r))
    return Phi + 2 * Phi @ U @ Phi


@pytest.mark.parametrize("name", ["splitplot", "sleepstudy", "sleepstudy_indep"])
def test_cluster_sums_equal_the_dense_formulas(name):
    res = fit(name)
    np.testing.assert_allclose(kenward_roger(res).Phi_A, dense_vcov_adj(res), rtol=1e-9, atol=1e-12)


def test_exchangeable_and_identity_structures():
    """Linear structures beyond lme4's: the dense formulas agree, and a one-effect
    exchangeable level equals the identity one."""
    c = REF["mixed"]["orthodont_slope"]
    data = case_data(c["data"])
    res = mlmeta.mixed(c["formula"], data, covariance={"Subject": "exchangeable"})
    np.testing.assert_allclose(kenward_roger(res).Phi_A, dense_vcov_adj(res), rtol=1e-9, atol=1e-12)
    res = mlmeta.mixed(c["formula"], data, covariance={"Subject": "identity"})
    np.testing.assert_allclose(kenward_roger(res).Phi_A, dense_vcov_adj(res), rtol=1e-9, atol=1e-12)


def test_refusals():
    c = REF["mixed"]["sleepstudy"]
    data = case_data(c["data"])
    with pytest.raises(ValueError, match="REML"):
        mlmeta.mixed(c["formula"], data, method="ml", test="kenward-roger")
    with pytest.raises(ValueError, match="REML"):
        mlmeta.mixed(c["formula"], data, method="ml").t_test(ddf="kenward-roger")
    custom = mlmeta.mixed(c["formula"], data, covariance={"Subject": [[None, 0.2], [0.2, None]]})
    with pytest.raises(ValueError, match="linear in"):
        KenwardRoger(custom)
    meta = mlmeta.meregress("yi ~ ablat + (1 | trial)", case_data("tests/reference/data/bcg.csv"),
                            variance="vi")
    with pytest.raises(ValueError, match="mlmeta.mixed"):
        KenwardRoger(meta)
    with pytest.raises(ValueError, match="ddf must be"):
        fit("sleepstudy").with_ddf("kenward")


def test_cluster_size_limit(monkeypatch):
    monkeypatch.setattr(krmod, "MAX_CLUSTER_ROWS", 9)
    with pytest.raises(ValueError, match="MAX_CLUSTER_ROWS = 9"):
        KenwardRoger(fit("sleepstudy"))
