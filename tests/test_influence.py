"""Influence diagnostics against metafor (rma.mv) and lme4 (influence.merMod), and against
dense NumPy computations and refits from scratch.

The references were made by tests/reference/make_influence.R. Every value is compared at
1e-4 relative; entries close to zero (a deletion that barely moves the estimates) are
differences of two nearly equal optima, so an absolute floor of 1e-7 times the column's
largest value applies to them.
"""

import warnings

import numpy as np
import pandas as pd
import pytest

import mlmeta
from mlmeta.influence import hat_diagonals, marginal_weights
from references import case_data, load

REF = load("influence_reference")
RTOL = 1e-4


def _close(actual, expected):
    expected = np.asarray(expected, dtype=float)
    np.testing.assert_allclose(np.asarray(actual, dtype=float), expected, rtol=RTOL,
                               atol=1e-7 * np.nanmax(np.abs(expected)))


def berkey_V(dat):
    """The bundled covariance of berkey: per trial, rows' variances and their covariance."""
    return [g[["v1i", "v2i"]].to_numpy() for _, g in dat.groupby("trial", sort=True)]


def _meta_fit(case, fitted):
    if "variance" in case:
        return fitted(case["formula"], case["data"], variance=case["variance"], method=case["method"])
    dat = mlmeta.datasets.load(case["data"])
    return mlmeta.meregress(case["formula"], dat, V=berkey_V(dat), method=case["method"])


@pytest.fixture(scope="module")
def meta_influence(fitted):
    cache = {}

    def get(name):
        if name not in cache:
            case = REF["meta"][name]
            res = _meta_fit(case, fitted)
            cache[name] = (res.influence(), res.influence(cluster=case["cluster"]))
        return cache[name]
    return get


@pytest.mark.parametrize("name", sorted(REF["meta"]))
def test_rows_match_metafor(name, meta_influence):
    rows = REF["meta"][name]["rows"]
    inf, _ = meta_influence(name)
    coefs = sorted(rows["dfbetas"], key=lambda c: c == "_cons")     # mlmeta: _cons last
    assert list(inf.columns) == ["cooks_distance", "hat", "rstudent"] + [f"dfbetas:{c}" for c in coefs]
    for col in ("cooks_distance", "hat", "rstudent"):
        _close(inf[col], rows[col])
    for c, values in rows["dfbetas"].items():
        _close(inf[f"dfbetas:{c}"], values)
    pd.testing.assert_index_equal(inf.index, mlmeta.datasets.load(REF["meta"][name]["data"]).index)


@pytest.mark.parametrize("name", sorted(REF["meta"]))
def test_clusters_match_metafor(name, meta_influence):
    ref = REF["meta"][name]["clusters"]
    _, inf = meta_influence(name)
    assert [str(x) for x in inf.index] == ref["labels"] and inf.index.name == ref["name"]
    assert list(inf.columns[:2]) == ["cooks_distance", "X2"]
    _close(inf.cooks_distance, ref["cooks_distance"])
    _close(inf.X2, ref["X2"])
    for c, values in ref["dfbetas"].items():
        _close(inf[f"dfbetas:{c}"], values)
    assert inf.attrs["failed"] == [] and inf.attrs["not_converged"] == []


@pytest.fixture(scope="module")
def mixed_influence():
    cache = {}

    def get(name):
        if name not in cache:
            case = REF["mixed"][name]
            res = mlmeta.mixed(case["formula"], case_data(case["data"]), method=case["method"])
            cache[name] = (res, res.influence(), res.influence(cluster=case["cluster"]))
        return cache[name]
    return get


@pytest.mark.parametrize("name", sorted(REF["mixed"]))
def test_mixed_match_lme4(name, mixed_influence):
    ref = REF["mixed"][name]
    res, rows, clusters = mixed_influence(name)
    for c, b in ref["fit"]["fixef"].items():
        assert res.params[c] == pytest.approx(b, rel=1e-7)
    for col in ("cooks_distance", "hat", "rstudent"):
        _close(rows[col], ref["rows"][col])
    for c, values in ref["rows"]["dfbetas"].items():
        _close(rows[f"dfbetas:{c}"], values)
    assert [str(x) for x in clusters.index] == ref["clusters"]["labels"]
    for col in ("cooks_distance", "X2"):
        _close(clusters[col], ref["clusters"][col])
    for c, values in ref["clusters"]["dfbetas"].items():
        _close(clusters[f"dfbetas:{c}"], values)


