"""mlmeta.simulate: the repeated-measures simulator (pymer4's simulate_lmm) and the
three-level meta-analytic simulator."""

import warnings

import numpy as np
import pandas as pd
import pytest

import mlmeta
from mlmeta.simulate import lmm, lmm_arrays, meta


def test_lmm_layout():
    data, coefs, beta = lmm(5, 3, 4, seed=1)
    assert list(data.columns) == ["DV", "IV1", "IV2", "IV3", "Group"]
    assert len(data) == 20 and (data["Group"].to_numpy() == np.repeat([1, 2, 3, 4], 5)).all()
    assert list(coefs.columns) == ["Intercept", "IV1", "IV2", "IV3"]
    assert list(coefs.index) == ["Grp1", "Grp2", "Grp3", "Grp4"]
    assert beta.shape == (4,) and ((0 <= beta) & (beta < 1)).all()
    X = np.column_stack([np.ones(20), data[["IV1", "IV2", "IV3"]]])
    B = coefs.to_numpy()[data["Group"] - 1]
    resid = data["DV"] - np.einsum("ij,ij->i", X, B)
    assert np.abs(resid).max() < 5          # the noise, N(0, 1)


def test_lmm_seeds():
    a = lmm(4, 2, 3, seed=5)
    b = lmm(4, 2, 3, seed=5)
    c = lmm(4, 2, 3, seed=6)
    pd.testing.assert_frame_equal(a[0], b[0])
    assert not np.allclose(a[0]["DV"], c[0]["DV"])
    g = lmm(4, 2, 3, seed=np.random.default_rng(5))
    pd.testing.assert_frame_equal(a[0], g[0])
    s = lmm(4, 2, 3, seed=np.random.SeedSequence(5))
    pd.testing.assert_frame_equal(a[0], s[0])


def _pymer4_draws(num_obs, num_coef, num_grps, grp_sigmas, seed):
    """pymer4.simulate.simulate_lmm's draws (defaults: mus 0, sigmas 1, noise (0, 1))."""
    np.random.seed(seed)
    b = np.random.rand(num_coef + 1)
    blups = np.array([np.random.normal(est, grp_sigmas, num_grps) for est in b]).T
    xs, ys = [], []
    for grp in range(num_grps):
        x = np.random.normal(0.0, 1.0, size=(num_obs, num_coef))
        x = np.column_stack([np.ones((num_obs, 1)), x])
        ys.append(x @ blups[grp] + np.random.normal(0, 1, size=num_obs))
        xs.append(x)
    return np.concatenate(ys), np.concatenate(xs)[:, 1:], blups, b


def test_legacy_randomstate_reproduces_pymer4_order():
    y0, X0, B0, b0 = _pymer4_draws(6, 3, 5, 0.25, 42)
    data, coefs, beta = lmm(6, 3, 5, seed=np.random.RandomState(42))
    np.testing.assert_array_equal(beta, b0)
    np.testing.assert_array_equal(coefs.to_numpy(), B0)
    np.testing.assert_array_equal(data[["IV1", "IV2", "IV3"]].to_numpy(), X0)
    np.testing.assert_allclose(data["DV"].to_numpy(), y0, rtol=0, atol=1e-14)


def test_lmm_distributions():
    y, X, codes, B, beta = lmm_arrays(40, 2, 4000, group_sd=[0.5, 1.0, 2.0], noise_sd=0.7, seed=3)
    np.testing.assert_allclose((B - beta).std(axis=0, ddof=1), [0.5, 1.0, 2.0], rtol=0.05)
    np.testing.assert_allclose((B - beta).mean(axis=0), 0, atol=0.1)
    np.testing.assert_allclose(X.std(axis=0), 1.0, rtol=0.02)
    e = y - B[codes, 0] - np.einsum("ij,ij->i", X, B[codes, 1:])
    assert abs(e.std() - 0.7) < 0.01 and abs(e.mean()) < 0.01


def test_lmm_options():
    _, coefs, beta = lmm(5, 2, 3, coef=[1.0, 2.0, 3.0], group_sd=0.0, seed=1)
    np.testing.assert_array_equal(beta, [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(coefs.to_numpy(), np.tile(beta, (3, 1)))
    _, _, beta = lmm(5, 2, 3, null=True, seed=1)
    assert beta[0] > 0 and (beta[1:] == 0).all()
    with pytest.raises(ValueError, match="coef"):
        lmm(5, 2, 3, coef=[1.0, 2.0])
    with pytest.raises(ValueError, match="group_sd"):
        lmm(5, 2, 3, group_sd=[1.0, 2.0])


def test_lmm_fits_recover_truth():
    data, _, beta = lmm(30, 2, 200, group_sd=0.5, seed=9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = mlmeta.mixed("DV ~ IV1 + IV2 + (IV1 + IV2 | Group)", data)
    est = res.params[["_cons", "IV1", "IV2"]].to_numpy()
    assert np.all(np.abs(est - beta) < 4 * res.bse[["_cons", "IV1", "IV2"]].to_numpy())
    np.testing.assert_allclose(np.diag(res.re_cov["Group"]), 0.25, rtol=0.3)
    assert abs(res.scale - 1.0) < 0.05


def test_meta_layout_and_truth():
    data, eff, truth = meta(50, (2, 5), beta=(0.3, -0.1), tau=0.2, omega=0.1, slope_sd=0.15, rho=0.5,
                            vi=(0.02, 0.05), seed=1)
    assert list(data.columns) == ["y", "v", "se", "x", "cluster", "es"]
    sizes = data.groupby("cluster").size()
    assert sizes.min() >= 2 and sizes.max() <= 5 and len(sizes) == 50
    assert ((data.v >= 0.02) & (data.v <= 0.05)).all()
    np.testing.assert_allclose(data.se ** 2, data.v)
    assert (data.groupby("cluster")["es"].apply(lambda s: list(s) == list(range(1, len(s) + 1)))).all()
    np.testing.assert_allclose(truth["Sigma"], [[0.04, 0.015], [0.015, 0.0225]])
    assert eff.shape == (50, 2)
    const, _, _ = meta(10, 3, x_within=False, vi=0.05, seed=2)
    assert (const.groupby("cluster")["x"].nunique() == 1).all() and (const.v == 0.05).all()


def test_meta_fit_recovers_truth():
    data, _, truth = meta(400, (3, 6), beta=(0.3, 0.2), tau=0.3, omega=0.2, vi=(0.01, 0.05), seed=4)
    res = mlmeta.meregress("y ~ x + (1 | cluster) + (1 | cluster:es)", data, variance="v")
    assert abs(res.params["_cons"] - 0.3) < 4 * res.bse["_cons"]
    assert abs(res.params["x"] - 0.2) < 4 * res.bse["x"]
    np.testing.assert_allclose(res.re_cov["cluster"].iloc[0, 0], 0.09, rtol=0.25)
    np.testing.assert_allclose(res.re_cov["cluster:es"].iloc[0, 0], 0.04, rtol=0.3)
    slope, _, _ = meta(300, (3, 6), tau=0.3, omega=0.1, slope_sd=0.3, vi=(0.01, 0.03), seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = mlmeta.meregress("y ~ x + (1 + x || cluster) + (1 | cluster:es)", slope, variance="v")
    np.testing.assert_allclose(res.re_cov["cluster"].loc["x", "x"], 0.09, rtol=0.35)
