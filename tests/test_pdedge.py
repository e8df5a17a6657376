"""A custom level's correlations in coordinates where the positive definite edge is a
bound (mlmeta.pdedge): the maps and their derivatives, the deviance's gradient in those
coordinates, and an optimum on the edge checked against the dense likelihood."""

import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import optimize

import mlmeta
from dense import DenseDeviance
from mlmeta.covstruct import Custom
from mlmeta.pdedge import (CorrelationMap, _Coordinates, _objective, _pivot_order,
                           correlation_maps)
from references import REFERENCE, load, read_exact

PATTERNS = {
    "all free": [[None, None, None], [None, None, None], [None, None, None]],
    "one fixed": [[None, 0.3, None], [0.3, None, None], [None, None, None]],
    "shared label": [[None, "r", None], ["r", None, "r"], [None, "r", None]],
    "fixed, q = 4": [[None, 0.2, -0.4, None], [0.2, None, None, None],
                     [-0.4, None, None, None], [None, None, None, None]],
    "labels and fixed SD, q = 4": [[1.5, "r", "r", 0.1], ["r", None, None, None],
                                   ["r", None, None, None], [0.1, None, None, None]],
}


def _map(pattern):
    s = Custom([f"e{i}" for i in range(len(pattern))], pattern)
    return s, CorrelationMap(s, np.arange(len(s._corr_free)), _pivot_order(s))


def _R(s, rho):
    return s._sd_R(np.concatenate([np.ones(len(s._sd_free)), rho]))[1]


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_angles_cover_the_psd_set_with_exact_derivatives(name):
    s, m = _map(PATTERNS[name])
    assert m.kind == "angles"
    rng = np.random.default_rng(3)
    for _ in range(5):
        psi = rng.uniform(0.05, np.pi - 0.05, len(m.idx))
        rho, J = m.rho(psi)
        h = 1e-6
        Jd = np.array([(m.rho(psi + h * e)[0] - m.rho(psi - h * e)[0]) / (2 * h)
                       for e in np.eye(psi.size)]).T
        assert np.abs(J - Jd).max() < 1e-8
        R = _R(s, rho)
        assert np.linalg.eigvalsh(R)[0] > 0                      # inside the set
        assert m.psi(rho) == pytest.approx(psi, abs=1e-10)       # and back
    # an angle at a bound: R singular (the edge), yet positive semi-definite
    psi = rng.uniform(0.3, 2.8, len(m.idx))
    psi[-1] = np.pi
    w = np.linalg.eigvalsh(_R(s, m.rho(psi)[0]))
    assert abs(w[0]) < 1e-12 and w[0] > -1e-12
    # the shrink keeps an edge point strictly inside (the engine and NumPy can factor it)
    np.linalg.cholesky(_R(s, m.shrink(m.rho(psi)[0])))


def test_interval_of_a_lone_correlation_is_its_psd_range():
    s = Custom(list("abc"), [[None, -0.56, -0.59], [-0.56, None, None], [-0.59, None, None]])
    m = CorrelationMap(s, [3])
    # R = [[1, a, b], [a, 1, r], [b, r, 1]] is PSD for r in ab -+ sqrt((1 - a^2)(1 - b^2))
    a, b = -0.56, -0.59
    half = np.sqrt((1 - a * a) * (1 - b * b))
    assert (m.lo, m.hi) == (pytest.approx(a * b - half, abs=1e-12),
                            pytest.approx(a * b + half, abs=1e-12))


def test_patterns_the_angles_cannot_hold_are_left_alone():
    # fixed correlations between two disjoint pairs: no effect is in both
    pat = [[None, 0.2, None, None], [0.2, None, None, None], [None, None, None, 0.3],
           [None, None, 0.3, None]]
    assert _pivot_order(Custom(list("abcd"), pat)) is None


def _model(pattern):
    rng = np.random.default_rng(11)
    n = 90
    df = pd.DataFrame({"g": np.repeat(np.arange(30), 3), "x": rng.normal(size=n),
                       "x2": rng.normal(size=n)})
    df["y"] = 0.3 * df.x + rng.normal(size=n) * 0.8
    df["v"] = rng.uniform(0.05, 0.2, n)
    return mlmeta.Model("y ~ x + (1 + x + x2 | g)", df, variance="v",
                        covariance={"g": pattern}).model


