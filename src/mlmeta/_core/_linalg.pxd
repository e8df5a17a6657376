# Thin BLAS/LAPACK wrappers on column-major (Fortran-order) blocks.
# Every wrapper is `noexcept nogil`; the ones that can fail return LAPACK's info.
# The small ones are inline so the kernels' many tiny products cost no call.

from scipy.linalg.cython_blas cimport dgemm, dsymm, dtrsm
from scipy.linalg.cython_lapack cimport dpotrf, dpotri, dsyev
from libc.math cimport sqrt, fabs

cdef enum:
    SMALL_GEMM = 512     # inline loops for m n k up to this (BLAS call overhead dominates)
    SMALL_FACTOR = 8     # inline Cholesky / triangular solves up to this order


cdef inline void _small_gemm(bint ta, bint tb, int m, int n, int k, double alpha,
                             const double* A, int lda, const double* B, int ldb,
                             double beta, double* C, int ldc) noexcept nogil:
    """Plain loops for tiny products, where a BLAS call costs more than the work
    (one loop nest per transpose case so the inner loop has no branches)."""
    cdef int i, j, l
    cdef double acc
    for j in range(n):
        for i in range(m):
            acc = 0.0
            if not ta and not tb:
                for l in range(k):
                    acc += A[i + l * lda] * B[l + j * ldb]
            elif ta and not tb:
                for l in range(k):
                    acc += A[l + i * lda] * B[l + j * ldb]
            elif not ta:
                for l in range(k):
                    acc += A[i + l * lda] * B[j + l * ldb]
            else:
                for l in range(k):
                    acc += A[l + i * lda] * B[j + l * ldb]
            if beta == 0.0:
                C[i + j * ldc] = alpha * acc
            else:
                C[i + j * ldc] = alpha * acc + beta * C[i + j * ldc]


cdef inline void gemm(char transa, char transb, int m, int n, int k, double alpha,
                      const double* A, int lda, const double* B, int ldb,
                      double beta, double* C, int ldc) noexcept nogil:
    """C <- alpha op(A) op(B) + beta C with op(A) m x k, op(B) k x n."""
    cdef int i, j
    if m == 0 or n == 0:
        return
    if k == 0:
        if beta == 0.0:
            for j in range(n):
                for i in range(m):
                    C[i + j * ldc] = 0.0
        elif beta != 1.0:
            for j in range(n):
                for i in range(m):
                    C[i + j * ldc] *= beta
        return
    if m * n * k <= SMALL_GEMM:
        _small_gemm(transa == b'T', transb == b'T', m, n, k, alpha, A, lda, B, ldb, beta, C, ldc)
        return
    dgemm(&transa, &transb, &m, &n, &k, &alpha, <double*>A, &lda, <double*>B, &ldb,
          &beta, C, &ldc)


cdef inline void trsm_left_lower(char trans, int m, int n, const double* L, int ldl,
                                 double* B, int ldb) noexcept nogil:
    """B <- op(L)^{-1} B for lower-triangular L (m x m), B m x n; op = 'N' or 'T'."""
    cdef char side = b'L'
    cdef char uplo = b'L'
    cdef char diag = b'N'
    cdef double one = 1.0
    cdef int j
    if m == 0 or n == 0:
        return
    cdef int i, l
    cdef double acc
    cdef double rd[SMALL_FACTOR]
    if m == 1:
        acc = 1.0 / L[0]
        for j in range(n):
            B[j * ldb] *= acc
        return
    if m <= SMALL_FACTOR:
        for i in range(m):
            rd[i] = 1.0 / L[i + i * ldl]      # multiply, not divide, in the loops
        if trans == b'N':
            for j in range(n):
                for i in range(m):
                    acc = B[i + j * ldb]
                    for l in range(i):
                        acc -= L[i + l * ldl] * B[l + j * ldb]
                    B[i + j * ldb] = acc * rd[i]
        else:
            # column (axpy) form: a dot product here would be vectorised into wide loads of
            # values just stored one by one, which stalls store forwarding
            for j in range(n):
                for i in range(m - 1, -1, -1):
                    acc = B[i + j * ldb] * rd[i]
                    B[i + j * ldb] = acc
                    for l in range(i):
                        B[l + j * ldb] -= L[i + l * ldl] * acc
        return
    dtrsm(&side, &uplo, &trans, &diag, &m, &n, &one, <double*>L, &ldl, B, &ldb)


cdef inline int potrf_lower(int n, double* A, int lda) noexcept nogil:
    """Lower Cholesky factor in place (A = L L'); returns LAPACK info."""
    cdef char uplo = b'L'
    cdef int info = 0
    cdef int i, j, l
    cdef double acc, d
    if n <= SMALL_FACTOR:
        for j in range(n):
            d = A[j + j * lda]
            for l in range(j):
                d -= A[j + l * lda] * A[j + l * lda]
            if not (d > 0.0):
                return j + 1
            d = sqrt(d)
            A[j + j * lda] = d
            d = 1.0 / d
            for i in range(j + 1, n):
                acc = A[i + j * lda]
                for l in range(j):
                    acc -= A[i + l * lda] * A[j + l * lda]
                A[i + j * lda] = acc * d
        return 0
    dpotrf(&uplo, &n, A, &lda, &info)
    return info


cdef inline int potri_lower_tri(int n, double* A, int lda) noexcept nogil:
    """The lower triangle of A <- (L L')^-1 from the lower Cholesky factor in A (the
    upper triangle untouched); returns LAPACK info."""
    cdef char uplo = b'L'
    cdef int info = 0
    if n == 0:
        return 0
    dpotri(&uplo, &n, A, &lda, &info)
    return info


