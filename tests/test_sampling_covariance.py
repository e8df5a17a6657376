"""Known sampling covariance V (full blocks): kernel paths against dense NumPy, validation,
and the multivariate Berkey et al. (1998) example."""

import numpy as np
import pytest
from scipy import sparse

import mlmeta
from dense import dense_loglik, dense_V, dense_Z
from mlmeta.covstruct import make_structure
from mlmeta.design import build_design
from mlmeta.model import NestedModel
from references import load


def _data(seed, n_top=12, coupling="leaf"):
    """Three levels (a / a:b / a:b:c); V blocks coupling rows within leaves ("leaf"),
    across leaves of a top cluster ("top"), or a mixture ("mixed")."""
    rng = np.random.default_rng(seed)
    rows = []
    for a in range(n_top):
        for b in range(rng.integers(1, 4)):
            for c in range(rng.integers(1, 3)):
                for _ in range(rng.integers(1, 4)):
                    rows.append((a, b, c))
    codes = np.array(rows)
    n = len(codes)
    x = rng.normal(size=n)
    X = np.column_stack([x, np.ones(n)])
    y = 0.2 * x + rng.normal(size=n)
    Z = [np.column_stack([x, np.ones(n)]), np.ones((n, 1)), np.ones((n, 1))]
    groups = [codes[:, 0], codes[:, 0] * 10 + codes[:, 1], codes[:, 0] * 100 + codes[:, 1] * 10 + codes[:, 2]]
    V = np.diag(rng.uniform(0.1, 0.4, n))
    for a in range(n_top):
        mode = coupling if coupling != "mixed" else ["leaf", "top", "none"][a % 3]
        if mode == "none":
            continue
        key = groups[2] if mode == "leaf" else groups[0]
        for g in np.unique(key[groups[0] == a]):
            r = np.flatnonzero(key == g)
            sd = np.sqrt(np.diag(V)[r])
            B = 0.5 * np.outer(sd, sd)
            np.fill_diagonal(B, sd ** 2)
            V[np.ix_(r, r)] = B
    return y, X, Z, groups, V


@pytest.mark.parametrize("coupling", ["leaf", "top", "mixed"])
@pytest.mark.parametrize("method", ["reml", "ml"])
def test_model_with_V_matches_dense(coupling, method):
    y, X, Z, groups, V = _data(1, coupling=coupling)
    d = build_design(y, X, Z, groups, V=sparse.csr_matrix(V))
    structs = [make_structure("unstructured", ["x", "_cons"]), make_structure(None, ["_cons"]),
               make_structure(None, ["_cons"])]
    m = NestedModel(d, structs, method)
    rng = np.random.default_rng(2)
    theta = rng.uniform(0.1, 0.6, m.n_theta)
    ev = m.evaluate(theta)
    Vs = V[np.ix_(d.perm, d.perm)]
    Vfull = dense_V(d.Z, d.groups, m.Sigma_list(theta), Vs)
    ll, beta, covb = dense_loglik(d.y, d.X, Vfull, method)
    assert -0.5 * ev.deviance == pytest.approx(ll, rel=1e-10)
    np.testing.assert_allclose(ev.beta, beta, rtol=1e-9)
    h = 1e-6
    g = m.gradient(theta)
    num = np.array([(m.deviance(theta + h * e) - m.deviance(theta - h * e)) / (2 * h)
                    for e in np.eye(m.n_theta)])
    np.testing.assert_allclose(g, num, rtol=1e-5, atol=1e-6)
    # BLUPs against G Z' V^-1 r
    blocks = dense_Z(d.Z, d.groups)
    Zf = np.hstack([B for B, _ in blocks])
    from scipy.linalg import block_diag
    Gf = block_diag(*[np.kron(np.eye(G), S) for (_, G), S in zip(blocks, m.Sigma_list(theta))])
    u = Gf @ Zf.T @ np.linalg.solve(Vfull, d.y - d.X @ beta)
    got = np.concatenate([uu.ravel() for uu, _ in m.random_effects(theta)])
    np.testing.assert_allclose(got, u, rtol=1e-8, atol=1e-12)
    # EM moves uphill
    theta2, _ = m.em_step(theta)
    assert m.deviance(theta2) <= ev.deviance + 1e-9
    # marginal blocks carry the full V
    for a, b, Vj in m.marginal_blocks(theta):
        np.testing.assert_allclose(Vj, Vfull[a:b, a:b], rtol=1e-12)


