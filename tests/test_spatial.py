"""Spatial correlation structures (metafor's SPEXP, SPGAU, SPLIN, SPRAT, SPSPH with
``dist=``): fits against metafor (tests/reference/make_spatial_references.R), the engine
against a dense likelihood, the analytic gradient against finite differences, and bad
input."""

import warnings

import numpy as np
import pandas as pd
import pytest
from dense import dense_loglik
from references import data_path, load

import mlmeta
from mlmeta.covspatial import SPATIAL_STRUCTURES, spatial_correlation

FORMULA = "yi ~ x1 + (1 | study) + (1 | site)"
CASES = load("spatial_reference")["cases"]


def _data():
    return pd.read_csv(data_path("spatial_sim.csv"))


def _coords(df):
    return df.groupby("site")[["lon", "lat"]].first()


def _manhattan():
    return pd.read_csv(data_path("spatial_manhattan.csv"), index_col=0)


@pytest.mark.parametrize("key", sorted(CASES))
def test_spatial_fit_matches_metafor(key):
    case = CASES[key]
    df = _data()
    dist = _coords(df) if case["dist"] == "euclidean" else _manhattan()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mlmeta.ConvergenceWarning)
        res = mlmeta.meregress(FORMULA, df, variance="vi", method=case["method"],
                               covariance={"site": case["struct"]}, dist={"site": dist})
    rho = res.re_params().set_index(["group", "param"]).estimate[("site", "rho")]
    if not res.converged:
        # SPLIN's R(rho) has a kink wherever rho equals a distance between two sites, and
        # its ML optimum here lies on one: no zero gradient there, honestly not converged
        assert case["struct"] == "SPLIN"
        C = _coords(df).to_numpy()
        D = np.sqrt(((C[:, None, :] - C[None, :, :]) ** 2).sum(-1))
        assert np.abs(D - rho).min() < 1e-6 * rho
    assert res.llf == pytest.approx(case["loglik"], rel=1e-6)
    # metafor: (intrcpt, x1); mlmeta: (x1, _cons)
    np.testing.assert_allclose(res.params[["_cons", "x1"]], case["beta"], rtol=1e-5)
    np.testing.assert_allclose(res.bse[["_cons", "x1"]], case["se"], rtol=1e-4)
    vc = res.re_params().set_index(["group", "param"]).estimate
    assert vc[("study", "sd(_cons)")] ** 2 == pytest.approx(case["sigma2_study"], rel=1e-4)
    assert vc[("site", "sd(_cons)")] ** 2 == pytest.approx(case["tau2"], rel=1e-4)
    assert vc[("site", "rho")] == pytest.approx(case["rho"], rel=1e-4)
    if case.get("loglik_default_start") is not None:
        # metafor's default start stops lower; the fit must not
        assert res.llf > case["loglik_default_start"] + 1e-3


def test_summary_names_the_structure_and_prints_rho():
    df = _data()
    res = mlmeta.meregress(FORMULA, df, variance="vi", covariance={"site": "spexp"},
                           dist={"site": _coords(df)})
    text = str(res.summary())
    assert "site: Spatial exponential (SPEXP)" in text
    row = res.re_params().set_index(["group", "param"]).loc[("site", "rho")]
    assert row.lower < row.estimate < row.upper and row.std_err > 0
    assert list(res.groups.nesting) == ["top", "crossed"]


def test_distance_inputs_agree():
    """Coordinates, a labelled distance matrix with extra sites, and an array in sorted
    label order give one fit."""
    df = _data()
    C = _coords(df)
    D = np.sqrt(((C.to_numpy()[:, None, :] - C.to_numpy()[None, :, :]) ** 2).sum(-1))
    labelled = pd.DataFrame(D, index=C.index, columns=C.index)
    extra = pd.concat([labelled, pd.DataFrame(7.0, index=["zz"], columns=C.index)])
    extra["zz"] = 7.0
    extra.loc["zz", "zz"] = 0.0
    fits = [mlmeta.meregress(FORMULA, df, variance="vi", covariance={"site": "SPGAU"},
                             dist={"site": d}, method="ml").llf for d in (C, extra, D)]
    assert fits[1] == pytest.approx(fits[0], rel=1e-10)
    assert fits[2] == pytest.approx(fits[0], rel=1e-10)


def _spatial_model(form, method="reml"):
    """The model of a fit stopped at its start (no iterations)."""
    df = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mlmeta.ConvergenceWarning)
        res = mlmeta.meregress(FORMULA, df, variance="vi", method=method, covariance={"site": form},
                               dist={"site": _coords(df)}, em_iter=0, maxiter=0)
    return res.model, df


def _dense_ll(model, theta):
    """-0.5 deviance from a dense V = diag(v) + s1^2 Z1 Z1' + s2^2 Z2 R(rho) Z2'."""
    d = model.design
    y, X = d.y, d.X
    V = np.diag(d.variance)
    s_tree = model.structs[0].T(theta[model.theta_slices[0]])[0, 0]
    V += s_tree ** 2 * (d.groups[0][:, None] == d.groups[0][None, :])
    sp = model.structs[1]
    th = theta[model.theta_slices[1]]
    Z = np.eye(d.n_groups[1])[d.groups[1]]
    V += th[0] ** 2 * Z @ sp.correlation(th) @ Z.T
    return dense_loglik(y, X, V, model.method)[0]


