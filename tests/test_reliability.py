"""Fits under awkward designs: exchangeable correlations at their lower bound, variances
far beyond the sampling variances, starts the engine cannot evaluate, evaluation
budgets of the extra starts, and the stationarity check before a fit is called
converged."""

import warnings

import numpy as np
import pandas as pd
import pytest

import mlmeta
from dense import DenseDeviance
from mlmeta import optimize
from mlmeta.api import build_model
from mlmeta.refine import theta_scale


def _exchangeable_data(singular, seed=5, G=30, m=10):
    """Three effects (x, x2, _cons) per group; ``singular``: they sum to zero in every
    group, an exchangeable covariance with correlation -1/2 = -1/(q-1)."""
    rng = np.random.default_rng(seed)
    n = G * m
    g = np.repeat(np.arange(G), m)
    x, x2 = rng.normal(size=n), rng.normal(size=n)
    if singular:
        u = rng.normal(size=(G, 3))
        u = 0.8 * (u - u.mean(axis=1, keepdims=True))
    else:
        u = rng.normal(size=(G, 3)) * 0.6 + rng.normal(size=(G, 1)) * 0.5
    y = 0.2 + 0.3 * x + u[g, 0] * x + u[g, 1] * x2 + u[g, 2] + rng.normal(size=n) * 0.3
    return pd.DataFrame(dict(y=y, x=x, x2=x2, g=g, v=0.09))


EXCH = "y ~ x + x2 + (1 + x + x2 | g)"


def test_exchangeable_correlation_at_its_lower_bound_is_flagged_and_its_interval_stays_inside():
    with pytest.warns(mlmeta.BoundaryWarning, match=r"lower bound -0.5 = -1/\(q-1\)"):
        res = mlmeta.meregress(EXCH, _exchangeable_data(True), variance="v",
                               covariance={"g": "exchangeable"})
    rows = res.re_params().set_index("param")
    corr = rows.loc["corr(x,x2 x,_cons x2,_cons)"]
    assert corr.estimate == pytest.approx(-0.5, abs=1e-6) and corr.boundary
    assert any("lower bound" in n for n in res.notes)
    ci = res.profile_ci().set_index("param").loc["corr(x,x2)"]
    assert ci.lower == -0.5 and -0.5 <= ci.upper < 1.0


def _small_exchangeable_data(seed=0, G=8, m=6):
    """Few groups, true common correlation -0.35: a wide interval near -1/(q-1) = -0.5."""
    rng = np.random.default_rng(seed)
    n = G * m
    g = np.repeat(np.arange(G), m)
    x, x2 = rng.normal(size=n), rng.normal(size=n)
    C = np.full((3, 3), -0.35)
    np.fill_diagonal(C, 1.0)
    u = rng.normal(size=(G, 3)) @ np.linalg.cholesky(C).T * 0.6
    y = 0.2 + 0.3 * x + u[g, 0] * x + u[g, 1] * x2 + u[g, 2] + rng.normal(size=n) * 0.3
    return pd.DataFrame(dict(y=y, x=x, x2=x2, g=g, v=0.09))


@pytest.mark.parametrize("data", [_exchangeable_data(False), _small_exchangeable_data()])
def test_exchangeable_correlation_interval_is_within_its_parameter_space(data):
    """Wald intervals of an exchangeable correlation use the Fisher transform of r mapped
    from (-1/(q-1), 1) onto (-1, 1): they cannot leave the parameter space (with atanh r
    the second data set's 95% interval reached -0.55)."""
    res = mlmeta.meregress(EXCH, data, variance="v", covariance={"g": "exchangeable"})
    corr = res.re_params().set_index("param").loc["corr(x,x2 x,_cons x2,_cons)"]
    assert not corr.boundary and -0.5 < corr.lower < corr.estimate < corr.upper < 1.0
    for level in (50.0, 95.0, 99.99):
        c = res.re_params(level=level).set_index("param").loc["corr(x,x2 x,_cons x2,_cons)"]
        assert -0.5 < c.lower and c.upper < 1.0
    ci = res.profile_ci().set_index("param").loc["corr(x,x2)"]
    assert -0.5 <= ci.lower < corr.estimate < ci.upper < 1.0
    key = ("g", "corr(x,x2 x,_cons x2,_cons)")
    assert res.e.V_report.loc[key, key] == pytest.approx(corr.std_err ** 2, rel=1e-9)


