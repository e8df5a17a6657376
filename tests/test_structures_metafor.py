"""metafor's covariance structures (AR, HAR, CAR, HCS, CS, UN, DIAG, ID) against
metafor 3.8 (tests/reference/make_structures_metafor.R): longitudinal meta-analyses
with a known sampling covariance (metadat's dat.ishak2007) and with sampling variances
(a simulated data set with unequally spaced times), REML and ML."""

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import mlmeta
from references import case_data, data_path, load

REF = load("structures_metafor")
CASES = REF["cases"]


def _fit(name):
    """The case's mlmeta fit: yi ~ 0 + C(time) + (0 + C(factor) | study), V or vi."""
    case = CASES[name]
    df = case_data(case["data"])
    if case["V"] is None:
        kw = {"variance": "vi"}
    else:        # the known sampling covariance, stored in long form (1-based rows, cols)
        t = pd.read_csv(data_path(Path(case["V"]).name))
        kw = {"V": sparse.csr_matrix((t["value"], (t["row"] - 1, t["col"] - 1)),
                                     shape=(len(df), len(df)))}
    formula = f"yi ~ 0 + C(time) + (0 + C({case['factor']}) | study)"
    with warnings.catch_warnings(record=True) as caught:    # UN: a singular optimum, as metafor's
        warnings.simplefilter("always", mlmeta.BoundaryWarning)
        res = mlmeta.meregress(formula, df, method=case["method"],
                               covariance={"study": case["struct"]}, **kw)
    assert all(issubclass(w.category, mlmeta.BoundaryWarning) for w in caught)
    return case, res


@pytest.fixture(scope="module")
def fits():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = _fit(name)
        return cache[name]
    return get


@pytest.mark.parametrize("name", sorted(CASES))
def test_agrees_with_metafor(name, fits):
    """llf to 1e-6 (relative), beta 1e-5, SEs 1e-4, tau (SDs) 1e-4 relative, rho 1e-4."""
    case, res = fits(name)
    assert res.converged
    # only UN's optimum is on the boundary (G singular: metafor's smallest eigenvalue ~1e-13)
    assert bool(res.boundary) == (case["struct"] == "UN" and name.startswith("ishak"))
    assert res.llf >= case["loglik"] - 1e-6 * abs(case["loglik"])
    assert res.llf == pytest.approx(case["loglik"], rel=1e-6)
    np.testing.assert_allclose(res.params.values, case["beta"], rtol=1e-5)
    np.testing.assert_allclose(res.bse.values, case["se"], rtol=1e-4)
    G = np.array(case["G"])
    S = res.re_cov["study"].values
    q = G.shape[0]
    np.testing.assert_allclose(S, G, rtol=0, atol=1e-4 * np.abs(G).max())
    np.testing.assert_allclose(np.sqrt(np.diag(S)),
                               np.sqrt(np.broadcast_to(case["tau2"], q)), rtol=1e-4)
    s = res.model.structs[0]
    params = res.re_params()
    if case["struct"] in ("AR", "HAR", "CAR", "HCS", "CS"):
        kind = "corr" if case["struct"] == "CS" else "rho"
        rho = params.loc[params.param.str.startswith(kind + "("), "estimate"]
        assert rho.size == 1
        assert float(rho.iloc[0]) == pytest.approx(case["rho"], abs=1e-4)
    if case["struct"] == "UN":       # metafor's rho: the lower triangle, column by column
        sd = np.sqrt(np.diag(S))
        R = S / np.outer(sd, sd)
        np.testing.assert_allclose(R[np.triu_indices(q, 1)], case["rho"], atol=1e-4)
    expected_kind = {"AR": "custom", "HAR": "custom", "CAR": "custom", "HCS": "custom",
                     "CS": "exchangeable", "UN": "unstructured", "DIAG": "independent",
                     "ID": "identity"}[case["struct"]]
    assert s.kind == expected_kind


@pytest.mark.parametrize("name", sorted(n for n in CASES if CASES[n]["profile_ci"]))
def test_profile_intervals_agree_with_metafor(name, fits):
    """Profile-likelihood intervals of tau^2 and rho (metafor's confint)."""
    case, res = fits(name)
    ci = res.profile_ci()
    var = ci.iloc[0]
    rho = ci.iloc[1]
    assert rho.param.startswith("rho(")
    np.testing.assert_allclose([var.lower, var.upper], case["profile_ci"]["tau2"], rtol=1e-4)
    np.testing.assert_allclose([rho.lower, rho.upper], case["profile_ci"]["rho"], atol=1e-4)


