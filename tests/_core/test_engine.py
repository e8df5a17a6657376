"""The engine's problem object: structure maps and EM projections against
mlmeta.covstruct (their test twins), the contract of its entry points, and failures."""

import numpy as np
import pytest

import mlmeta
from mlmeta.covstruct import make_structure
from mlmeta.design import build_design
from mlmeta.model import NestedModel

NAMES = ["x", "z", "_cons"]
SPECS = [
    "identity", "independent", "exchangeable", "unstructured",
    [["a", None, None], [None, "a", None], [None, None, "a"]],                   # equal SDs
    [[None, 0.3, "r"], [0.3, None, "r"], ["r", "r", 0.5]],                      # fixed and equal
    [[None, None, None], [None, None, None], [None, None, None]],               # all free
]


def _model(spec, seed=0, n=60):
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(n // 3), 3)
    Z = [np.column_stack([rng.normal(size=n), rng.normal(size=n), np.ones(n)])]
    X = np.column_stack([Z[0][:, 0], np.ones(n)])
    d = build_design(rng.normal(size=n), X, Z, [g], rng.uniform(0.1, 0.5, n))
    return NestedModel(d, [make_structure(spec, NAMES)], "reml")


def _theta(s, rng):
    th = rng.uniform(0.2, 0.9, s.n_theta)
    if s.kind == "custom":         # correlations inside (-1, 1) and a PD matrix
        th[len(s.sd_groups):] = rng.uniform(-0.3, 0.3, s.n_theta - len(s.sd_groups))
    return th


@pytest.mark.parametrize("spec", SPECS, ids=range(len(SPECS)))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_structure_maps_match_covstruct(spec, seed):
    m = _model(spec)
    s = m.structs[0]
    th = _theta(s, np.random.default_rng(seed))
    T, D = m.problem.factors(th)
    np.testing.assert_allclose(T.reshape(3, 3, order="F"), s.T(th), rtol=1e-13, atol=1e-15)
    dT = np.stack([D[:, k].reshape(3, 3, order="F") for k in range(s.n_theta)])
    np.testing.assert_allclose(dT, s.dT(th), rtol=1e-11, atol=1e-13)
    # and the derivative is that of the map (central differences)
    h = 1e-6
    for k in range(s.n_theta):
        e = np.zeros(s.n_theta)
        e[k] = h
        num = (s.T(th + e) - s.T(th - e)) / (2 * h)
        np.testing.assert_allclose(dT[k], num, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("spec", SPECS, ids=range(len(SPECS)))
@pytest.mark.parametrize("seed", [0, 1])
def test_em_projection_matches_covstruct(spec, seed):
    m = _model(spec)
    s = m.structs[0]
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(3, 3))
    Sigma = A @ A.T + 0.1 * np.eye(3)
    got = m.problem.em_project(0, Sigma, np.zeros(s.n_theta))
    np.testing.assert_allclose(got, s.from_Sigma(Sigma), rtol=1e-12, atol=1e-14)


def test_em_projection_stays_feasible_like_covstruct():
    """Fixed correlations 0.9, 0.9 with a free third one: a Sigma whose third correlation
    is negative averages to an infeasible matrix. The engine and covstruct both move from
    the previous (feasible) correlation towards it only as far as stays positive definite,
    and from the best common value when the previous one is not feasible either."""
    pattern = [[None, .9, .9], [.9, None, None], [.9, None, None]]
    m = _model(pattern)
    s = m.structs[0]
    Sigma = np.array([[1.0, -0.3, 0.3], [-0.3, 1.0, -0.8], [0.3, -0.8, 1.0]])
    for prev in (np.array([1.0, 1.0, 1.0, 0.9]), np.array([1.0, 1.0, 1.0, 0.0])):
        got = m.problem.em_project(0, Sigma, prev)
        np.testing.assert_allclose(got, s.from_Sigma(Sigma, theta_prev=prev), rtol=1e-12)
        assert np.linalg.eigvalsh(s._sd_R(got)[1]).min() > 0
        assert got[3] > 0.62            # the feasible set: corr > 2 * 0.81 - 1
    assert s.from_Sigma(np.eye(3))[3] > 0.62          # starting values, too


@pytest.mark.parametrize("spec", SPECS, ids=range(len(SPECS)))
def test_gradient_matches_finite_differences(spec):
    m = _model(spec, seed=4)
    th = _theta(m.structs[0], np.random.default_rng(5))
    ev = m.evaluate(th, gradient=True)
    h = 1e-6
    num = np.array([(m.evaluate(th + h * e).deviance - m.evaluate(th - h * e).deviance) / (2 * h)
                    for e in np.eye(th.size)])
    np.testing.assert_allclose(ev.grad, num, rtol=1e-5, atol=1e-6)


def test_entry_points_check_their_inputs():
    P = _model("unstructured").problem
    with pytest.raises(ValueError, match="theta must have 6 elements"):
        P.evaluate(np.zeros(3))
    with pytest.raises(ValueError, match="theta0 must have 6 columns"):
        P.fit(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="Phi must be"):
        P.pieces(np.zeros(9), np.eye(5))
    with pytest.raises(ValueError, match="sigma2 must be positive"):
        P.evaluate(np.full(6, 0.1), sigma2=-1.0)


def test_undefined_objective_is_reported_not_returned():
    m = _model("independent")
    out = m.problem.evaluate(np.array([np.nan, 0.1, 0.1]))
    assert out["deviance"] == np.inf and out["status"] == -4
    assert np.isnan(out["beta"]).all()
    with pytest.raises(FloatingPointError, match="theta is not finite"):
        m.evaluate(np.array([np.nan, 0.1, 0.1]))


def test_failure_message_names_cluster_and_level(schoolcal):
    m = _model("independent")
    msg = m.failure_message(1 + int(m.design.kernel.cluster_ptr[3]))
    assert "top-level cluster #4" in msg and "(level 1)" in msg
    res = mlmeta.meregress("stdmdiff ~ 1 + (1 | district) + (1 | district:school)", schoolcal,
                           variance="var")
    # one effect per school: the school level is folded into the diagonal, so the
    # engine's tree has one node per district and its status names that node
    assert res.model._fold_level() == 1
    msg = res.model.failure_message(1 + 2)         # the third district's node
    label = res.frame.group_labels[0][2]
    assert f"top-level cluster district = {label!r}" in msg and "(level 1)" in msg
    tree = mlmeta.meregress("stdmdiff ~ 1 + (1 | district) + (1 | district:year)", schoolcal,
                            variance="var")
    assert tree.model._fold_level() is None
    K = tree.model.design.kernel
    node = int(K.cluster_ptr[2])                # the first node of the third district
    msg = tree.model.failure_message(1 + node)
    assert f"top-level cluster district = {label!r}" in msg
    assert f"(level {int(K.level[node]) + 1})" in msg


def test_failed_batch_fit_reports_nan_not_zero():
    """A mixed model whose outcome is fitted exactly (no residual variance) has no
    defined optimum: NaN estimates and standard errors, converged False."""
    rng = np.random.default_rng(0)
    import pandas as pd

    df = pd.DataFrame({"y": rng.normal(size=40), "g": np.repeat(np.arange(8), 5)})
    M = mlmeta.Model("y ~ 1 + (1 | g)", df)
    Y = np.column_stack([df.y.values, np.full(40, 2.5)])     # the second: constant
    br = mlmeta.fit_batch(M, Y, n_jobs=1)
    assert br.converged[0] and np.isfinite(br.bse.values[0]).all()
    assert not br.converged[1]
    assert np.isnan(br.bse.values[1]).all() and np.isnan(br.params.values[1]).all()
    assert np.isnan(br.llf[1])


def test_problem_is_safe_to_share_between_threads():
    """Evaluations of one model from several threads give the serial answers (the
    problem's workspaces are used under its lock)."""
    from concurrent.futures import ThreadPoolExecutor

    m = _model("unstructured", seed=7)
    rng = np.random.default_rng(8)
    thetas = [_theta(m.structs[0], rng) for _ in range(40)]
    serial = [m.evaluate(t, gradient=True) for t in thetas]
    with ThreadPoolExecutor(4) as ex:
        threaded = list(ex.map(lambda t: m.evaluate(t, gradient=True), thetas * 5))
    for i, ev in enumerate(threaded):
        ref = serial[i % len(thetas)]
        assert ev.deviance == ref.deviance
        np.testing.assert_array_equal(ev.grad, ref.grad)
        np.testing.assert_array_equal(ev.beta, ref.beta)


@pytest.mark.parametrize("n_rows", [3, 200])
def test_rows_shared_out_over_threads_give_the_serial_fits(n_rows):
    """A batch of fits shared out over 2 or 3 threads (rows taken one at a time, or in
    runs, by whichever thread is free) gives the serial results bit for bit, and the
    workspaces grown for the threads leave the first one's evaluations unchanged."""
    m = _model("unstructured", seed=3)
    rng = np.random.default_rng(4)
    P = m.problem
    theta0 = np.array([_theta(m.structs[0], rng) for _ in range(n_rows)])
    Y = m.design.yw[None, :] + rng.normal(scale=0.5, size=(n_rows, m.n_obs))
    before = P.evaluate(theta0[0], gradient=True)
    serial = P.fit(theta0, Y, maxiter=30, quasi=True, n_threads=1)
    for threads in (2, 3):
        shared = P.fit(theta0, Y, maxiter=30, quasi=True, n_threads=threads)
        for key in ("theta", "deviance", "beta", "se", "Hinv", "converged", "n_iter", "n_evals"):
            np.testing.assert_array_equal(shared[key], serial[key], err_msg=key)
    after = P.evaluate(theta0[0], gradient=True)
    for key in ("deviance", "grad", "beta", "Hinv"):
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)