@pytest.mark.parametrize("ratio", [1e12, 1e16])
def test_variances_beyond_double_precision_are_a_value_error_naming_the_cause(schoolcal, ratio):
    """Between-study variances 1e12 times the sampling variances: X'V^-1X and r'V^-1r are
    then differences of numbers far larger than themselves. The fit used to report a
    log-likelihood 1.3 off, or raise FloatingPointError ("collinear moderators?")."""
    df = schoolcal.assign(var=schoolcal["var"] / ratio)
    with pytest.raises(ValueError, match="sampling variances"):
        mlmeta.meregress("stdmdiff ~ year_c + (1 | district) + (1 | district:school)", df,
                         variance="var")


def test_batch_fits_beyond_double_precision_are_nan_with_a_warning(schoolcal):
    df = schoolcal.assign(var=schoolcal["var"] / 1e14)
    model = mlmeta.Model("stdmdiff ~ year_c + (1 | district) + (1 | district:school)", df,
                         variance="var")
    Y = np.column_stack([df.stdmdiff, df.stdmdiff * 1.1])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)      # no stray sqrt of a failed H^-1
        with pytest.warns(UserWarning, match="2 of 2 fits failed"):
            out = mlmeta.fit_batch(model, Y)
    assert np.isnan(out.llf).all() and not out.converged.any()
    assert np.isnan(out.bse.to_numpy()).all()


def test_rounding_error_estimate_tracks_the_dense_likelihood(schoolcal):
    """Where the estimate says the deviance is good to 1e-4, it matches the dense one."""
    for ratio in (1.0, 1e4, 1e6):
        df = schoolcal.assign(var=schoolcal["var"] / ratio)
        res = mlmeta.meregress("stdmdiff ~ year_c + (1 | district) + (1 | district:school)", df,
                               variance="var")
        m, d = res.model, res.model.design
        err = optimize.model_rounding_error(m, res.theta)
        dev = DenseDeviance(d.y, d.X, d.Z, d.groups, d.variance, m.method, cluster=d.groups[0])(
            m.T_list(res.theta))[0]
        assert abs(-0.5 * dev - res.llf) <= max(err, 1e-9)


