# Thin BLAS/LAPACK wrappers on column-major (Fortran-order) blocks.
# Every wrapper is `noexcept nogil`; the ones that can fail return LAPACK's info.

cdef void gemm(char transa, char transb, int m, int n, int k, double alpha,
               const double* A, int lda, const double* B, int ldb,
               double beta, double* C, int ldc) noexcept nogil

cdef void trsm_left_lower(char trans, int m, int n, const double* L, int ldl,
                          double* B, int ldb) noexcept nogil

cdef int potrf_lower(int n, double* A, int lda) noexcept nogil

cdef void zero(double* a, Py_ssize_t n) noexcept nogil

cdef void copy(const double* src, double* dst, Py_ssize_t n) noexcept nogil
