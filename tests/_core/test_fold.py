"""The deepest level of one-row groups folded into the diagonal (mlmeta._core._fold):
the folded problem against the tree problem with a node per group (deviance, beta,
H^-1, gradient, EM moments, batch outcomes), the gradient against finite differences,
and which models fold."""

import warnings

import numpy as np
import pandas as pd
import pytest

import mlmeta
from mlmeta.api import build_model


def _data(n_top=40, per_top=5, seed=0, depth=1):
    """``depth`` nested levels above one-row groups: top ``a``, (``m``), rows ``b``."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 2 * per_top, n_top)
    a = np.repeat(np.arange(n_top), sizes)
    n = a.size
    df = pd.DataFrame({"a": a, "b": np.arange(n), "m": a * 10 + rng.integers(0, 3, n),
                       "x": rng.normal(size=n), "x2": rng.normal(size=n),
                       "v": rng.uniform(0.02, 0.2, n)})
    u = rng.normal(0, 0.3, n_top)[a] + rng.normal(0, 0.2, n)
    df["y"] = 0.2 + 0.1 * df.x + u + rng.normal(size=n) * np.sqrt(df.v)
    for k in range(3, 7):       # more moderators: [X, y] wider than the unrolled kernels
        df[f"x{k}"] = rng.normal(size=n)
    return df.sort_values(["a", "m"]).reset_index(drop=True) if depth > 1 else df


CASES = [
    ("y ~ x + (1 | a) + (1 | a:b)", {}, 1),
    ("y ~ x + (1 + x | a) + (1 | a:b)", {}, 1),
    ("y ~ x + x2 + (1 | a) + (1 | a:m) + (1 | a:m:b)", {}, 2),
    ("y ~ x + (1 | a) + (1 + x || a:m) + (0 + x | a:m:b)", {}, 2),
    ("y ~ 1 + (1 | a) + (1 | a:b)", {"method": "ml"}, 1),
    ("y ~ x + x2 + x3 + x4 + x5 + x6 + (1 | a) + (1 | a:b)", {}, 1),
    ("y ~ x + x2 + x3 + (1 | a) + (1 | a:b)", {"method": "ml"}, 1),
]


def _models(formula, kw, depth):
    df = _data(depth=depth)
    return build_model(formula, df, variance="v", **kw)[0], df


@pytest.mark.parametrize("formula,kw,depth", CASES)
def test_folded_problem_matches_the_tree(formula, kw, depth):
    m, _ = _models(formula, kw, depth)
    assert m._fold_level() == len(m.structs) - 1
    assert m.problem is not m.tree_problem
    rng = np.random.default_rng(1)
    for _ in range(4):
        th = np.clip(rng.uniform(-0.2, 0.7, m.n_theta), m.lower, m.upper)
        a = m.problem.evaluate(th, gradient=True, em=True)
        b = m.tree_problem.evaluate(th, gradient=True, em=True)
        assert a["deviance"] == pytest.approx(b["deviance"], rel=1e-12, abs=1e-9)
        np.testing.assert_allclose(a["beta"], b["beta"], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(a["Hinv"], b["Hinv"], rtol=1e-9, atol=1e-13)
        np.testing.assert_allclose(a["grad"], b["grad"], rtol=1e-8, atol=1e-8)
        np.testing.assert_allclose(a["E"], b["E"], rtol=1e-8, atol=1e-8)
        assert a["logdet_C"] == pytest.approx(b["logdet_C"], rel=1e-12)


@pytest.mark.parametrize("formula,kw,depth", CASES[:3])
def test_folded_gradient_matches_differences(formula, kw, depth):
    m, _ = _models(formula, kw, depth)
    th = np.clip(np.random.default_rng(2).uniform(0.1, 0.6, m.n_theta), m.lower, m.upper)
    g = m.problem.evaluate(th, gradient=True)["grad"]
    for i in range(m.n_theta):
        h = 1e-6 * max(1.0, abs(th[i]))
        up, dn = th.copy(), th.copy()
        up[i] += h
        dn[i] -= h
        fd = (m.problem.evaluate(up)["deviance"] - m.problem.evaluate(dn)["deviance"]) / (2 * h)
        assert g[i] == pytest.approx(fd, rel=1e-5, abs=1e-6)


def test_folded_fits_agree_with_the_tree_fit_and_its_blups():
    df = _data(seed=3)
    f = "y ~ x + (1 | a) + (1 | a:b)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mlmeta.BoundaryWarning)
        res = mlmeta.meregress(f, df, variance="v")
    m = res.model
    assert m._fold_level() == 1
    assert not m.design.tree_built      # the fit never needed the deepest level's nodes
    tree = m.tree_problem.fit(res.theta[None, :], em_iter=0, maxiter=50)
    assert -0.5 * tree["deviance"][0] == pytest.approx(res.llf, abs=1e-9)
    np.testing.assert_allclose(tree["theta"][0], res.theta, rtol=1e-5, atol=1e-8)
    u, pev = m.random_effects(res.theta)[1]          # through the tree problem's nodes
    assert u.shape == (len(df), 1) and np.all(pev > 0)


def test_batch_outcomes_use_the_fold():
    df = _data(seed=4)
    model = mlmeta.Model("y ~ x + (1 | a) + (1 | a:b)", df, variance="v")
    assert model.model._fold_level() == 1
    rng = np.random.default_rng(5)
    Y = df.y.to_numpy()[:, None] + rng.normal(0, 0.3, (len(df), 3))
    out = mlmeta.fit_batch(model, Y)
    for j in range(3):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", mlmeta.BoundaryWarning)
            single = mlmeta.meregress("y ~ x + (1 | a) + (1 | a:b)", df.assign(y=Y[:, j]),
                                      variance="v")
        assert out.llf[j] == pytest.approx(single.llf, abs=1e-7)


def test_which_models_fold():
    df = _data(seed=6)
    fold = lambda f, **kw: build_model(f, df, **kw)[0]._fold_level()       # noqa: E731
    assert fold("y ~ x + (1 | a) + (1 | a:b)", variance="v") == 1
    assert fold("y ~ x + (1 | a)", variance="v") is None             # no level left above
    assert fold("y ~ x + (1 | a) + (0 + x + x2 | a:b)", variance="v") is None   # two effects
    assert fold("y ~ x + (1 | a) + (1 | a:m)", variance="v") is None       # groups of several rows
    # a profiled residual: the one-row level is not identified apart from it (refused
    # elsewhere); with sampling variances, a V with off-diagonal entries keeps the tree
    V = np.diag(df.v.to_numpy())
    V[0, 1] = V[1, 0] = 0.5 * np.sqrt(V[0, 0] * V[1, 1])
    assert fold("y ~ x + (1 | a) + (1 | a:b)", V=V) is None


@pytest.mark.parametrize("formula,kw,depth", CASES)
def test_the_full_tree_built_on_first_use_is_the_eager_one(formula, kw, depth):
    """A design whose deepest level has one-row groups builds its tree on first use: the
    same kernel blocks, node numbering and the same upper-level index as built at once."""
    from mlmeta.design import _node_index, _tree_blocks

    m, _ = _models(formula, kw, depth)
    d = m.design
    assert d.upper is not None and not d.tree_built
    fn, kw_tree = d._lazy
    K_eager, nog, _, border = _tree_blocks(**{**kw_tree, "codes": list(kw_tree["codes"]),
                                              "n_groups": list(kw_tree["n_groups"]),
                                              "starts": list(kw_tree["starts"])})
    K = d.kernel                          # built now
    assert d.tree_built and border is None
    for name in ("level", "parent", "nq", "zz_ptr", "za_ptr", "cluster_ptr", "ZZ", "ZA", "AA"):
        np.testing.assert_array_equal(np.asarray(getattr(K, name)), np.asarray(getattr(K_eager, name)))
    for a, b in zip(d.node_of_group, nog):
        np.testing.assert_array_equal(a, b)
    # the upper index is the full tree's restricted to the levels above the deepest
    L = d.n_levels - 1
    up = d.upper
    keep = np.asarray(K.level) < L
    np.testing.assert_array_equal(up["level"], np.asarray(K.level)[keep])
    np.testing.assert_array_equal(up["cluster_ptr"],
                                  np.concatenate([[0], np.cumsum(keep)])[np.asarray(K.cluster_ptr)])
    idx = _node_index(L, d.group_start, d.groups, d.groups[0], np.zeros(d.n_clusters, bool), d.n_groups)
    np.testing.assert_array_equal(up["parent"], idx["parent"])


def test_group_traces_from_the_rows_match_the_kernel_blocks():
    """The largest trace of Z_g'Lambda^-1 Z_g per level, from the rows (diagonal
    whitening) and from the kernel's ZZ blocks."""
    from mlmeta.accuracy import largest_group_traces

    for formula, kw, depth in CASES:
        m, _ = _models(formula, kw, depth)
        d = m.design
        K = d.kernel
        ZZ = np.asarray(K.ZZ)
        for lvl, got in enumerate(largest_group_traces(m)):
            nodes = d.node_of_group[lvl]
            na = np.asarray(K.nq)[nodes]
            base = np.asarray(K.zz_ptr)[nodes] + K.diag_offset(nodes)
            r = np.arange(d.q[lvl])
            want = ZZ[base[:, None] + r * (1 + na[:, None])].sum(axis=1).max()
            assert got == pytest.approx(want, rel=1e-12)