def test_mixed_model_with_uncentred_years_starts_where_the_objective_is_defined():
    """A moment start in the outcome's units made the profiled (relative) factors so large
    that the factorisation failed at the start: FloatingPointError."""
    rng = np.random.default_rng(0)
    n, G = 120, 12
    g = np.repeat(np.arange(G), n // G)
    year = rng.integers(1976, 2003, n).astype(float)
    y = 1e4 * (0.3 + rng.normal(size=G)[g] * 0.5 + 0.01 * (year - 1990) + rng.normal(size=n))
    df = pd.DataFrame(dict(y=y, year=year, g=g, h=np.arange(n) % 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = mlmeta.mixed("y ~ year + (1 + year | g) + (1 | g:h)", df, method="ml")
    assert np.isfinite(res.llf) and np.isfinite(res.bse).all()
    str(res.summary())


def test_extra_starts_are_cut_at_their_budget_and_the_record_says_so(schoolcal, monkeypatch):
    model, _, _ = build_model("stdmdiff ~ year_c + (1 + year_c | district) + (1 | district:school)",
                              schoolcal, variance="var", method="ml")
    monkeypatch.setattr(optimize, "EXTRA_EVALS_FACTOR", 0)
    monkeypatch.setattr(optimize, "EXTRA_MIN_EVALS", 1)
    rec = optimize.fit_nested(model, safeguard=True)
    assert rec.eval_budget == model.n_theta + 1
    assert rec.cut_short and all(n >= rec.eval_budget for _, n in rec.cut_short)
    assert any("stopped at their limit" in msg for msg in rec.messages)


def test_extra_starts_cost_a_bounded_multiple_of_the_main_fit(schoolcal):
    model, _, _ = build_model("stdmdiff ~ year_c + (1 + year_c | district) + (1 | district:school)",
                              schoolcal, variance="var", method="ml")
    alone = optimize.fit_nested(model, safeguard=False)
    rec = optimize.fit_nested(model, safeguard=True)
    n_starts = sum(1 for c in rec.candidates if c[0] != "EM start")
    assert rec.n_evals <= alone.n_evals + n_starts * (rec.eval_budget + 50 * (model.n_theta + 1))
    assert -0.5 * rec.deviance >= -0.5 * alone.deviance - 1e-9


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_the_step_off_zero_is_scale_free(schoolcal, scale):
    """An identity level over (x, _cons): the same SD for a slope and an intercept, so the
    model changes with the units of x and its SD's natural size with them. The engine's
    saddle step (1e-3 times the sampling SD) is far too large or too small for some units;
    the fit must reach the dense optimum whatever they are."""
    df = schoolcal.assign(x=schoolcal.year_c * scale)
    res = mlmeta.meregress("stdmdiff ~ x + (1 + x | district) + (1 | district:school)", df,
                           variance="var", covariance={"district": "identity"}, method="ml")
    m, d = res.model, res.model.design
    dense = DenseDeviance(d.y, d.X, d.Z, d.groups, d.variance, "ml", cluster=d.groups[0])
    s = theta_scale(m, res.theta)
    best = -np.inf
    for t in (res.theta, 0.5 * s, s, 0.1 * s):
        from scipy import optimize as so

        r = so.minimize(lambda z: dense(m.T_list(z * s))[0], t / s, method="L-BFGS-B",
                        bounds=[(0, None)] * m.n_theta)
        best = max(best, -0.5 * r.fun)
    assert res.converged
    assert res.llf >= best - 1e-6


def test_an_sd_interval_beyond_the_largest_float_is_inf_without_a_warning():
    """exp(eta + z se) of an SD whose eta is barely identified overflowed with a
    RuntimeWarning from re_params and summary."""
    from mlmeta.vcomp import VarComp, component_table

    comps = [VarComp(0, "g", "sd", (0,), "sd(_cons)", "var(_cons)", 7e-7, False)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for variance in (False, True):
            (_, est, se, lo, hi), = component_table(comps, np.array([[1e6]]), [0], None, None,
                                                    variance=variance)
            assert hi == np.inf and 0.0 <= lo < est


def test_condition_bound_of_the_random_effects_precision(schoolcal):
    """c_condition bounds cond(C), C = I + T'Z'Lambda^-1 Z T, from above up to the number
    of levels (it takes the worst level, not their sum), and not by a hundred times more, on a design
    with a random slope and a crossed level."""
    from dense import dense_ZT

    df = schoolcal.assign(k=np.arange(len(schoolcal)) % 5)
    model, _, _ = build_model("stdmdiff ~ year_c + (1 + year_c | district) + (1 | district:school)"
                              " + (1 | k)", df, variance="var")
    d = model.design
    rng = np.random.default_rng(1)
    for scale in (0.1, 10.0, 1e4):
        theta = np.abs(rng.normal(size=model.n_theta)) * scale
        ZT = dense_ZT(d.Z, d.groups, model.T_list(theta)) / np.sqrt(d.variance)[:, None]
        true = np.linalg.eigvalsh(np.eye(ZT.shape[1]) + ZT.T @ ZT)[-1]
        est = optimize.c_condition(model, theta)
        assert (true - 1) / d.n_levels <= (est - 1) * (1 + 1e-12)
        assert est - 1 <= 100 * (true - 1)


def test_huge_factors_count_in_the_rounding_error():
    assert optimize.rounding_error(1.0, np.zeros(1), np.eye(1), reml=True, kappa=1e12) > \
        optimize.ROUNDING_TOL > optimize.rounding_error(1.0, np.zeros(1), np.eye(1), reml=True,
                                                       kappa=1e6)


def test_a_covariance_whose_variance_the_information_gives_as_negative_has_no_se():
    from mlmeta.vcomp import VarComp, component_table

    comps = [VarComp(0, "g", "sd", (0,), "sd(x)", "var(x)", 0.5, False),
             VarComp(0, "g", "sd", (1,), "sd(_cons)", "var(_cons)", 0.4, False),
             VarComp(0, "g", "corr", ((0, 1),), "corr(x,_cons)", "cov(x,_cons)", 0.3, False)]
    cov = np.array([[1e-2, 0, 0], [0, -1.0, 0], [0, 0, 1e-2]])     # a rounding artefact
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = component_table(comps, cov, [0, 1, 2], None, None, variance=True)
    assert rows[1][2] is None and rows[2][2] is None and rows[0][2] > 0
