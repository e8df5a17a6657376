# cython: language_level=3
"""Whitening by the blocks of a known sampling covariance V, in compiled loops.

Block g holds rows and columns ``starts[g]:starts[g + 1]`` of V (CSR, rows sorted by
cluster). Its factor is checked on the correlation scale: with D = diag(B),
R = D^-1/2 B D^-1/2 = L_R L_R', the block is numerically singular when a squared pivot
L_R[k, k]^2 (the share of row k's variance not explained by the rows before it) is at
most ``pivot_tol``; then L = D^1/2 L_R, log|B| = 2 sum_k log L[k, k], and rows of a
matrix M are whitened by M[block] <- L^-1 M[block].
"""

import numpy as np

from libc.math cimport sqrt, log
from libc.string cimport memset

from mlmeta._core._linalg cimport gemm, jacobi_eigen, potrf_lower, trsm_left_lower


cdef inline void dense_block(const long long[::1] indptr, const long long[::1] indices,
                             const double[::1] data, Py_ssize_t a, Py_ssize_t nb,
                             double* B) noexcept nogil:
    """B (nb x nb, column-major) <- rows and columns a:a + nb of the CSR matrix (entries
    stored twice add up)."""
    cdef Py_ssize_t r, c, kk
    memset(B, 0, nb * nb * sizeof(double))
    for r in range(a, a + nb):
        for kk in range(indptr[r], indptr[r + 1]):
            c = indices[kk]
            if a <= c < a + nb:
                B[(r - a) + (c - a) * nb] += data[kk]


def block_factors(const long long[::1] indptr, const long long[::1] indices,
                  const double[::1] data, const Py_ssize_t[::1] starts,
                  const Py_ssize_t[::1] sel, double pivot_tol):
    """The Cholesky factors L of the blocks ``sel`` of V (CSR: indptr, indices, data).

    Returns (packed, ptr, logdet, fail, code, row, pivot): block sel[i]'s L (column-major,
    upper part zero) at ``packed[ptr[i]:ptr[i + 1]]``; logdet = sum of log|B| over the
    blocks factored; fail = -1, or the position in ``sel`` of the first block that is not
    positive definite (code 1: the factorisation broke down at ``row``) or numerically
    singular (code 2: the smallest squared pivot ``pivot`` at ``row``), the blocks after
    it not factored.
    """
    cdef Py_ssize_t m = sel.shape[0]
    ptr_arr = np.zeros(m + 1, dtype=np.intp)
    cdef Py_ssize_t[::1] ptr = ptr_arr
    cdef Py_ssize_t i, g, a, b, nb, r, c, kk, big = 1
    for i in range(m):
        nb = starts[sel[i] + 1] - starts[sel[i]]
        ptr[i + 1] = ptr[i] + nb * nb
        if nb > big:
            big = nb
    packed_arr = np.zeros(ptr[m])
    sd_arr = np.empty(big)
    cdef double[::1] packed = packed_arr
    cdef double[::1] sd = sd_arr
    cdef double* L
    cdef double logdet = 0.0, piv, pmin = 0.0
    cdef int info, fail = -1, code = 0, row = -1
    with nogil:
        for i in range(m):
            g = sel[i]
            a = starts[g]
            b = starts[g + 1]
            nb = b - a
            L = &packed[ptr[i]] if nb else NULL
            if nb == 0:
                continue
            dense_block(indptr, indices, data, a, nb, L)
            for r in range(nb):
                sd[r] = sqrt(L[r + r * nb])
            for c in range(nb):
                for r in range(nb):
                    L[r + c * nb] = L[r + c * nb] / (sd[r] * sd[c])
            info = potrf_lower(<int>nb, L, <int>nb)
            if info != 0:
                fail, code, row = <int>i, 1, info - 1
                break
            kk = 0
            pmin = L[0] * L[0]
            for r in range(1, nb):
                piv = L[r + r * nb] * L[r + r * nb]
                if piv < pmin:
                    pmin = piv
                    kk = r
            if not pmin > pivot_tol:
                fail, code, row = <int>i, 2, <int>kk
                break
            for c in range(nb):
                for r in range(nb):
                    L[r + c * nb] = sd[r] * L[r + c * nb] if r >= c else 0.0
                logdet += 2.0 * log(L[c + c * nb])
    return packed_arr, ptr_arr, logdet, fail, code, row, pmin


def solve_blocks(const double[::1] packed, const Py_ssize_t[::1] ptr,
                 const Py_ssize_t[::1] starts, const Py_ssize_t[::1] sel, double[::1, :] M):
    """M[block] <- L^-1 M[block] for each block sel[i] (rows starts[g]:starts[g + 1]),
    L its factor at ``packed[ptr[i]:ptr[i + 1]]`` (:func:`block_factors`); in place."""
    cdef Py_ssize_t i, a, nb
    cdef int ncol = <int>M.shape[1]
    cdef int ld = <int>M.shape[0]
    if ncol == 0 or ld == 0:
        return
    with nogil:
        for i in range(sel.shape[0]):
            a = starts[sel[i]]
            nb = starts[sel[i] + 1] - a
            if nb:
                trsm_left_lower(b'N', <int>nb, ncol, &packed[ptr[i]], <int>nb, &M[a, 0], ld)


