"""The engine's EM + Newton loop: the state it reports at the end, EM's hand-over to
Newton (``em_switch``) and the Newton certificate, on models whose optimum is known
from a run without them."""

import numpy as np
import pytest

from mlmeta.batch import Model
from mlmeta.optimize import start_theta

FORMULAS = [
    "stdmdiff ~ 1 + (1 | district/school)",
    "stdmdiff ~ year_c + (1 + year_c || district) + (1 | district:school)",
    "stdmdiff ~ year_c + (1 + year_c | district) + (1 | district:school)",
]


def _batch(schoolcal, formula, m=40, method="reml"):
    M = Model(formula, schoolcal, variance="var", method=method)
    model = M.model
    d = model.design
    Y = M.simulate(m, seed=11)
    Yw = np.ascontiguousarray((Y[d.perm] * d.weights[:, None]).T)
    th0 = np.repeat(start_theta(model)[None, :], m, axis=0)
    return model, Yw, th0


@pytest.mark.parametrize("formula", FORMULAS)
@pytest.mark.parametrize("method", ["reml", "ml"])
def test_reported_state_is_that_of_the_final_theta(schoolcal, formula, method):
    """No evaluation is repeated at the end of a run: the deviance, beta, H^-1, se and
    sigma^2 reported are those of an evaluation at the theta reported."""
    M = Model(formula, schoolcal, variance="var", method=method)
    P = M.model.problem
    th0 = start_theta(M.model)
    for kw in (dict(), dict(em_iter=0), dict(em_iter=3, maxiter=0), dict(em_only=True),
               dict(em_switch=3, switch_dec=0.3)):
        r = P.fit(th0, **kw)
        ev = P.evaluate(r["theta"][0])
        assert r["deviance"][0] == ev["deviance"]
        np.testing.assert_array_equal(r["beta"][0], ev["beta"])
        np.testing.assert_allclose(r["Hinv"][0], ev["Hinv"], rtol=1e-14, atol=0)
        np.testing.assert_allclose(r["se"][0], np.sqrt(np.diag(ev["Hinv"])), rtol=1e-14)
        assert r["sigma2"][0] == ev["sigma2"]


@pytest.mark.parametrize("formula", FORMULAS)
def test_em_hand_over_reaches_the_same_optimum_with_fewer_evaluations(schoolcal, formula):
    model, Yw, th0 = _batch(schoolcal, formula)
    full = model.problem.fit(th0, Yw, maxiter=100)
    fast = model.problem.fit(th0, Yw, maxiter=100, em_switch=3, switch_dec=0.3)
    np.testing.assert_allclose(fast["deviance"], full["deviance"], rtol=1e-10)
    np.testing.assert_allclose(fast["beta"], full["beta"], rtol=1e-6, atol=1e-8)
    assert fast["converged"].all() and full["converged"].all()
    # where EM handed over, it did so at iterate 3 or later, and theta_em is that iterate
    handed = fast["n_em"] < 20
    assert (fast["n_em"][handed] >= 3).all()
    if formula == FORMULAS[0]:
        assert handed.mean() > 0.9
        assert fast["n_evals"].mean() < 0.7 * full["n_evals"].mean()


def test_em_hand_over_is_refused_where_newton_would_not_hold(schoolcal):
    """A decrement allowance of zero never lets EM hand over (the Hessian check fails),
    and the run is then EM's full 20 iterations and Newton, as without em_switch."""
    model, Yw, th0 = _batch(schoolcal, FORMULAS[0], m=10)
    full = model.problem.fit(th0, Yw, maxiter=100)
    never = model.problem.fit(th0, Yw, maxiter=100, em_switch=3, switch_dec=0.0)
    np.testing.assert_array_equal(never["theta"], full["theta"])
    np.testing.assert_array_equal(never["n_em"], full["n_em"])


@pytest.mark.parametrize("formula", FORMULAS)
def test_certified_runs_are_stationary_minima(schoolcal, formula):
    """A certified run (a differenced Hessian, or the one of the iterate before carried
    by the secant pair, positive definite; a vanishing decrement) ends where the
    gradient of the free parameters vanishes and their Hessian, differenced here in
    Python, is positive definite."""
    M = Model(formula, schoolcal, variance="var")
    Y = M.simulate(8, seed=4)
    checked = 0
    for y in Y.T:
        m = M._rebuilt(y)[0]
        r = m.problem.fit(start_theta(m), maxiter=100)
        if not r["certified"][0]:
            continue
        checked += 1
        th = r["theta"][0]
        free = ~(th <= m.lower + 1e-12)
        g = m.problem.evaluate(th, gradient=True)["grad"]
        scale = np.maximum(np.abs(th), 1e-3)
        assert np.all(np.abs(g[free]) * scale[free] < 1e-5)
        k = int(free.sum())
        H = np.zeros((k, k))
        for a, i in enumerate(np.flatnonzero(free)):
            h = 1e-5 * scale[i]
            e = np.zeros_like(th)
            e[i] = h
            gp = m.problem.evaluate(th + e, gradient=True)["grad"]
            gm = m.problem.evaluate(th - e, gradient=True)["grad"]
            H[:, a] = ((gp - gm) / (2 * h))[free]
        assert np.linalg.eigvalsh(0.5 * (H + H.T))[0] > 0
    assert checked >= 4
