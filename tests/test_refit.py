"""The batch's checks made for all columns at once (mlmeta.refit) against the per-column
computations they replace."""

import warnings

import numpy as np
import pytest

import mlmeta
from mlmeta import refit
from mlmeta.batch import Model
from mlmeta.optimize import (c_condition, conditioned_model, conditioning, rounding_error,
                             start_theta)
from references import REFERENCE, load, read_exact

FORMULAS = [
    "stdmdiff ~ 1 + (1 | district/school)",
    "stdmdiff ~ year_c + (1 + year_c | district) + (1 | district:school)",
    "stdmdiff ~ year_c + (1 + year_c || district) + (1 | district:school)",
]


def _fits(schoolcal, formula, m=30, covariance=None, method="reml"):
    M = Model(formula, schoolcal, variance="var", covariance=covariance, method=method)
    Y = M.simulate(m, seed=7)
    return M, Y


@pytest.mark.parametrize("formula", FORMULAS)
def test_settled_fits_are_those_the_finishing_leaves_alone(schoolcal, formula, monkeypatch):
    """Skipping the finishing for the fits _settled picks gives the numbers of finishing
    every fit one by one (finish_outcome, as before)."""
    M, Y = _fits(schoolcal, formula)
    # outcomes with a variance at zero too: the steps off the bound must still be taken
    Y = np.column_stack([Y, np.repeat(Y.mean(axis=1, keepdims=True), 3, axis=1)])
    fast = refit.fit_outcomes(M.model, Y)
    monkeypatch.setattr(refit, "_settled", lambda model, out, safeguard, rows:
                        np.zeros(len(rows), dtype=bool))
    monkeypatch.setattr(refit, "_settled_off_bounds", lambda model, Yw, out, safeguard, rows:
                        np.zeros(len(rows), dtype=bool))
    slow = refit.fit_outcomes(M.model, Y)
    for key in ("deviance", "theta", "beta", "se", "converged", "n_iter", "n_evals"):
        np.testing.assert_array_equal(fast[key], slow[key], err_msg=key)


def test_fits_settled_off_the_bounds_are_those_the_finishing_leaves_alone(schoolcal):
    """The steps off the bounds of many boundary fits in one engine call: a fit it settles
    is one finish_outcome leaves as it is; a fit that a step off its bound improves (an
    interior optimum with a variance set to zero, called certified) is not settled."""
    from mlmeta.optimize import finish_outcome

    M = Model(FORMULAS[0], schoolcal, variance="var")
    Y = M.simulate(200, seed=7, theta=np.array([0.05, 0.05]))     # small variances: zeros
    model = M.model
    d = model.design
    Yw = np.ascontiguousarray((Y[d.perm] * d.weights[:, None]).T)
    out = model.problem.fit(refit.column_starts(model, model, Yw), Yw, em_switch=3,
                            switch_dec=30.0)
    rows = np.flatnonzero(~refit._settled(model, out, False, np.arange(Y.shape[1])))
    assert rows.size >= 10                      # boundary fits among the 200
    quiet = refit._settled_off_bounds(model, Yw, out, False, rows)
    assert quiet.any()
    for j in rows[quiet]:
        th, f, conv, _, _ = finish_outcome(model, Yw[j], out["theta"][j], out["deviance"][j],
                                           out["converged"][j], out["theta_em"][j], maxiter=1000,
                                           tol=1e-6, safeguard=False, certified=True)
        np.testing.assert_array_equal(th, out["theta"][j])
        assert conv
    # an interior fit pushed to a zero variance: the step off it lowers the deviance
    j = int(np.flatnonzero(refit._settled(model, out, False, np.arange(Y.shape[1])))[0])
    pushed = {key: np.array(v[j:j + 1], copy=True) for key, v in out.items()
              if isinstance(v, np.ndarray) and v.shape[:1] == (Y.shape[1],)}
    pushed["theta"][0, 0] = 0.0
    pushed["deviance"] = model.problem.fit(pushed["theta"], Yw[j:j + 1], em_iter=0,
                                           maxiter=0)["deviance"]
    assert not refit._settled_off_bounds(model, Yw[j:j + 1], pushed, False, np.arange(1)).any()
    # extra starts or a custom level: never settled here
    assert not refit._settled_off_bounds(model, Yw, out, "auto", rows).any()


def test_settled_needs_a_certificate_and_the_interior(schoolcal):
    M, Y = _fits(schoolcal, FORMULAS[0], m=4)
    model = M.model
    out = dict(theta=np.array([[0.2, 0.1], [0.0, 0.1], [0.2, 1e-12], [0.2, 0.1]]),
               certified=np.array([True, True, True, False]),
               converged=np.array([True, True, True, True]))
    rows = np.arange(4)
    np.testing.assert_array_equal(refit._settled(model, out, False, rows),
                                  [True, False, False, False])
    assert not refit._settled(model, out, True, rows).any()       # extra starts: never


def test_settled_is_never_taken_with_a_custom_level(schoolcal):
    M = Model(FORMULAS[1], schoolcal, variance="var",
              covariance={"district": [[None, 0.5], [0.5, None]]})
    k = M.model.n_theta
    out = dict(theta=np.full((3, k), 0.3), certified=np.ones(3, bool), converged=np.ones(3, bool))
    assert not refit._settled(M.model, out, False, np.arange(3)).any()


