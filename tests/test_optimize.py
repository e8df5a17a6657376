"""Optimiser honesty: non-convergence, better optima from other starts, saddles at 0."""

import warnings

import numpy as np
import pandas as pd
import pytest

import mlmeta
from mlmeta.api import build_model
from mlmeta.optimize import fit_nested

SLOPE = "stdmdiff ~ year_c + (1 + year_c || district) + (1 | district:school)"


def test_start_at_local_maximum_reports_better_optimum(schoolcal):
    model, _, _ = build_model(SLOPE, schoolcal, variance="var")
    stata = np.array([0.0335302, 0.06437, 0.1808125])
    rec = fit_nested(model, theta0=stata, em_iter=0, safeguard=True)
    first = rec.candidates[0]
    assert -0.5 * first[1] == pytest.approx(-7.2095301, abs=1e-6)    # the local maximum
    assert rec.better_optimum and rec.converged
    assert -0.5 * rec.deviance == pytest.approx(-7.181388694081951, abs=1e-8)
    assert any("local optimum" in m for m in rec.messages)


def test_without_safeguard_local_start_stays_local(schoolcal):
    model, _, _ = build_model(SLOPE, schoolcal, variance="var")
    rec = fit_nested(model, theta0=np.array([0.0335302, 0.06437, 0.1808125]), em_iter=0,
                     safeguard=False)
    assert -0.5 * rec.deviance == pytest.approx(-7.2095301, abs=1e-6)
    assert not rec.better_optimum


def test_nonconvergence_is_reported(schoolcal):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        res = mlmeta.meregress(SLOPE, schoolcal, variance="var", em_iter=0, maxiter=1,
                               safeguard=False)
    assert not res.converged
    assert any(issubclass(x.category, mlmeta.ConvergenceWarning) for x in w)
    assert any("convergence not achieved" in n for n in res.notes)
    assert "convergence not achieved" in res.summary().as_text()


def test_saddle_at_zero_is_left(schoolcal):
    """Starting with a variance exactly at 0 (zero gradient by symmetry) still reaches the optimum."""
    model, _, _ = build_model("stdmdiff ~ 1 + (1 | district) + (1 | district:school)",
                              schoolcal, variance="var")
    rec = fit_nested(model, theta0=np.array([0.0, 0.2]), em_iter=0, safeguard=False)
    assert rec.converged
    assert -0.5 * rec.deviance == pytest.approx(-7.958724033710965, abs=1e-9)


def test_fit_record_bookkeeping(schoolcal):
    model, _, _ = build_model("stdmdiff ~ 1 + (1 | district) + (1 | district:school)",
                              schoolcal, variance="var")
    rec = fit_nested(model)
    # EM hands over to Newton from its third iterate on where it may (refine.EM_SWITCH)
    assert 3 <= rec.n_em <= 20 and rec.n_evals > rec.n_em and rec.seconds > 0
    assert rec.theta_em is not None and rec.theta_start.shape == (2,)
    assert rec.candidates and rec.candidates[0][0] == "EM start"


def test_fixed_parameters_are_held(schoolcal):
    model, _, _ = build_model("stdmdiff ~ 1 + (1 | district) + (1 | district:school)",
                              schoolcal, variance="var")
    rec = fit_nested(model, theta0=np.array([0.1, 0.2]), fixed=[0])
    assert rec.theta[0] == 0.1 and rec.converged
    free = fit_nested(model, theta0=np.array([0.1, 0.2]), fixed=[0], em_iter=0, safeguard=False)
    assert free.theta[1] == pytest.approx(rec.theta[1], rel=1e-6)
    zero = fit_nested(model, theta0=np.array([0.0, 0.2]), fixed=[0])
    assert zero.theta[0] == 0.0


MODELS = [
    ("stdmdiff ~ 1 + (1 | district) + (1 | district:school)", "reml"),
    (SLOPE, "reml"),
    ("stdmdiff ~ year_c + (1 + year_c | district) + (1 | district:school)", "ml"),
]


