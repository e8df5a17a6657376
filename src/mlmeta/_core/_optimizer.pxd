from mlmeta._core._problem cimport Prob, Work


cdef struct Options:
    int em_iter, maxiter
    double tol, em_tol      # em_tol: EM stops when the deviance changes by <= em_tol (|f| + em_tol)
    bint quasi              # BFGS updates of one finite-difference Hessian (exploratory runs)
    bint em_only            # no Newton steps: converged when EM met em_tol
    int em_switch           # EM iterate at which Newton may take over (0: never) ...
    double switch_dec       # ... when the Newton decrement there is at most this max(1, |f|)
    const double* known     # an optimum found already (NULL: none) ...
    double known_dev        # ... and its deviance
    const double* known_H   # its Hessian (k x k, NaN rows unknown; NULL: none)


cdef struct Out:
    double* dev
    double* beta
    double* se
    double* Hinv         # (X'V^-1X)^-1 at the end (p x p), in the design's working basis
    double* sig2
    double* theta_em
    double* log_em       # deviance after each EM iteration (NULL: not kept)
    double* log_newton   # deviance after each Newton iteration (NULL: not kept)
    double* hess         # the last Hessian of the Newton iterations (k x k; NULL: not kept)
    int* n_iter
    int* n_em
    int* joined
    int* status


cdef int fit_one(const Prob* P, Work* W, const double* y, double* th, const Options* O,
                 Out R) noexcept nogil