def test_summary_labels(fits):
    """The summary names the structure, one SD (AR, CAR) or one per level (HAR) and rho."""
    _, res = fits("ishak_ar_reml")
    text = res.summary().as_text()
    assert "study: AR(1)" in text
    assert "sd(C(time))" in text and "rho(C(time))" in text
    var = res.re_params(variance=True)
    assert list(var.param) == ["var(C(time))", "rho(C(time))"]
    assert var.estimate.iloc[1] == pytest.approx(res.re_params().estimate.iloc[1], rel=1e-14)
    _, res = fits("ishak_har_reml")
    text = res.summary().as_text()
    assert "study: HAR(1)" in text and "rho(C(time))" in text
    assert all(f"sd(C(time)[{k}])" in text for k in (1, 2, 3, 4))
    _, res = fits("ishak_car_reml")
    assert "study: CAR(1)" in res.summary().as_text()
    assert list(res.re_params().param) == ["sd(C(years))", "rho(C(years))"]


ISHAK = "yi ~ 0 + C(time) + (0 + C(time) | study)"


@pytest.mark.filterwarnings("ignore::mlmeta.BoundaryWarning")
@pytest.mark.parametrize("names", [("CS", "cs", "exchangeable", "exch"),
                                   ("UN", "un", "Unstructured", "unstr"),
                                   ("DIAG", "diag", "independent", "ind"),
                                   ("ID", "Id", "identity"),
                                   ("AR", "ar", " Ar "), ("HAR", "har"), ("HCS", "hcs")])
def test_names_are_case_insensitive_aliases(names):
    df = case_data(CASES["sim_ar_reml"]["data"])
    llf = {n: mlmeta.meregress(ISHAK, df, variance="vi", covariance={"study": n}).llf
           for n in names}
    assert len(set(llf.values())) == 1


def _longitudinal():
    df = case_data(CASES["sim_ar_reml"]["data"]).copy()
    df["x"] = np.linspace(-1, 1, len(df))
    df["arm"] = np.array(["a", "b", "c"])[np.arange(len(df)) % 3]
    df["one"] = 1
    return df


@pytest.mark.parametrize("formula, cov, match", [
    ("yi ~ 1 + (1 + C(time) | study)", "AR",
     r"covariance 'AR' of 'study' needs a term whose effects are the levels of one factor"),
    ("yi ~ 1 + (0 + x | study)", "HAR", r"'HAR' of 'study' needs .* levels of one factor.*\['x'\]"),
    ("yi ~ 1 + (1 + x | study)", "CAR", r"'CAR' of 'study' needs .* levels of one factor"),
    ("yi ~ 1 + (0 + C(time) + C(arm) | study)", "AR", r"levels of one factor"),
    ("yi ~ 1 + (0 + C(arm) | study)", "car",
     r"'CAR' of 'study' needs numeric levels \(the times\).*\['a', 'b', 'c'\]"),
    ("yi ~ 1 + (0 + C(one) | study)", "AR", r"'AR' of 'study' needs two or more levels"),
    ("yi ~ 1 + (1 | study)", "HCS", r"'HCS' of 'study' needs two or more levels"),
    ("yi ~ 1 + (1 | study)", "banded", r"unknown covariance structure 'banded'.*AR, HAR, CAR, HCS"),
])
def test_bad_structures_name_the_term_and_problem(formula, cov, match):
    with pytest.raises(ValueError, match=match):
        mlmeta.meregress(formula, _longitudinal(), variance="vi", covariance={"study": cov})


@pytest.mark.filterwarnings("ignore::mlmeta.BoundaryWarning")
def test_hcs_on_any_effects_and_ar_in_mixed_models():
    """HCS needs no factor (a free SD per effect, one correlation); AR and CAR also fit
    raw-data mixed models (lme4 semantics, the residual variance profiled)."""
    df = _longitudinal()
    res = mlmeta.meregress("yi ~ x + (1 + x | study)", df, variance="vi",
                           covariance={"study": "HCS"})
    assert list(res.re_params().param) == ["sd(x)", "sd(_cons)", "rho(x,_cons)"]
    rng = np.random.default_rng(3)
    t = np.tile(np.repeat([0.0, 1.0, 2.5, 4.0], 2), 30)
    subj = np.repeat(np.arange(30), 8)
    u = rng.normal(size=(30, 4)) @ np.linalg.cholesky(0.6 ** np.abs(np.subtract.outer(
        [0, 1, 2.5, 4], [0, 1, 2.5, 4]))).T
    y = 1 + 0.1 * t + u[subj, np.searchsorted([0, 1, 2.5, 4], t)] + rng.normal(scale=0.5, size=t.size)
    raw = pd.DataFrame({"y": y, "t": t, "subj": subj})
    for name in ("AR", "CAR"):
        fit = mlmeta.mixed("y ~ C(t) + (0 + C(t) | subj)", raw, covariance={"subj": name})
        rho = fit.re_params().estimate.iloc[1]
        assert fit.converged and 0 < rho < 1
        assert f"subj: {name}(1)" in fit.summary().as_text()
