"""Model refits and fit_batch against sequential fits."""

import numpy as np
import pandas as pd
import pytest

import mlmeta
from mlmeta.batch import Model, fit_batch


CASES = [
    ("stdmdiff ~ year_c + (1 | district) + (1 | district:school)", None, "reml"),
    ("stdmdiff ~ year_c + (1 | district) + (1 | district:school)", None, "ml"),
    ("stdmdiff ~ year_c + (1 + year_c || district) + (1 | district:school)", None, "reml"),
    ("stdmdiff ~ year_c + (1 + year_c | district) + (1 | district:school)", None, "reml"),
    ("stdmdiff ~ year_c + (1 + year_c | district) + (1 | district:school)",
     {"district": "exchangeable"}, "reml"),
]


@pytest.mark.parametrize("formula,cov,method", CASES)
def test_fit_batch_matches_sequential_fits(schoolcal, formula, cov, method):
    M = Model(formula, schoolcal, variance="var", method=method, covariance=cov)
    Y = M.simulate(12, seed=3)
    br = fit_batch(M, Y, n_jobs=2)
    for j in range(Y.shape[1]):
        ref = M.fit(Y[:, j], safeguard=False)
        if not ref.converged:
            continue
        assert br.llf[j] >= ref.llf - 1e-7
        if abs(br.llf[j] - ref.llf) < 1e-7:
            np.testing.assert_allclose(br.params.values[j], ref.params.values, rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(br.bse.values[j], ref.bse.values, rtol=1e-5, atol=1e-7)
    assert br.converged.mean() > 0.8
    one = fit_batch(M, Y, n_jobs=1)
    np.testing.assert_allclose(one.llf, br.llf, rtol=1e-12)     # threads do not change results


def test_model_fit_equals_meregress(schoolcal, fitted):
    f = "stdmdiff ~ year_c + (1 | district) + (1 | district:school)"
    M = Model(f, schoolcal, variance="var")
    a = M.fit()
    b = fitted(f, "schoolcal", variance="var")
    assert a.llf == pytest.approx(b.llf, rel=1e-12)
    y2 = schoolcal["stdmdiff"].to_numpy() * 2
    c = M.fit(y2)
    d = mlmeta.meregress(f, schoolcal.assign(stdmdiff=y2), variance="var")
    assert c.llf == pytest.approx(d.llf, rel=1e-10)
    v2 = schoolcal["var"].to_numpy() * 1.5
    e = M.fit(variance=v2)
    g = mlmeta.meregress(f, schoolcal.assign(var=v2), variance="var")
    assert e.llf == pytest.approx(g.llf, rel=1e-10)
    with pytest.raises(ValueError, match="rows"):
        M.fit(np.ones(10))
    with pytest.raises(ValueError, match="positive"):
        M.fit(variance=-v2)


def test_mixed_model_batch():
    rng = np.random.default_rng(0)
    g = np.repeat(np.arange(20), 8)
    x = rng.normal(size=g.size)
    df = pd.DataFrame({"g": g, "x": x, "y": x + rng.normal(size=20)[g] + rng.normal(size=g.size)})
    M = Model("y ~ x + (1 + x | g)", df)
    assert M.mixed
    Y = M.simulate(6, seed=1)
    br = fit_batch(M, Y)
    for j in range(6):
        ref = mlmeta.mixed("y ~ x + (1 + x | g)", df.assign(y=Y[:, j]), safeguard=False)
        assert br.llf[j] == pytest.approx(ref.llf, abs=1e-6)
        np.testing.assert_allclose(br.params.values[j], ref.params.values, rtol=1e-5, atol=1e-8)
        assert br.scale[j] == pytest.approx(ref.scale, rel=1e-5)
        np.testing.assert_allclose(br.re_cov["g"][j], ref.re_cov["g"].values, rtol=1e-4, atol=1e-8)


def test_fallback_for_custom_structures(schoolcal):
    f = "stdmdiff ~ year_c + (1 + year_c | district) + (1 | district:school)"
    M = Model(f, schoolcal, variance="var", covariance={"district": [[None, .5], [.5, None]]})
    Y = M.simulate(3, seed=2)
    br = fit_batch(M, Y)
    ref = M.fit(Y[:, 1], safeguard=False)
    assert br.llf[1] == pytest.approx(ref.llf, rel=1e-10)


def test_simulate_moments(schoolcal):
    M = Model("stdmdiff ~ 1 + (1 | district) + (1 | district:school)", schoolcal, variance="var")
    theta = np.array([0.3, 0.2])
    Y = M.simulate(4000, seed=0, theta=theta, beta=np.array([0.1]))
    assert Y.mean() == pytest.approx(0.1, abs=0.01)
    d = M.model.design
    V = np.cov(Y[d.perm])
    i, j = 0, 1                                  # two schools of the first (sorted) district
    assert V[i, j] == pytest.approx(0.09, abs=0.01)
    assert V[i, i] == pytest.approx(0.09 + 0.04 + d.variance[0], abs=0.015)


def test_threaded_fits_then_fork_do_not_hang():
    """Threads are Python threads (no OpenMP runtime): a process that has run threaded
    fits can fork, and the child can run threaded fits again."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import multiprocessing as mp
        import warnings
        import mlmeta
        warnings.simplefilter("ignore")
        df = mlmeta.datasets.load("schoolcal")
        m = mlmeta.Model("stdmdiff ~ 1 + (1 | district) + (1 | district:school)", df,
                         variance="var")
        Y = m.simulate(40, seed=1)
        a = mlmeta.fit_batch(m, Y, n_jobs=2).llf

        def child(q):
            q.put(mlmeta.fit_batch(m, Y, n_jobs=2).llf.tolist())

        ctx = mp.get_context("fork")
        q = ctx.Queue()
        p = ctx.Process(target=child, args=(q,))
        p.start()
        b = q.get(timeout=60)
        p.join(60)
        assert p.exitcode == 0 and b == a.tolist()
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


@pytest.mark.parametrize("seed", range(9))
def test_fit_batch_matches_single_fits_on_random_designs(seed):
    """Seeded three-level designs (intercepts, correlated and independent random slopes on
    an uncentred moderator; REML and ML): every column's log-likelihood is its single
    fit's to 1e-8 (relative), the estimates to 1e-5."""
    rng = np.random.default_rng(seed)
    na, nb, ne = rng.integers(4, 15), rng.integers(2, 5), rng.integers(1, 4)
    a = np.repeat(np.arange(na), nb * ne)
    b = np.repeat(np.arange(na * nb), ne)
    x = rng.normal(size=a.size) + rng.uniform(-3, 3)
    v = rng.uniform(0.01, 0.3, a.size)
    y = (0.2 * x + rng.uniform(0, 0.6) * rng.normal(size=na)[a]
         + rng.uniform(0, 0.4) * rng.normal(size=na * nb)[b] + np.sqrt(v) * rng.normal(size=a.size))
    df = pd.DataFrame({"a": a, "b": b, "x": x, "v": v, "y": y})
    formula = ["y ~ x + (1 | a/b)", "y ~ x + (1 + x | a) + (1 | a:b)",
               "y ~ x + (1 + x || a) + (1 | a:b)"][seed % 3]
    M = Model(formula, df, variance="v", method=["reml", "ml"][seed % 2])
    Y = M.simulate(6, seed=seed)
    br = fit_batch(M, Y, n_jobs=2)
    for j in range(Y.shape[1]):
        ref = M.fit(Y[:, j], safeguard=False)
        assert br.llf[j] == pytest.approx(ref.llf, rel=1e-8, abs=1e-8)
        np.testing.assert_allclose(br.params.values[j], ref.params.values, rtol=1e-5, atol=1e-6)
        assert br.converged[j] == ref.converged