def test_V_diagonal_equals_variance(fitted):
    df = mlmeta.datasets.load("schoolcal")
    f = "stdmdiff ~ year_c + (1 | district) + (1 | district:school)"
    a = fitted(f, "schoolcal", variance="var")
    b = mlmeta.meregress(f, df, V=np.diag(df["var"].to_numpy()))
    c = mlmeta.meregress(f, df, V=sparse.diags(df["var"].to_numpy()))
    assert b.llf == pytest.approx(a.llf, rel=1e-12) and c.llf == pytest.approx(a.llf, rel=1e-12)
    np.testing.assert_allclose(b.params, a.params, rtol=1e-10)


def test_berkey_full_versus_diagonal_V(fitted):
    """The seed answer: true-effect correlation 0.6088 with the full V, 0.7752 with its diagonal."""
    dat = mlmeta.datasets.load("berkey")
    blocks = [np.column_stack([g.v1i.values, g.v2i.values]) for _, g in dat.groupby("trial", sort=True)]
    f = "yi ~ 0 + outcome + (0 + outcome | trial)"
    res1 = fitted(f, "berkey", V=blocks)
    res2 = mlmeta.meregress(f, dat, variance="vi")
    assert round(res1.recovariance("trial", correlation=True).iloc[0, 1], 4) == 0.6088
    assert round(res2.recovariance("trial", correlation=True).iloc[0, 1], 4) == 0.7752
    dense = np.zeros((10, 10))
    for t in range(5):
        dense[2 * t:2 * t + 2, 2 * t:2 * t + 2] = blocks[t]
    same = fitted(f, "berkey", V=dense)
    assert same.llf == pytest.approx(res1.llf, rel=1e-12)


def test_V_validation():
    df = mlmeta.datasets.load("schoolcal")
    f = "stdmdiff ~ 1 + (1 | district) + (1 | district:school)"
    V = np.diag(df["var"].to_numpy())
    with pytest.raises(ValueError, match="exactly one of"):
        mlmeta.meregress(f, df, V=V, variance="var")
    with pytest.raises(ValueError, match="56 rows"):
        mlmeta.meregress(f, df, V=V[:10, :10])
    W = V.copy()
    W[0, 1] = 0.01
    with pytest.raises(ValueError, match="not symmetric"):
        mlmeta.meregress(f, df, V=W)
    W = V.copy()
    i, j = 0, int(np.flatnonzero(df.district != df.district[0])[0])
    W[i, j] = W[j, i] = 0.001
    with pytest.raises(ValueError, match="between different top-level clusters"):
        mlmeta.meregress(f, df, V=W)
    W = V.copy()
    k = int(np.flatnonzero(df.district == df.district[0])[1])
    W[0, k] = W[k, 0] = 1.0          # |corr| > 1
    with pytest.raises(ValueError, match="not positive definite"):
        mlmeta.meregress(f, df, V=W)
    W = V.copy()
    W[3, 3] = 0.0
    with pytest.raises(ValueError, match="positive sampling variances"):
        mlmeta.meregress(f, df, V=W)
    with pytest.raises(ValueError, match="blocks"):
        mlmeta.meregress(f, df, V=[np.eye(2)])


