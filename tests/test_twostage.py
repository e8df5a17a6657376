"""mlmeta.two_stage: first stage vs per-group lm(), one-sample t by hand and R's
t.test(), and the meta-analytic second stage vs metafor::rma.mv (stored references,
made by tests/reference/make_twostage_references.R)."""

import inspect

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import mlmeta
from mlmeta.simulate import lmm
from mlmeta.twostage import first_stage, mv_meta, two_stage
from references import case_data, load

REF = load("twostage_reference")
DATA = case_data(REF["data"])
ORDER = REF["names"]            # R's order, mlmeta names


def test_first_stage_matches_lm_per_group():
    res = two_stage(REF["formula"], DATA, REF["group"])
    np.testing.assert_allclose(res.first_stage[ORDER].to_numpy(), REF["b"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(res.sigma2.to_numpy(), REF["sigma2"], rtol=1e-10)
    perm = [res.fe_names.index(n) for n in ORDER]
    S = res.first_stage_cov[:, perm][:, :, perm]
    np.testing.assert_allclose(S, np.array(REF["S"]), rtol=1e-9, atol=1e-14)
    assert list(res.first_stage.index) == REF["groups"]


def test_ols_second_stage_is_one_sample_t():
    res = two_stage(REF["formula"], DATA, REF["group"])
    tt = REF["ttest"]
    np.testing.assert_allclose(res.params[ORDER], tt["estimate"], rtol=1e-12)
    np.testing.assert_allclose(res.bse[ORDER], tt["se"], rtol=1e-12)
    np.testing.assert_allclose(res.tvalues[ORDER], tt["t"], rtol=1e-10)
    np.testing.assert_allclose(res.df[ORDER], tt["df"])
    np.testing.assert_allclose(res.pvalues[ORDER], tt["p"], rtol=1e-8, atol=1e-300)
    # by hand, from the first-stage table
    B = res.first_stage.to_numpy()
    J = B.shape[0]
    np.testing.assert_allclose(res.params, B.mean(0), rtol=1e-13)
    np.testing.assert_allclose(res.bse, B.std(0, ddof=1) / np.sqrt(J), rtol=1e-12)
    res_t = [stats.ttest_1samp(B[:, k], 0.0) for k in range(B.shape[1])]
    np.testing.assert_allclose(res.pvalues, [r.pvalue for r in res_t], rtol=1e-9)
    ci = res.conf_int()
    crit = stats.t.ppf(0.975, J - 1)
    np.testing.assert_allclose(ci["upper"], res.params + crit * res.bse)


@pytest.mark.parametrize("method", ["reml", "ml"])
def test_meta_second_stage_matches_metafor(method):
    ref = REF["meta"][method]
    res = two_stage(REF["formula"], DATA, REF["group"], second_stage="meta", method=method, test="z")
    assert res.converged
    assert abs(res.llf - ref["llf"]) < 1e-6
    np.testing.assert_allclose(res.params[ORDER], ref["beta"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(res.bse[ORDER], ref["se"], rtol=1e-6)
    np.testing.assert_allclose(res.tvalues[ORDER], ref["zval"], rtol=1e-5)
    np.testing.assert_allclose(res.re_cov.loc[ORDER, ORDER].to_numpy(), ref["G"], rtol=1e-5, atol=1e-7)
    assert np.isinf(res.df).all()
    res_t = two_stage(REF["formula"], DATA, REF["group"], second_stage="meta", method=method)
    assert (res_t.df == res_t.n_groups - 1).all()


def _dense_mv(b, S, Sigma, reml):
    """-2 log-likelihood, GLS beta and its covariance H^-1 of the stacked model with a
    dense Jp x Jp covariance."""
    J, p = b.shape
    V = np.kron(np.eye(J), Sigma) + np.block([[S[i] if i == j else np.zeros((p, p)) for j in range(J)]
                                              for i in range(J)])
    X = np.kron(np.ones((J, 1)), np.eye(p))
    y = b.reshape(-1)
    Vi = np.linalg.inv(V)
    H = X.T @ Vi @ X
    beta = np.linalg.solve(H, X.T @ Vi @ y)
    r = y - X @ beta
    dev = np.linalg.slogdet(V)[1] + r @ Vi @ r
    if reml:
        dev += (J * p - p) * np.log(2 * np.pi) + np.linalg.slogdet(H)[1] - np.linalg.slogdet(X.T @ X)[1]
    else:
        dev += J * p * np.log(2 * np.pi)
    return dev, beta, np.linalg.inv(H)


def _stacked(res):
    """The first-stage coefficients and sampling covariances the meta second stage used."""
    return res.first_stage.to_numpy()[res.used], res.first_stage_cov[res.used]


@pytest.mark.parametrize("method", ["reml", "ml"])
def test_meta_objective_is_the_dense_likelihood(method):
    """The reported llf, beta and Var(beta) are the dense stacked model's at the reported
    Sigma (interior and singular optima)."""
    reml = method == "reml"
    for data, formula in [(DATA, REF["formula"]), (lmm(8, 2, 12, group_sd=0.5, seed=12)[0], "DV ~ IV1 + IV2"),
                          (lmm(6, 3, 15, group_sd=0.3, seed=21)[0], "DV ~ IV1 + IV2 + IV3")]:
        res = two_stage(formula, data, "Group", second_stage="meta", method=method)
        assert res.converged
        b, S = _stacked(res)
        dev, beta, Hinv = _dense_mv(b, S, res.re_cov.to_numpy(), reml)
        assert abs(-0.5 * dev - res.llf) < 1e-9
        np.testing.assert_allclose(res.params.to_numpy(), beta, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(res.cov_params().to_numpy(), Hinv, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("method", ["reml", "ml"])
def test_meta_optimum_is_a_maximum_of_the_dense_likelihood(method):
    """At an interior optimum (Sigma positive definite) the gradient of the dense
    criterion over the Cholesky factor L of Sigma = L L' (the optimiser's parameters)
    vanishes, and moving away from it lowers the likelihood."""
    reml = method == "reml"
    res = two_stage(REF["formula"], DATA, REF["group"], second_stage="meta", method=method)
    b, S = _stacked(res)
    Sigma = res.re_cov.to_numpy()
    assert np.linalg.eigvalsh(Sigma).min() > 0.05            # interior for these data
    L = np.linalg.cholesky(Sigma)
    idx = np.tril_indices(L.shape[0])

    def dev(lv):
        M = np.zeros_like(L)
        M[idx] = lv
        return _dense_mv(b, S, M @ M.T, reml)[0]

    lv = L[idx]
    dev0 = dev(lv)
    h = 1e-5
    grad = np.array([(dev(lv + h * e) - dev(lv - h * e)) / (2 * h) for e in np.eye(lv.size)])
    assert np.abs(grad).max() < 1e-5, grad
    rng = np.random.default_rng(0)
    for _ in range(20):
        assert dev(lv * (1 + 0.05 * rng.standard_normal(lv.size))) > dev0


def test_mv_meta_is_scale_equivariant():
    rng = np.random.default_rng(3)
    J, p = 15, 2
    b = rng.standard_normal((J, p)) + [1.0, -2.0]
    S = np.stack([np.diag(rng.uniform(0.05, 0.3, p)) for _ in range(J)])
    a = mv_meta(b, S)
    D = np.diag([10.0, 0.01])
    c = mv_meta(b @ D, D @ S @ D)
    np.testing.assert_allclose(c["beta"], a["beta"] @ D, rtol=1e-6)
    np.testing.assert_allclose(c["Sigma"], D @ a["Sigma"] @ D, rtol=1e-5, atol=1e-10)
    assert abs(c["llf"] - (a["llf"] - J * np.log(np.linalg.det(D)) + np.log(np.linalg.det(D)))) < 1e-6


def test_first_stage_any_row_order_and_singular_groups():
    dat, _, _ = lmm(6, 2, 10, seed=11)
    rows = np.r_[np.arange(len(dat)), ]
    dat = dat.iloc[np.random.default_rng(1).permutation(rows)]
    small = pd.DataFrame({"DV": [1.0, 2.0], "IV1": [0.1, 0.3], "IV2": [0.5, 0.2], "Group": [99, 99]})
    flat = pd.DataFrame({"DV": [1.0, 2.0, 0.5, 0.1], "IV1": [0.1, 0.3, 0.2, 0.4], "IV2": [1.0] * 4,
                         "Group": [98] * 4})
    full = pd.concat([dat, small, flat], ignore_index=True)
    with pytest.warns(UserWarning, match="2 group"):
        res = two_stage("DV ~ IV1 + IV2", full, "Group")
    assert set(res.dropped) == {98, 99} and res.n_groups == 10
    ref = two_stage("DV ~ IV1 + IV2", dat.sort_values("Group"), "Group")
    np.testing.assert_allclose(res.params, ref.params, rtol=1e-12)
    np.testing.assert_allclose(res.bse, ref.bse, rtol=1e-12)
    fs = first_stage(dat.DV.to_numpy(), np.column_stack([np.ones(len(dat)), dat.IV1, dat.IV2]),
                     dat.Group.to_numpy() - 1)
    for g in range(10):
        m = (dat.Group == g + 1).to_numpy()
        Xg = np.column_stack([np.ones(m.sum()), dat.IV1[m], dat.IV2[m]])
        np.testing.assert_allclose(fs["b"][g], np.linalg.lstsq(Xg, dat.DV[m], rcond=None)[0], rtol=1e-10)


def test_meta_needs_residual_df_and_summary():
    dat, _, _ = lmm(3, 2, 12, group_sd=0.5, seed=12)       # n_g = p: no residual df
    with pytest.raises(ValueError, match="at least 2"):
        with pytest.warns(UserWarning):
            two_stage("DV ~ IV1 + IV2", dat, "Group", second_stage="meta")
    dat, _, _ = lmm(8, 2, 12, group_sd=0.5, seed=12)
    res = two_stage("DV ~ IV1 + IV2", dat, "Group", second_stage="meta")
    text = str(res.summary())
    assert "meta" in text and "Between-group SDs" in text and "Groups (Group)" in text
    with pytest.raises(ValueError, match="second_stage"):
        two_stage("DV ~ IV1", dat, "Group", second_stage="gls")
    with pytest.raises(ValueError, match="group="):
        two_stage("DV ~ IV1 + (1 | Group)", dat, "Group")


@pytest.mark.skipif("V" not in inspect.signature(mlmeta.meregress).parameters,
                    reason="meregress has no V= (known full sampling covariance) option")
@pytest.mark.parametrize("method", ["reml", "ml"])
def test_meta_engines_agree(method):
    """The dense second stage and meregress(V=) on the stacked coefficients."""
    for data, formula in [(DATA, REF["formula"]),
                          (lmm(6, 3, 15, group_sd=0.1, seed=21)[0], "DV ~ IV1 + IV2 + IV3")]:
        a = two_stage(formula, data, "Group", second_stage="meta", method=method)
        b = two_stage(formula, data, "Group", second_stage="meta", method=method, engine="meregress")
        assert abs(a.llf - b.llf) < 1e-7
        np.testing.assert_allclose(a.params, b.params, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(a.bse, b.bse, rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(a.re_cov, b.re_cov, rtol=1e-4, atol=1e-6)
    ref = REF["meta"][method]
    np.testing.assert_allclose(b.re_cov.to_numpy().shape, (4, 4))
    c = two_stage(REF["formula"], DATA, REF["group"], second_stage="meta", method=method, engine="meregress")
    assert abs(c.llf - ref["llf"]) < 1e-6