@pytest.mark.parametrize("formula,method", MODELS)
def test_exploratory_runs_reach_the_full_newton_optima(schoolcal, formula, method):
    """BFGS-updated runs from the extra starts end where full Newton runs end, and a run
    that joins the known optimum says so and returns it."""
    from mlmeta.optimize import alternative_starts

    model, _, _ = build_model(formula, schoolcal, variance="var", method=method)
    rec = fit_nested(model, safeguard=False)
    starts = np.array([t for _, t in alternative_starts(model, rec.theta_em, rec.theta)])
    P = model.problem
    full = P.fit(starts, em_iter=0)
    quasi = P.fit(starts, em_iter=0, quasi=True)
    for i in range(len(starts)):
        assert full["converged"][i]
        if quasi["deviance"][i] != pytest.approx(full["deviance"][i], abs=1e-6):
            # a different basin from the same start: still an optimum, which full
            # Newton from there confirms without moving away
            again = P.fit(quasi["theta"][i], em_iter=0)
            assert again["converged"][0]
            assert again["deviance"][0] == pytest.approx(quasi["deviance"][i], abs=1e-6)
    joined = P.fit(starts, em_iter=0, quasi=True, known_theta=rec.theta, known_dev=rec.deviance)
    for i in range(len(starts)):
        if joined["joined"][i]:
            np.testing.assert_array_equal(joined["theta"][i], rec.theta)
            assert joined["deviance"][i] == pytest.approx(rec.deviance, abs=1e-9)
            assert joined["converged"][i]
        else:
            assert joined["deviance"][i] == pytest.approx(quasi["deviance"][i], abs=1e-6)
    assert joined["joined"].any()
    assert joined["n_evals"].sum() < full["n_evals"].sum()


def test_exploring_runs_expand_steps_off_a_zero_variance(schoolcal):
    """Off a variance near zero the deviance is flat in theta and a Newton step with the
    curvature taken positive doubles it. The extra starts' runs (quasi-Newton, or with
    a known optimum to join) take steps 4, 16, ... times as long while the deviance
    falls; the main run keeps its Newton steps."""
    model, _, _ = build_model("stdmdiff ~ 1 + (1 | district) + (1 | district:school)", schoolcal,
                              variance="var")
    P = model.problem
    start = np.array([[1e-4, 0.29738607]])   # level 2 at its optimum with level 1 at zero
    rec = fit_nested(model, safeguard=False)
    main = P.fit(start, em_iter=0, maxiter=1)
    assert main["theta"][0, 0] == pytest.approx(2e-4, rel=1e-3)
    for options in (dict(quasi=True), dict(known_theta=rec.theta, known_dev=rec.deviance)):
        run = P.fit(start, em_iter=0, maxiter=1, **options)
        assert run["theta"][0, 0] > 100 * main["theta"][0, 0]
        assert run["deviance"][0] < main["deviance"][0]


@pytest.mark.parametrize("method", ["ml", "reml"])
def test_uncentred_slopes_reach_the_centred_optimum(schoolcal, method):
    """A correlated random slope on the uncentred year (1976-2002) is the model on the
    centred one reparameterised: the same optimum (it stopped at -8.2099 instead of
    -7.6694 under ML), the same slope and slope variance; scaling the moderator changes
    nothing."""
    un = "stdmdiff ~ {x} + (1 + {x} | district) + (1 | district:school)"
    ref = mlmeta.meregress(un.format(x="year_c"), schoolcal, variance="var", method=method)
    for x, data, scale in (("year", schoolcal, 1.0),
                           ("yk", schoolcal.assign(yk=schoolcal.year * 1000.0), 1000.0)):
        res = mlmeta.meregress(un.format(x=x), data, variance="var", method=method)
        assert res.converged
        assert res.llf == pytest.approx(ref.llf, rel=1e-8)
        assert res.params[x] * scale == pytest.approx(ref.params["year_c"], rel=1e-5)
        S, R = res.re_cov["district"], ref.re_cov["district"]
        assert S.loc[x, x] * scale ** 2 == pytest.approx(R.loc["year_c", "year_c"], rel=1e-4)


