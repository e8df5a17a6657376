"""The nested kernel against dense NumPy: log|V|, A'V^-1A, gradient, EM moments."""

import numpy as np
import pytest
from scipy.linalg import block_diag

from dense import dense_Z
from mlmeta.covstruct import make_structure
from mlmeta.design import build_design
from mlmeta.model import NestedModel


class _Kernel:
    """The kernel passes of a design, run through the engine's test twin (every call
    refactors at the T it is given)."""

    def __init__(self, d):
        structs = [make_structure("unstructured", [f"z{i}" for i in range(q)]) for q in d.q]
        self.problem = NestedModel(d, structs, "ml").problem
        self.t_off = d.kernel.t_off

    def pack_T(self, Ts):
        return np.concatenate([np.asarray(T, dtype=float).ravel(order="F") for T in Ts])

    def factor(self, T):
        out = self.problem.pieces(T, np.eye(self.problem.p + 1))
        return out["logdet"], out["S"], out["status"]

    def gradient_pieces(self, T, Phi):
        out = self.problem.pieces(T, Phi)
        return out["G"], out["E"]


def _random_tree(rng, n_levels, n_obs, fanout=3, q=None):
    codes = [rng.integers(0, fanout, n_obs)]
    for _ in range(1, n_levels):
        codes.append(codes[-1] * 100 + rng.integers(0, fanout, n_obs))
    q = q or [int(rng.integers(1, 3)) for _ in range(n_levels)]
    Z = []
    for ql in q:
        cols = [rng.normal(size=n_obs) for _ in range(ql - 1)] + [np.ones(n_obs)]
        Z.append(np.column_stack(cols))
    return codes, Z, q


def _dense_pieces(d, Ts):
    w = d.weights
    Zt = [z * w[:, None] for z in d.Z]
    blocks = dense_Z(Zt, d.groups)
    Zf = np.hstack([B for B, _ in blocks])
    Tf = block_diag(*[np.kron(np.eye(G), Tl) for (_, G), Tl in zip(blocks, Ts)])
    # the kernel works in the design's basis for the fixed part: X B and y - X b0
    A = np.column_stack([(d.X @ d.B) * w[:, None], (d.y - d.X @ d.b0) * w])
    C = np.eye(Zf.shape[1]) + Tf.T @ Zf.T @ Zf @ Tf
    return blocks, Zf, Tf, A, C


CASES = [
    # (n_levels, n_obs, fanout, q)
    (1, 1, 1, [1]),            # a single row
    (1, 12, 12, [1]),          # one row per cluster
    (1, 30, 1, [2]),           # one cluster only
    (2, 40, 3, [2, 1]),
    (2, 6, 4, [3, 3]),         # q > n_j in most clusters
    (3, 60, 3, [2, 1, 2]),
    (4, 80, 2, [1, 2, 1, 1]),  # 4 levels
    (5, 90, 2, [1, 1, 1, 1, 1]),
]


