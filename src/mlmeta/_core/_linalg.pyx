# cython: language_level=3
"""BLAS/LAPACK wrappers used by the kernels, with small ``cpdef``-style twins
(``py_*``) so each wrapper can be tested against NumPy."""

import numpy as np


def py_gemm(transa, transb, double alpha, A, B, double beta, C):
    """Test twin of :func:`gemm`; returns the new C (inputs are not modified)."""
    cdef double[::1, :] a = np.asfortranarray(A, dtype=np.float64)
    cdef double[::1, :] b = np.asfortranarray(B, dtype=np.float64)
    out = np.array(C, dtype=np.float64, order="F", copy=True)
    cdef double[::1, :] c = out
    cdef char ta = ord(transa)
    cdef char tb = ord(transb)
    cdef int m = c.shape[0]
    cdef int n = c.shape[1]
    cdef int k = a.shape[1] if transa == "N" else a.shape[0]
    gemm(ta, tb, m, n, k, alpha, &a[0, 0], max(1, a.shape[0]), &b[0, 0],
         max(1, b.shape[0]), beta, &c[0, 0], max(1, m))
    return out


def py_trsm_left_lower(trans, L, B):
    """Test twin of :func:`trsm_left_lower`: returns op(L)^{-1} B."""
    cdef double[::1, :] l = np.asfortranarray(L, dtype=np.float64)
    out = np.array(B, dtype=np.float64, order="F", copy=True)
    cdef double[::1, :] b = out
    trsm_left_lower(ord(trans), b.shape[0], b.shape[1], &l[0, 0], l.shape[0],
                    &b[0, 0], b.shape[0])
    return out


def py_potrf_lower(A):
    """Test twin of :func:`potrf_lower`: returns (L, info), L's upper part zeroed."""
    out = np.array(A, dtype=np.float64, order="F", copy=True)
    cdef double[::1, :] a = out
    info = potrf_lower(a.shape[0], &a[0, 0], a.shape[0])
    return np.tril(out), info


def py_sym_eigen(A, bint jacobi=False):
    """Test twin of :func:`sym_eigen` (or, with ``jacobi``, of :func:`jacobi_eigen` at any
    order): returns (w, V, info) for the symmetric A (its lower triangle read)."""
    out = np.array(A, dtype=np.float64, order="F", copy=True)
    cdef int n = out.shape[0]
    cdef double[::1, :] a = out
    w = np.zeros(max(n, 1))
    cdef double[::1] wv = w
    cdef int lw = max(3 * n * n + 64, 1)
    work = np.zeros(lw)
    cdef double[::1] wk = work
    if jacobi:
        info = jacobi_eigen(n, &a[0, 0], &wv[0], &wk[0])
    else:
        info = sym_eigen(n, &a[0, 0], &wv[0], &wk[0], lw)
    return w[:n], out, info