@pytest.mark.parametrize("method", ["ml", "reml"])
def test_uncentred_independent_slope_reaches_dense_optimum(schoolcal, method):
    """With independent effects the uncentred model is a different model; its optimum
    is the dense likelihood's (reference/make_dense_optima.py)."""
    from references import load

    ref = load("dense_structures")[f"schoolcal-uncentred-{method}"]
    res = mlmeta.meregress("stdmdiff ~ year + (1 + year || district) + (1 | district:school)",
                           schoolcal, variance="var", method=method)
    assert res.converged
    assert res.llf >= ref["llf"] - 1e-7
    assert res.llf == pytest.approx(ref["llf"], abs=1e-7)



def test_auto_runs_the_starts_away_from_the_em_path_only_where_the_fit_is_exposed(schoolcal):
    """schoolcal's two-level optimum is interior (and certified): "auto" leaves out the
    starts at the natural scale and the random ones, and the EM start inflated, which lies
    downhill of the optimum (the record names them all), runs the EM start shrunk and each
    level at zero and reaches the optimum that every start reaches; True runs them all."""
    from mlmeta.starts import INFLATED, WIDE, on_boundary

    model, _, _ = build_model("stdmdiff ~ 1 + (1 | district) + (1 | district:school)", schoolcal,
                              variance="var")
    auto = fit_nested(model, safeguard="auto")
    full = fit_nested(model, safeguard=True)
    assert not on_boundary(model, auto.theta, model.lower, model.upper, np.ones(2))
    assert sorted(auto.skipped_starts) == sorted(
        c[0] for c in full.candidates if c[0].startswith(WIDE) or c[0] == INFLATED)
    assert [c[0] for c in auto.candidates] == ["EM start", "EM start x 0.1", "level 1 at zero",
                                               "level 2 at zero"]
    assert not full.skipped_starts
    assert auto.deviance == pytest.approx(full.deviance, abs=1e-9)
    assert auto.n_evals < full.n_evals


def test_the_inflated_em_start_runs_where_it_does_not_descend_to_the_optimum(schoolcal):
    """descends: a start is downhill of the optimum when the deviance falls along the
    segment at t = 0, 1/3, 2/3 and to f; a start beyond a rise (the optimum itself
    pretended to lie elsewhere), an undefined deviance or a flat segment (the start is
    the optimum) is not."""
    from mlmeta.starts import SEGMENT_POINTS, descends

    model, _, _ = build_model("stdmdiff ~ 1 + (1 | district) + (1 | district:school)", schoolcal,
                              variance="var")
    rec = fit_nested(model, safeguard=False)
    lo, up = model.lower, model.upper
    t = rec.theta
    starts = [("shrunk", 0.1 * t), ("inflated", 3.0 * t), ("here", t.copy()),
              ("beyond", 3.0 * t)]
    ok = descends(model, starts, [0, 1, 2], t, rec.deviance, lower=lo, upper=up)
    assert ok.tolist() == [True, True, False]
    # seen from a point that is not the optimum, the far start's segment rises again
    f_mid = float(model.evaluate(2.0 * t).deviance)
    assert descends(model, starts, [3], 2.0 * t, f_mid, lower=lo, upper=up).tolist() == [True]
    assert descends(model, starts, [0], 2.0 * t, f_mid, lower=lo, upper=up).tolist() == [False]
    # the deviances it compares are the model's own
    seg = [0.1 * t + k / SEGMENT_POINTS * (t - 0.1 * t) for k in range(SEGMENT_POINTS)]
    devs = [float(model.evaluate(p).deviance) for p in seg] + [rec.deviance]
    assert all(a > b for a, b in zip(devs[:-1], devs[1:]))
    assert descends(model, starts, [], t, rec.deviance, lower=lo, upper=up).shape == (0,)