def test_a_large_two_level_fold_is_split_in_halves_on_one_thread_or_two():
    """From TWO_SPLIT_ROWS rows the two-level kernels sum two halves of the clusters (on
    two threads when a single run has them): the tree's numbers, and the same bits on
    one thread and on two."""
    rng = np.random.default_rng(8)
    n_top = 16_000
    sizes = rng.integers(1, 9, n_top)
    a = np.repeat(np.arange(n_top), sizes)
    n = a.size
    assert n >= 65_536
    df = pd.DataFrame({"a": a, "b": np.arange(n), "x": rng.normal(size=n),
                       "v": rng.uniform(0.02, 0.2, n)})
    df["y"] = 0.1 * df.x + rng.normal(0, 0.3, n_top)[a] + rng.normal(0, 0.2, n) \
        + rng.normal(size=n) * np.sqrt(df.v)
    m = build_model("y ~ x + (1 | a) + (1 | a:b)", df, variance="v")[0]
    assert m._fold_level() == 1
    th = np.array([0.4, 0.3])
    a_ = m.problem.evaluate(th, gradient=True, em=True)
    b_ = m.tree_problem.evaluate(th, gradient=True, em=True)
    assert a_["deviance"] == pytest.approx(b_["deviance"], rel=1e-12)
    np.testing.assert_allclose(a_["grad"], b_["grad"], rtol=1e-8)
    np.testing.assert_allclose(a_["E"], b_["E"], rtol=1e-9)
    one = m.problem.fit(th[None, :], n_threads=1, em_iter=5, maxiter=20)
    two = m.problem.fit(th[None, :], n_threads=2, em_iter=5, maxiter=20)
    for key in ("theta", "deviance", "beta", "Hinv", "n_evals"):
        np.testing.assert_array_equal(one[key], two[key])
    # a single evaluation too
    two = m.problem.evaluate(th, gradient=True, em=True, n_threads=2)
    for key in ("deviance", "grad", "E", "beta", "Hinv"):
        np.testing.assert_array_equal(a_[key], two[key])