@pytest.mark.parametrize("name", ["all free", "one fixed", "shared label"])
def test_deviance_gradient_in_edge_coordinates_matches_differences(name):
    model = _model(PATTERNS[name])
    maps = correlation_maps(model)
    assert len(maps) == 1
    coords = _Coordinates(maps, model.lower, model.upper)
    rng = np.random.default_rng(5)
    psi = np.where(model.lower == 0, rng.uniform(0.2, 0.6, model.n_theta), 0.0)
    psi[maps[0].idx] = rng.uniform(0.4, 2.7, len(maps[0].idx))
    scale = np.ones(model.n_theta)
    f_ref = model.evaluate(coords.theta(psi)[0]).deviance
    fun, _ = _objective(model, coords, scale, None, f_ref)
    f, g = fun(psi)
    h = 1e-6
    gd = np.array([(fun(psi + h * e)[0] - fun(psi - h * e)[0]) / (2 * h) for e in np.eye(psi.size)])
    assert f == pytest.approx(f_ref)
    assert np.abs(g - gd).max() < 1e-5 * max(1.0, np.abs(g).max())
    # the whitened-outcome path (a batch column: central differences) agrees
    fun_y, _ = _objective(model, coords, scale, model.design.yw, f_ref)
    f_y, g_y = fun_y(psi)
    assert f_y == pytest.approx(f, rel=1e-12) and g_y == pytest.approx(g, rel=1e-4, abs=1e-6)


CASES = load("fuzz_regressions")


def _stored(name):
    spec = CASES[name]
    data = read_exact(REFERENCE.parent.parent / spec["data"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mlmeta.BoundaryWarning)
        return mlmeta.mixed(spec["formula"], data, method=spec["method"],
                            covariance=spec["covariance"])


def test_an_optimum_on_the_edge_is_certified_against_the_dense_likelihood():
    res = _stored("case_1_5849")       # all correlations free, two SDs fixed: R singular
    m = res.model
    assert res.converged
    assert any("edge of their positive definite set" in msg for msg in res.fit_record.messages)
    assert any("singular" in b for b in res.boundary)          # flagged as a boundary
    cmap = correlation_maps(m)[0]
    rho = cmap.center + (res.theta[cmap.idx] - cmap.center) / (1.0 - cmap.eps)
    psi = cmap.psi(rho)
    # one angle on its bound (a row's last angle enters R through its cosine only: the
    # deviance is even about the bound, which Newton approaches as a variance nears 0)
    on = np.flatnonzero(np.minimum(psi, np.pi - psi) < 1e-4)
    assert on.size == 1
    d = m.design
    dense = DenseDeviance(d.y, d.X, d.Z, d.groups, None, m.method, cluster=d.groups[0])

    def dev(p, theta=res.theta):
        t = theta.copy()
        t[cmap.idx] = cmap.shrink(cmap.rho(p)[0])
        return dense(m.T_list(t))[0]

    assert res.llf == pytest.approx(-0.5 * dense(m.T_list(res.theta))[0], abs=1e-8)
    f0 = dev(psi)
    # KKT on the bound: moving the angle inwards (off the edge) raises the deviance (the
    # multiplier of the edge, as curvature in the angle), while along the edge (the other
    # angles) the dense gradient vanishes
    j = on[0]
    inward = 1.0 if psi[j] < 1.0 else -1.0
    for h in (1e-3, 1e-2, 1e-1):
        p = psi.copy()
        p[j] += inward * h
        assert dev(p) > f0
    h = 1e-5
    for k in np.setdiff1d(np.arange(psi.size), on):
        e = h * np.eye(psi.size)[k]
        assert abs(dev(psi + e) - dev(psi - e)) / (2 * h) < 1e-4
    # the other parameters: no dense quasi-Newton step gains
    free = np.ones(m.n_theta, dtype=bool)
    free[cmap.idx] = False

    def f_other(x):
        t = res.theta.copy()
        t[free] = x
        try:
            return dense(m.T_list(t))[0]
        except (FloatingPointError, np.linalg.LinAlgError):
            return np.inf

    bounds = [(lo, None) if np.isfinite(lo) else (None, None) for lo in m.lower[free]]
    best = optimize.minimize(f_other, res.theta[free], method="L-BFGS-B", bounds=bounds)
    assert -0.5 * best.fun - res.llf < 1e-6


def test_edge_answers_do_not_depend_on_the_row_order():
    spec = CASES["case_1_4857"]
    data = read_exact(REFERENCE.parent.parent / spec["data"])
    V = np.loadtxt(REFERENCE.parent.parent / spec["V"], delimiter=",")
    perm = np.random.default_rng(2).permutation(len(data))
    kw = dict(method=spec["method"], covariance=spec["covariance"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mlmeta.BoundaryWarning)
        a = mlmeta.meregress(spec["formula"], data, V=V, **kw)
        b = mlmeta.meregress(spec["formula"], data.iloc[perm].reset_index(drop=True),
                             V=V[np.ix_(perm, perm)], **kw)
    assert a.converged and b.converged
    assert b.llf == pytest.approx(a.llf, abs=1e-8)
    assert b.theta == pytest.approx(a.theta, rel=1e-4, abs=1e-6)
