from mlmeta._core._problem cimport Prob, Work

cdef void set_response(const Prob* P, Work* W, const double* y) noexcept nogil
cdef Py_ssize_t factor_all(const Prob* P, Work* W, double* logdet) noexcept nogil
cdef void solve_all(const Prob* P, Work* W, const double* Phi, bint want_G,
                    bint want_E) noexcept nogil
cdef void inverse_H(const Prob* P, Work* W) noexcept nogil
cdef double evaluate(const Prob* P, Work* W, const double* th, double* grad, bint em,
                     double sigma2) noexcept nogil