@pytest.mark.parametrize("form", SPATIAL_STRUCTURES)
@pytest.mark.parametrize("method", ["reml", "ml"])
def test_engine_matches_dense_likelihood_and_gradient(form, method):
    model, _ = _spatial_model(form, method)
    rng = np.random.default_rng(7)
    sp = model.structs[1]
    for _ in range(3):
        theta = np.array([rng.uniform(0.1, 0.5), rng.uniform(0.3, 1.0),
                          rng.uniform(0.5, 3.0) / sp.unit])
        try:
            ev = model.evaluate(theta, gradient=True)
        except FloatingPointError:        # SPLIN in two dimensions: R(rho) indefinite
            assert form == "SPLIN"
            assert np.linalg.eigvalsh(sp.correlation(theta[1:])).min() < -1e-10
            continue
        assert -0.5 * ev.deviance == pytest.approx(_dense_ll(model, theta), rel=1e-10)
        fd = []
        for i in range(model.n_theta):
            h = 1e-6 * max(1.0, abs(theta[i]))
            e = np.zeros(model.n_theta)
            e[i] = h
            fd.append((model.deviance(theta + e) - model.deviance(theta - e)) / (2 * h))
        np.testing.assert_allclose(ev.grad, fd, rtol=1e-5, atol=1e-6)


def test_correlation_formulas_and_derivatives():
    d = np.array([0.0, 0.3, 1.0, 2.5])
    rho = 1.7
    x = d / rho
    expect = {"SPEXP": np.exp(-x), "SPGAU": np.exp(-x ** 2),
              "SPLIN": np.where(x < 1, 1 - x, 0), "SPRAT": 1 - x ** 2 / (1 + x ** 2),
              "SPSPH": np.where(x < 1, 1 - 1.5 * x + 0.5 * x ** 3, 0)}
    for form, R in expect.items():
        got, dR = spatial_correlation(form, d, rho)
        np.testing.assert_allclose(got, R, rtol=1e-14)
        h = 1e-6
        fd = (spatial_correlation(form, d, rho + h)[0] - spatial_correlation(form, d, rho - h)[0]) / (2 * h)
        np.testing.assert_allclose(dR, fd, rtol=1e-6, atol=1e-9)


def test_singular_R_does_not_stop_the_fit():
    """SPGAU at a long range (R numerically rank one) and two sites at one place: the
    objective stays defined, and the fit ends at an optimum."""
    model, df = _spatial_model("SPGAU")
    sp = model.structs[1]
    theta = np.array([0.2, 0.5, 500.0 / sp.unit])
    assert np.linalg.eigvalsh(sp.correlation(theta[1:])).min() < 1e-12
    assert np.isfinite(model.evaluate(theta, gradient=True).grad).all()
    C = _coords(df)
    C.iloc[1] = C.iloc[0].to_numpy()
    res = mlmeta.meregress(FORMULA, df, variance="vi", covariance={"site": "SPGAU"},
                           dist={"site": C})
    assert res.converged and np.isfinite(res.llf)


def test_mixed_accepts_dist():
    df = _data()
    res = mlmeta.mixed(FORMULA, df, covariance={"site": "SPEXP"}, dist={"site": _coords(df)})
    assert res.converged
    assert "Spatial exponential (SPEXP)" in str(res.summary())


def _bad(df, **kw):
    opts = dict(variance="vi", covariance={"site": "SPEXP"}, dist={"site": _coords(df)})
    opts.update(kw)
    formula = opts.pop("formula", FORMULA)
    return mlmeta.meregress(formula, df, **opts)


def _labelled(df):
    C = _coords(df).to_numpy()
    D = np.sqrt(((C[:, None, :] - C[None, :, :]) ** 2).sum(-1))
    labels = _coords(df).index
    return pd.DataFrame(D, index=labels, columns=labels)


@pytest.mark.parametrize("change, match", [
    (lambda D: D - 1.0 * (D > 0), "dist\\['site'\\] has negative distances"),
    (lambda D: D.mask(D == D.iloc[2, 3]), "non-finite distances"),
    (lambda D: D + np.triu(np.full(D.shape, 0.5), 1), "dist\\['site'\\] is not symmetric"),
    (lambda D: D + np.eye(D.shape[0]), "non-zero diagonal"),
    (lambda D: D.drop(index=D.index[0], columns=D.columns[0]), "no entry for 1 group"),
])
def test_bad_distance_matrices_are_refused(change, match):
    df = _data()
    with pytest.raises(ValueError, match=match):
        _bad(df, dist={"site": change(_labelled(df))})


def test_bad_spatial_specifications_are_refused():
    df = _data()
    with pytest.raises(ValueError, match="covariance 'SPEXP' of 'site' needs the distances"):
        _bad(df, dist=None)
    with pytest.raises(ValueError, match="dist= gives distances for 'site', but its covariance"):
        _bad(df, covariance=None)
    with pytest.raises(ValueError, match="not in the formula"):
        _bad(df, dist={"site": _coords(df), "place": _coords(df)})
    with pytest.raises(ValueError, match="applies to a random intercept \\(1 \\| site\\)"):
        _bad(df, formula="yi ~ x1 + (1 | study) + (0 + x1 | site)")
    with pytest.raises(ValueError, match="must be 60 x 60"):
        _bad(df, dist={"site": np.zeros((3, 3))})
    with pytest.raises(ValueError, match="numeric columns only"):
        _bad(df, dist={"site": _coords(df).assign(name="a")})
    with pytest.raises(ValueError, match="both a known correlation matrix R and a spatial"):
        _bad(df, R={"site": np.eye(60)})
    with pytest.raises(ValueError, match="two or more groups at different places"):
        _bad(df, dist={"site": _coords(df) * 0.0})
    with pytest.raises(ValueError, match="spatial structure\\) needs another random term"):
        _bad(df, formula="yi ~ x1 + (1 | site)")