cdef inline int potri_lower(int n, double* A, int lda) noexcept nogil:
    """A <- (L L')^-1 from the lower Cholesky factor in A, both triangles filled;
    returns LAPACK info."""
    cdef int i, j
    cdef int info = potri_lower_tri(n, A, lda)
    for j in range(n):
        for i in range(j):
            A[i + j * lda] = A[j + i * lda]
    return info


cdef inline void symm_left_lower(int m, int n, double alpha, const double* A, int lda,
                                 const double* B, int ldb, double beta, double* C,
                                 int ldc) noexcept nogil:
    """C <- alpha A B + beta C with A m x m symmetric, held in its lower triangle."""
    cdef char side = b'L'
    cdef char uplo = b'L'
    if m == 0 or n == 0:
        return
    dsymm(&side, &uplo, &m, &n, &alpha, <double*>A, &lda, <double*>B, &ldb, &beta, C, &ldc)


cdef inline void zero(double* a, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        a[i] = 0.0


cdef inline void copy(const double* src, double* dst, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        dst[i] = src[i]


cdef enum:
    # Jacobi's method up to this order: for 2 x 2 one rotation (LAPACK's own closed form,
    # without its setup, which costs more than the work); larger orders stay with dsyev
    # (with Jacobi's rounding from order 3, stored hard cases of fuzz_regressions.json
    # end at other optima: decisions near singular Hessians follow the last digits)
    SMALL_EIGEN = 2


cdef inline int jacobi_eigen(int n, double* A, double* w, double* work) noexcept nogil:
    """:func:`sym_eigen` by the cyclic Jacobi method (any order; ``work``: 2 n^2 numbers).
    Each rotation J(p, q) zeroes A_pq: tau = (A_qq - A_pp) / 2 A_pq,
    t = sign(tau) / (|tau| + sqrt(1 + tau^2)), c = 1 / sqrt(1 + t^2), s = t c; sweeps
    until every off-diagonal entry is below 1e-300 or 1e-17 sqrt(|A_pp A_qq|)."""
    cdef double* M = work
    cdef double* Vt = work + n * n
    cdef int i, j, p, q, k, _sweep, done = 0, best
    cdef double apq, tau, t, c, s, x, y, off
    for j in range(n):
        for i in range(j, n):
            M[i + j * n] = A[i + j * n]
            M[j + i * n] = A[i + j * n]
        for i in range(n):
            Vt[i + j * n] = 1.0 if i == j else 0.0
    for _sweep in range(60):
        done = 1
        for p in range(n - 1):
            for q in range(p + 1, n):
                apq = M[p + q * n]
                off = 1e-17 * sqrt(fabs(M[p + p * n] * M[q + q * n]))
                if fabs(apq) <= off or fabs(apq) < 1e-300:
                    M[p + q * n] = 0.0
                    M[q + p * n] = 0.0
                    continue
                done = 0
                tau = (M[q + q * n] - M[p + p * n]) / (2.0 * apq)
                t = 1.0 / (fabs(tau) + sqrt(1.0 + tau * tau))
                if tau < 0.0:
                    t = -t
                c = 1.0 / sqrt(1.0 + t * t)
                s = t * c
                for k in range(n):          # columns p, q of M J
                    x = M[k + p * n]
                    y = M[k + q * n]
                    M[k + p * n] = c * x - s * y
                    M[k + q * n] = s * x + c * y
                for k in range(n):          # rows p, q of J' (M J)
                    x = M[p + k * n]
                    y = M[q + k * n]
                    M[p + k * n] = c * x - s * y
                    M[q + k * n] = s * x + c * y
                M[p + q * n] = 0.0
                M[q + p * n] = 0.0
                for k in range(n):          # V J
                    x = Vt[k + p * n]
                    y = Vt[k + q * n]
                    Vt[k + p * n] = c * x - s * y
                    Vt[k + q * n] = s * x + c * y
        if done:
            break
    if not done:
        return 1
    # ascending order (selection: n is small)
    for j in range(n):
        w[j] = M[j + j * n]
    for j in range(n):
        best = j
        for i in range(j + 1, n):
            if w[i] < w[best]:
                best = i
        if best != j:
            x = w[j]
            w[j] = w[best]
            w[best] = x
            for k in range(n):
                x = Vt[k + j * n]
                Vt[k + j * n] = Vt[k + best * n]
                Vt[k + best * n] = x
    for j in range(n * n):
        A[j] = Vt[j]
    return 0


cdef inline int sym_eigen(int n, double* A, double* w, double* work, int lwork) noexcept nogil:
    """Eigen-decomposition of the symmetric n x n A (column-major; its lower triangle is
    read), as LAPACK's dsyev('V', 'L'): eigenvalues ascending in w, A overwritten by the
    orthonormal eigenvectors (column m for w[m]); :func:`jacobi_eigen` up to SMALL_EIGEN,
    dsyev above. ``work`` holds at least max(2 n^2, lwork) numbers. Returns 0, or
    nonzero when the method did not converge."""
    cdef char jobv = b'V'
    cdef char lo = b'L'
    cdef int info = 0
    if n > SMALL_EIGEN:
        dsyev(&jobv, &lo, &n, A, &n, w, work, &lwork, &info)
        return info
    return jacobi_eigen(n, A, w, work)