def test_auto_runs_every_start_from_a_fit_on_the_boundary(schoolcal):
    """An optimum whose correlation of intercept and slope is +-1 (a zero on the diagonal of
    the level's factor: on the boundary): "auto" runs every start."""
    from mlmeta.starts import on_boundary

    model, _, _ = build_model("stdmdiff ~ year_c + (1 + year_c | district) + (1 | district:school)",
                              schoolcal, variance="var")
    rec = fit_nested(model, safeguard="auto")
    assert on_boundary(model, rec.theta, model.lower, model.upper, np.ones(model.n_theta))
    assert not rec.skipped_starts
    assert any(c[0] == "natural scale" for c in rec.candidates)


def test_on_boundary_sees_zero_variances_bounds_and_pd_edges():
    from mlmeta.starts import on_boundary

    class Flat:                     # no custom level
        structs, theta_slices = [], []

    lower, upper = np.array([0.0, -1.0]), np.array([np.inf, 1.0])
    scale = np.array([2.0, 1.0])
    assert not on_boundary(Flat, np.array([0.5, 0.2]), lower, upper, scale)
    assert on_boundary(Flat, np.array([1e-5, 0.2]), lower, upper, scale)
    assert on_boundary(Flat, np.array([0.5, 1.0 - 1e-6]), lower, upper, scale)
    assert on_boundary(Flat, np.array([0.5, -1.0]), lower, upper, scale)
    # a parameter held fixed at its bound does not count
    assert not on_boundary(Flat, np.array([0.0, 0.2]), np.array([0.0, -1.0]),
                           np.array([0.0, 1.0]), scale)


def test_the_hand_over_to_newton_scales_with_large_data(monkeypatch):
    """EM hands over to Newton where the remaining deviance is at most switch_dec / 2:
    30 up to 10^4 rows, growing with the rows above; a 30,000-row fit ends at the same
    optimum with the scaled and with the fixed bound, in fewer EM iterations."""
    import pandas as pd

    from mlmeta import refine

    assert refine.switch_dec(56) == refine.switch_dec(10_000) == 30.0
    assert refine.switch_dec(10**6) == pytest.approx(3000.0)
    rng = np.random.default_rng(3)
    n_a = 6000
    a = np.repeat(np.arange(n_a), 5)
    n = a.size
    v = rng.uniform(0.01, 0.1, n)
    x = rng.normal(size=n)
    y = 0.2 + 0.1 * x + rng.normal(0, 0.3, n_a)[a] + rng.normal(0, 0.2, n) + rng.normal(size=n) * np.sqrt(v)
    df = pd.DataFrame({"y": y, "x": x, "v": v, "a": a, "b": np.arange(n)})
    f = "y ~ x + (1 | a) + (1 | a:b)"
    scaled = mlmeta.meregress(f, df, variance="v", safeguard=False)
    monkeypatch.setattr(refine, "SWITCH_OBS", 10**9)
    fixed = mlmeta.meregress(f, df, variance="v", safeguard=False)
    assert scaled.converged and fixed.converged
    assert scaled.llf == pytest.approx(fixed.llf, abs=1e-8)
    np.testing.assert_allclose(scaled.theta, fixed.theta, rtol=1e-6)
    assert scaled.fit_record.n_em < fixed.fit_record.n_em


