"""``executor=`` of fit_batch, bootstrap, permutation_test and simstudy.run: a process
pool and a real Dask cluster of two worker processes give exactly the numbers of the
serial run, with the work cut into a few chunks per worker."""

import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest

import mlmeta
from mlmeta import _executor, simstudy
from mlmeta.batch import Model, fit_batch

SCHOOL = "stdmdiff ~ year_c + (1 | district) + (1 | district:school)"
GRID = {"n_groups": [8, 12], "n_obs": [6], "group_sd": [0.5]}
STRATEGIES = ("mixed_intercept", "ols_cluster", "two_stage_ols")


class _CountingPool(ProcessPoolExecutor):
    """A process pool that counts the tasks submitted to it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.submitted = 0

    def submit(self, fn, /, *args, **kwargs):
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


@pytest.fixture(scope="module")
def pool():
    with _CountingPool(max_workers=2, mp_context=mp.get_context("spawn")) as ex:
        yield ex


@pytest.fixture(scope="module")
def dask_client():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(processes=True, n_workers=2, threads_per_worker=1,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        yield client


@pytest.fixture(scope="module")
def school():
    return mlmeta.datasets.load("schoolcal")


@pytest.fixture(scope="module")
def res(school):
    return mlmeta.meregress(SCHOOL, school, variance="var")


def _same_batch(a, b):
    pd.testing.assert_frame_equal(a.params, b.params)
    pd.testing.assert_frame_equal(a.bse, b.bse)
    for key in ("llf", "theta", "converged", "n_iter", "n_evals"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key))
    assert a.re_cov.keys() == b.re_cov.keys()
    for g in a.re_cov:
        np.testing.assert_array_equal(a.re_cov[g], b.re_cov[g])
    if a.scale is None:
        assert b.scale is None
    else:
        np.testing.assert_array_equal(a.scale, b.scale)


def test_chunks_cover_the_items_a_few_per_worker(pool):
    assert _executor.n_workers(pool) == 2
    for n in (1, 5, 8, 9, 1000):
        parts = _executor.chunks(n, pool)
        assert parts[0][0] == 0 and parts[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
        sizes = [b - a for a, b in parts]
        assert len(parts) == min(n, 4 * 2) and max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_bad_executor_is_an_error(school, res):
    M = Model(SCHOOL, school, variance="var")
    with pytest.raises(ValueError, match="executor must be"):
        fit_batch(M, M.simulate(2, seed=1), executor=4)
    with pytest.raises(ValueError, match="executor must be"):
        res.bootstrap(10, executor="dask")
    with pytest.raises(ValueError, match="executor must be"):
        simstudy.run(GRID, STRATEGIES, n_sim=1, executor=object(), progress=False)


def test_fit_batch_process_pool_equals_serial(pool, school):
    M = Model(SCHOOL, school, variance="var")
    Y = M.simulate(50, seed=4)
    before = pool.submitted
    got = fit_batch(M, Y, executor=pool)
    assert pool.submitted - before == 8            # 50 columns in 4 chunks per worker
    _same_batch(fit_batch(M, Y, n_jobs=1), got)
    # threads inside each chunk do not change the numbers either
    _same_batch(fit_batch(M, Y, n_jobs=2), fit_batch(M, Y, executor=pool, n_jobs=2))


def test_fit_batch_executor_mixed_and_rebuilt_models(pool, school):
    rng = np.random.default_rng(0)
    g = np.repeat(np.arange(12), 6)
    x = rng.standard_normal(g.size)
    data = pd.DataFrame({"y": 1 + 0.5 * x + rng.standard_normal(12)[g] + rng.standard_normal(g.size),
                         "x": x, "g": g})
    mixed = Model("y ~ x + (1 | g)", data)
    Y = mixed.simulate(9, seed=2)
    _same_batch(fit_batch(mixed, Y, n_jobs=1), fit_batch(mixed, Y, executor=pool))
    # constraints: every column is refitted through Model.fit (the fallback path)
    con = Model(SCHOOL, school, variance="var", constraints=["year_c = 0.01"])
    Y = con.simulate(5, seed=3)
    _same_batch(fit_batch(con, Y, n_jobs=1), fit_batch(con, Y, executor=pool))


def test_resampling_process_pool_equals_serial(pool, res):
    for kind in ("parametric", "cluster"):
        a, ra = res.bootstrap(24, kind=kind, seed=7, n_jobs=1)
        b, rb = res.bootstrap(24, kind=kind, seed=7, executor=pool)
        pd.testing.assert_frame_equal(a, b)
        assert ra.keys() == rb.keys()
        for k in ra:
            np.testing.assert_array_equal(ra[k], rb[k])
    pd.testing.assert_frame_equal(res.permutation_test(19, seed=3, n_jobs=1),
                                  res.permutation_test(19, seed=3, executor=pool))


def test_thread_pool_executor(res, school):
    M = Model(SCHOOL, school, variance="var")
    Y = M.simulate(10, seed=8)
    with ThreadPoolExecutor(max_workers=2) as ex:
        _same_batch(fit_batch(M, Y, n_jobs=1), fit_batch(M, Y, executor=ex))
        pd.testing.assert_frame_equal(res.permutation_test(9, seed=1, n_jobs=1),
                                      res.permutation_test(9, seed=1, executor=ex))


def test_simstudy_process_pool_equals_serial(pool):
    serial = simstudy.run(GRID, STRATEGIES, n_sim=2, seed=5, n_jobs=1, progress=False)
    got = simstudy.run(GRID, STRATEGIES, n_sim=2, seed=5, executor=pool, chunksize=2, progress=False)
    pd.testing.assert_frame_equal(serial.drop(columns="seconds"), got.drop(columns="seconds"))


def test_dask_local_cluster_round_trip(dask_client, res, school):
    """A real cluster of two worker processes: the model is scattered once, chunks come
    back in order and the numbers are the serial run's."""
    assert _executor.n_workers(dask_client) == 2
    M = Model(SCHOOL, school, variance="var")
    Y = M.simulate(20, seed=6)
    _same_batch(fit_batch(M, Y, n_jobs=1), fit_batch(M, Y, executor=dask_client))
    for kind in ("parametric", "cluster"):
        a, _ = res.bootstrap(16, kind=kind, seed=2, n_jobs=1)
        b, _ = res.bootstrap(16, kind=kind, seed=2, executor=dask_client)
        pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_frame_equal(res.permutation_test(15, seed=4, n_jobs=1),
                                  res.permutation_test(15, seed=4, executor=dask_client))
    serial = simstudy.run(GRID, STRATEGIES, n_sim=2, seed=9, n_jobs=1, progress=False)
    got = simstudy.run(GRID, STRATEGIES, n_sim=2, seed=9, executor=dask_client, chunksize=1,
                       progress=False)
    pd.testing.assert_frame_equal(serial.drop(columns="seconds"), got.drop(columns="seconds"))
    # a result pickled to a worker and read there prints the same summary
    text = dask_client.submit(lambda r: r.summary().as_text(), res, pure=False).result()
    assert text == res.summary().as_text()
