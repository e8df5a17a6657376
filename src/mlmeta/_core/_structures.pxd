from mlmeta._core._problem cimport Prob, Work

cdef int set_factors(const Prob* P, Work* W, const double* th) noexcept nogil
cdef void em_project(const Prob* P, Py_ssize_t l, const double* Sig, double* th,
                     double* scratch) noexcept nogil
cdef void em_update(const Prob* P, Work* W, double* th) noexcept nogil