def test_random_starts_are_the_seeded_draws_kept_per_model_size():
    """The pseudo-random starts: the generator seeded by the model's size gives them (the
    same points as drawn afresh), their draws kept read-only for the next fit of that size."""
    from mlmeta.refine import theta_scale
    from mlmeta.starts import N_RANDOM_STARTS, _random_draws, alternative_starts

    df = mlmeta.datasets.load("schoolcal")
    model, _, _ = build_model("stdmdiff ~ 1 + (1 | district) + (1 | district:school)", df,
                              variance="var")
    theta = np.array([0.25, 0.18])
    scale = theta_scale(model, theta)
    got = [t for label, t in alternative_starts(model, theta, theta, scale)
           if label.startswith("random start")]
    k = model.n_theta
    rng = np.random.default_rng([model.n_obs, k, 17])
    assert len(got) == N_RANDOM_STARTS
    for t in got:
        u = (rng.uniform(0.05, 2.0, k), rng.uniform(-0.5, 0.5, k), rng.uniform(-1.0, 1.0, k))
        want = np.clip(np.where(model.lower == 0.0, u[0], u[2]) * scale, model.lower, model.upper)
        np.testing.assert_array_equal(t, want)
    draws = _random_draws(model.n_obs, k)
    assert draws is _random_draws(model.n_obs, k)
    assert not any(a.flags.writeable for d in draws for a in d)


def test_moment_start_is_kept_on_the_model_and_handed_out_as_copies():
    """start_theta computes the moment start once per model (fit_batch, refits and
    Model.fit ask for it again); changing the copy a caller got changes nothing."""
    from mlmeta.optimize import _moment_start, start_theta

    df = mlmeta.datasets.load("schoolcal")
    model, _, _ = build_model("stdmdiff ~ 1 + (1 | district) + (1 | district:school)", df,
                              variance="var")
    t = start_theta(model)
    np.testing.assert_array_equal(t, _moment_start(model))
    t[:] = -1.0
    np.testing.assert_array_equal(start_theta(model), _moment_start(model))


def test_the_main_run_returns_the_hessian_it_ended_with(schoolcal):
    """``hessian=True``: the Hessian of the free parameters at the run's last Newton
    iteration, as differenced there (the central differences of the gradient agree); a
    parameter that is not free (held by equal bounds) has NaN in its row and column."""
    model, _, _ = build_model(SLOPE, schoolcal, variance="var")
    P = model.problem
    rec = fit_nested(model, safeguard=False)
    run = P.fit(rec.theta_start[None, :], hessian=True)
    theta, H = run["theta"][0], run["hess"][0]
    assert run["certified"][0] and H.shape == (3, 3)
    np.testing.assert_array_equal(H, H.T)
    num = np.empty((3, 3))
    for i in range(3):
        h = 1e-5 * max(abs(theta[i]), 1e-2)
        up, down = theta.copy(), theta.copy()
        up[i] += h
        down[i] -= h
        num[:, i] = (model.gradient(up) - model.gradient(down)) / (2 * h)
    np.testing.assert_allclose(H, 0.5 * (num + num.T), rtol=1e-4, atol=1e-6 * np.abs(num).max())
    assert "hess" not in P.fit(rec.theta_start[None, :])
    lower, upper = model.lower.copy(), model.upper.copy()
    lower[1] = upper[1] = 0.05
    held = P.fit(rec.theta_start[None, :], lower=lower, upper=upper, hessian=True)["hess"][0]
    assert np.isnan(held[1]).all() and np.isnan(held[:, 1]).all()
    assert np.isfinite(np.delete(np.delete(held, 1, 0), 1, 1)).all()


