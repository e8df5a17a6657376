"""Deviance and gradient of the profiled objective against dense brute force."""

import numpy as np
import pytest

from dense import dense_loglik, dense_V
from mlmeta.covstruct import make_structure
from mlmeta.design import build_design
from mlmeta.model import NestedModel


def _model(structs_spec, method, seed=0, n=70):
    rng = np.random.default_rng(seed)
    g0 = rng.integers(0, 8, n)
    g1 = g0 * 10 + rng.integers(0, 4, n)
    x1, x2 = rng.normal(size=n), rng.normal(size=n)
    X = np.column_stack([x1, np.ones(n)])
    Z = [np.column_stack([x1, x2, np.ones(n)])[:, -len(structs_spec[0][1]):],
         np.column_stack([x1, np.ones(n)])[:, -len(structs_spec[1][1]):]]
    y = 0.3 * x1 + rng.normal(size=n)
    v = rng.uniform(0.05, 0.5, n)
    d = build_design(y, X, Z, [g0, g1], v)
    structs = [make_structure(kind, names) for kind, names in structs_spec]
    return NestedModel(d, structs, method), rng


SPECS = [
    [("identity", ["_cons"]), ("identity", ["_cons"])],
    [("independent", ["x1", "_cons"]), ("identity", ["_cons"])],
    [("unstructured", ["x1", "_cons"]), ("identity", ["_cons"])],
    [("unstructured", ["x1", "x2", "_cons"]), ("unstructured", ["x1", "_cons"])],
    [("exchangeable", ["x1", "x2", "_cons"]), ("independent", ["x1", "_cons"])],
    [("identity", ["x1", "x2", "_cons"]), ("exchangeable", ["x1", "_cons"])],
]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("method", ["reml", "ml"])
def test_deviance_matches_dense(spec, method):
    m, rng = _model(spec, method)
    d = m.design
    for _ in range(3):
        theta = rng.uniform(0.05, 0.6, m.n_theta) * np.where(m.lower == 0, 1, rng.choice([-1, 1], m.n_theta))
        ev = m.evaluate(theta)
        V = dense_V(d.Z, d.groups, m.Sigma_list(theta), d.variance)
        ll, beta, covb = dense_loglik(d.y, d.X, V, method)
        assert -0.5 * ev.deviance == pytest.approx(ll, rel=1e-10, abs=1e-10)
        np.testing.assert_allclose(ev.beta, beta, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(ev.cov_beta, covb, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("method", ["reml", "ml"])
def test_gradient_matches_finite_differences(spec, method):
    m, rng = _model(spec, method, seed=1)
    theta = rng.uniform(0.1, 0.6, m.n_theta)
    g = m.gradient(theta)
    h = 1e-6
    num = np.array([(m.deviance(theta + h * e) - m.deviance(theta - h * e)) / (2 * h)
                    for e in np.eye(m.n_theta)])
    np.testing.assert_allclose(g, num, rtol=1e-5, atol=1e-6)


def test_gradient_at_boundary_is_one_sided_derivative():
    m, rng = _model(SPECS[1], "reml", seed=2)
    theta = np.array([0.0, 0.3, 0.2])
    g = m.gradient(theta)
    h = 1e-4
    e = np.eye(3)[0]
    # the deviance depends on s only through s^2: symmetric in s, derivative 0 at 0
    assert m.deviance(theta + h * e) == pytest.approx(m.deviance(theta - h * e), rel=1e-13)
    assert g[0] == pytest.approx(0.0, abs=1e-8)
    num = np.array([(m.deviance(theta + h * u) - m.deviance(theta - h * u)) / (2 * h) for u in np.eye(3)[1:]])
    np.testing.assert_allclose(g[1:], num, rtol=1e-5)


def test_em_step_increases_likelihood():
    m, rng = _model(SPECS[3], "reml", seed=3)
    theta = m.theta_from_Sigmas([np.eye(3) * 0.2, np.eye(2) * 0.2])
    dev = m.deviance(theta)
    for _ in range(5):
        theta, _ = m.em_step(theta)
        new = m.deviance(theta)
        assert new <= dev + 1e-9
        dev = new


def test_bad_method():
    with pytest.raises(ValueError, match="method"):
        _model(SPECS[0], "mle")


@pytest.mark.parametrize("method", ["reml", "ml"])
def test_random_effects_match_dense(method):
    m, rng = _model(SPECS[3], method, seed=4)
    theta = rng.uniform(0.1, 0.5, m.n_theta)
    d = m.design
    from dense import dense_Z
    blocks = dense_Z(d.Z, d.groups)
    Zf = np.hstack([B for B, _ in blocks])
    Gf = np.zeros((Zf.shape[1], Zf.shape[1]))
    col = 0
    for (_B, G), S in zip(blocks, m.Sigma_list(theta)):
        q = S.shape[0]
        Gf[col:col + G * q, col:col + G * q] = np.kron(np.eye(G), S)
        col += G * q
    V = Zf @ Gf @ Zf.T + np.diag(d.variance)
    Vi = np.linalg.inv(V)
    X = d.X
    H = X.T @ Vi @ X
    beta = np.linalg.solve(H, X.T @ Vi @ d.y)
    P = Vi - Vi @ X @ np.linalg.solve(H, X.T @ Vi)
    u = Gf @ Zf.T @ Vi @ (d.y - X @ beta)
    pev = Gf - Gf @ Zf.T @ P @ Zf @ Gf
    got = m.random_effects(theta)
    col = 0
    for (uu, pp), (_B, G) in zip(got, blocks):
        q = uu.shape[1]
        np.testing.assert_allclose(uu.ravel(), u[col:col + G * q], rtol=1e-9, atol=1e-12)
        for g in range(G):
            sl = slice(col + g * q, col + (g + 1) * q)
            np.testing.assert_allclose(pp[g], pev[sl, sl], rtol=1e-8, atol=1e-12)
        col += G * q


def test_marginal_blocks_match_dense():
    m, rng = _model(SPECS[4], "reml", seed=5)
    theta = rng.uniform(0.1, 0.5, m.n_theta)
    d = m.design
    V = dense_V(d.Z, d.groups, m.Sigma_list(theta), d.variance)
    covered = 0
    for a, b, Vj in m.marginal_blocks(theta):
        np.testing.assert_allclose(Vj, V[a:b, a:b], rtol=1e-12)
        assert np.all(V[a:b, b:] == 0)
        covered += b - a
    assert covered == d.n_obs


def _profiled(method, seed=6):
    rng = np.random.default_rng(seed)
    n = 90
    g0 = rng.integers(0, 9, n)
    x = rng.normal(size=n)
    X = np.column_stack([x, np.ones(n)])
    Z = [np.column_stack([x, np.ones(n)])]
    y = 0.5 * x + rng.normal(size=9)[g0] + rng.normal(size=n)
    d = build_design(y, X, Z, [g0], None)
    return NestedModel(d, [make_structure("unstructured", ["x", "_cons"])], method, residual="profiled"), rng


@pytest.mark.parametrize("method", ["reml", "ml"])
def test_profiled_residual_matches_dense(method):
    m, rng = _profiled(method)
    d = m.design
    theta = np.array([0.4, 0.2, 0.7])
    ev = m.evaluate(theta)
    # profile sigma^2 numerically on the dense likelihood with V = sigma^2 (I + Z G_rel Z')
    from scipy.optimize import minimize_scalar
    Vrel = dense_V(d.Z, d.groups, m.Sigma_list(theta), np.ones(d.n_obs))

    def f(ls):
        return -dense_loglik(d.y, d.X, np.exp(ls) * Vrel, method)[0]

    r = minimize_scalar(f, bounds=(-5, 5), method="bounded", options={"xatol": 1e-10})
    assert -0.5 * ev.deviance == pytest.approx(-r.fun, rel=1e-8)
    assert ev.sigma2 == pytest.approx(np.exp(r.x), rel=1e-5)
    g = m.gradient(theta)
    h = 1e-6
    num = np.array([(m.deviance(theta + h * e) - m.deviance(theta - h * e)) / (2 * h) for e in np.eye(3)])
    np.testing.assert_allclose(g, num, rtol=1e-5, atol=1e-6)
    theta2, _ = m.em_step(theta)
    assert m.deviance(theta2) <= ev.deviance + 1e-9


def test_repeated_evaluation_is_kept_and_owned_by_the_caller():
    """The last evaluation at theta is returned again (no more than it computed: a
    gradient asked after a value-only evaluation is computed); its arrays are copies."""
    m, rng = _model(SPECS[2], "reml", seed=2)
    theta = rng.uniform(0.1, 0.6, m.n_theta)
    first = m.evaluate(theta)
    assert first.grad is None
    with_grad = m.evaluate(theta, gradient=True)
    assert with_grad.grad is not None and with_grad.deviance == first.deviance
    again = m.evaluate(theta)               # kept: the gradient comes along
    np.testing.assert_array_equal(again.grad, with_grad.grad)
    again.beta[:] = np.nan
    again.grad[:] = np.nan
    third = m.evaluate(theta, gradient=True)
    assert np.all(np.isfinite(third.beta)) and np.all(np.isfinite(third.grad))
    np.testing.assert_array_equal(third.beta, first.beta)
    other = m.evaluate(theta * 1.1)
    assert other.deviance != first.deviance
    assert m.evaluate(theta, sigma2=1.0).deviance == first.deviance    # not kept, same value


def _designs_for_with_Z():
    """(design, Z of the same rows, known_R): nested with slopes, a folded deepest level,
    crossed levels, a crossed level with a known correlation, and Lambda = I."""
    rng = np.random.default_rng(11)
    n = 120
    a = np.repeat(np.arange(12), 10)
    b = np.arange(n) // 2
    c = rng.integers(0, 7, n)
    x = rng.normal(size=n)
    X = np.column_stack([np.ones(n), x])
    y = rng.normal(size=n)
    v = rng.uniform(0.05, 0.2, n)
    one = np.ones((n, 1))
    R = np.corrcoef(rng.normal(size=(7, 20)))
    yield build_design(y, X, [np.column_stack([one, x]), one], [a, b], v), None
    yield build_design(y, X, [one, one], [a, np.arange(n)], v), None
    yield build_design(y, X, [one, one, np.column_stack([one, x])], [a, b, c], v, n_tree=2), None
    yield build_design(y, X, [one, one], [a, c], v, n_tree=1, known_R={1: R}), {1: R}
    yield build_design(y, X, [np.column_stack([one, x]), one], [a, b], None), None


@pytest.mark.parametrize("k", range(5))
def test_with_Z_is_the_design_built_again(k):
    """with_Z keeps the sort, whitening, working basis and codes and builds the blocks for
    the new Z: the same kernel, border and node index as building the design again."""
    from mlmeta.design import with_Z

    d, known = list(_designs_for_with_Z())[k]
    rng = np.random.default_rng(k)
    Z = [z @ (np.triu(rng.normal(size=(z.shape[1],) * 2)) + 2 * np.eye(z.shape[1])) for z in d.Z]
    got = with_Z(d, Z, known_R=known)
    want = build_design(d.y, d.X, Z, d.groups, d.variance, n_tree=d.n_tree, known_R=known)
    assert got.tree_built == want.tree_built
    for name in ("level", "parent", "nq", "zz_ptr", "za_ptr", "cluster_ptr", "ZZ", "ZA", "AA"):
        np.testing.assert_allclose(np.asarray(getattr(got.kernel, name)),
                                   np.asarray(getattr(want.kernel, name)), rtol=1e-13, atol=1e-13)
    for u, w in zip(got.node_of_group + got.groups, want.node_of_group + want.groups):
        if u is not None or w is not None:
            np.testing.assert_array_equal(u, w)
    assert got.n_groups == want.n_groups and got.q == want.q
    if want.border is not None:
        np.testing.assert_allclose(got.border["S0"], want.border["S0"], rtol=1e-13, atol=1e-13)
        for key in ("b_off", "cmap_ptr", "bmap"):
            np.testing.assert_array_equal(got.border[key], want.border[key])
    np.testing.assert_array_equal(d.Z[0], list(_designs_for_with_Z())[k][0].Z[0])   # d untouched


@pytest.mark.parametrize("n", [200, 5000])
def test_start_coefficients_are_the_least_squares_fit(n):
    """The start's least squares: NumPy's lstsq below LSTSQ_SVD_ROWS rows (bit for bit),
    the projection on the orthonormal Xw from there on; the same coefficients to rounding."""
    from mlmeta.design import LSTSQ_SVD_ROWS

    rng = np.random.default_rng(5)
    g = np.arange(n) // 5
    X = np.column_stack([rng.standard_normal(n) + 3.0, np.ones(n)])
    y = X @ [0.5, 1.0] + rng.standard_normal(n)
    d = build_design(y, X, [np.ones((n, 1))], [g], rng.uniform(0.5, 2.0, n))
    assert d.orthonormal
    b = d.start_coefficients()
    exact = np.linalg.lstsq(d.Xw, d.yw, rcond=None)[0]
    np.testing.assert_array_equal(b, d.least_squares() if n >= LSTSQ_SVD_ROWS else exact)
    np.testing.assert_allclose(b, exact, rtol=0, atol=1e-12 * np.abs(d.yw).max())


def test_start_coefficients_are_computed_once_and_handed_out_as_copies():
    """The design keeps its start coefficients (the moment start and the natural sizes
    both ask for them); a caller's changes to the copy it got leave them, and a design
    replaced with another outcome computes its own."""
    import dataclasses

    rng = np.random.default_rng(2)
    n = 60
    X = np.column_stack([rng.standard_normal(n), np.ones(n)])
    y = X @ [0.5, 1.0] + rng.standard_normal(n)
    d = build_design(y, X, [np.ones((n, 1))], [np.arange(n) // 4], rng.uniform(0.5, 2.0, n))
    b = d.start_coefficients()
    b[:] = 7.0
    np.testing.assert_array_equal(d.start_coefficients(),
                                  np.linalg.lstsq(d.Xw, d.yw, rcond=None)[0])
    e = dataclasses.replace(d, yw=d.yw + d.Xw @ [1.0, -2.0])
    np.testing.assert_allclose(e.start_coefficients(), d.start_coefficients() + [1.0, -2.0],
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 55, 56, 1000, 1001])
def test_median_sampling_sd_is_numpys_median(n):
    """The model's scale (the median sampling SD) from one partition: np.median's number,
    bit for bit, for odd and even counts."""
    from mlmeta.model import _median

    v = np.random.default_rng(n).uniform(1e-3, 1.0, n) ** 3
    assert _median(v) == float(np.median(v))
    assert _median(np.full(n, 0.25)) == 0.25