# ---- metafor's structures over a factor's levels: R_ij = rho^(d_ij) ---------------------
LEVELS = ["C(t)[0.5]", "C(t)[1.0]", "C(t)[2.5]"]     # CAR lags 0.5, 1.5, 2: one below 1
FACTOR_SPECS = ["AR", "HAR", "CAR", "HCS"]


def _level_model(spec, seed=0, n=60):
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(n // 3), 3)
    level = np.tile(np.arange(3), n // 3)
    Z = [np.eye(3)[level]]
    X = np.column_stack([rng.normal(size=n), np.ones(n)])
    d = build_design(rng.normal(size=n), X, Z, [g], rng.uniform(0.1, 0.5, n))
    return NestedModel(d, [make_structure(spec, LEVELS, term="g")], "reml")


def _level_theta(s, rng):
    k = len(s.sd_groups)
    rho = rng.uniform(0.1, 0.8) if s.lower[k] >= 0 else rng.uniform(-0.45, 0.8)   # HCS: > -1/2
    return np.concatenate([rng.uniform(0.2, 0.9, k), [rho]])


@pytest.mark.parametrize("spec", FACTOR_SPECS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_factor_structure_maps_match_covstruct(spec, seed):
    """T and dT/dtheta of the engine against covstruct, and dT against central
    differences of T (the power rho^d, d = |i - j| or |t_i - t_j|)."""
    m = _level_model(spec)
    s = m.structs[0]
    th = _level_theta(s, np.random.default_rng(seed))
    T, D = m.problem.factors(th)
    np.testing.assert_allclose(T.reshape(3, 3, order="F"), s.T(th), rtol=1e-13, atol=1e-15)
    dT = np.stack([D[:, k].reshape(3, 3, order="F") for k in range(s.n_theta)])
    np.testing.assert_allclose(dT, s.dT(th), rtol=1e-11, atol=1e-13)
    h = 1e-6
    for k in range(s.n_theta):
        e = np.zeros(s.n_theta)
        e[k] = h
        num = (s.T(th + e) - s.T(th - e)) / (2 * h)
        np.testing.assert_allclose(dT[k], num, rtol=1e-6, atol=1e-8)


def test_car_derivative_at_rho_zero_is_finite_and_shared():
    """At rho = 0 (CAR's bound) d rho^0.5 / d rho is infinite: both maps take it at
    RHO_FLOOR, so the gradient stays finite and the twins agree."""
    m = _level_model("CAR")
    s = m.structs[0]
    th = np.array([0.5, 0.0])
    T, D = m.problem.factors(th)
    np.testing.assert_allclose(T.reshape(3, 3, order="F"), 0.5 * np.eye(3), atol=1e-15)
    np.testing.assert_allclose(D[:, 1].reshape(3, 3, order="F"), s.dT(th)[1], rtol=1e-12)
    assert np.isfinite(D).all() and np.abs(D[:, 1]).max() > 1.0
    assert np.isfinite(m.evaluate(th, gradient=True).grad).all()


@pytest.mark.parametrize("spec", FACTOR_SPECS)
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_factor_em_projection_matches_covstruct(spec, seed):
    """The EM projection of a random Sigma (some correlations negative): SDs averaged,
    rho from the lag-1 correlations (AR, HAR), a fit of log r on d (CAR), the mean
    correlation (HCS), clipped into the bounds; engine and covstruct agree."""
    m = _level_model(spec)
    s = m.structs[0]
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(3, 3))
    Sigma = A @ A.T + 0.1 * np.eye(3)
    got = m.problem.em_project(0, Sigma, np.full(s.n_theta, 0.3))
    np.testing.assert_allclose(got, s.from_Sigma(Sigma), rtol=1e-12, atol=1e-14)
    assert (got >= s.lower).all() and (got <= s.upper).all()
    # a Sigma of the structure is projected onto its own parameters
    th = _level_theta(s, rng)
    th[-1] = min(th[-1], 0.9)
    np.testing.assert_allclose(m.problem.em_project(0, s.Sigma(th), th), th, rtol=1e-10)


def test_car_projection_fits_log_correlations_on_lags():
    """CAR's rho: the least-squares fit of log r_ij = d_ij log rho over the pairs with
    r_ij > 0 (0 when none is positive)."""
    m = _level_model("CAR")
    s = m.structs[0]
    R = np.array([[1.0, 0.8, -0.2], [0.8, 1.0, 0.5], [-0.2, 0.5, 1.0]])
    d = np.array([0.5, 1.5])                  # lags of the positive pairs (0,1), (1,2)
    rho = np.exp(np.sum(d * np.log([0.8, 0.5])) / np.sum(d * d))
    got = m.problem.em_project(0, 4.0 * R, np.zeros(2))
    np.testing.assert_allclose(got, [2.0, rho], rtol=1e-12)
    np.testing.assert_allclose(s.from_Sigma(4.0 * R), got, rtol=1e-12)
    R = np.array([[1.0, -0.1, -0.2], [-0.1, 1.0, -0.3], [-0.2, -0.3, 1.0]])
    np.testing.assert_allclose(m.problem.em_project(0, R, np.zeros(2)), [1.0, 0.0], atol=1e-15)


@pytest.mark.parametrize("spec", FACTOR_SPECS)
def test_factor_gradient_and_em_steps(spec):
    """The deviance gradient against central differences; EM steps stay feasible and
    within the bounds (the optimiser undoes steps that lower the likelihood)."""
    m = _level_model(spec, seed=4)
    th = _level_theta(m.structs[0], np.random.default_rng(5))
    ev = m.evaluate(th, gradient=True)
    h = 1e-6
    num = np.array([(m.evaluate(th + h * e).deviance - m.evaluate(th - h * e).deviance) / (2 * h)
                    for e in np.eye(th.size)])
    np.testing.assert_allclose(ev.grad, num, rtol=1e-5, atol=1e-6)
    s = m.structs[0]
    t = th.copy()
    for _ in range(10):
        t, dev = m.problem.em_step(t)
        assert np.isfinite(dev) and (t >= s.lower).all() and (t <= s.upper).all()
        assert np.isfinite(m.evaluate(t).deviance)


@pytest.mark.parametrize("formula", ["stdmdiff ~ 1 + (1 | district) + (1 | district:school)",
                                     "stdmdiff ~ year_c + (1 + year_c | district) + (1 | district:year)"])
def test_evaluate_at_another_outcome_matches_a_model_of_it(schoolcal, formula):
    """Problem.evaluate(y=...) (whitened, sorted rows) gives the deviance and analytic
    gradient of the model built on that outcome; the problem then returns to its own."""
    from mlmeta.api import build_model

    m = build_model(formula, schoolcal, variance="var")[0]
    rng = np.random.default_rng(7)
    y2 = schoolcal.stdmdiff.to_numpy() + rng.normal(0, 0.2, len(schoolcal))
    other = build_model(formula, schoolcal.assign(stdmdiff=y2), variance="var")[0]
    d = m.design
    yw = y2[d.perm] * d.weights
    th = np.clip(rng.uniform(0.05, 0.4, m.n_theta), m.lower, m.upper)
    a = m.evaluate(th, gradient=True, y=yw)
    b = other.evaluate(th, gradient=True)
    assert a.deviance == pytest.approx(b.deviance, rel=1e-11)
    np.testing.assert_allclose(a.grad, b.grad, rtol=1e-8, atol=1e-10)
    own = build_model(formula, schoolcal, variance="var")[0].evaluate(th).deviance
    assert m.evaluate(th).deviance == pytest.approx(own, rel=1e-13)