def test_runs_from_a_parameter_at_zero_start_from_the_known_hessian():
    """An exploring run seeded with the known optimum's Hessian (``known_hess``) takes it
    as its first model instead of differencing one: from a parameter of sleepstudy's
    optimum at zero it joins the optimum in fewer evaluations. A seed unknown in a free
    parameter's row is not used (the run is the unseeded one, bit for bit)."""
    from references import load

    data = pd.DataFrame(load("df_reference")["data"]["sleepstudy"])
    model = mlmeta.mixed("Reaction ~ Days + (1 + Days | Subject)", data).model
    P = model.problem
    rec = fit_nested(model, safeguard=False)
    H = P.fit(rec.theta_start[None, :], hessian=True)["hess"][0]
    assert np.isfinite(H).all()
    start = rec.theta.copy()
    start[0] = 0.0
    known = dict(quasi=True, known_theta=rec.theta, known_dev=rec.deviance)
    plain = P.fit(start[None, :], em_iter=0, **known)
    seeded = P.fit(start[None, :], em_iter=0, known_hess=H, **known)
    assert plain["joined"][0] and seeded["joined"][0]
    assert seeded["n_evals"][0] < plain["n_evals"][0]
    unknown = H.copy()
    unknown[2, :] = unknown[:, 2] = np.nan
    again = P.fit(start[None, :], em_iter=0, known_hess=unknown, **known)
    np.testing.assert_array_equal(again["theta"], plain["theta"])
    assert again["n_evals"][0] == plain["n_evals"][0]
    with pytest.raises(ValueError, match="known_hess"):
        P.fit(start[None, :], known_hess=H[:2, :2], **known)


def test_a_scalar_level_at_zero_starts_with_its_variance_on_the_nested_level(schoolcal):
    """The extra start with the districts at zero gives their variance to the schools
    nested in them (an observation's variance as at the optimum); the start with the
    deepest level at zero, and levels with more than one parameter, are the optimum with
    the level zeroed."""
    from mlmeta.optimize import alternative_starts

    model, _, _ = build_model("stdmdiff ~ 1 + (1 | district) + (1 | district:school)", schoolcal,
                              variance="var")
    rec = fit_nested(model, safeguard=False)
    th = rec.theta
    starts = dict(alternative_starts(model, rec.theta_em, th))
    np.testing.assert_allclose(starts["level 1 at zero"], [0.0, np.hypot(th[0], th[1])],
                               rtol=1e-15)
    np.testing.assert_array_equal(starts["level 2 at zero"], [th[0], 0.0])
    slope, _, _ = build_model("stdmdiff ~ 1 + (1 + year_c | district) + (1 | district:school)",
                              schoolcal, variance="var")
    rs = fit_nested(slope, safeguard=False)
    got = dict(alternative_starts(slope, rs.theta_em, rs.theta))["level 1 at zero"]
    np.testing.assert_array_equal(got, np.r_[0.0, 0.0, 0.0, rs.theta[3]])


def test_a_run_off_a_scalar_variance_at_zero_steps_in_the_variance_scale(schoolcal):
    """From the optimum of the slice where the districts' variance is zero, an exploring
    run's probe finds the deviance falling off zero and goes on by a secant step in the
    variance theta^2 (where the deviance is nearly quadratic): within one iteration the
    districts' parameter is near its optimum, not 1e-3 of the sampling scale (Newton in
    theta doubles it per step), and the run joins the optimum. A main run (not
    exploring) keeps the probe's small step."""
    model, _, _ = build_model("stdmdiff ~ 1 + (1 | district) + (1 | district:school)", schoolcal,
                              variance="var")
    P = model.problem
    rec = fit_nested(model, safeguard=False)
    lower, upper = model.lower.copy(), model.upper.copy()
    upper[0] = 0.0                             # the slice: districts at zero
    edge = P.fit(np.array([[0.0, rec.theta[1]]]), em_iter=0, lower=lower, upper=upper)
    slice_opt = edge["theta"]
    known = dict(known_theta=rec.theta, known_dev=rec.deviance)
    one = P.fit(slice_opt, em_iter=0, maxiter=1, quasi=True, **known)
    assert 0.3 * rec.theta[0] < one["theta"][0, 0] < 3.0 * rec.theta[0]
    assert one["deviance"][0] < edge["deviance"][0] - 1.0
    main = P.fit(slice_opt, em_iter=0, maxiter=1)
    assert 0.0 < main["theta"][0, 0] < 1e-2 * rec.theta[0]
    run = P.fit(slice_opt, em_iter=0, quasi=True, **known)
    assert run["joined"][0] and run["deviance"][0] == pytest.approx(rec.deviance, abs=1e-9)