@pytest.mark.parametrize("n_levels,n_obs,fanout,q", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_kernel_matches_dense(n_levels, n_obs, fanout, q, seed):
    rng = np.random.default_rng(seed)
    codes, Z, q = _random_tree(rng, n_levels, n_obs, fanout, q)
    X = np.column_stack([rng.normal(size=n_obs), np.ones(n_obs)])
    y = rng.normal(size=n_obs)
    var = rng.uniform(0.1, 1.0, n_obs)
    d = build_design(y, X, Z, codes, var)
    K = _Kernel(d)
    Ts = [np.tril(rng.normal(size=(ql, ql))) for ql in q]
    T = K.pack_T(Ts)
    logdet, S, status = K.factor(T)
    assert status == 0
    blocks, Zf, Tf, A, C = _dense_pieces(d, Ts)
    Vw = np.eye(n_obs) + Zf @ Tf @ Tf.T @ Zf.T
    assert logdet == pytest.approx(np.linalg.slogdet(Vw)[1], rel=1e-11, abs=1e-11)
    np.testing.assert_allclose(S, A.T @ np.linalg.solve(Vw, A), rtol=1e-10, atol=1e-10)

    Phi = rng.normal(size=(3, 3))
    Phi = Phi @ Phi.T
    G, E = K.gradient_pieces(T, Phi)

    def f(Tvec):
        ld, Sv, _ = K.factor(Tvec)
        return ld + np.sum(Phi * Sv)

    h = 1e-6
    num = np.array([(f(T + h * e) - f(T - h * e)) / (2 * h) for e in np.eye(len(T))])
    np.testing.assert_allclose(2 * G, num, rtol=1e-5, atol=1e-6 * max(1, np.abs(num).max()))

    Ci = np.linalg.inv(C)
    Wd = Ci @ (Tf.T @ Zf.T @ A)
    Ed, col = [], 0
    for (_, n_groups), ql in zip(blocks, q):
        acc = np.zeros((ql, ql))
        for g in range(n_groups):
            sl = slice(col + g * ql, col + (g + 1) * ql)
            acc += Ci[sl, sl] + Wd[sl] @ Phi @ Wd[sl].T
        col += n_groups * ql
        Ed.append(acc)
    np.testing.assert_allclose(E, K.pack_T(Ed), rtol=1e-10, atol=1e-10)


def test_zero_factor_is_harmless():
    """T = 0 (every variance on the boundary): C = I, V = Lambda."""
    rng = np.random.default_rng(3)
    codes, Z, q = _random_tree(rng, 2, 30, 3, [2, 1])
    X = np.ones((30, 1))
    y = rng.normal(size=30)
    d = build_design(y, X, Z, codes, np.full(30, 0.5))
    logdet, S, status = _Kernel(d).factor(np.zeros(d.kernel.t_off[-1]))
    assert status == 0 and logdet == 0.0
    A = np.column_stack([d.Xw, d.yw])          # the design's whitened working basis
    np.testing.assert_allclose(S, A.T @ A)
    np.testing.assert_allclose(d.Xw, (d.X @ d.B) / np.sqrt(0.5), rtol=1e-12, atol=1e-14)


def test_nonfinite_T_reports_node():
    rng = np.random.default_rng(4)
    codes, Z, q = _random_tree(rng, 1, 10, 2, [1])
    d = build_design(rng.normal(size=10), np.ones((10, 1)), Z, codes, np.ones(10))
    _, _, status = _Kernel(d).factor(np.array([np.nan]))
    assert status >= 1


def test_row_order_and_relabelling_invariance():
    rng = np.random.default_rng(5)
    codes, Z, q = _random_tree(rng, 3, 50, 3, [1, 2, 1])
    X = np.column_stack([rng.normal(size=50), np.ones(50)])
    y = rng.normal(size=50)
    v = rng.uniform(0.1, 1, 50)
    d1 = build_design(y, X, Z, codes, v)
    perm = rng.permutation(50)
    relabel = [(-c * 7 + 3)[perm] for c in codes]   # new ids, different order
    d2 = build_design(y[perm], X[perm], [z[perm] for z in Z], relabel, v[perm])
    K1, K2 = _Kernel(d1), _Kernel(d2)
    T = K1.pack_T([np.tril(rng.normal(size=(k, k))) for k in q])
    l1, S1, _ = K1.factor(T)
    l2, S2, _ = K2.factor(T)
    assert l1 == pytest.approx(l2, rel=1e-12)

    def in_x_basis(d, S):
        """A'V^-1A with A = [X, y] (the kernel's basis is X B, y - X b0)."""
        p = d.n_fe
        M = np.eye(p + 1)
        M[:p, :p] = d.B
        M[:p, p] = -d.b0
        Mi = np.linalg.inv(M)
        return Mi.T @ S @ Mi

    np.testing.assert_allclose(in_x_basis(d1, S1), in_x_basis(d2, S2), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("n_levels,fanout,p", [(1, 5, 2), (2, 3, 2), (3, 2, 2), (5, 2, 2),
                                               (1, 5, 20), (3, 2, 24)])
def test_scalar_path_matches_blocked(n_levels, fanout, p):
    """Scalar trees (one effect per node) run dedicated loops (with p + 1 >= WIDE_NC
    columns, S -= Y'Y and Phi W' as one BLAS product each over all nodes); the blocked
    kernels must give the same log|C|, S, gradient pieces, W and selected inverse."""
    rng = np.random.default_rng(11 + n_levels)
    codes, Z, q = _random_tree(rng, n_levels, 70, fanout, [1] * n_levels)
    X = np.column_stack([rng.normal(size=(70, p - 1)), np.ones(70)])
    d = build_design(rng.normal(size=70), X, Z, codes, rng.uniform(0.1, 1, 70))
    T = rng.normal(size=n_levels)
    Phi = rng.normal(size=(p + 1, p + 1))
    Phi = Phi @ Phi.T
    out = []
    for general in (False, True):
        d.kernel.force_general = general      # read when the problem is built
        r = _Kernel(d).problem.pieces(T, Phi)
        out.append((r["logdet"], r["S"], r["G"], r["E"], r["W"], r["SB"]))
    d.kernel.force_general = False
    for a, b in zip(*out):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)
