"""Results, models and batch fits pickle with the standard library's pickle: the compiled
problem (C workspaces) is left out and rebuilt on first use, and everything a user reads
off a result -- its model frame, summary and postestimation -- is the same after a round
trip, in this process and in a freshly spawned one."""

import multiprocessing as mp
import pickle

import numpy as np
import pandas as pd
import pytest

import mlmeta
from mlmeta.batch import Model, fit_batch
from references import load

SCHOOL = "stdmdiff ~ year_c + (1 | district) + (1 | district:school)"
BERKEY = "yi ~ 0 + outcome + (0 + outcome | trial)"
SLEEP = "Reaction ~ Days + (1 + Days | Subject)"


def _berkey_V(dat):
    """The known 2 x 2 sampling covariance of each trial (columns v1i, v2i), over the data rows."""
    V = np.zeros((len(dat), len(dat)))
    for _, g in dat.groupby("trial"):
        i = g.index.to_numpy()
        V[np.ix_(i, i)] = g[["v1i", "v2i"]].to_numpy()
    return V


def _sleepstudy():
    return pd.DataFrame(load("df_reference")["data"]["sleepstudy"])


@pytest.fixture(scope="module")
def fits():
    school = mlmeta.datasets.load("schoolcal")
    berkey = mlmeta.datasets.load("berkey")
    return {
        "schoolcal": (mlmeta.meregress(SCHOOL, school, variance="var"), "district"),
        "berkey_V": (mlmeta.meregress(BERKEY, berkey, V=_berkey_V(berkey)), "trial"),
        "sleepstudy": (mlmeta.mixed(SLEEP, _sleepstudy()), "Subject"),
    }


def _roundtrip(obj):
    return pickle.loads(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def _readout(res, cluster):
    """What a user reads off a fitted result: printed tables and postestimation."""
    out = {
        "summary": res.summary().as_text(),
        "html": res.summary().as_html(),
        "params": res.params, "bse": res.bse, "cov": res.cov_params(), "llf": res.llf,
        "theta": res.theta, "re_cov": res.re_cov, "df": res.df,
        "fitted": res.predict("fitted"), "rstandard": res.predict("rstandard"),
        "xb": res.predict("xb", stdp=True),
        "blups": res.random_effects(),
        "t_test": res.t_test(), "wald": str(res.wald_test(res.fe_names[0])),
        "robust": res.robust(cluster=cluster).summary().as_text(),
        "sample": res.sample, "y": res.frame.y, "X": res.frame.X,
    }
    if res.Q_M is not None:             # known sampling variances
        out["profile_ci"] = res.profile_ci()
    return out


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, dict):
            assert x.keys() == y.keys(), key
            for k in x:
                pd.testing.assert_frame_equal(x[k], y[k])
        elif isinstance(x, pd.DataFrame):
            pd.testing.assert_frame_equal(x, y)
        elif isinstance(x, pd.Series):
            pd.testing.assert_series_equal(x, y)
        elif isinstance(x, np.ndarray):
            np.testing.assert_array_equal(x, y)
        else:
            assert x == y, key


@pytest.mark.parametrize("case", ["schoolcal", "berkey_V", "sleepstudy"])
def test_result_roundtrip_keeps_frame_model_and_postestimation(fits, case):
    res, cluster = fits[case]
    before = _readout(res, cluster)
    back = _roundtrip(res)
    assert type(back) is type(res)
    # the compiled problem is not in the pickle: rebuilt when first needed
    assert "problem" not in back.model.__dict__
    after = _readout(back, cluster)
    assert "problem" in back.model.__dict__
    _assert_same(before, after)
    pd.testing.assert_index_equal(back.frame.data_index, res.frame.data_index)
    # a refit from the unpickled model reaches the same optimum
    ev_a, ev_b = res.model.evaluate(res.theta), back.model.evaluate(back.theta)
    assert ev_a.deviance == ev_b.deviance
    np.testing.assert_array_equal(ev_a.beta, ev_b.beta)
    # and an unpickled result pickles again
    assert _roundtrip(back).summary().as_text() == before["summary"]


def test_predict_on_newdata_after_roundtrip(fits):
    res = _roundtrip(fits["schoolcal"][0])
    new = pd.DataFrame({"year_c": [-5.0, 0.0, 7.5]})
    ref = fits["schoolcal"][0]
    pd.testing.assert_frame_equal(res.predict("xb", newdata=new, stdp=True),
                                  ref.predict("xb", newdata=new, stdp=True))
    pd.testing.assert_frame_equal(res.predict_interval(new), ref.predict_interval(new))


def test_model_and_batch_results_roundtrip():
    school = mlmeta.datasets.load("schoolcal")
    M = Model(SCHOOL, school, variance="var")
    Y = M.simulate(6, seed=5)
    back = _roundtrip(M)
    assert back.fit().summary().as_text() == M.fit().summary().as_text()
    a, b = fit_batch(M, Y, n_jobs=1), fit_batch(back, Y, n_jobs=1)
    pd.testing.assert_frame_equal(a.params, b.params)
    np.testing.assert_array_equal(a.llf, b.llf)
    c = _roundtrip(a)
    pd.testing.assert_frame_equal(c.params, a.params)
    pd.testing.assert_frame_equal(c.bse, a.bse)
    for g in a.re_cov:
        np.testing.assert_array_equal(c.re_cov[g], a.re_cov[g])
    np.testing.assert_array_equal(c.converged, a.converged)
    lo_a, _ = a.conf_int()
    pd.testing.assert_frame_equal(c.conf_int()[0], lo_a)
    # a mixed model (profiled residual variance) too
    mm = Model(SLEEP, _sleepstudy())
    mb = _roundtrip(mm)
    assert mb.mixed and mb.fit().llf == mm.fit().llf


def _child_readout(payload):
    """Runs in a spawned interpreter: unpickle a result and read it."""
    res = pickle.loads(payload)
    return (res.summary().as_text(), res.random_effects(), res.predict("fitted"),
            res.robust(cluster=res.group_names[0]).bse)


def _child_fit(payload):
    """Runs in a spawned interpreter: unpickle a Model and fit it."""
    M, y = pickle.loads(payload)
    return M.fit(y).params


@pytest.mark.parametrize("case", ["schoolcal", "berkey_V", "sleepstudy"])
def test_roundtrip_through_a_spawned_process(fits, case):
    res = fits[case][0]
    with mp.get_context("spawn").Pool(1) as pool:
        text, blups, fitted, robust_se = pool.apply(_child_readout, (pickle.dumps(res),))
    assert text == res.summary().as_text()
    for k, v in res.random_effects().items():
        pd.testing.assert_frame_equal(blups[k], v)
    pd.testing.assert_series_equal(fitted, res.predict("fitted"))
    pd.testing.assert_series_equal(robust_se, res.robust(cluster=res.group_names[0]).bse)


def test_model_fits_in_a_spawned_process():
    school = mlmeta.datasets.load("schoolcal")
    M = Model(SCHOOL, school, variance="var")
    y = M.simulate(1, seed=9)[:, 0]
    with mp.get_context("spawn").Pool(1) as pool:
        params = pool.apply(_child_fit, (pickle.dumps((M, y)),))
    pd.testing.assert_series_equal(params, M.fit(y).params)
