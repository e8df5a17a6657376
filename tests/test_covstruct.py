import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlmeta.covstruct import make_structure, STRUCTURES


def _names(q):
    return [f"x{i}" for i in range(q - 1)] + ["_cons"]


@pytest.mark.parametrize("kind", STRUCTURES)
@pytest.mark.parametrize("q", [1, 2, 3, 4])
def test_theta_sigma_roundtrip(kind, q):
    s = make_structure(kind, _names(q))
    rng = np.random.default_rng(q)
    for _ in range(5):
        theta = rng.uniform(0.1, 1.0, s.n_theta)
        S = s.Sigma(theta)
        np.testing.assert_allclose(s.Sigma(s.from_Sigma(S)), S, rtol=1e-10, atol=1e-12)
        vals = s.report_values(theta)
        np.testing.assert_allclose(s.Sigma_from_report(vals), S, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", STRUCTURES)
@settings(max_examples=40, deadline=None)
@given(data=st.data(), q=st.integers(1, 4))
def test_sigma_psd_and_structured(kind, data, q):
    s = make_structure(kind, _names(q))
    theta = np.array([data.draw(st.floats(lo if np.isfinite(lo) else -5.0, 5.0))
                      for lo in s.lower])
    S = s.Sigma(theta)
    assert np.linalg.eigvalsh(S).min() >= -1e-9 * max(1.0, np.abs(S).max())
    if s.kind in ("identity", "exchangeable"):
        np.testing.assert_allclose(np.diag(S), S[0, 0])
    if s.kind in ("identity", "independent") and q > 1:
        np.testing.assert_allclose(S - np.diag(np.diag(S)), 0.0, atol=1e-14)
    if s.kind == "exchangeable" and q > 2:
        off = S[~np.eye(q, dtype=bool)]
        np.testing.assert_allclose(off, off[0], atol=1e-12)


@pytest.mark.parametrize("kind", STRUCTURES)
def test_dT_matches_differences(kind):
    s = make_structure(kind, _names(3))
    theta = np.random.default_rng(0).uniform(0.1, 1, s.n_theta)
    h = 1e-6
    num = np.array([(s.T(theta + h * e) - s.T(theta - h * e)) / (2 * h) for e in np.eye(s.n_theta)])
    np.testing.assert_allclose(s.dT(theta), num, atol=1e-8)


def test_defaults_and_labels():
    assert make_structure(None, ["x", "_cons"], correlated=True).kind == "unstructured"
    assert make_structure(None, ["x", "_cons"], correlated=False).kind == "independent"
    assert make_structure("independent", ["_cons"]).title == "Identity"
    assert make_structure("un", ["x", "_cons"]).kind == "unstructured"
    s = make_structure("unstructured", ["year_c", "_cons"])
    assert s.labels() == ["sd(year_c)", "sd(_cons)", "corr(year_c,_cons)"]
    assert s.labels(variance=True) == ["var(year_c)", "var(_cons)", "cov(year_c,_cons)"]
    assert make_structure("identity", ["a", "_cons"]).labels() == ["sd(a _cons)"]


def test_unknown_structure():
    with pytest.raises(ValueError, match="unknown covariance structure"):
        make_structure("banded", ["x", "_cons"])
    with pytest.raises(ValueError, match="unknown covariance structure"):
        make_structure("", ["x", "_cons"])


CUSTOM = [[["a", .3, None], [.3, "a", None], [None, None, None]],
          [[None, "r", "r"], ["r", 0.5, "r"], ["r", "r", None]],
          [[0.2, None], [None, None]]]


@pytest.mark.parametrize("pattern", CUSTOM)
def test_custom_roundtrip_and_patterns(pattern):
    q = len(pattern)
    s = make_structure(pattern, _names(q))
    rng = np.random.default_rng(q)
    for _ in range(5):
        theta = np.clip(rng.uniform(0.05, 0.6, s.n_theta), s.lower, s.upper)
        S = s.Sigma(theta)
        th2 = s.from_Sigma(S)
        np.testing.assert_allclose(th2, theta, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(s.theta_from_report(s.report_values(theta)), theta, rtol=1e-12)
        sd = np.sqrt(np.diag(S))
        R = S / np.outer(sd, sd)
        for i in range(q):
            for j in range(q):
                v = pattern[i][j]
                if i == j and isinstance(v, float):
                    assert sd[i] == pytest.approx(v, rel=1e-12)
                if i != j and isinstance(v, float):
                    assert R[i, j] == pytest.approx(v, rel=1e-12)
        labels = {}
        for i in range(q):
            for j in range(q):
                v = pattern[i][j]
                if isinstance(v, str):
                    labels.setdefault(v, []).append(sd[i] if i == j else R[i, j])
        for vals in labels.values():
            np.testing.assert_allclose(vals, vals[0], rtol=1e-12)
    h = 1e-6
    theta = np.clip(rng.uniform(0.1, 0.5, s.n_theta), s.lower, s.upper)
    num = np.array([(s.T(theta + h * e) - s.T(theta - h * e)) / (2 * h) for e in np.eye(s.n_theta)])
    np.testing.assert_allclose(s.dT(theta), num, atol=1e-7)


@settings(max_examples=40, deadline=None)
@given(sd1=st.floats(0, 5), sd2=st.floats(0, 5), r=st.floats(-0.999, 0.999))
def test_custom_sigma_psd_inside_bounds(sd1, sd2, r):
    s = make_structure([[None, "."], [".", None]], ["x", "_cons"])     # "." is free, as in Stata
    S = s.Sigma(np.array([sd1, sd2, r]))
    assert np.linalg.eigvalsh(S).min() >= -1e-9 * max(1.0, np.abs(S).max())


def test_unstructured_from_singular_sigma():
    s = make_structure("unstructured", ["x", "_cons"])
    S = np.array([[1.0, 2.0], [2.0, 4.0]])     # correlation 1
    np.testing.assert_allclose(s.Sigma(s.from_Sigma(S)), S, atol=1e-12)


# ---- metafor's structures over a factor's levels ----------------------------------------
LEVELS = ["C(time)[0.25]", "C(time)[0.5]", "C(time)[1.0]", "C(time)[2.0]"]


@pytest.mark.parametrize("name", ["AR", "HAR", "CAR", "HCS"])
def test_factor_structures_are_metafors(name):
    """Sigma as metafor defines it: AR tau^2 rho^|i-j|, HAR tau_i tau_j rho^|i-j|, CAR
    tau^2 rho^|t_i-t_j| over the levels' numeric values, HCS tau_i tau_j rho (i != j);
    theta is its report (SDs, rho), and theta -> Sigma -> theta round-trips."""
    s = make_structure(name, LEVELS, term="study")
    q = len(LEVELS)
    tau = np.array([0.3, 0.5, 0.7, 0.9]) if name in ("HAR", "HCS") else np.full(q, 0.4)
    rho = 0.6
    theta = np.concatenate([tau if name in ("HAR", "HCS") else tau[:1], [rho]])
    i = np.arange(q)
    t = np.array([0.25, 0.5, 1.0, 2.0])
    lag = {"AR": np.abs(i[:, None] - i), "HAR": np.abs(i[:, None] - i),
           "CAR": np.abs(t[:, None] - t), "HCS": (i[:, None] != i).astype(float)}[name]
    np.testing.assert_allclose(s.Sigma(theta), np.outer(tau, tau) * rho ** lag, rtol=1e-14)
    np.testing.assert_allclose(s.T(theta) @ s.T(theta).T, s.Sigma(theta), rtol=1e-12)
    np.testing.assert_allclose(s.from_Sigma(s.Sigma(theta)), theta, rtol=1e-12)
    np.testing.assert_array_equal(s.report_values(theta), theta)
    np.testing.assert_array_equal(s.theta_from_report(theta), theta)
    np.testing.assert_allclose(s.Sigma_from_report(theta), s.Sigma(theta), rtol=1e-15)
    assert s.lower[-1] == (0.0 if name == "CAR" else -s.CORR_BOUND) and s.upper[-1] < 1
    assert (s.lower[:-1] == 0).all() and np.isinf(s.upper[:-1]).all()
    sd_labels = (["sd(C(time))"] if name in ("AR", "CAR") else [f"sd({n})" for n in LEVELS])
    assert s.labels() == sd_labels + ["rho(C(time))"]
    assert s.labels(variance=True)[-1] == "rho(C(time))"
    assert s.labels(variance=True)[0].startswith("var(")
    assert [k for k, _ in s.report_params()] == ["sd"] * (len(theta) - 1) + ["rho"]
    h = 1e-6
    num = np.array([(s.T(theta + h * e) - s.T(theta - h * e)) / (2 * h) for e in np.eye(theta.size)])
    np.testing.assert_allclose(s.dT(theta), num, atol=1e-7)


def test_factor_structure_names_and_two_levels():
    assert make_structure("ar", LEVELS).title == "AR(1)"
    assert make_structure(" Har ", LEVELS).title == "HAR(1)"
    assert make_structure("CAR", LEVELS).title == "CAR(1)"
    assert make_structure("hcs", ["x", "_cons"]).labels() == ["sd(x)", "sd(_cons)", "rho(x,_cons)"]
    for alias, kind in [("CS", "exchangeable"), ("un", "unstructured"), ("DIAG", "independent"),
                        ("Id", "identity"), ("exch", "exchangeable"), ("ind", "independent")]:
        assert make_structure(alias, LEVELS).kind == kind
    two = make_structure("AR", LEVELS[:2])                # one correlation: rho itself
    assert two.n_theta == 2 and two.Sigma([1.0, 0.3])[0, 1] == pytest.approx(0.3)
    with pytest.raises(ValueError, match="'CAR' of 'g' needs numeric levels"):
        make_structure("CAR", ["C(arm)[a]", "C(arm)[b]"], term="g")
    with pytest.raises(ValueError, match="'AR' needs a term whose effects are the levels"):
        make_structure("AR", ["C(time)[T.2]", "C(time)[T.3]"])     # contrasts: an intercept
    with pytest.raises(ValueError, match="'HAR' needs two or more levels"):
        make_structure("HAR", ["C(time)[1]"])
    with pytest.raises(ValueError, match="unknown covariance structure 'ARMA'"):
        make_structure("ARMA", LEVELS)


def test_custom_lags_validation_and_rho_range():
    from mlmeta.covstruct import Custom

    free = [[None, "r", "r"], ["r", None, "r"], ["r", "r", None]]
    with pytest.raises(ValueError, match="non-integer lag d needs rho >= 0"):
        Custom(["a", "b", "c"], free, lags=[[0, 0.5, 1], [0.5, 0, 1], [1, 1, 0]])
    with pytest.raises(ValueError, match="lags must be symmetric"):
        Custom(["a", "b", "c"], free, lags=[[0, 1, 2], [2, 0, 1], [1, 1, 0]])
    with pytest.raises(ValueError, match="positive numbers off the diagonal"):
        Custom(["a", "b", "c"], free, lags=[[0, 0, 1], [0, 0, 1], [1, 1, 0]])
    s = Custom(["a", "b", "c"], free)                     # exchangeable: rho > -1/2
    lo, hi = s.rho_range([1.0, 1.0, 1.0, 0.3], 3)
    assert lo == pytest.approx(-0.5, abs=1e-9) and lo > -0.5 and hi == s.CORR_BOUND
    car = make_structure("CAR", LEVELS)
    assert car.rho_range([1.0, 0.5], 1) == (0.0, car.CORR_BOUND)


@pytest.mark.parametrize("kind", STRUCTURES)
def test_constant_dT_is_made_once_per_type_and_size(kind):
    """The linear structures' dT does not depend on theta: one read-only array per type and
    number of effects, the same numbers as T's differences, another size another array."""
    s, t = make_structure(kind, _names(3)), make_structure(kind, _names(3))
    assert s.dT(np.zeros(s.n_theta)) is t.dT(np.ones(t.n_theta))
    assert not s.dT(np.zeros(s.n_theta)).flags.writeable
    e = np.eye(s.n_theta)
    want = np.array([s.T(e[i]) - s.T(np.zeros(s.n_theta)) for i in range(s.n_theta)])
    np.testing.assert_array_equal(s.dT(np.zeros(s.n_theta)), want)
    u = make_structure(kind, _names(2))
    assert u.dT(np.zeros(u.n_theta)).shape == (u.n_theta, 2, 2)