@pytest.mark.parametrize("formula", FORMULAS)
@pytest.mark.parametrize("method", ["reml", "ml"])
def test_vectorised_accuracy_check_matches_rounding_error(schoolcal, formula, method):
    M, Y = _fits(schoolcal, formula, method=method)
    model = M.model
    d = model.design
    Yw = np.ascontiguousarray((Y[d.perm] * d.weights[:, None]).T)
    out = model.problem.fit(np.repeat(refit.start_theta(model)[None], Y.shape[1], axis=0), Yw)
    # large variances as well: the bound on C's condition decides there
    out["theta"][:5] *= 10.0 ** np.arange(3, 8)[:, None]
    out["deviance"][5] = np.inf                         # a failed fit is not checked
    kappa = refit._c_conditions(model, out["theta"])
    want = np.array([c_condition(model, t) for t in out["theta"]])
    np.testing.assert_allclose(kappa, want, rtol=1e-12)
    got = refit._inaccurate(model, Yw, out)
    ref = np.zeros(len(got), dtype=bool)
    for j in np.flatnonzero(np.isfinite(out["deviance"])):
        ref[j] = rounding_error(float(Yw[j] @ Yw[j]), out["beta"][j], out["Hinv"][j],
                               reml=method == "reml", kappa=want[j]) > refit.ROUNDING_TOL
    np.testing.assert_array_equal(got, ref)
    assert got[:5].any() and not got[5]


def test_custom_level_kappa_matches(schoolcal):
    M = Model(FORMULAS[1], schoolcal, variance="var",
              covariance={"district": [[None, 0.5], [0.5, None]]})
    rng = np.random.default_rng(0)
    theta = np.abs(rng.normal(size=(6, M.model.n_theta))) * 10.0 ** rng.integers(0, 5, (6, 1))
    want = [c_condition(M.model, t) for t in theta]
    np.testing.assert_allclose(refit._c_conditions(M.model, theta), want, rtol=1e-12)


@pytest.mark.parametrize("formula,method", [
    (FORMULAS[0], "reml"), (FORMULAS[1], "ml"), (FORMULAS[2], "reml"),
    ("stdmdiff ~ year + (1 + year | district) + (1 | district:school)", "reml"),   # conditioned
])
def test_column_starts_are_the_single_fits_starts(schoolcal, formula, method):
    M, Y = _fits(schoolcal, formula, m=6, method=method)
    model = M.model
    d = model.design
    Yw = np.ascontiguousarray((Y[d.perm] * d.weights[:, None]).T)
    A = conditioning(model)
    assert (A is not None) == ("year +" in formula)
    work = model if A is None else conditioned_model(model, A)[0]
    got = refit.column_starts(model, work, Yw)
    for j, y in enumerate(Y.T):
        single = M._rebuilt(y)[0]
        single = single if A is None else conditioned_model(single, A)[0]
        np.testing.assert_allclose(got[j], start_theta(single), rtol=1e-12)
    # chunks of columns start where the whole batch does (executors cut it so)
    np.testing.assert_array_equal(refit.column_starts(model, work, Yw[2:5]), got[2:5])


def test_conditioned_batch_is_not_refitted_where_another_basis_confirms(schoolcal, monkeypatch):
    """Uncentred slopes: the batch fits in the well-scaled basis; the bound on C's
    condition flags every fit in the model's basis, and the deviance computed in both
    bases confirms it instead of a single fit of every column."""
    M, Y = _fits(schoolcal, "stdmdiff ~ year + (1 + year | district) + (1 | district:school)",
                 m=12)
    calls = []
    rebuilt = refit._fit_rebuilt
    monkeypatch.setattr(refit, "_fit_rebuilt", lambda model, Y, *a: calls.append(Y.shape[1])
                        or rebuilt(model, Y, *a))
    out = refit.fit_outcomes(M.model, Y)
    assert sum(calls) <= 2
    for j in range(Y.shape[1]):
        ref = M.fit(Y[:, j], safeguard=False)
        assert -0.5 * out["deviance"][j] == pytest.approx(ref.llf, rel=1e-8)
        np.testing.assert_allclose(out["beta"][j], ref.params.values, rtol=1e-5)


def test_batch_column_failing_at_its_start_is_fitted_from_the_start_shrunk():
    """A column whose moment start leaves the objective undefined (stored fuzz case
    1:1894, an exchangeable level over uncentred years) is fitted again from that start
    shrunk, as the single fit of that outcome is: the same log-likelihood, not NaN."""
    spec = load("fuzz_regressions")["case_1_1894"]
    data = read_exact(REFERENCE.parent.parent / spec["data"])
    Y = np.loadtxt(REFERENCE.parent.parent / spec["Y"], delimiter=",")
    M = Model(spec["formula"], data, method=spec["method"], covariance=spec["covariance"],
              **spec["sampling"])
    model = M.model
    work, _ = conditioned_model(model, conditioning(model))
    Yw = np.ascontiguousarray((Y[model.design.perm] * model.design.weights[:, None]).T)
    starts = refit.column_starts(model, work, Yw)          # as fit_outcomes makes them
    assert not np.isfinite(work.problem.fit(starts, Yw, maxiter=0, em_iter=0)["deviance"][1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = mlmeta.fit_batch(M, Y, n_jobs=1)
        single = Model(spec["formula"], data.assign(y=Y[:, 1]), method=spec["method"],
                       covariance=spec["covariance"], **spec["sampling"]).fit()
    assert np.isfinite(batch.llf[1])
    assert batch.llf[1] == pytest.approx(single.llf, abs=1e-8)
