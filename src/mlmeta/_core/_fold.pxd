from mlmeta._core._problem cimport Prob, Work

cdef void fold_prepare(const Prob* P, Work* W, double* logdet) noexcept nogil
cdef void fold_pieces(const Prob* P, Work* W, const double* Phi) noexcept nogil
cdef bint two_level(const Prob* P) noexcept nogil
cdef Py_ssize_t factor_two(const Prob* P, Work* W, double* logdet) noexcept nogil
cdef void solve_two(const Prob* P, Work* W, const double* Phi) noexcept nogil
