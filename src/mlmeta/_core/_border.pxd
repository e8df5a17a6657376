from mlmeta._core._nested cimport Tree
from mlmeta._core._problem cimport Prob, Work

cdef Py_ssize_t factor_crossed(const Prob* P, Work* W, Tree* t, double* logdet) noexcept nogil
cdef void solve_crossed(const Prob* P, Work* W, Tree* t, const double* Phi) noexcept nogil
