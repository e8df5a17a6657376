import numpy as np
import pytest

from mlmeta._core._linalg import py_gemm, py_potrf_lower, py_sym_eigen, py_trsm_left_lower


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


@pytest.mark.parametrize("jacobi", [False, True])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 12])
def test_sym_eigen_matches_numpy(n, jacobi):
    """sym_eigen (Jacobi's method up to SMALL_EIGEN, dsyev above) and Jacobi's method at
    every order: eigenvalues ascending, orthonormal eigenvectors, A = V diag(w) V', from
    the lower triangle only; scaled and nearly singular matrices included."""
    rng = np.random.default_rng(n)
    for scale in (1e-8, 1.0, 1e8):
        B = rng.normal(size=(n, n))
        for A in (scale * (B + B.T), scale * (B @ B.T + 1e-12 * np.eye(n))):
            w, V, info = py_sym_eigen(np.tril(A) + np.triu(rng.normal(size=(n, n)), 1), jacobi)
            assert info == 0
            big = np.abs(A).max()
            np.testing.assert_allclose(w, np.linalg.eigvalsh(A), rtol=0, atol=1e-13 * big)
            assert np.all(np.diff(w) >= 0)
            np.testing.assert_allclose(V.T @ V, np.eye(n), atol=1e-13)
            np.testing.assert_allclose(V @ np.diag(w) @ V.T, A, atol=1e-13 * big)


def test_jacobi_eigen_of_a_diagonal_and_a_repeated_eigenvalue():
    w, V, info = py_sym_eigen(np.diag([3.0, 1.0, 2.0]), jacobi=True)
    assert info == 0 and list(w) == [1.0, 2.0, 3.0]
    np.testing.assert_array_equal(np.abs(V), np.eye(3)[:, [1, 2, 0]])
    w, V, info = py_sym_eigen(np.full((4, 4), 2.0), jacobi=True)
    np.testing.assert_allclose(w, [0, 0, 0, 8], atol=1e-14)
    np.testing.assert_allclose(V.T @ V, np.eye(4), atol=1e-14)