# --------------------------------------------------------------------------- dense checks
def _dense_V(res, theta):
    """Marginal covariance over the model-frame rows, built densely."""
    f = res.frame
    V = np.diag(np.asarray(f.extra["variance"], dtype=float))
    for Z, g, S in zip(f.Z, f.groups, res.model.Sigma_list(theta)):
        V += (Z @ S @ Z.T) * (np.asarray(g)[:, None] == np.asarray(g)[None, :])
    return V


def test_fixed_variance_components_match_dense_gls(fitted):
    """reestimate=False: b_(-i) is the GLS estimate of the other rows at theta-hat; every
    statistic is recomputed here from the dense n x n covariance."""
    res = fitted("stdmdiff ~ year_c + (1 | district) + (1 | district:school)", "schoolcal",
                 variance="var")
    inf = res.influence(reestimate=False)
    X, y = res.frame.X, res.frame.y
    V = _dense_V(res, res.theta)
    b, Vb = res.params.values, res.cov_params().values
    cooks, rstud, dfb = [], [], []
    for i in range(len(y)):
        k = np.arange(len(y)) != i
        A = np.linalg.inv(X[k].T @ np.linalg.solve(V[np.ix_(k, k)], X[k]))
        bi = A @ X[k].T @ np.linalg.solve(V[np.ix_(k, k)], y[k])
        cooks.append((b - bi) @ np.linalg.solve(Vb, b - bi))
        dfb.append((b - bi) / np.sqrt(np.diag(Vb)))
        rstud.append((y[i] - X[i] @ bi) / np.sqrt(V[i, i] + X[i] @ A @ X[i]))
    W = np.linalg.inv(V)
    hat = np.diag(X @ Vb @ X.T @ W)
    np.testing.assert_allclose(inf.cooks_distance, cooks, rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(inf.rstudent, rstud, rtol=1e-10)
    np.testing.assert_allclose(inf.hat, hat, rtol=1e-10)
    np.testing.assert_allclose(inf[["dfbetas:year_c", "dfbetas:_cons"]], dfb, rtol=1e-9, atol=1e-11)
    assert inf.attrs["reestimate"] is False
    d = res.model.design
    w = marginal_weights(res.model, res.theta)
    np.testing.assert_allclose(w, np.diag(W)[d.perm], rtol=1e-12)


def test_mixed_hat_and_residuals_dense(fitted):
    """lme4's conditional hat values: y-hat = X b + Z u-hat = H y, H computed densely."""
    res = fitted("stdmdiff ~ year_c + (1 | district)", "schoolcal", kind="mixed")
    f, d = res.frame, res.model.design
    S = res.re_cov["district"].values
    g = np.asarray(f.groups[0])
    G = (f.Z[0] @ S @ f.Z[0].T) * (g[:, None] == g[None, :])
    V = G + res.scale * np.eye(len(g))
    Vi = np.linalg.inv(V)
    A = np.linalg.inv(f.X.T @ Vi @ f.X)
    Hx = f.X @ A @ f.X.T @ Vi
    H = Hx + G @ Vi @ (np.eye(len(g)) - Hx)
    h, P, Py = hat_diagonals(res.model, res.theta)
    np.testing.assert_allclose((1 - res.scale * P)[np.argsort(d.perm)], np.diag(H), rtol=1e-9)
    np.testing.assert_allclose(res.scale * Py[np.argsort(d.perm)], res.predict("residuals"),
                               rtol=1e-8, atol=1e-12)
    inf = res.influence()
    np.testing.assert_allclose(inf.hat, np.diag(H), rtol=1e-9)


def test_deletion_fits_equal_fits_from_scratch():
    """Warm-started deletion refits reach the optimum a full fit of the reduced data finds,
    also when the full-data variance is on the boundary (it is started off zero)."""
    df = pd.DataFrame({
        "y": [0.308, -0.003, 0.057, 0.572, 0.373, -0.007, 0.116, 0.096, 0.105, 0.128],
        "v": [0.084, 0.085, 0.061, 0.043, 0.024, 0.051, 0.053, 0.024, 0.024, 0.1],
        "study": range(10)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = mlmeta.meregress("y ~ 1 + (1 | study)", df, variance="v")
        assert res.theta[0] < 1e-10                     # tau^2 = 0 on the full data
        scratch = [mlmeta.meregress("y ~ 1 + (1 | study)", df.drop(index=i), variance="v")
                   for i in range(len(df))]
    assert max(s.theta[0] for s in scratch) > 0.03     # ... but not without some rows
    inf = res.influence()
    b, se = res.params["_cons"], res.bse["_cons"]
    bd = np.array([s.params["_cons"] for s in scratch])
    np.testing.assert_allclose(inf.cooks_distance, (b - bd) ** 2 / se ** 2, rtol=1e-6, atol=1e-12)


@pytest.mark.filterwarnings("ignore::mlmeta.BoundaryWarning")
def test_deleting_clusters_equals_refitting_without_them():
    dat = mlmeta.datasets.load("berkey")
    res = mlmeta.meregress("yi ~ 0 + outcome + (0 + outcome | trial)", dat, variance="vi")
    inf = res.influence(cluster="trial")
    for t in inf.index:
        sub = dat[dat.trial != t]
        r = mlmeta.meregress("yi ~ 0 + outcome + (0 + outcome | trial)", sub, variance="vi")
        delta = res.params.values - r.params.values
        assert inf.loc[t, "cooks_distance"] == pytest.approx(
            delta @ np.linalg.solve(res.cov_params().values, delta), rel=1e-6)


# --------------------------------------------------------------------------- interface
def test_cluster_given_as_column_array_or_series(fitted):
    res = fitted("stdmdiff ~ 1 + (1 | district) + (1 | district:school)", "schoolcal",
                 variance="var")
    dat = mlmeta.datasets.load("schoolcal")
    by_term = res.influence(cluster="district")
    by_col = res.influence(cluster="district", data=dat)       # a term: data not needed
    by_array = res.influence(cluster=dat.district.to_numpy())
    by_series = res.influence(cluster=dat.district.iloc[::-1])  # aligned on the index
    for other in (by_col, by_array, by_series):
        np.testing.assert_allclose(other.values, by_term.values, rtol=1e-12)
    per_school = res.influence(cluster="district:school")
    assert per_school.index.names == ["district", "school"] and len(per_school) == 56
    rows = res.influence()
    order = np.lexsort((dat.school, dat.district))
    np.testing.assert_allclose(per_school.cooks_distance.values, rows.cooks_distance.values[order],
                               rtol=1e-10)
    by_year = res.influence(cluster="year", data=dat)
    assert by_year.index.name == "year" and list(by_year.index) == sorted(dat.year.unique())


def test_index_of_used_rows_and_failed_deletions():
    """Rows with missing values are not in the output; a deletion that leaves a moderator
    without data gives NaN (metafor's NA) and is listed in attrs['failed']."""
    dat = mlmeta.datasets.load("schoolcal").copy()
    dat.index = [f"r{i}" for i in range(len(dat))]
    dat.loc["r3", "stdmdiff"] = np.nan
    dat["single"] = 0.0
    dat.loc["r10", "single"] = 1.0
    with pytest.warns(mlmeta.MissingDataWarning):
        res = mlmeta.meregress("stdmdiff ~ single + (1 | district) + (1 | district:school)", dat,
                               variance="var")
    inf = res.influence()
    assert list(inf.index) == [r for r in dat.index if r != "r3"]
    assert inf.attrs["failed"] == ["r10"]
    assert inf.loc["r10", ["cooks_distance", "dfbetas:single", "rstudent"]].isna().all()
    assert np.isfinite(inf.drop(index="r10").cooks_distance).all()
    assert np.isfinite(inf.hat).all()


def test_constrained_coefficient_has_no_dfbetas(fitted):
    res = fitted("stdmdiff ~ year_c + (1 | district) + (1 | district:school)", "schoolcal",
                 variance="var", constraints=["year_c = 0.005"])
    inf = res.influence(cluster="district")
    assert inf["dfbetas:year_c"].isna().all()
    assert np.isfinite(inf[["cooks_distance", "X2", "dfbetas:_cons"]].values).all()


def test_bad_arguments(fitted):
    res = fitted("stdmdiff ~ 1 + (1 | district) + (1 | district:school)", "schoolcal",
                 variance="var")
    dat = mlmeta.datasets.load("schoolcal")
    with pytest.raises(ValueError, match="single cluster"):
        res.influence(cluster=np.ones(56))
    with pytest.raises(ValueError, match="pass data="):
        res.influence(cluster="year")
    with pytest.raises(ValueError, match="unknown column"):
        res.influence(cluster="nope", data=dat)
    with pytest.raises(ValueError, match="55 values"):
        res.influence(cluster=np.arange(55))
    with pytest.raises(ValueError, match="reestimate"):
        res.influence(reestimate="yes")
    with pytest.raises(ValueError, match="n_jobs"):
        res.influence(n_jobs=0)
