"""Crossed random effects: lme4 and metafor references (tests/reference/
make_crossed_references.R), the engine's border against a dense likelihood, and how
terms are found nested or crossed."""

import os
import warnings

import numpy as np
import pandas as pd
import pytest
from dense import dense_loglik, dense_V
from references import REFERENCE, load

import mlmeta
from mlmeta.covstruct import Identity, Independent, Unstructured
from mlmeta.design import build_design
from mlmeta.model import NestedModel
from mlmeta.nesting import nested_in, tree_order

REF = load("crossed_reference")


def _data(path):
    return pd.read_csv(REFERENCE.parent.parent / path)


def _lme4_order(values):
    """mlmeta lists the intercept last, lme4 first."""
    return np.roll(np.asarray(values, dtype=float), 1)


@pytest.mark.parametrize("name", sorted(REF["lme4"]))
def test_mixed_matches_lme4(name):
    case = REF["lme4"][name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = mlmeta.mixed(case["formula"], _data(case["data"]), method=case["method"])
    assert res.converged
    ll = res.llf_lme4 if case["method"] == "reml" else res.llf
    assert ll == pytest.approx(case["loglik"], rel=1e-8, abs=1e-7)
    b = np.array(list(case["beta"].values()))
    se = np.array(list(case["se"].values()))
    np.testing.assert_allclose(_lme4_order(res.params), b, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(_lme4_order(res.bse), se, rtol=1e-4)
    # variance components: lme4's vcov column (variances, covariances, residual)
    for vc in case["vc"]:
        if vc["grp"] == "Residual":
            assert res.scale == pytest.approx(vc["vcov"], rel=1e-4)
            continue
        S = res.re_cov[vc["grp"].split(".")[0]]
        v1 = "_cons" if vc["var1"] == "(Intercept)" else vc["var1"]
        v2 = v1 if vc["var2"] is None or vc["var2"] == "NA" else (
            "_cons" if vc["var2"] == "(Intercept)" else vc["var2"])
        assert S.loc[v1, v2] == pytest.approx(vc["vcov"], rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("name", sorted(REF["metafor"]))
def test_meregress_matches_metafor_crossed_species(name):
    case = REF["metafor"][name]
    df = _data("tests/reference/data/moura2021.csv")
    res = mlmeta.meregress(f"yi ~ {case['mods']} + (1 | study/esid) + (1 | species)", df,
                           variance="vi", method=case["method"])
    assert res.converged
    assert res.llf == pytest.approx(case["loglik"], rel=1e-8)
    np.testing.assert_allclose(_lme4_order(res.params), list(case["beta"].values()), rtol=1e-5)
    np.testing.assert_allclose(_lme4_order(res.bse), list(case["se"].values()), rtol=1e-4)
    for term, s2 in zip(["study", "study:esid", "species"], case["sigma2"].values()):
        assert float(res.re_cov[term].iloc[0, 0]) == pytest.approx(s2, rel=1e-4)
    assert list(res.groups.nesting) == ["top", "in study", "crossed"]
    assert "Crossed: species crossed with study > study:esid" in str(res.summary())


# --------------------------------------------------------------------------- #
# the engine's border against a dense likelihood
# --------------------------------------------------------------------------- #

def _crossed_problem(seed, tree_levels=1, q_tree=1):
    rng = np.random.default_rng(seed)
    n = 260
    top = rng.integers(0, 12, n)
    sub = top * 3 + rng.integers(0, 3, n)
    b = rng.integers(0, 9, n)
    c = rng.integers(0, 4, n)
    x = rng.normal(size=n)
    X = np.column_stack([x, np.ones(n)])
    Zt = [np.ones((n, 1)) if q_tree == 1 else np.column_stack([x, np.ones(n)])]
    structs = [Identity(["_cons"]) if q_tree == 1 else Unstructured(["x", "_cons"])]
    groups = [top]
    if tree_levels == 2:
        Zt.append(np.ones((n, 1)))
        structs.append(Identity(["_cons"]))
        groups.append(sub)
    Z = Zt + [np.column_stack([x, np.ones(n)]), np.ones((n, 1))]
    structs += [Unstructured(["x", "_cons"]), Independent(["_cons"])]
    groups += [b, c]
    y = 1 + 0.5 * x + rng.normal(size=12)[top] + 0.7 * rng.normal(size=9)[b] + rng.normal(size=n)
    v = rng.uniform(0.5, 1.5, n)
    return y, X, Z, groups, v, structs, tree_levels


@pytest.mark.parametrize("method", ["reml", "ml"])
@pytest.mark.parametrize("shape", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_border_likelihood_and_gradient_match_dense(method, shape):
    y, X, Z, groups, v, structs, n_tree = _crossed_problem(sum(shape), *shape)
    d = build_design(y, X, Z, groups, v, n_tree=n_tree)
    m = NestedModel(d, structs, method=method)
    rng = np.random.default_rng(3)
    theta = np.abs(rng.normal(0.6, 0.2, m.n_theta))
    ev = m.evaluate(theta, gradient=True)
    ll, beta, Hinv = dense_loglik(y, X, dense_V(Z, groups, m.Sigma_list(theta), v), method)
    assert -0.5 * ev.deviance == pytest.approx(ll, rel=1e-11)
    np.testing.assert_allclose(ev.beta, beta, rtol=1e-9)
    np.testing.assert_allclose(ev.cov_beta, Hinv, rtol=1e-9)
    h = 1e-6
    fd = [(m.deviance(theta + h * e) - m.deviance(theta - h * e)) / (2 * h) for e in np.eye(m.n_theta)]
    np.testing.assert_allclose(ev.grad, fd, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["reml", "ml"])
def test_scalar_border_matches_the_general_border_and_dense(method):
    """A border of 300 scalar groups takes the scalar path (lower triangles, T_c as
    scalings); the same level declared with a known correlation R = I takes the general
    one. Both agree to rounding in deviance, beta, gradient and EM moments, and with
    the dense likelihood."""
    rng = np.random.default_rng(21)
    n = 900
    top, b, c = (rng.permutation(np.arange(n) % k) for k in (40, 280, 20))
    x = rng.normal(size=n)
    X = np.column_stack([x, np.ones(n)])
    y = (1 + 0.5 * x + rng.normal(size=40)[top] + 0.7 * rng.normal(size=280)[b]
         + 0.4 * rng.normal(size=20)[c] + rng.normal(size=n))
    v = rng.uniform(0.5, 1.5, n)
    Z = [np.ones((n, 1))] * 3
    groups = [top, b, c]
    structs = [Identity(["_cons"]) for _ in range(3)]
    scalar = NestedModel(build_design(y, X, Z, groups, v, n_tree=1), structs, method=method)
    general = NestedModel(build_design(y, X, Z, groups, v, n_tree=1, known_R={1: np.eye(280)}),
                          structs, method=method)
    assert scalar.problem.nb == 300 and not scalar.problem.wide
    theta = np.array([0.8, 0.6, 0.3])
    a = scalar.evaluate(theta, gradient=True, em=True)
    g = general.evaluate(theta, gradient=True, em=True)
    assert a.deviance == pytest.approx(g.deviance, rel=1e-12)
    np.testing.assert_allclose(a.beta, g.beta, rtol=1e-10)
    np.testing.assert_allclose(a.grad, g.grad, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(np.concatenate([np.ravel(e) for e in a.E]),
                               np.concatenate([np.ravel(e) for e in g.E]), rtol=1e-9)
    ll, beta, Hinv = dense_loglik(y, X, dense_V(Z, groups, scalar.Sigma_list(theta), v), method)
    assert -0.5 * a.deviance == pytest.approx(ll, rel=1e-11)
    np.testing.assert_allclose(a.cov_beta, Hinv, rtol=1e-9)
    h = 1e-6
    fd = [(scalar.deviance(theta + h * e) - scalar.deviance(theta - h * e)) / (2 * h)
          for e in np.eye(3)]
    np.testing.assert_allclose(a.grad, fd, rtol=1e-5, atol=1e-5)


def test_border_em_step_does_not_lower_the_likelihood():
    y, X, Z, groups, v, structs, n_tree = _crossed_problem(7, 2, 2)
    m = NestedModel(build_design(y, X, Z, groups, v, n_tree=n_tree), structs, method="ml")
    theta = np.full(m.n_theta, 0.3)
    devs = []
    for _ in range(5):
        theta, dev = m.em_step(theta)
        devs.append(dev)
    assert all(b <= a + 1e-9 for a, b in zip(devs, devs[1:]))


@pytest.mark.parametrize("coupled", ["leaf", "top"])
def test_border_with_a_full_sampling_covariance_matches_dense(coupled):
    y, X, Z, groups, v, structs, n_tree = _crossed_problem(11, 2, 1)
    n = y.shape[0]
    # effects of one tree leaf (or of one top-level cluster: whitened as one node) share a
    # correlated sampling error (rho = 0.4)
    key = groups[1] if coupled == "leaf" else groups[0]
    same = key[:, None] == key[None, :]
    V = np.where(same, 0.4 * np.sqrt(np.outer(v, v)), 0.0) + np.diag(0.6 * v)
    from scipy import sparse
    d = build_design(y, X, Z, groups, V=sparse.csr_matrix(V), n_tree=n_tree)
    m = NestedModel(d, structs, method="reml")
    theta = np.full(m.n_theta, 0.5)
    ll, beta, _ = dense_loglik(y, X, dense_V(Z, groups, m.Sigma_list(theta), V), "reml")
    assert -0.5 * m.deviance(theta) == pytest.approx(ll, rel=1e-11)
    assert n == d.n_obs and d._tree_args["merged"].any() == (coupled == "top")


# --------------------------------------------------------------------------- #
# nested or crossed, by the ids
# --------------------------------------------------------------------------- #

def test_tree_order_prefers_the_chain_holding_most_effects():
    rng = np.random.default_rng(0)
    n = 400
    study = rng.integers(0, 20, n)
    esid = np.arange(n)
    species = rng.integers(0, 15, n)
    order, n_tree, parent = tree_order([species, study, esid], [1, 1, 1])
    assert order == [1, 2, 0] and n_tree == 2 and parent[2] == 1
    assert nested_in(esid, study) and not nested_in(study, species)
    # the usual nested model keeps its order
    assert tree_order([study, esid], [1, 1]) == ([0, 1], 2, [None, 0])


def test_crossed_results_print_and_report_groups():
    case = REF["lme4"]["sim_slopes_reml"]
    res = mlmeta.mixed(case["formula"], _data(case["data"]))
    text = str(res.summary())
    assert "Crossed: subj crossed with item" in text
    g = res.groups
    assert list(g.index) == ["item", "subj"] and list(g.nesting) == ["top", "crossed"]
    assert g.loc["subj", "n_groups"] == 40


@pytest.mark.parametrize("shape", [(1, 1), (2, 2)])
def test_border_random_effects_match_dense_blups(shape):
    """u = Sigma Z' V^-1 (y - X beta) and PEV = Sigma - Sigma Z' P Z Sigma (P the REML
    projection), per group of every level, crossed or nested."""
    y, X, Z, groups, v, structs, n_tree = _crossed_problem(5, *shape)
    d = build_design(y, X, Z, groups, v, n_tree=n_tree)
    m = NestedModel(d, structs, method="reml")
    theta = np.full(m.n_theta, 0.45)
    Sigmas = m.Sigma_list(theta)
    V = dense_V(Z, groups, Sigmas, v)
    Vi = np.linalg.inv(V)
    H = X.T @ Vi @ X
    beta = np.linalg.solve(H, X.T @ Vi @ y)
    P = Vi - Vi @ X @ np.linalg.solve(H, X.T @ Vi)
    got = m.random_effects(theta)
    for lvl, (Zl, S) in enumerate(zip(Z, Sigmas)):
        u, pev = got[lvl]
        codes = d.groups[lvl][np.argsort(d.perm)]        # the design's group of each data row
        for k in range(u.shape[0]):
            rows = codes == k
            B = np.zeros((y.shape[0], S.shape[0]))
            B[rows] = Zl[rows]
            np.testing.assert_allclose(u[k], S @ B.T @ Vi @ (y - X @ beta), rtol=1e-8, atol=1e-10)
            np.testing.assert_allclose(pev[k], S - S @ B.T @ P @ B @ S, rtol=1e-8, atol=1e-10)


def test_both_border_paths_are_exercised_by_the_references():
    """Clusters that see most of the border go through one dense product (wide), the
    others through per-cluster blocks; the lme4 and metafor references cover both."""
    from mlmeta.api import build_model
    from mlmeta.mixed import build_mixed_model

    case = REF["lme4"]["sim_slopes_reml"]
    wide, _, _ = build_mixed_model(case["formula"], _data(case["data"]))
    df = _data("tests/reference/data/moura2021.csv")
    narrow, _, _ = build_model("yi ~ 1 + (1 | study/esid) + (1 | species)", df, variance="vi")
    assert wide.problem.wide and not narrow.problem.wide


def test_a_wide_border_is_factored_with_threaded_blas_to_the_same_numbers(monkeypatch):
    """From BORDER_THREADS_MIN_NB crossed effects on, a single fit's border runs on
    threaded BLAS; the deviance, gradient and estimates agree with one thread to rounding."""
    import mlmeta._threads as threads

    rng = np.random.default_rng(8)
    n = 4800
    subj, item = rng.permutation(np.arange(n) % 800), rng.permutation(np.arange(n) % 600)
    df = pd.DataFrame({"subj": subj, "item": item, "x": rng.normal(size=n)})
    df["y"] = (df.x + rng.normal(size=800)[subj] + 0.5 * rng.normal(size=600)[item]
               + rng.normal(size=n))
    assert threads.border_blas_threads(600) == min(4, max(1, os.cpu_count() or 1))
    assert threads.border_blas_threads(600, kernel_threads=2) == 1
    assert threads.border_blas_threads(threads.BORDER_THREADS_MIN_NB - 1) == 1
    f = "y ~ x + (1 | subj) + (1 | item)"
    fits, evals = [], []
    for limit in (threads.BORDER_THREADS_MIN_NB, 10 ** 9):
        monkeypatch.setattr(threads, "BORDER_THREADS_MIN_NB", limit)
        res = mlmeta.mixed(f, df, safeguard=False)
        assert res.model.problem.nb == 600
        fits.append(res)
        evals.append(res.model.evaluate(np.array([0.9, 0.6]), gradient=True))
    assert fits[0].llf == pytest.approx(fits[1].llf, rel=1e-12)
    np.testing.assert_allclose(fits[0].params, fits[1].params, rtol=1e-7)
    assert evals[0].deviance == pytest.approx(evals[1].deviance, rel=1e-13)
    np.testing.assert_allclose(evals[0].grad, evals[1].grad, rtol=1e-9)
