"""Known correlation matrices across the groups of a term (metafor's ``R=``): a
phylogenetic meta-analysis against metafor (tests/reference/make_phylo_references.R),
the engine against a dense likelihood, and bad input."""

import numpy as np
import pandas as pd
import pytest
from dense import dense_loglik, dense_V
from references import REFERENCE, load
from test_crossed import _crossed_problem, _data

import mlmeta
from mlmeta.covstruct import Identity
from mlmeta.design import build_design
from mlmeta.model import NestedModel



def _used_species():
    df, _ = _phylo()
    return sorted(df.phylogeny.unique())


def _duplicate_first_group(A):
    """A used species' correlations made equal to another's (a singular R)."""
    a, b = _used_species()[:2]
    B = A.copy()
    B.loc[b, :] = B.loc[a, :].to_numpy()
    B.loc[:, b] = B.loc[:, a].to_numpy()
    B.loc[b, b] = 1.0
    return B


def _drop_first_group(A):
    a = _used_species()[0]
    return A.drop(index=a, columns=a)


def _phylo():
    """The first 150 studies of dat.moura2021 (as the reference script) and the phylogenetic
    correlation over all 341 species (extra species are ignored)."""
    df = _data("tests/reference/data/moura2021.csv").assign(phylogeny=lambda d: d.species)
    df = df[df.study.isin(sorted(df.study.unique())[:150])]
    A = pd.read_csv(REFERENCE / "data" / "moura2021_phylo_cor.csv.gz", index_col=0)
    return df, A


@pytest.mark.parametrize("method", ["reml", "ml"])
def test_phylogenetic_meta_analysis_matches_metafor(method):
    case = load("phylo_reference")["cases"][method]
    df, A = _phylo()
    res = mlmeta.meregress("yi ~ 1 + (1 | study/esid) + (1 | species) + (1 | phylogeny)", df,
                           variance="vi", method=method, R={"phylogeny": A})
    assert res.converged
    assert res.llf == pytest.approx(case["loglik"], rel=1e-8)
    assert float(res.params.iloc[0]) == pytest.approx(case["beta"], rel=1e-5)
    assert float(res.bse.iloc[0]) == pytest.approx(case["se"], rel=1e-4)
    for term, s2 in case["sigma2"].items():
        name = "study:esid" if term == "esid" else term
        assert float(res.re_cov[name].iloc[0, 0]) == pytest.approx(s2, rel=1e-4, abs=1e-8)
    assert any("species is zero" in b for b in res.boundary)      # metafor: 6e-11
    assert list(res.groups.nesting) == ["top", "in study", "crossed", "crossed"]
    assert ": Known correlation R" in str(res.summary())


def test_known_correlation_array_in_label_order_equals_dataframe():
    df, A = _phylo()
    df = df[df.study.isin(sorted(df.study.unique())[:60])]
    used = sorted(df.phylogeny.unique())
    f = "yi ~ 1 + (1 | study) + (1 | phylogeny)"
    a = mlmeta.meregress(f, df, variance="vi", R={"phylogeny": A})
    b = mlmeta.meregress(f, df, variance="vi", R={"phylogeny": A.loc[used, used].to_numpy()})
    assert a.llf == pytest.approx(b.llf, rel=1e-12)


@pytest.mark.parametrize("change, match", [
    (_drop_first_group, "has no row/column for 1 group"),
    (lambda A: A * 2.0, "not a correlation matrix"),
    (lambda A: _duplicate_first_group(A), "not positive definite"),
    (lambda A: A.T.where(np.triu(np.ones(A.shape, dtype=bool)), A.T + 0.01), "not symmetric"),
])
def test_bad_known_correlation_matrices_are_refused(change, match):
    df, A = _phylo()
    with pytest.raises(ValueError, match=match):
        mlmeta.meregress("yi ~ 1 + (1 | study) + (1 | phylogeny)", df, variance="vi",
                         R={"phylogeny": change(A)})


def test_known_correlation_needs_an_intercept_term_and_a_tree():
    df, A = _phylo()
    with pytest.raises(ValueError, match="no random term is grouped by 'phylo'"):
        mlmeta.meregress("yi ~ 1 + (1 | study) + (1 | phylogeny)", df, variance="vi", R={"phylo": A})
    with pytest.raises(ValueError, match="needs another random term"):
        mlmeta.meregress("yi ~ 1 + (1 | phylogeny)", df, variance="vi", R={"phylogeny": A})


def test_known_correlation_engine_matches_dense():
    y, X, Z, groups, v, structs, n_tree = _crossed_problem(21, 1, 1)
    rng = np.random.default_rng(4)
    G = int(groups[-1].max()) + 1
    B = rng.normal(size=(G, G))
    R = B @ B.T + G * np.eye(G)
    R /= np.sqrt(np.outer(np.diag(R), np.diag(R)))
    d = build_design(y, X, Z, groups, v, n_tree=n_tree, known_R={n_tree + 1: R})
    m = NestedModel(d, structs[:-1] + [Identity(["_cons"])], method="reml")
    theta = np.full(m.n_theta, 0.5)
    S = m.Sigma_list(theta)
    Zc = np.eye(G)[groups[-1]]
    V = dense_V(Z[:-1], groups[:-1], S[:-1], v) + S[-1][0, 0] * Zc @ R @ Zc.T
    ll, _, _ = dense_loglik(y, X, V, "reml")
    ev = m.evaluate(theta, gradient=True)
    assert -0.5 * ev.deviance == pytest.approx(ll, rel=1e-11)
    h = 1e-6
    fd = [(m.deviance(theta + h * e) - m.deviance(theta - h * e)) / (2 * h) for e in np.eye(m.n_theta)]
    np.testing.assert_allclose(ev.grad, fd, rtol=1e-5, atol=1e-5)
    u, _ = m.random_effects(theta)[-1]
    Vi = np.linalg.inv(V)
    beta = m.evaluate(theta).beta
    np.testing.assert_allclose(u[:, 0], S[-1][0, 0] * R @ Zc.T @ Vi @ (y - X @ beta), rtol=1e-8, atol=1e-10)


