"""One model or results object used from several threads at once gives the numbers of a
serial run: the compiled problem's workspaces are shared, and every call holds the
problem's lock while it uses them."""

import threading
import time
import warnings

import numpy as np
import pandas as pd
import pytest

import mlmeta


def _hammer(work, loop, n_threads=2):
    """Run ``work()`` in this thread while ``n_threads`` threads call ``loop()`` until it
    ends; returns (work's result, every loop result, exceptions)."""
    stop = threading.Event()
    results, errors = [], []

    def spin():
        while not stop.is_set():
            try:
                results.append(loop())
            except Exception as exc:           # collected: the test reports them
                errors.append(exc)
            time.sleep(0.001)                 # let the worker have the interpreter too

    threads = [threading.Thread(target=spin) for _ in range(n_threads)]
    for t in threads:
        t.start()
    try:
        out = work()
    finally:
        stop.set()
        for t in threads:
            t.join()
    return out, results, errors


def _tables(res):
    return {k: v[["blup", "se"]].to_numpy() for k, v in res.random_effects().items()}


def test_profile_intervals_and_blups_from_several_threads(schoolcal):
    res = mlmeta.meregress("stdmdiff ~ year_c + (1 + year_c | district) + (1 | district:school)",
                           schoolcal, variance="var")
    blups, ci = _tables(res), res.profile_ci()

    def work():
        return [res.profile_ci() for _ in range(2)]

    out, tables, errors = _hammer(work, lambda: _tables(res))
    assert not errors
    assert len(tables) > 0
    for got in out:
        pd.testing.assert_frame_equal(got, ci)
    for t in tables:
        for k in blups:
            np.testing.assert_array_equal(t[k], blups[k])


def _mixed_data(seed=1, n=160):
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"a": rng.integers(0, 12, n), "b": rng.integers(0, 3, n),
                       "c": rng.integers(0, 6, n), "x": rng.normal(size=n)})
    u0, u1, w = rng.normal(size=12) * 0.7, rng.normal(size=12) * 0.3, rng.normal(size=6) * 0.5
    df["y"] = 1 + 0.5 * df.x + u0[df.a] + u1[df.a] * df.x + w[df.c] + rng.normal(size=n)
    return df


@pytest.mark.parametrize("formula", ["y ~ x + (1 | a) + (1 | a:b)",      # nested
                                     "y ~ x + (1 | a) + (1 | c)"])      # crossed
def test_mixed_profile_summary_and_blups_from_several_threads(formula):
    res = mlmeta.mixed(formula, _mixed_data())
    blups = _tables(res)
    fresh = mlmeta.mixed(formula, _mixed_data())
    text, ci = str(fresh.summary()), fresh.profile_ci()      # the serial numbers

    def work():
        return res.profile_ci(), str(res.summary())

    (got_ci, got_text), tables, errors = _hammer(work, lambda: _tables(res))
    assert not errors
    pd.testing.assert_frame_equal(got_ci, ci)
    assert got_text == text
    for t in tables:
        for k in blups:
            np.testing.assert_array_equal(t[k], blups[k])


def _batch_data(seed=3, n=300):
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"s": rng.integers(0, 30, n), "x": rng.normal(size=n),
                       "v": rng.uniform(0.05, 0.3, n)})
    df["y"] = 0.2 + 0.3 * df.x + rng.normal(size=30)[df.s] * 0.4 + rng.normal(size=n) * np.sqrt(df.v)
    Y = np.column_stack([0.2 + 0.3 * df.x + rng.normal(size=30)[df.s] * rng.uniform(0, 0.6)
                         + rng.normal(size=n) * np.sqrt(df.v) for _ in range(12)])
    return df, Y


@pytest.mark.parametrize("variance", ["v", None])
def test_fit_batch_from_one_and_eight_threads_is_identical(variance):
    df, Y = _batch_data()
    model = mlmeta.Model("y ~ x + (1 + x | s)", df, **({"variance": variance} if variance else {}))
    one = mlmeta.fit_batch(model, Y, n_jobs=1)
    eight = mlmeta.fit_batch(model, Y, n_jobs=8)
    for name in ("llf", "theta", "converged", "n_iter", "n_evals"):
        np.testing.assert_array_equal(getattr(one, name), getattr(eight, name))
    pd.testing.assert_frame_equal(one.params, eight.params)
    pd.testing.assert_frame_equal(one.bse, eight.bse)


def test_eight_threads_fitting_one_model_match_serial_fits():
    df, Y = _batch_data(seed=4)
    model = mlmeta.Model("y ~ x + (1 + x | s)", df, variance="v")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        serial = [model.fit(y=Y[:, j]) for j in range(8)]
        out = [None] * 8

        def fit(j):
            out[j] = model.fit(y=Y[:, j])

        threads = [threading.Thread(target=fit, args=(j,)) for j in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for a, b in zip(serial, out):
        assert a.llf == b.llf
        np.testing.assert_array_equal(a.theta, b.theta)
        np.testing.assert_array_equal(a.params, b.params)
        np.testing.assert_array_equal(a.bse, b.bse)


def test_extra_starts_share_out_over_the_cores_only_where_they_pay(monkeypatch):
    from mlmeta import _threads

    monkeypatch.setattr(_threads, "n_cpus", lambda: 4)
    n = _threads.START_THREADS_MIN_OBS
    assert _threads.start_threads(n - 1) == 1
    assert _threads.start_threads(n) == 4
    with _threads.fit_threads(2):
        assert _threads.start_threads(n) == 2
        with _threads.fit_threads(1):
            assert _threads.start_threads(n) == 1
        assert _threads.start_threads(n) == 2
    assert _threads.start_threads(n) == 4
    # off the main thread the caller already runs fits side by side
    got = []
    t = threading.Thread(target=lambda: got.append(_threads.start_threads(10 * n)))
    t.start()
    t.join()
    assert got == [1]


def test_a_fit_whose_extra_starts_run_on_two_threads_matches_one_thread(monkeypatch):
    from mlmeta import _threads
    from mlmeta.simulate import lmm

    data, _, _ = lmm(40, 2, 30, seed=3)
    formula = "DV ~ IV1 + IV2 + (IV1 + IV2 | Group)"
    assert len(data) >= _threads.START_THREADS_MIN_OBS
    monkeypatch.setattr(_threads, "n_cpus", lambda: 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        two = mlmeta.mixed(formula, data)
        with _threads.fit_threads(1):
            one = mlmeta.mixed(formula, data)
    assert two.fit_record.eval_budget > 0          # the extra starts ran
    assert two.llf == one.llf
    np.testing.assert_array_equal(two.params.values, one.params.values)
    np.testing.assert_array_equal(two.theta, one.theta)
    assert [c[1] for c in two.fit_record.candidates] == [c[1] for c in one.fit_record.candidates]
