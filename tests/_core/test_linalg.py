import numpy as np
import pytest

from mlmeta._core._linalg import py_gemm, py_potrf_lower, py_trsm_left_lower


@pytest.mark.parametrize("ta,tb", [("N", "N"), ("T", "N"), ("N", "T"), ("T", "T")])
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (3, 2, 4), (5, 1, 2), (2, 3, 1)])
def test_gemm_matches_numpy(ta, tb, m, n, k):
    rng = np.random.default_rng(m * 100 + n * 10 + k)
    A = rng.normal(size=(m, k) if ta == "N" else (k, m))
    B = rng.normal(size=(k, n) if tb == "N" else (n, k))
    C = rng.normal(size=(m, n))
    opA = A if ta == "N" else A.T
    opB = B if tb == "N" else B.T
    np.testing.assert_allclose(py_gemm(ta, tb, 0.7, A, B, -1.3, C), 0.7 * opA @ opB - 1.3 * C,
                               rtol=1e-13, atol=1e-13)


def test_gemm_beta_zero_ignores_garbage():
    A = np.ones((2, 2))
    C = np.full((2, 2), np.nan)
    np.testing.assert_allclose(py_gemm("N", "N", 1.0, A, A, 0.0, C), 2 * np.ones((2, 2)))


@pytest.mark.parametrize("m", [1, 2, 5])
@pytest.mark.parametrize("trans", ["N", "T"])
def test_trsm_and_potrf(m, trans):
    rng = np.random.default_rng(m)
    M = rng.normal(size=(m, m))
    S = M @ M.T + m * np.eye(m)
    L, info = py_potrf_lower(S)
    assert info == 0
    np.testing.assert_allclose(L, np.linalg.cholesky(S), rtol=1e-12)
    B = rng.normal(size=(m, 3))
    opL = L if trans == "N" else L.T
    np.testing.assert_allclose(py_trsm_left_lower(trans, L, B), np.linalg.solve(opL, B), rtol=1e-10)


def test_potrf_reports_failure():
    _, info = py_potrf_lower(np.array([[1.0, 2.0], [2.0, 1.0]]))
    assert info > 0
    _, info = py_potrf_lower(np.array([[-1.0]]))
    assert info == 1