def test_V_matches_metafor_with_vcalc():
    """Sampling errors correlated within districts (across schools: the dense-cluster path)."""
    ref = load("V_reference")
    dat = mlmeta.datasets.load("schoolcal")
    for case in ref["cases"]:
        V = mlmeta.vcalc("var", "district", rho=case["rho"], obs="school", data=dat)
        res = mlmeta.meregress("stdmdiff ~ year_c + (1 | district) + (1 | district:school)", dat,
                               V=V, method=case["method"])
        assert res.converged
        assert res.llf == pytest.approx(case["llf"], rel=1e-9)
        for name, value in case["params"].items():
            assert res.params[name] == pytest.approx(value, rel=1e-6)
            assert res.bse[name] == pytest.approx(case["bse"][name], rel=1e-6)
        got = [res.re_cov[k].iloc[0, 0] for k in ("district", "district:school")]
        np.testing.assert_allclose(got, case["sigma2"], rtol=1e-5)


def _correlated_V(df, rho, rows, scale=1.0):
    """Diagonal V from df.var with rows ``rows`` correlated at rho (times ``scale``)."""
    V = np.diag(df["var"].to_numpy()) * scale
    sd = np.sqrt(np.diag(V)[rows])
    V[np.ix_(rows, rows)] = rho * np.outer(sd, sd) + np.diag((1 - rho) * sd ** 2)
    return V


@pytest.mark.parametrize("scale", [1e-8, 1.0, 1e8])
@pytest.mark.parametrize("across", [False, True])
def test_singular_V_block_is_refused_naming_its_cluster(schoolcal, scale, across):
    """A block with a correlation of exactly 1 is rank-deficient: refused at every scale of
    V (a relative pivot threshold), naming the cluster, whether the block lies within the
    deepest group (whitened by itself) or couples schools (the district becomes one dense
    node). Depending on Cholesky rounding it used to be accepted, with llf of -4e3 ... -1e17."""
    d = schoolcal.district.to_numpy()
    rows = np.flatnonzero(d == d[20])[:2]
    var = schoolcal["var"].to_numpy().copy()
    var[rows] = [0.2809, 0.4688]     # chol([[v1, s1 s2], [s1 s2, v2]]) rounds to a positive pivot
    df = schoolcal.assign(stdmdiff=schoolcal.stdmdiff * np.sqrt(scale), var=var)
    V = _correlated_V(df, 1.0, rows, scale)
    formula = ("stdmdiff ~ 1 + (1 | district) + (1 | district:school)" if across
               else "stdmdiff ~ 1 + (1 | district)")
    with pytest.raises(ValueError, match=rf"top-level cluster district = {int(d[20])} .*numerically "
                                         rf"singular"):
        mlmeta.meregress(formula, df, V=V)


@pytest.mark.parametrize("across", [False, True])
def test_V_block_below_the_pivot_threshold_names_its_row(schoolcal, across):
    """A correlation of 1 - 1e-12 leaves the second row a relative pivot 1 - rho^2 of
    2e-12, below the threshold (1e-10): refused, naming the row and its pivot."""
    d = schoolcal.district.to_numpy()
    rows = np.flatnonzero(d == d[20])[:2]
    V = _correlated_V(schoolcal, 1.0 - 1e-12, rows)
    formula = ("stdmdiff ~ 1 + (1 | district) + (1 | district:school)" if across
               else "stdmdiff ~ 1 + (1 | district)")
    with pytest.raises(ValueError, match=r"row 2 of the block is a linear combination of the rows "
                                         r"before it up to a relative pivot of 2\.0e-12 \(at most 1e-10\)"):
        mlmeta.meregress(formula, schoolcal, V=V)


@pytest.mark.parametrize("one_minus_rho", [1e-4, 1e-8])
def test_nearly_singular_V_block_fits_the_dense_likelihood(schoolcal, one_minus_rho):
    """Correlations just below 1 are legal: the fit's log-likelihood is the dense one at its
    estimates and no finite-difference step fails (summary, intervals)."""
    d = schoolcal.district.to_numpy()
    rows = np.flatnonzero(d == d[20])[:3]
    V = _correlated_V(schoolcal, 1.0 - one_minus_rho, rows)
    res = mlmeta.meregress("stdmdiff ~ 1 + (1 | district) + (1 | district:school)", schoolcal, V=V)
    m, dd = res.model, res.model.design
    ll = dense_loglik(dd.y, dd.X, dense_V(dd.Z, dd.groups, m.Sigma_list(res.theta),
                                          dd.Lambda.toarray()), "reml")[0]
    assert res.llf == pytest.approx(ll, abs=1e-6)
    assert "Random-effects" in str(res.summary()) or res.re_params().shape[0] == 2


