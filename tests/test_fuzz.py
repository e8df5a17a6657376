"""The random-design harness (tools/fuzz.py) on a short seeded slice: every fit ends ok
or with a ValueError naming bad input; no crash, hang, error, stray warning, silent
NaN, accepted singular V, wrong log-likelihood, missed optimum, false convergence or
thread dependence against the dense likelihood. The full run (10,000 fits) is

    nice -n 19 python tools/fuzz.py --fits 10000 --seed 1 --jobs 2

and ``python tools/fuzz.py --case SEED:IDX`` reproduces one case."""

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def _load(name):
    if str(TOOLS) not in sys.path:
        sys.path.insert(0, str(TOOLS))
    return importlib.import_module(name)


def test_random_designs_against_dense_likelihood(capsys):
    fuzz = _load("fuzz")
    rc = fuzz.main(["--fits", "24", "--seed", "11", "--timeout", "120"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert ", ".join(f"{k} 0" for k in fuzz.FAILURES) in out


def test_a_case_is_reproduced_from_its_seed_and_index():
    cases = _load("fuzz_cases")
    a, b = cases.make_case(11, 5), cases.make_case(11, 5)
    assert (a.formula, a.api, a.method) == (b.formula, b.api, b.method)
    assert a.data.equals(b.data)
    assert cases.make_case(11, 6).data.shape != a.data.shape or not cases.make_case(11, 6).data.equals(a.data)


def test_the_slice_covers_the_ways_to_fit():
    cases = _load("fuzz_cases")
    apis = {cases.make_case(11, i).api for i in range(24)}
    assert apis == set(cases.APIS)


@pytest.mark.parametrize("cluster", [False, True])
@pytest.mark.parametrize("Lambda", ["variance", "V", "profiled"])
def test_dense_factorisation_matches_the_dense_inverse(cluster, Lambda):
    """The oracle's factorisation (one QR, or cluster by cluster with a crossed level
    carried to the last one) against the inverse-based dense likelihood."""
    from dense import DenseDeviance, dense_loglik, dense_V

    rng = np.random.default_rng(2)
    n = 90
    g1 = rng.integers(0, 9, n)
    g2 = g1 * 3 + rng.integers(0, 3, n)
    k = rng.integers(0, 5, n)                    # crossed with g1
    x = rng.normal(size=n)
    X = np.column_stack([x, np.ones(n)])
    y = 1 + x + rng.normal(size=n)
    Z = [np.column_stack([x, np.ones(n)]), np.ones((n, 1)), np.ones((n, 1))]
    groups = [g1, g2, k]
    Ts = [np.array([[0.5, 0.0], [0.3, 0.8]]), np.array([[0.7]]), np.array([[0.4]])]
    v = rng.uniform(0.2, 1.0, n)
    Lam = {"variance": v, "profiled": None}.get(Lambda)
    if Lambda == "V":
        Lam = np.diag(v)
        same = (g2[:, None] == g2[None, :]) & ~np.eye(n, dtype=bool)
        Lam[same] = 0.3 * np.sqrt(np.outer(v, v))[same]
    for method in ("reml", "ml"):
        dev, beta, s2 = DenseDeviance(y, X, Z, groups, Lam, method, cluster=g1 if cluster else None)(Ts)
        dense_Lam = np.ones(n) if Lam is None else Lam
        ll, beta_ref, _ = dense_loglik(y, X, s2 * dense_V(Z, groups, [T @ T.T for T in Ts], dense_Lam),
                                       method)
        assert -0.5 * dev == pytest.approx(ll, rel=1e-11)
        np.testing.assert_allclose(beta, beta_ref, rtol=1e-9)


def test_dense_factorisation_is_accurate_at_extreme_variance_ratios():
    """One level of random intercepts with equal sampling variances has a closed form:
    V_j = v I + t J, |V_j| = v^(m-1) (v + m t), the GLS beta is the mean of the cluster
    means and r'V^-1 r = sum_ij (y_ij - ybar_j)^2 / v + m sum_j (ybar_j - beta)^2 / (v + m t).
    The factorisation keeps it at t / v = 1e14, where the inverse of V does not."""
    from dense import DenseDeviance

    rng = np.random.default_rng(3)
    m, G, v, t = 4, 30, 1e-10, 1e4
    g = np.repeat(np.arange(G), m)
    y = rng.normal(size=G)[g] * np.sqrt(t) + rng.normal(size=G * m) * np.sqrt(v)
    X = np.ones((G * m, 1))
    # closed form (ML): beta = weighted mean of the cluster means, weights equal here
    ybar = y.reshape(G, m).mean(axis=1)
    beta = ybar.mean()
    within = np.sum((y.reshape(G, m) - ybar[:, None]) ** 2)
    quad = within / v + m * np.sum((ybar - beta) ** 2) / (v + m * t)
    logdet = G * ((m - 1) * np.log(v) + np.log(v + m * t))
    dev_ref = G * m * np.log(2 * np.pi) + logdet + quad
    dev, b, _ = DenseDeviance(y, X, [np.ones((G * m, 1))], [g], np.full(G * m, v), "ml",
                              cluster=g)([np.array([[np.sqrt(t)]])])
    assert dev == pytest.approx(dev_ref, rel=1e-10)
    assert b[0] == pytest.approx(beta, rel=1e-7)
