"""The compiled whitening by V's blocks against NumPy/SciPy's Cholesky factor and
triangular solve."""

import numpy as np
import pytest
from scipy import linalg, sparse

from mlmeta._core._whiten import block_factors, solve_blocks
from mlmeta.design import PIVOT_TOL


def _blocks(sizes, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    out = []
    for nb in sizes:
        M = rng.normal(size=(nb, nb + 2))
        sd = scale * rng.uniform(0.1, 10.0, nb)
        out.append(sd[:, None] * (M @ M.T / (nb + 2)) * sd[None, :])
    return out


def _csr(blocks, duplicate=False):
    V = linalg.block_diag(*blocks) if blocks else np.zeros((0, 0))
    if not duplicate:
        return sparse.csr_matrix(V), V
    C = sparse.csr_matrix(V)            # every entry stored twice, in two parts adding up to it
    counts = np.diff(C.indptr)
    indices = np.concatenate([np.tile(C.indices[a:b], 2) for a, b in zip(C.indptr[:-1], C.indptr[1:])])
    data = np.concatenate([np.concatenate([0.25 * C.data[a:b], 0.75 * C.data[a:b]])
                           for a, b in zip(C.indptr[:-1], C.indptr[1:])])
    M = sparse.csr_matrix((data, indices, np.concatenate([[0], np.cumsum(2 * counts)])), shape=V.shape)
    return M, V


def _factors(Vs, starts, sel):
    return block_factors(Vs.indptr.astype(np.int64), Vs.indices.astype(np.int64),
                         np.asarray(Vs.data, dtype=float), np.asarray(starts, dtype=np.intp),
                         np.ascontiguousarray(sel, dtype=np.intp), PIVOT_TOL)


@pytest.mark.parametrize("duplicate", [False, True])
@pytest.mark.parametrize("sizes", [[1], [2, 3, 1, 5], [40, 2], [1, 1, 70, 3]])
def test_factors_and_solves_match_numpy(sizes, duplicate):
    blocks = _blocks(sizes, seed=len(sizes), scale=1e-3)
    Vs, V = _csr(blocks, duplicate)
    if duplicate:
        assert Vs.nnz > sparse.csr_matrix(V).nnz
    starts = np.concatenate([[0], np.cumsum(sizes)])
    sel = np.ascontiguousarray(np.arange(len(sizes))[::-1][::2])   # some blocks, in any order
    packed, ptr, logdet, fail, code, row, pivot = _factors(Vs, starts, sel)
    assert fail == -1 and code == 0
    want = 0.0
    rng = np.random.default_rng(5)
    M = np.asfortranarray(rng.normal(size=(starts[-1], 3)))
    expected = M.copy()
    for i, g in enumerate(sel):
        a, b = starts[g], starts[g + 1]
        L = packed[ptr[i]:ptr[i + 1]].reshape(b - a, b - a, order="F")
        Lnp = np.linalg.cholesky(blocks[g])
        np.testing.assert_allclose(L, Lnp, rtol=1e-12, atol=1e-12 * np.abs(Lnp).max())
        assert np.all(np.triu(L, 1) == 0)
        want += np.linalg.slogdet(blocks[g])[1]
        expected[a:b] = linalg.solve_triangular(Lnp, M[a:b], lower=True)
    assert logdet == pytest.approx(want, rel=1e-12, abs=1e-12)
    solve_blocks(packed, ptr, starts.astype(np.intp), sel.astype(np.intp), M)
    np.testing.assert_allclose(M, expected, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("scale", [1e-8, 1.0, 1e8])
def test_singular_and_indefinite_blocks_are_named(scale):
    good = _blocks([3], seed=1)[0]
    s = np.array([1.0, 2.0])
    singular = np.outer(s, s) * (1 + np.array([[0.0, 0], [0, 1e-12]]))   # pivot ~1e-12
    indefinite = np.array([[1.0, 1.5], [1.5, 1.0]])
    for bad, code in ((singular, 2), (indefinite, 1)):
        blocks = [scale * good, scale * bad, scale * good]
        Vs, _ = _csr(blocks)
        starts = np.array([0, 3, 5, 8])
        packed, ptr, logdet, fail, got, row, pivot = _factors(Vs, starts, [0, 1, 2])
        assert (fail, got) == (1, code)
        assert logdet == pytest.approx(np.linalg.slogdet(scale * good)[1], rel=1e-12)
        if code == 2:
            Lr = np.linalg.cholesky(bad / np.outer(s, s))
            assert row == 1 and pivot == pytest.approx(Lr[1, 1] ** 2, rel=1e-3)
            assert pivot <= PIVOT_TOL


def test_nothing_to_whiten():
    Vs, _ = _csr(_blocks([2]))
    packed, ptr, logdet, fail, *_ = _factors(Vs, [0, 2], [])
    assert packed.size == 0 and list(ptr) == [0] and logdet == 0.0 and fail == -1
    M = np.asfortranarray(np.ones((2, 0)))
    solve_blocks(packed, ptr, np.array([0, 2], dtype=np.intp), np.zeros(0, dtype=np.intp), M)