def test_V_blocks_of_the_wrong_size_are_named():
    import pandas as pd

    df = pd.DataFrame({"y": [1.0, 2, 3, 4, 5, 6], "g": [1, 1, 2, 2, 3, 3]})
    with pytest.raises(ValueError, match=r"V block 1 \(group 2\) is 3 x 3 but the group has 2 rows"):
        mlmeta.meregress("y ~ 1 + (1 | g)", df, V=[np.eye(2), np.eye(3), np.eye(2)])
    with pytest.raises(ValueError, match=r"V has 2 blocks but 'g' has 3 groups"):
        mlmeta.meregress("y ~ 1 + (1 | g)", df, V=[np.eye(2), np.eye(2)])
    # lists, integers and scalars are blocks too
    res = mlmeta.meregress("y ~ 1 + (1 | g)", df, V=[np.eye(2), [[1, 0], [0, 1]], 0.5 * np.eye(2)])
    same = mlmeta.meregress("y ~ 1 + (1 | g)", df, V=np.diag([1.0, 1, 1, 1, 0.5, 0.5]))
    assert res.llf == pytest.approx(same.llf, rel=1e-12)


def test_the_callers_sparse_V_is_left_as_given():
    """A sparse V with unsorted column indices: the fit reads it, and the caller's arrays
    stay as they were (the model works on its own copy)."""
    import pandas as pd

    df = pd.DataFrame({"y": [1.0, 2, 3, 4, 5, 6.5], "g": [1, 1, 2, 2, 3, 3]})
    dense = np.kron(np.eye(3), [[1.0, 0.3], [0.3, 1.0]])
    C = sparse.csr_matrix(dense)
    # each row's two entries stored in reverse column order
    indices = np.concatenate([C.indices[a:b][::-1] for a, b in zip(C.indptr[:-1], C.indptr[1:])])
    data = np.concatenate([C.data[a:b][::-1] for a, b in zip(C.indptr[:-1], C.indptr[1:])])
    V = sparse.csr_matrix((data, indices, C.indptr.copy()), shape=C.shape)
    V.has_sorted_indices = False
    before = (V.data.copy(), V.indices.copy(), V.indptr.copy())
    res = mlmeta.meregress("y ~ 1 + (1 | g)", df, V=V)
    same = mlmeta.meregress("y ~ 1 + (1 | g)", df, V=dense)
    assert res.llf == pytest.approx(same.llf, rel=1e-12)
    for a, b in zip(before, (V.data, V.indices, V.indptr)):
        np.testing.assert_array_equal(a, b)


def test_V_over_all_rows_is_restricted_to_the_rows_used(schoolcal):
    """A row dropped for a missing value takes its row and column of V with it: the fit
    equals the fit of the remaining rows with V restricted to them."""
    from mlmeta import MissingDataWarning

    d = schoolcal.district.to_numpy()
    rows = np.flatnonzero(d == d[20])[:3]
    V = _correlated_V(schoolcal, 0.5, rows)
    df = schoolcal.copy()
    df.loc[rows[1], "stdmdiff"] = np.nan
    f = "stdmdiff ~ 1 + (1 | district) + (1 | district:school)"
    with pytest.warns(MissingDataWarning, match="dropped 1 of 56 rows"):
        res = mlmeta.meregress(f, df, V=V)
    keep = np.setdiff1d(np.arange(len(df)), [rows[1]])
    same = mlmeta.meregress(f, df.iloc[keep], V=V[np.ix_(keep, keep)])
    assert res.llf == pytest.approx(same.llf, rel=1e-12)
    np.testing.assert_allclose(res.params.values, same.params.values, rtol=1e-10)