def merged_products(const double[::1] packed, const Py_ssize_t[::1] loff,
                    const Py_ssize_t[::1] first, const Py_ssize_t[::1] last,
                    const Py_ssize_t[::1] nq, const double[::1, :] Zcat,
                    const Py_ssize_t[::1] qoff, const Py_ssize_t[::1] q,
                    const Py_ssize_t[::1, :] colpos, const double[::1, :] A,
                    double[::1] ZZ, const Py_ssize_t[::1] zz_at, double[::1] ZA,
                    const Py_ssize_t[::1] za_at):
    """The products of clusters whitened as one block (rows first[c]:last[c], factor L at
    ``packed[loff[c]:]``): with Zf the cluster's random-effects columns (row r's
    columns of level l, ``Zcat[r, qoff[l]:qoff[l] + q[l]]``, at columns
    ``colpos[r, l]:colpos[r, l] + q[l]`` of the nq[c] columns) and Zt = L^-1 Zf,
    ZZ[zz_at[c]:] <- Zt'Zt (nq x nq) and ZA[za_at[c]:] <- Zt'A[rows] (nq x A's columns,
    A whitened already), column-major."""
    cdef Py_ssize_t m = first.shape[0], n_levels = q.shape[0]
    cdef Py_ssize_t c, r, l, t, a, nb, big = 1
    cdef int ncol = <int>A.shape[1], lda = <int>A.shape[0], k
    for c in range(m):
        if (last[c] - first[c]) * nq[c] > big:
            big = (last[c] - first[c]) * nq[c]
    work_arr = np.empty(big)
    cdef double[::1] work = work_arr
    cdef double* Zf = &work[0]
    with nogil:
        for c in range(m):
            a = first[c]
            nb = last[c] - a
            k = <int>nq[c]
            if nb == 0 or k == 0:
                continue
            memset(Zf, 0, nb * k * sizeof(double))
            for l in range(n_levels):
                for t in range(q[l]):
                    for r in range(nb):
                        Zf[r + (colpos[a + r, l] + t) * nb] = Zcat[a + r, qoff[l] + t]
            trsm_left_lower(b'N', <int>nb, k, &packed[loff[c]], <int>nb, Zf, <int>nb)
            gemm(b'T', b'N', k, k, <int>nb, 1.0, Zf, <int>nb, Zf, <int>nb, 0.0, &ZZ[zz_at[c]], k)
            if ncol:
                gemm(b'T', b'N', k, ncol, <int>nb, 1.0, Zf, <int>nb, &A[a, 0], lda, 0.0,
                     &ZA[za_at[c]], k)


def rotate_blocks(const long long[::1] indptr, const long long[::1] indices,
                  const double[::1] data, const Py_ssize_t[::1] starts,
                  const Py_ssize_t[::1] sel, double[::1, :] M, double[::1] lam,
                  double max_cond, double[::1] Q, const Py_ssize_t[::1] qptr):
    """Each block g = sel[i] of V (rows and columns starts[g]:starts[g + 1]) as
    B = Q_i diag(w) Q_i' (Jacobi's method: eigenvalues of a positive definite B to high
    relative accuracy): M[block] <- Q_i'M[block] and lam[block] <- w (ascending), in
    place, Q_i (column-major) kept at ``Q[qptr[i]:qptr[i + 1]]``.

    Returns -1, or the position in ``sel`` of the first block whose decomposition failed
    or whose eigenvalues are not all positive with w_max <= max_cond w_min (the blocks
    before it rotated, the rest not)."""
    cdef Py_ssize_t m = sel.shape[0]
    cdef Py_ssize_t i, g, a, nb, big = 1
    for i in range(m):
        nb = starts[sel[i] + 1] - starts[sel[i]]
        if nb > big:
            big = nb
    W_arr = np.empty(2 * big * big)
    cdef double[::1] Wv = W_arr
    cdef double* B
    cdef int fail = -1
    with nogil:
        for i in range(m):
            g = sel[i]
            a = starts[g]
            nb = starts[g + 1] - a
            if nb == 0:
                continue
            B = &Q[qptr[i]]
            dense_block(indptr, indices, data, a, nb, B)
            if jacobi_eigen(<int>nb, B, &lam[a], &Wv[0]) != 0:
                fail = <int>i
                break
            if not (lam[a] > 0.0 and lam[a + nb - 1] <= max_cond * lam[a]):
                fail = <int>i
                break
    if fail < 0:
        rotate_by(Q, qptr, starts, sel, M)
    return fail


def rotate_by(const double[::1] Q, const Py_ssize_t[::1] qptr, const Py_ssize_t[::1] starts,
              const Py_ssize_t[::1] sel, double[::1, :] M):
    """M[block] <- Q_i'M[block] for each block g = sel[i] (rows starts[g]:starts[g + 1]),
    Q_i at ``Q[qptr[i]:qptr[i + 1]]`` (:func:`rotate_blocks`); in place."""
    cdef Py_ssize_t m = sel.shape[0]
    cdef Py_ssize_t i, a, nb, r, j, big = 1
    cdef int ncol = <int>M.shape[1], ld = <int>M.shape[0]
    if ncol == 0 or ld == 0:
        return
    for i in range(m):
        nb = starts[sel[i] + 1] - starts[sel[i]]
        if nb > big:
            big = nb
    T_arr = np.empty(big * ncol)
    cdef double[::1] Tv = T_arr
    cdef double* T = &Tv[0]
    with nogil:
        for i in range(m):
            a = starts[sel[i]]
            nb = starts[sel[i] + 1] - a
            if nb == 0:
                continue
            gemm(b'T', b'N', <int>nb, ncol, <int>nb, 1.0, &Q[qptr[i]], <int>nb, &M[a, 0], ld,
                 0.0, T, <int>nb)
            for j in range(ncol):
                for r in range(nb):
                    M[a + r, j] = T[r + j * nb]
