"""Bootstrap and permutation tests: determinism, agreement with asymptotics on easy data."""

import numpy as np
import pandas as pd
import pytest

import mlmeta

F = "stdmdiff ~ year_c + (1 | district) + (1 | district:school)"


@pytest.fixture(scope="module")
def fit(fitted):
    return fitted(F, "schoolcal", variance="var")


def test_parametric_bootstrap_seeded_and_thread_independent(fit):
    a, ra = fit.bootstrap(60, seed=5, n_jobs=1)
    b, rb = fit.bootstrap(60, seed=5, n_jobs=2)
    pd.testing.assert_frame_equal(a, b)
    c, _ = fit.bootstrap(60, seed=6)
    assert not np.allclose(a.boot_mean.values, c.boot_mean.values)
    assert list(a.index) == ["year_c", "_cons", "district: sd(_cons)", "district:school: sd(_cons)"]
    # the bootstrap SE of a coefficient is close to its model-based SE
    assert a.loc["_cons", "boot_se"] == pytest.approx(fit.bse["_cons"], rel=0.35)
    assert (a.lower <= a.estimate).all() and (a.estimate <= a.upper).all()


def test_cluster_bootstrap(fit):
    a, reps = fit.bootstrap(40, kind="cluster", seed=1, n_jobs=2)
    b, _ = fit.bootstrap(40, kind="cluster", seed=1, n_jobs=1)
    pd.testing.assert_frame_equal(a, b)
    assert a.n_ok.min() >= 35
    with pytest.raises(ValueError, match="kind"):
        fit.bootstrap(10, kind="wild")


def test_permutation_test(fit):
    t = fit.permutation_test(99, seed=2)
    assert list(t.index) == ["Q_M (moderators)", "year_c"]
    # with one moderator the omnibus statistic is z^2
    assert t.loc["Q_M (moderators)", "statistic"] == pytest.approx(fit.zvalues["year_c"] ** 2)
    assert t.p_perm.between(0.01, 1).all()
    assert abs(t.loc["year_c", "p_perm"] - t.loc["year_c", "p_asymptotic"]) < 0.2
    t2 = fit.permutation_test(99, seed=2, n_jobs=1)
    pd.testing.assert_frame_equal(t, t2)


def test_permutation_needs_moderators():
    res = mlmeta.meregress("stdmdiff ~ 1 + (1 | district)", mlmeta.datasets.load("schoolcal"),
                           variance="var")
    with pytest.raises(ValueError, match="no moderators"):
        res.permutation_test(10)
