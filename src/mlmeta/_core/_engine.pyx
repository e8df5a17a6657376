# cython: language_level=3
"""The fitting engine: one compiled objective and one EM + Newton loop for every fit.

A :class:`Problem` holds everything about a nested model that does not depend on
theta (the kernel's tree and cross-products, the covariance structures as maps
theta -> T, the likelihood's constants) plus its workspaces. Every fit of the
package -- the main fit, refits, batches of outcome vectors, profiling with fixed
parameters, EM only, verbose runs -- goes through :meth:`Problem.fit`; every
evaluation of the objective (Satterthwaite df, variance-component information,
postestimation) goes through :meth:`Problem.evaluate`. Both call the one
``evaluate`` below.

The objective (DESIGN.md section 1). With the kernel's ``log|C|`` and
``S = A'V^-1 A`` (``A = [X, y]`` whitened), ``H = X'V^-1X``,
``beta = H^-1 X'V^-1 y`` and ``rss = y'V^-1 y - beta' X'V^-1 y``:

    known Lambda:     dev = n log 2pi + log|Lambda| + log|C| + rss
    profiled sigma^2: dev = dof (log 2pi + log sigma^2 + 1) + log|C|,  sigma^2 = rss / dof
    sigma^2 given:    dev = dof (log 2pi + log sigma^2) + log|C| + rss / sigma^2
    REML adds         log|H| - log|X'X| (and -p log 2pi with known Lambda)

with dof = n - p (REML) or n (ML); ``Lambda`` is relative to sigma^2 in the last
two forms. The gradient with respect to each level's factor ``T_l`` is ``2 G_l``
(the kernel's accumulation with ``Phi = fac gamma gamma' (+ [H^-1, 0; 0, 0] for
REML)``, ``gamma = (-beta, 1)``, ``fac = 1 / sigma^2`` or 1), chained to theta by

    d dev / d theta_k = sum_ij (dT / d theta_k)_ij (2 G)_ij .

Covariance structures reach the engine only as ``T(theta)`` and ``dT/dtheta``:
for identity, independent, exchangeable and unstructured levels ``T`` is linear
in theta (``T_flat = M theta`` with a constant ``M``); a custom (Stata pattern)
level has ``T = D chol(R)`` with ``D = diag(sd)`` and

    dT / d sd_a   = diag(1[sd_map == a]) chol(R)
    dT / d rho_b  = D L Psi(L^-1 dR_b L^-T),  Psi(M) = tril(M, -1) + diag(M) / 2 .

EM updates ``Sigma_l <- T_l (E_l / N_l) T_l'`` and projects it back on the level's
structure (:func:`em_project`); parameters outside their bounds after an update
are clipped (so fixed parameters, with equal bounds, stay where they are).

The Newton loop: parameters held at a bound by their gradient are fixed for the
step; the rest take a Newton step with a finite-difference Hessian of the
analytic gradient (eigenvalues made positive), backtracking along the projected
path; a zero variance whose increase lowers the deviance is a saddle and is left.
Exploratory runs (``quasi``) update one differenced Hessian by BFGS and may stop
on reaching an optimum already known.

A Problem is not reentrant: its workspaces are shared by its calls, so every
Python-level method holds the problem's lock while it runs.
"""

import threading

import numpy as np

from mlmeta._threads import parallel_calls
from libc.math cimport log, sqrt, fabs, INFINITY, NAN
from libc.stdlib cimport malloc, free
from scipy.linalg.cython_lapack cimport dpotrf, dsyev

from mlmeta._core._linalg cimport gemm, zero, copy, potrf_lower, trsm_left_lower
from mlmeta._core._nested cimport (Tree, SubBlocks, NestedKernel, factor_cluster, invert_cluster,
                                   accumulate_cluster, assemble_factors, reduce_factors)

cdef double LOG2PI = 1.8378770664093453

cdef enum:
    K_IDENTITY = 0
    K_INDEPENDENT = 1
    K_EXCHANGEABLE = 2
    K_UNSTRUCTURED = 3
    K_CUSTOM = 4

# status codes of an evaluation (> 0: 1 + the node whose block failed)
cdef enum:
    ST_OK = 0
    ST_H = -1          # X'V^-1X not positive definite
    ST_R = -2          # a custom level's correlation matrix not positive definite
    ST_SIGMA = -3      # profiled residual variance not positive
    ST_NONFINITE = -4  # theta not finite

KINDS = {"identity": K_IDENTITY, "independent": K_INDEPENDENT, "exchangeable": K_EXCHANGEABLE,
         "unstructured": K_UNSTRUCTURED, "custom": K_CUSTOM}


cdef struct Prob:
    Tree tree
    SubBlocks sb
    Py_ssize_t n_clusters, n_nodes, n_levels, n_obs
    const Py_ssize_t* cluster_ptr
    const Py_ssize_t* q
    const Py_ssize_t* t_off
    const Py_ssize_t* kind
    const Py_ssize_t* th_off
    const Py_ssize_t* n_th
    const Py_ssize_t* n_sd       # custom levels: number of free SDs (the rest are correlations)
    const Py_ssize_t* c_off      # custom levels: offset into cmap / cfix (q + q*q entries)
    const Py_ssize_t* cmap       # sd_map (q) then corr_map (q x q): local theta index or -1
    const double* cfix           # the fixed values where the map is -1
    const double* n_groups
    const double* M              # t_len x n_theta, column-major: dT/dtheta of linear levels
    const double* lower
    const double* upper
    const double* ZA0
    const double* AA0
    const double* Zw
    const Py_ssize_t* zw_off
    const double* Xw
    const Py_ssize_t* node_r0
    const Py_ssize_t* node_r1
    Py_ssize_t zz_len, za_len, tn_len, t_len, maxq, scratch_len
    int n_theta, p, ncol, reml, profiled, has_custom
    double logdet_Lambda, logdet_XtX, scale


cdef struct Work:
    double* WB
    double* WR
    double* SB
    double* WW
    double* KK
    double* Tn
    double* GN
    double* EN
    double* ZA
    double* AA
    double* S
    double* scratch
    double* Tlev
    double* G
    double* E
    double* Hc
    double* Hinv
    double* beta
    double* Phi
    double* D        # dT/dtheta (t_len x n_theta): M, with custom levels' columns per evaluation
    double* cs       # custom-structure scratch
    double* tmp      # optimiser scratch: see fit_one
    double sigma2, rss, logdet_C, logdet_H
    int n_evals, status


# -- covariance structures: theta -> T, dT/dtheta, EM projection ---------------------

cdef int custom_T(const Prob* P, Py_ssize_t l, const double* th, double* T, double* D,
                  double* cs) noexcept nogil:
    """T = D chol(R) of a custom level and its derivatives (columns th_off..th_off+n_th
    of the t_len-row matrix D, rows t_off[l]..). Returns ST_R if R is not positive definite."""
    cdef Py_ssize_t q = P.q[l], o = P.th_off[l], r0 = P.t_off[l], k, i, j, m, b
    cdef const Py_ssize_t* smap = P.cmap + P.c_off[l]
    cdef const Py_ssize_t* cmap = smap + q
    cdef const double* sfix = P.cfix + P.c_off[l]
    cdef const double* cfix = sfix + q
    cdef double* sd = cs
    cdef double* L = sd + q
    cdef double* Li = L + q * q
    cdef double* A = Li + q * q
    cdef double* Ps = A + q * q
    cdef double acc
    cdef int qi = <int>q
    for i in range(q):
        sd[i] = th[o + smap[i]] if smap[i] >= 0 else sfix[i]
    for j in range(q):
        for i in range(q):
            if i == j:
                L[i + j * q] = 1.0
            elif cmap[i + j * q] >= 0:
                L[i + j * q] = th[o + cmap[i + j * q]]
            else:
                L[i + j * q] = cfix[i + j * q]
    if potrf_lower(qi, L, qi) != 0:
        return ST_R
    for j in range(q):
        for i in range(j):
            L[i + j * q] = 0.0
        for i in range(q):
            T[i + j * q] = sd[i] * L[i + j * q]
            Li[i + j * q] = 1.0 if i == j else 0.0
    trsm_left_lower(b'N', qi, qi, L, qi, Li, qi)
    for k in range(P.n_th[l]):
        for j in range(q):
            for i in range(q):
                D[r0 + i + j * q + (o + k) * P.t_len] = 0.0
    for k in range(P.n_sd[l]):
        for i in range(q):
            if smap[i] == k:
                for j in range(q):
                    D[r0 + i + j * q + (o + k) * P.t_len] = L[i + j * q]
    for k in range(P.n_sd[l], P.n_th[l]):
        # A = Li dR_k (dR_k: ones where corr_map == k), then Ps = A Li'
        for j in range(q):
            for i in range(q):
                acc = 0.0
                for m in range(q):
                    if m != j and cmap[m + j * q] == k:
                        acc += Li[i + m * q]
                A[i + j * q] = acc
        for j in range(q):
            for i in range(q):
                acc = 0.0
                for m in range(q):
                    acc += A[i + m * q] * Li[j + m * q]
                Ps[i + j * q] = acc if i > j else (0.5 * acc if i == j else 0.0)
        for j in range(q):
            for i in range(q):
                acc = 0.0
                for m in range(q):
                    acc += L[i + m * q] * Ps[m + j * q]
                D[r0 + i + j * q + (o + k) * P.t_len] = sd[i] * acc
    return ST_OK


cdef int set_factors(const Prob* P, Work* W, const double* th) noexcept nogil:
    """W.Tlev = T(theta) for every level (column-major blocks at t_off) and W.D = dT/dtheta."""
    cdef Py_ssize_t i, k, l
    cdef double acc
    cdef int st
    for k in range(P.n_theta):
        if not (fabs(th[k]) < INFINITY):
            return ST_NONFINITE
    for i in range(P.t_len):
        acc = 0.0
        for k in range(P.n_theta):
            acc = acc + P.M[i + k * P.t_len] * th[k]
        W.Tlev[i] = acc
    if P.has_custom:
        for l in range(P.n_levels):
            if P.kind[l] == K_CUSTOM:
                st = custom_T(P, l, th, W.Tlev + P.t_off[l], W.D, W.cs)
                if st != ST_OK:
                    return st
    return ST_OK


cdef void em_project(const Prob* P, Py_ssize_t l, const double* Sig, double* th,
                     double* scratch) noexcept nogil:
    """theta of level l from Sigma_l (q x q, symmetric): the structure's moment projection.

    identity: s = sqrt(mean diag); independent: s_i = sqrt(Sigma_ii); exchangeable:
    a = sqrt(v - c), g = (-a + sqrt(a^2 + q c)) / q with v = mean diag and c = mean
    off-diagonal (clipped to [-v/(q-1), v]); unstructured: vech(chol(Sigma)) (kept if
    Sigma is not positive definite); custom: each free SD the mean of its elements'
    SDs, each free correlation the mean of its elements' correlations, within +-0.95."""
    cdef Py_ssize_t q = P.q[l], o = P.th_off[l], i, j, c, n
    cdef double v, cov, a, g, acc
    cdef int qi = <int>q, info = 0
    cdef char lo = b'L'
    cdef const Py_ssize_t* smap
    cdef const Py_ssize_t* cmap
    if P.kind[l] == K_IDENTITY:
        v = 0.0
        for i in range(q):
            v = v + Sig[i + i * q]
        th[o] = sqrt(v / q) if v > 0 else 0.0
    elif P.kind[l] == K_INDEPENDENT:
        for i in range(q):
            th[o + i] = sqrt(Sig[i + i * q]) if Sig[i + i * q] > 0 else 0.0
    elif P.kind[l] == K_EXCHANGEABLE:
        v = 0.0
        cov = 0.0
        for i in range(q):
            v = v + Sig[i + i * q]
            for j in range(q):
                if i != j:
                    cov = cov + Sig[i + j * q]
        v = v / q if v > 0 else 0.0
        cov = cov / (q * (q - 1))
        if cov < -v / (q - 1):
            cov = -v / (q - 1)
        if cov > v:
            cov = v
        a = sqrt(v - cov) if v - cov > 0 else 0.0
        g = a * a + q * cov
        th[o] = a
        th[o + 1] = (-a + (sqrt(g) if g > 0 else 0.0)) / q
    elif P.kind[l] == K_UNSTRUCTURED:
        copy(Sig, scratch, q * q)
        dpotrf(&lo, &qi, scratch, &qi, &info)
        if info != 0:
            return
        c = 0
        for j in range(q):
            for i in range(j, q):
                th[o + c] = scratch[i + j * q]
                c += 1
    else:
        smap = P.cmap + P.c_off[l]
        cmap = smap + q
        for i in range(q):
            scratch[i] = sqrt(Sig[i + i * q]) if Sig[i + i * q] > 0 else 0.0
        for c in range(P.n_sd[l]):
            acc = 0.0
            n = 0
            for i in range(q):
                if smap[i] == c:
                    acc += scratch[i]
                    n += 1
            th[o + c] = acc / n if n > 0 else 0.0
        for c in range(P.n_sd[l], P.n_th[l]):
            acc = 0.0
            n = 0
            for j in range(q):
                for i in range(j):
                    if cmap[i + j * q] == c:
                        if scratch[i] > 0 and scratch[j] > 0:
                            acc += 0.5 * (Sig[i + j * q] + Sig[j + i * q]) / (scratch[i] * scratch[j])
                        n += 1
            acc = acc / n if n > 0 else 0.0
            th[o + c] = -0.95 if acc < -0.95 else (0.95 if acc > 0.95 else acc)


cdef void em_update(const Prob* P, Work* W, double* th) noexcept nogil:
    """Sigma_l <- T_l (E_l / N_l) T_l' (after an evaluation with em), projected on each
    level's structure, then theta clipped to its bounds."""
    cdef Py_ssize_t l, i, j, q
    cdef double* T
    cdef double* E
    cdef double* Sig = W.scratch
    cdef double* tmp = W.scratch + P.maxq * P.maxq
    cdef double* pscr = tmp + P.maxq * P.maxq
    cdef int qi
    for l in range(P.n_levels):
        q = P.q[l]
        qi = <int>q
        T = W.Tlev + P.t_off[l]
        E = W.E + P.t_off[l]
        gemm(b'N', b'N', qi, qi, qi, 1.0 / P.n_groups[l], T, qi, E, qi, 0.0, tmp, qi)
        gemm(b'N', b'T', qi, qi, qi, 1.0, tmp, qi, T, qi, 0.0, Sig, qi)
        for j in range(q):
            for i in range(j):
                Sig[i + j * q] = 0.5 * (Sig[i + j * q] + Sig[j + i * q])
                Sig[j + i * q] = Sig[i + j * q]
        em_project(P, l, Sig, th, pscr)
    for i in range(P.n_theta):
        if th[i] < P.lower[i]:
            th[i] = P.lower[i]
        if th[i] > P.upper[i]:
            th[i] = P.upper[i]


# -- the objective -------------------------------------------------------------------

cdef void set_response(const Prob* P, Work* W, const double* y) noexcept nogil:
    """The outcome-dependent parts of ZA and A'A for a whitened outcome y (NULL: the
    design's own outcome, whose pieces the kernel holds)."""
    cdef Py_ssize_t a, l, i, r, j, ql
    cdef int p = P.p
    cdef double acc
    copy(P.ZA0, W.ZA, P.za_len)
    copy(P.AA0, W.AA, P.ncol * P.ncol)
    if y == NULL:
        return
    for a in range(P.n_nodes):
        l = P.tree.level[a]
        ql = P.q[l]
        for i in range(ql):
            acc = 0.0
            for r in range(P.node_r0[a], P.node_r1[a]):
                acc = acc + P.Zw[P.zw_off[l] + r * ql + i] * y[r]
            W.ZA[P.tree.za_ptr[a] + p * ql + i] = acc
    for j in range(p):
        acc = 0.0
        for r in range(P.n_obs):
            acc = acc + P.Xw[r * p + j] * y[r]
        W.AA[j + p * P.ncol] = acc
        W.AA[p + j * P.ncol] = acc
    acc = 0.0
    for r in range(P.n_obs):
        acc = acc + y[r] * y[r]
    W.AA[p + p * P.ncol] = acc


cdef Py_ssize_t factor_all(const Prob* P, Work* W, double* logdet) noexcept nogil:
    """Factor every cluster at the node factors W.Tn (assembled from W.Tlev): W.S =
    A'V^-1A, logdet += log|C|. Returns 0 or 1 + the node whose block failed."""
    cdef Tree t = P.tree
    cdef Py_ssize_t j, st
    t.ZA = W.ZA
    t.T = W.Tn
    zero(W.Tn, P.tn_len)
    assemble_factors(&P.sb, W.Tlev, W.Tn)
    copy(W.AA, W.S, P.ncol * P.ncol)
    for j in range(P.n_clusters):
        st = factor_cluster(&t, P.cluster_ptr[j], P.cluster_ptr[j + 1], W.WB, W.WR, W.S, logdet,
                            W.scratch)
        if st != 0:
            return st
    return 0


cdef void solve_all(const Prob* P, Work* W, const double* Phi) noexcept nogil:
    """After factor_all: the selected inverse and node solution of every cluster, and the
    per-level gradient pieces W.G and EM moments W.E for this Phi."""
    cdef Tree t = P.tree
    cdef Py_ssize_t j
    t.ZA = W.ZA
    t.T = W.Tn
    for j in range(P.n_clusters):
        invert_cluster(&t, P.cluster_ptr[j], P.cluster_ptr[j + 1], W.WB, W.WR, W.SB, W.WW)
        accumulate_cluster(&t, P.cluster_ptr[j], P.cluster_ptr[j + 1], W.SB, W.WW, W.KK, Phi,
                           W.GN, W.EN, W.scratch, P.maxq)
    zero(W.G, P.t_len)
    reduce_factors(&P.sb, W.GN, W.G)
    zero(W.E, P.t_len)
    reduce_factors(&P.sb, W.EN, W.E)


cdef double evaluate(const Prob* P, Work* W, const double* th, double* grad, bint em,
                     double sigma2) noexcept nogil:
    """Deviance at theta (module docstring), INFINITY with W.status set if it is not
    defined there; the gradient into ``grad`` when it is not NULL, the EM moments into
    W.E when ``em``. ``sigma2 > 0`` evaluates a profiled-residual model at that
    residual variance instead of profiling it out."""
    cdef Py_ssize_t i, k, j
    cdef int p = P.p
    cdef int nc = P.ncol
    cdef double logdet = 0.0
    cdef double rss, logdet_H, dev, dof, fac, acc
    cdef Py_ssize_t st
    W.n_evals += 1
    W.status = set_factors(P, W, th)
    if W.status != ST_OK:
        return INFINITY
    st = factor_all(P, W, &logdet)
    if st != 0:
        W.status = <int>st
        return INFINITY
    logdet_H = 0.0
    if p > 0:
        for j in range(p):
            for i in range(p):
                W.Hc[i + j * p] = W.S[i + j * nc]
            W.beta[j] = W.S[j + p * nc]
        if potrf_lower(p, W.Hc, p) != 0:
            W.status = ST_H
            return INFINITY
        trsm_left_lower(b'N', p, 1, W.Hc, p, W.beta, p)
        trsm_left_lower(b'T', p, 1, W.Hc, p, W.beta, p)
        for j in range(p):
            logdet_H = logdet_H + 2.0 * log(W.Hc[j + j * p])
        zero(W.Hinv, p * p)
        for j in range(p):
            W.Hinv[j + j * p] = 1.0
        trsm_left_lower(b'N', p, p, W.Hc, p, W.Hinv, p)
        trsm_left_lower(b'T', p, p, W.Hc, p, W.Hinv, p)
    rss = W.S[p + p * nc]
    for j in range(p):
        rss = rss - W.S[p + j * nc] * W.beta[j]
    W.rss = rss
    W.logdet_C = logdet
    W.logdet_H = logdet_H
    if P.profiled:
        dof = <double>(P.n_obs - p) if P.reml else <double>P.n_obs
        if sigma2 > 0:
            W.sigma2 = sigma2
            dev = dof * (LOG2PI + log(sigma2)) + logdet + rss / sigma2
        else:
            W.sigma2 = rss / dof
            if not (W.sigma2 > 0):
                W.status = ST_SIGMA
                return INFINITY
            dev = dof * (LOG2PI + log(W.sigma2) + 1.0) + logdet
        fac = 1.0 / W.sigma2
    else:
        W.sigma2 = 1.0
        dev = P.n_obs * LOG2PI + P.logdet_Lambda + logdet + rss
        if P.reml:
            dev = dev - p * LOG2PI
        fac = 1.0
    if P.reml:
        dev = dev + logdet_H - P.logdet_XtX
    if grad == NULL and not em:
        return dev
    # Phi = fac gamma gamma' (+ [H^-1, 0; 0, 0] for REML), gamma = (-beta, 1)
    for j in range(nc):
        for i in range(nc):
            W.Phi[i + j * nc] = fac * (-W.beta[i] if i < p else 1.0) * (-W.beta[j] if j < p else 1.0)
    if P.reml:
        for j in range(p):
            for i in range(p):
                W.Phi[i + j * nc] += W.Hinv[i + j * p]
    solve_all(P, W, W.Phi)
    if grad != NULL:
        for k in range(P.n_theta):
            acc = 0.0
            for i in range(P.t_len):
                acc = acc + W.D[i + k * P.t_len] * W.G[i]
            grad[k] = 2.0 * acc
    return dev


# -- the optimiser -----------------------------------------------------------------------

cdef struct Options:
    int em_iter, maxiter
    double tol, em_tol      # em_tol: EM stops when the deviance changes by <= em_tol (|f| + em_tol)
    bint quasi              # BFGS updates of one finite-difference Hessian (exploratory runs)
    bint em_only            # no Newton steps: converged when EM met em_tol
    const double* known     # an optimum found already (NULL: none) ...
    double known_dev        # ... and its deviance


cdef inline void bfgs_update(double* Hq, const double* s, const double* yv, double* Hs,
                             int k) noexcept nogil:
    """Hq <- Hq + y y'/(s'y) - (Hq s)(Hq s)'/(s' Hq s), skipped unless both curvatures > 0."""
    cdef int i, j
    cdef double sy = 0.0, sHs = 0.0, ss = 0.0, yy = 0.0
    for i in range(k):
        Hs[i] = 0.0
        for j in range(k):
            Hs[i] += Hq[i + j * k] * s[j]
    for i in range(k):
        sy += s[i] * yv[i]
        sHs += s[i] * Hs[i]
        ss += s[i] * s[i]
        yy += yv[i] * yv[i]
    if not (sy > 1e-10 * sqrt(ss * yy)) or not (sHs > 0.0):
        return
    for j in range(k):
        for i in range(k):
            Hq[i + j * k] += yv[i] * yv[j] / sy - Hs[i] * Hs[j] / sHs


cdef struct Out:
    double* dev
    double* beta
    double* se
    double* sig2
    double* theta_em
    double* log_em       # deviance after each EM iteration (NULL: not kept)
    double* log_newton   # deviance after each Newton iteration (NULL: not kept)
    int* n_iter
    int* n_em
    int* joined
    int* status


cdef int fit_one(const Prob* P, Work* W, const double* y, double* th, const Options* O,
                 Out R) noexcept nogil:
    """Fit one outcome vector (NULL: the design's own) from theta ``th`` (updated in
    place); returns 1 if converged.

    Converged means: the Hessian of the free parameters is positive definite and the
    Newton decrement g'H^-1g is at most ``tol max(1, |f|)`` (EM only: the deviance
    changed by at most em_tol in the last EM iteration). With ``O.quasi`` the Hessian
    is differenced once (and again when a parameter leaves a bound) and then updated
    by BFGS; such runs stop at a decrement of 1e-10 max(1, |f|) and serve to explore,
    not to certify. With ``O.known`` a run that comes within 5 % of that optimum
    without a lower deviance stops there (``joined``), since it would only find it again.
    """
    cdef int k = P.n_theta
    cdef int it, i, j, m, nf, lw, info = 0, n_half, accepted, moved, pd, converged, have_h, joined
    cdef int em_done = 0
    cdef double f, fc, fscale, gmax, dec, h, wmax, big, tt, armijo, stop, near, eps = 1e-12
    cdef char jobv = b'V'
    cdef char lo = b'L'
    cdef double* g = W.tmp
    cdef double* gc = g + k
    cdef double* cand = gc + k
    cdef double* step = cand + k
    cdef double* tp = step + k
    cdef double* gp = tp + k
    cdef double* H = gp + k
    cdef double* w = H + k * k
    cdef double* work = w + k
    cdef int* idx = <int*>(work + 4 * k + 8)
    cdef double* Hq = work + 5 * k + 8
    cdef double* Hs = Hq + k * k
    cdef double* hk = Hs + k          # 1 where Hq holds a differenced (or updated) row
    lw = 4 * k + 8
    W.n_evals = 0
    joined = 0
    have_h = 0
    set_response(P, W, y)
    fc = INFINITY
    R.n_em[0] = 0
    for i in range(k):
        if th[i] < P.lower[i]:
            th[i] = P.lower[i]
        if th[i] > P.upper[i]:
            th[i] = P.upper[i]
    for it in range(O.em_iter):
        f = evaluate(P, W, th, NULL, True, 0.0)
        if f == INFINITY:
            break
        if R.log_em != NULL:
            R.log_em[it] = f
        em_update(P, W, th)
        R.n_em[0] = it + 1
        if fabs(fc - f) <= O.em_tol * (fabs(f) + O.em_tol):
            em_done = 1
            break
        fc = f
    copy(th, R.theta_em, k)
    f = evaluate(P, W, th, g, False, 0.0)
    converged = 0
    pd = 0
    dec = INFINITY
    it = 0
    if O.em_only:
        converged = em_done if f < INFINITY else 0
    while not O.em_only and it < O.maxiter and f < INFINITY:
        it += 1
        fscale = fabs(f) if fabs(f) > 1.0 else 1.0
        stop = (1e-10 if O.quasi else 1e-14) * fscale
        nf = 0
        gmax = 0.0
        for i in range(k):
            if not ((th[i] <= P.lower[i] + eps and g[i] >= 0) or (th[i] >= P.upper[i] - eps and g[i] <= 0)):
                idx[nf] = i
                nf += 1
                if fabs(g[i]) > gmax:
                    gmax = fabs(g[i])
                if not hk[i]:
                    have_h = 0
        if gmax <= 1e-12 * fscale:
            dec = 0.0
            pd = 1
        else:
            if O.quasi and have_h:
                for m in range(nf):
                    for j in range(nf):
                        H[j + m * nf] = Hq[idx[j] + idx[m] * k]
            else:
                for m in range(nf):
                    i = idx[m]
                    h = 1e-6 * (P.scale if P.scale > fabs(th[i]) else fabs(th[i]))
                    copy(th, tp, k)
                    tp[i] = tp[i] + h
                    evaluate(P, W, tp, gp, False, 0.0)
                    for j in range(nf):
                        H[j + m * nf] = (gp[idx[j]] - g[idx[j]]) / h
                for m in range(nf):
                    for j in range(m):
                        H[j + m * nf] = 0.5 * (H[j + m * nf] + H[m + j * nf])
                        H[m + j * nf] = H[j + m * nf]
            dsyev(&jobv, &lo, &nf, H, &nf, w, work, &lw, &info)
            if info != 0:
                break
            pd = 1 if w[0] > 0 else 0
            wmax = 0.0
            for m in range(nf):
                if fabs(w[m]) > wmax:
                    wmax = fabs(w[m])
            if O.quasi and not have_h:
                # start the updates from the differenced Hessian made positive definite
                # (U max(|w|, 1e-10 max|w|) U'); BFGS keeps it so
                zero(Hq, k * k)
                for i in range(k):
                    hk[i] = 0.0
                    Hq[i + i * k] = 1.0
                for m in range(nf):
                    hk[idx[m]] = 1.0
                    for j in range(nf):
                        tt = 0.0
                        for i in range(nf):
                            h = fabs(w[i]) if fabs(w[i]) > 1e-10 * wmax else 1e-10 * wmax
                            tt = tt + H[j + i * nf] * h * H[m + i * nf]
                        Hq[idx[j] + idx[m] * k] = tt
                have_h = 1
            for m in range(nf):
                tt = 0.0
                for j in range(nf):
                    tt = tt + H[j + m * nf] * g[idx[j]]
                h = fabs(w[m]) if fabs(w[m]) > 1e-10 * wmax else 1e-10 * wmax
                gp[m] = tt / h
            dec = 0.0
            for j in range(nf):
                tt = 0.0
                for m in range(nf):
                    tt = tt + H[j + m * nf] * gp[m]
                step[j] = -tt
                dec = dec - g[idx[j]] * step[j]
        if dec <= stop and pd:
            moved = 0
            for i in range(k):
                if P.lower[i] == 0.0 and P.upper[i] > 0.0 and th[i] <= 0.0 and fabs(g[i]) <= 1e-10 * fscale:
                    copy(th, tp, k)
                    tp[i] = 1e-3 * P.scale
                    fc = evaluate(P, W, tp, gp, False, 0.0)
                    if gp[i] < 0 and fc < f:
                        copy(tp, th, k)
                        copy(gp, g, k)
                        f = fc
                        moved = 1
                        have_h = 0
            if not moved:
                converged = 1
                if R.log_newton != NULL:
                    R.log_newton[it - 1] = f
                break
            if R.log_newton != NULL:
                R.log_newton[it - 1] = f
            continue
        big = 0.0
        for j in range(nf):
            if fabs(step[j]) > big:
                big = fabs(step[j])
        tt = P.scale
        for j in range(nf):
            if fabs(th[idx[j]]) > tt:
                tt = fabs(th[idx[j]])
        big = big / (10.0 * tt)
        if big > 1.0:
            for j in range(nf):
                step[j] = step[j] / big
        n_half = 5 if dec <= 1e-10 * fscale else 40
        tt = 1.0
        accepted = 0
        for m in range(n_half):
            copy(th, cand, k)
            armijo = 0.0
            for j in range(nf):
                i = idx[j]
                cand[i] = th[i] + tt * step[j]
                if cand[i] < P.lower[i]:
                    cand[i] = P.lower[i]
                if cand[i] > P.upper[i]:
                    cand[i] = P.upper[i]
                armijo = armijo + g[i] * (cand[i] - th[i])
            fc = evaluate(P, W, cand, gc, False, 0.0)
            if fc < INFINITY and fc <= f + 1e-4 * armijo + 1e-14 * fscale:
                accepted = 1
                break
            tt = tt * 0.5
        if not accepted:
            if R.log_newton != NULL:
                R.log_newton[it - 1] = f
            if dec <= 1e-10 * fscale:
                converged = pd
            elif O.quasi and have_h:
                have_h = 0          # a poor model Hessian: difference it again
                continue
            break
        if O.quasi:
            for i in range(k):
                tp[i] = cand[i] - th[i]
                gp[i] = gc[i] - g[i]
            bfgs_update(Hq, tp, gp, Hs, k)
        copy(cand, th, k)
        copy(gc, g, k)
        f = fc
        if R.log_newton != NULL:
            R.log_newton[it - 1] = f
        if O.known != NULL:
            near = 0.0
            tt = P.scale
            for i in range(k):
                if fabs(th[i] - O.known[i]) > near:
                    near = fabs(th[i] - O.known[i])
                if fabs(O.known[i]) > tt:
                    tt = fabs(O.known[i])
            if near <= 0.05 * tt and f >= O.known_dev - 1e-9 * (fabs(O.known_dev) if fabs(O.known_dev) > 1.0 else 1.0):
                copy(O.known, th, k)
                f = O.known_dev
                joined = 1
                converged = 1
                break
    if not O.em_only and not converged and f < INFINITY:
        fscale = fabs(f) if fabs(f) > 1.0 else 1.0
        converged = 1 if (pd and dec <= O.tol * fscale) else 0
    R.n_iter[0] = it
    R.joined[0] = joined
    # one more evaluation gives the deviance, beta and H^-1 at the final theta
    R.dev[0] = evaluate(P, W, th, NULL, False, 0.0)
    R.status[0] = W.status
    R.sig2[0] = W.sigma2
    if R.dev[0] < INFINITY:
        for j in range(P.p):
            R.beta[j] = W.beta[j]
            R.se[j] = sqrt(W.sigma2 * W.Hinv[j + j * P.p])
    else:
        converged = 0
        for j in range(P.p):
            R.beta[j] = NAN
            R.se[j] = NAN
    return converged


# -- the Python-facing problem object ----------------------------------------------------

cdef class Problem:
    """A nested model's objective and optimiser, with its workspaces (not reentrant:
    every method takes the problem's lock).

    Parameters
    ----------
    kernel : NestedKernel (the tree and the theta-independent cross-products).
    structs : per level, a dict with ``kind`` (a key of ``KINDS``), ``q``, ``n_theta``,
        ``dT`` ((n_theta, q, q), the constant derivatives of a linear structure) and,
        for ``custom``, ``n_sd``, ``sd_map`` (q), ``corr_map`` (q x q), ``sd_fixed``,
        ``corr_fixed``.
    lower, upper : bounds of theta.
    n_groups : groups per level.
    n_obs : number of observations.
    reml, profiled : method, and whether the residual variance is profiled out.
    logdet_Lambda, logdet_XtX, scale : constants of the likelihood; scale is the size
        of a typical sampling SD (finite-difference steps, saddle probes).
    Zw, Xw, node_rows : per level the whitened random design (n x q_l), the whitened
        fixed design and each node's sorted rows (first, last + 1): needed only to fit
        new outcome vectors (a diagonal Lambda); None when the problem fits its own.
    """
    cdef Prob P
    cdef NestedKernel K
    cdef object _keep, _lock, _bufs
    cdef Work* Ws
    cdef int n_slots
    cdef readonly int n_theta, p
    cdef readonly bint new_outcomes
    cdef readonly object lower, upper, t_off, q

    def __init__(self, NestedKernel kernel, structs, lower, upper, n_groups, Py_ssize_t n_obs,
                 bint reml, bint profiled, double logdet_Lambda, double logdet_XtX,
                 double scale, Zw=None, Xw=None, node_rows=None):
        K = kernel
        self.K = K
        L = K.n_levels
        if len(structs) != L:
            raise ValueError("one structure is needed per level")
        q = np.asarray(K.q)
        t_off = np.asarray(K.t_off)
        n_th = np.array([int(s["n_theta"]) for s in structs], dtype=np.intp)
        th_off = np.concatenate([[0], np.cumsum(n_th)]).astype(np.intp)
        k = int(th_off[-1])
        t_len = int(t_off[-1])
        kind = np.array([KINDS[s["kind"]] for s in structs], dtype=np.intp)
        M = np.zeros((t_len, max(k, 1)), order="F")
        n_sd = np.zeros(L, dtype=np.intp)
        c_off = np.zeros(L + 1, dtype=np.intp)
        cmap, cfix = [], []
        for l, s in enumerate(structs):
            ql = int(q[l])
            if int(s["q"]) != ql:
                raise ValueError(f"structure of level {l} has {s['q']} effects, the level {ql}")
            if s["kind"] == "custom":
                n_sd[l] = int(s["n_sd"])
                cmap += [np.asarray(s["sd_map"], dtype=np.intp),
                         np.asarray(s["corr_map"], dtype=np.intp).ravel(order="F")]
                cfix += [np.nan_to_num(np.asarray(s["sd_fixed"], dtype=float)),
                         np.nan_to_num(np.asarray(s["corr_fixed"], dtype=float)).ravel(order="F")]
                c_off[l + 1] = c_off[l] + ql + ql * ql
            else:
                c_off[l + 1] = c_off[l]
                dT = np.asarray(s["dT"], dtype=float)
                for i in range(n_th[l]):
                    M[t_off[l]:t_off[l + 1], th_off[l] + i] = dT[i].ravel(order="F")
        cmap = np.concatenate(cmap) if cmap else np.zeros(1, dtype=np.intp)
        cfix = np.concatenate(cfix) if cfix else np.zeros(1)
        lower = np.ascontiguousarray(lower, dtype=float)
        upper = np.ascontiguousarray(upper, dtype=float)
        if lower.shape[0] != k or upper.shape[0] != k:
            raise ValueError("lower/upper need one entry per theta")
        n_groups = np.ascontiguousarray(n_groups, dtype=float)
        self.new_outcomes = Zw is not None
        if Zw is None:
            Zw = [np.zeros((0, int(ql))) for ql in q]
            Xw = np.zeros((0, int(K.ncol) - 1))
            node_rows = (np.zeros(K.n_nodes, dtype=np.intp), np.zeros(K.n_nodes, dtype=np.intp))
        Zw = [np.ascontiguousarray(z, dtype=float) for z in Zw]
        zw_off = np.concatenate([[0], np.cumsum([z.size for z in Zw])]).astype(np.intp)
        Zw_flat = np.concatenate([z.ravel() for z in Zw] + [np.zeros(1)])
        p = int(K.ncol) - 1
        Xw = np.ascontiguousarray(Xw, dtype=float).reshape(-1, p) if p else np.zeros((0, 0))
        node_r0 = np.ascontiguousarray(node_rows[0], dtype=np.intp)
        node_r1 = np.ascontiguousarray(node_rows[1], dtype=np.intp)
        AA = np.asfortranarray(K.AA)
        self._keep = (q, t_off, n_th, th_off, kind, M, n_sd, c_off, cmap, cfix, lower, upper,
                      n_groups, Zw_flat, zw_off, Xw, node_r0, node_r1, AA)
        self.lower, self.upper, self.t_off, self.q = lower, upper, t_off, q
        self.n_theta = k
        self.p = p
        self._lock = threading.Lock()
        self._bufs = None
        self.Ws = NULL
        self.n_slots = 0
        cdef Py_ssize_t[::1] v_kind = kind, v_thoff = th_off, v_nth = n_th, v_nsd = n_sd
        cdef Py_ssize_t[::1] v_coff = c_off, v_cmap = cmap, v_zwoff = zw_off
        cdef Py_ssize_t[::1] v_r0 = node_r0, v_r1 = node_r1
        cdef double[::1] v_cfix = cfix, v_ng = n_groups, v_lo = lower, v_up = upper, v_zw = Zw_flat
        cdef double[::1, :] v_M = M
        cdef double[::1, :] v_AA = AA
        cdef const double[:, ::1] v_Xw = Xw
        cdef Prob* P = &self.P
        P.tree = K._tree()
        P.tree.ZA = NULL        # per workspace (the outcome's pieces) ...
        P.tree.T = NULL         # ... and per evaluation
        P.sb = K._subblocks()
        P.n_clusters = K.n_clusters
        P.n_nodes = K.n_nodes
        P.n_levels = L
        P.n_obs = n_obs
        P.cluster_ptr = &K._cluster_ptr[0]
        P.q = &K._q[0]
        P.t_off = &K._t_off[0]
        P.kind = &v_kind[0]
        P.th_off = &v_thoff[0]
        P.n_th = &v_nth[0]
        P.n_sd = &v_nsd[0]
        P.c_off = &v_coff[0]
        P.cmap = &v_cmap[0]
        P.cfix = &v_cfix[0]
        P.n_groups = &v_ng[0]
        P.M = &v_M[0, 0]
        P.lower = &v_lo[0] if k else NULL
        P.upper = &v_up[0] if k else NULL
        P.ZA0 = &K._ZA[0]
        P.AA0 = &v_AA[0, 0]
        P.Zw = &v_zw[0]
        P.zw_off = &v_zwoff[0]
        P.Xw = &v_Xw[0, 0] if p > 0 and Xw.shape[0] > 0 else NULL
        if n_obs < 1:
            raise ValueError("no observations")
        P.node_r0 = &v_r0[0]
        P.node_r1 = &v_r1[0]
        P.zz_len = K._ZZ.shape[0]
        P.za_len = K._ZA.shape[0]
        P.tn_len = K._tn_ptr[K._tn_ptr.shape[0] - 1]
        P.t_len = t_len
        P.maxq = K.maxq
        P.scratch_len = 3 * P.maxq * max(P.maxq, <Py_ssize_t>P.tree.ncol) + 16
        P.n_theta = k
        P.p = p
        P.ncol = p + 1
        P.reml = reml
        P.profiled = profiled
        P.has_custom = bool((kind == K_CUSTOM).any())
        P.logdet_Lambda = logdet_Lambda
        P.logdet_XtX = logdet_XtX
        P.scale = scale

    def __dealloc__(self):
        free(self.Ws)

    @property
    def n_obs(self):
        return self.P.n_obs

    cdef void _ensure_slots(self, int n) except *:
        """Workspaces for n simultaneous fits (kept; grown when more are asked for)."""
        if n <= self.n_slots:
            return
        cdef Prob* P = &self.P
        cdef int k = P.n_theta
        cdef int p = P.p
        cdef int nc = p + 1
        cdef Py_ssize_t ms = P.maxq
        sizes = [P.zz_len, P.zz_len, P.za_len, P.za_len, P.za_len, P.tn_len, P.tn_len, P.tn_len,
                 P.za_len, nc * nc, nc * nc, P.scratch_len, P.t_len, P.t_len, P.t_len,
                 max(p * p, 1), max(p * p, 1), max(p, 1), nc * nc, max(P.t_len * k, 1),
                 5 * ms * ms + ms + 8, 16 * k + 2 * k * k + 32]
        offs = np.concatenate([[0], np.cumsum(sizes)]).astype(np.intp)
        buf = np.zeros((n, int(offs[-1])), dtype=np.float64)
        cdef double[:, ::1] B = buf
        cdef Py_ssize_t[::1] o = offs
        cdef Work* Ws = <Work*>malloc(n * sizeof(Work))
        if Ws == NULL:
            raise MemoryError()
        cdef int c
        for c in range(n):
            Ws[c].WB = &B[c, o[0]]
            Ws[c].SB = &B[c, o[1]]
            Ws[c].WR = &B[c, o[2]]
            Ws[c].WW = &B[c, o[3]]
            Ws[c].KK = &B[c, o[4]]
            Ws[c].Tn = &B[c, o[5]]
            Ws[c].GN = &B[c, o[6]]
            Ws[c].EN = &B[c, o[7]]
            Ws[c].ZA = &B[c, o[8]]
            Ws[c].AA = &B[c, o[9]]
            Ws[c].S = &B[c, o[10]]
            Ws[c].scratch = &B[c, o[11]]
            Ws[c].Tlev = &B[c, o[12]]
            Ws[c].G = &B[c, o[13]]
            Ws[c].E = &B[c, o[14]]
            Ws[c].Hc = &B[c, o[15]]
            Ws[c].Hinv = &B[c, o[16]]
            Ws[c].beta = &B[c, o[17]]
            Ws[c].Phi = &B[c, o[18]]
            Ws[c].D = &B[c, o[19]]
            Ws[c].cs = &B[c, o[20]]
            Ws[c].tmp = &B[c, o[21]]
            if k:
                copy(P.M, Ws[c].D, P.t_len * k)
            Ws[c].n_evals = 0
            Ws[c].status = 0
        free(self.Ws)
        self.Ws = Ws
        self._bufs = (buf, offs)
        self.n_slots = n

    cdef Work* _slot0(self) except NULL:
        self._ensure_slots(1)
        set_response(&self.P, &self.Ws[0], NULL)
        return &self.Ws[0]

    cdef double _eval(self, double[::1] tv, double* grad, bint em, double s2) except? -1:
        """evaluate() on workspace 0 at the design's own outcome (the lock must be held)."""
        cdef Work* W = self._slot0()
        cdef const double* tp = &tv[0] if self.n_theta else NULL
        cdef double dev
        with nogil:
            dev = evaluate(&self.P, W, tp, grad, em, s2)
        return dev

    def _check_theta(self, theta):
        th = np.ascontiguousarray(theta, dtype=np.float64)
        if th.ndim != 1 or th.shape[0] != self.n_theta:
            raise ValueError(f"theta must have {self.n_theta} elements, got shape {th.shape}")
        return th

    def evaluate(self, theta, bint gradient=False, bint em=False, sigma2=None):
        """The objective at theta (the design's own outcome). Returns a dict with
        deviance (inf where undefined, with ``status`` saying why), beta, Hinv
        (= (X'V^-1X)^-1, relative to sigma^2), rss, logdet_C, logdet_H, sigma2, and
        ``grad`` (d deviance / d theta) and ``E`` (per-level EM moments, flattened like
        T) when asked for. ``sigma2``: evaluate a profiled-residual model at this
        residual variance (the deviance not profiled over it)."""
        th = self._check_theta(theta)
        cdef double[::1] tv = th
        cdef double s2 = 0.0 if sigma2 is None else float(sigma2)
        if sigma2 is not None and not s2 > 0:
            raise ValueError("sigma2 must be positive")
        grad = np.zeros(self.n_theta)
        cdef double[::1] gv = grad
        cdef Work* W
        cdef double dev
        cdef int p = self.p
        cdef double* gptr = &gv[0] if (gradient and self.n_theta) else NULL
        with self._lock:
            dev = self._eval(tv, gptr, em, s2)
            W = &self.Ws[0]
            out = dict(deviance=dev, status=W.status, sigma2=W.sigma2, rss=W.rss,
                       logdet_C=W.logdet_C, logdet_H=W.logdet_H, n_evals=1)
            out["beta"] = self._vec(W.beta, p)
            out["Hinv"] = self._vec(W.Hinv, p * p).reshape(p, p, order="F")
            if gradient:
                out["grad"] = grad
            if em:
                out["E"] = self._vec(W.E, self.P.t_len)
            if dev == INFINITY:
                out["beta"][:] = np.nan
                out["Hinv"][:] = np.nan
        return out

    def em_step(self, theta):
        """One EM update from theta: (theta', deviance at theta)."""
        th = self._check_theta(theta).copy()
        cdef double[::1] tv = th
        cdef double dev
        with self._lock:
            dev = self._eval(tv, NULL, True, 0.0)
            if dev < INFINITY and self.n_theta:
                em_update(&self.P, &self.Ws[0], &tv[0])
            status = self.Ws[0].status
        if dev == INFINITY:
            raise FloatingPointError(f"the objective is not defined at theta (status {status})")
        return th, dev

    def factors(self, theta):
        """(T, dT/dtheta) at theta: T flattened by level (column-major blocks at t_off),
        dT as a (t_len, n_theta) array. A test twin of the structures' maps."""
        th = self._check_theta(theta)
        cdef double[::1] tv = th
        cdef Work* W
        cdef int st
        with self._lock:
            self._ensure_slots(1)
            W = &self.Ws[0]
            st = set_factors(&self.P, W, &tv[0] if self.n_theta else NULL)
            if st != ST_OK:
                raise FloatingPointError(f"T(theta) is not defined at theta = {th} (status {st})")
            T = self._vec(W.Tlev, self.P.t_len)
            D = self._vec(W.D, self.P.t_len * self.n_theta).reshape(self.P.t_len, self.n_theta,
                                                                     order="F")
        return T, D

    def em_project(self, int level, Sigma, theta):
        """theta with level ``level``'s entries replaced by the EM projection of Sigma
        (a test twin of the structures' moment projections)."""
        if not 0 <= level < self.P.n_levels:
            raise ValueError("no such level")
        q = int(self.q[level])
        S = np.asfortranarray(Sigma, dtype=float)
        if S.shape != (q, q):
            raise ValueError(f"Sigma must be {q} x {q}")
        th = self._check_theta(theta).copy()
        cdef double[::1, :] sv = S
        cdef double[::1] tv = th
        scratch = np.zeros(5 * q * q + q + 8)
        cdef double[::1] sc = scratch
        em_project(&self.P, level, &sv[0, 0], &tv[0], &sc[0])
        return th

    def node_solution(self, theta):
        """Evaluate at theta and return (W, SB): W = C^-1 R per node (nq_a x ncol blocks at
        the kernel's za_ptr) and the blocks of C^-1 on the ZZ pattern."""
        th = self._check_theta(theta)
        cdef double[::1] tv = th
        cdef double dev
        with self._lock:
            dev = self._eval(tv, NULL, True, 0.0)
            if dev == INFINITY:
                raise FloatingPointError(f"the objective is not defined at theta = {th}")
            return self._vec(self.Ws[0].WW, self.P.za_len), self._vec(self.Ws[0].SB, self.P.zz_len)

    def pieces(self, T, Phi):
        """Kernel test twin: for a flat T (level blocks) and a symmetric Phi, refactor and
        return a dict with logdet (log|C|), S (= A'V^-1A), G and E (the per-level
        gradient pieces and EM moments of the kernel module's docstring), W and SB (the
        node solution, as :meth:`node_solution`) and status (0, or 1 + failed node)."""
        Tv_ = np.ascontiguousarray(T, dtype=float)
        Ph = np.asfortranarray(Phi, dtype=float)
        cdef Prob* P = &self.P
        if Tv_.shape[0] != P.t_len:
            raise ValueError("T has the wrong length")
        if Ph.shape != (P.ncol, P.ncol):
            raise ValueError("Phi must be (p+1) x (p+1)")
        cdef double[::1] Tv = Tv_
        cdef double[::1, :] Pv = Ph
        cdef Work* W
        cdef double logdet = 0.0
        cdef Py_ssize_t st
        cdef int nc = P.ncol
        with self._lock:
            W = self._slot0()
            copy(&Tv[0], W.Tlev, P.t_len)
            st = factor_all(P, W, &logdet)
            S = np.array(<double[:nc * nc]>W.S).reshape(nc, nc, order="F").copy()
            if st != 0:
                return dict(logdet=logdet, S=S, status=int(st))
            solve_all(P, W, &Pv[0, 0])
            return dict(logdet=logdet, S=S, G=self._vec(W.G, P.t_len), E=self._vec(W.E, P.t_len),
                        W=self._vec(W.WW, P.za_len), SB=self._vec(W.SB, P.zz_len), status=0)

    cdef object _vec(self, double* x, Py_ssize_t n):
        """A copy of n doubles of a workspace."""
        out = np.empty(n)
        cdef double[::1] o = out
        if n:
            copy(x, &o[0], n)
        return out

    def fit(self, theta0, Yw=None, lower=None, upper=None, *, int em_iter=20, double em_tol=0.0,
            int maxiter=1000, double tol=1e-6, bint quasi=False, bint em_only=False,
            known_theta=None, double known_dev=INFINITY, int n_threads=1, bint log=False):
        """Fit the rows of ``theta0`` (m x n_theta starts) to the design's own outcome
        (``Yw`` None) or to the rows of ``Yw`` (m x n whitened, sorted outcomes).

        ``lower``/``upper`` replace the problem's bounds (equal bounds fix a parameter).
        Runs are shared out over ``n_threads`` threads, each with its own workspace.
        Returns a dict of arrays: theta, theta_em (after EM), deviance, beta, se,
        converged, n_iter (Newton), n_em, n_evals, sigma2, joined, status and, with
        ``log``, log_em / log_newton (deviance per iteration, NaN past the end)."""
        cdef Prob P = self.P
        cdef int k = P.n_theta
        cdef int p = P.p
        th0 = np.atleast_2d(np.asarray(theta0, dtype=np.float64))
        if th0.shape[1] != k:
            raise ValueError(f"theta0 must have {k} columns, got {th0.shape[1]}")
        m = th0.shape[0]
        cdef bint own = Yw is None
        if not own:
            Yw = np.ascontiguousarray(Yw, dtype=np.float64)
            if Yw.shape != (m, P.n_obs):
                raise ValueError(f"Yw must be {m} x {P.n_obs}")
            if not self.new_outcomes:
                raise ValueError("this problem fits only its own outcome (a design whitened by "
                                 "a full sampling covariance V)")
        lo = self.lower if lower is None else np.ascontiguousarray(lower, dtype=float)
        up = self.upper if upper is None else np.ascontiguousarray(upper, dtype=float)
        if lo.shape[0] != k or up.shape[0] != k:
            raise ValueError("lower/upper need one entry per theta")
        cdef double[::1] lov = lo, upv = up
        if k:
            P.lower = &lov[0]
            P.upper = &upv[0]
        theta = np.ascontiguousarray(np.clip(th0, lo, up))
        n_log_em = max(em_iter, 1) if log else 1
        n_log_nt = max(maxiter, 1) if log else 1
        res = dict(theta=theta, theta_em=np.empty_like(theta), deviance=np.empty(m),
                   beta=np.zeros((m, max(p, 1))), se=np.zeros((m, max(p, 1))),
                   sigma2=np.ones(m), converged=np.zeros(m, dtype=np.intc),
                   n_iter=np.zeros(m, dtype=np.intc), n_em=np.zeros(m, dtype=np.intc),
                   n_evals=np.zeros(m, dtype=np.intc), joined=np.zeros(m, dtype=np.intc),
                   status=np.zeros(m, dtype=np.intc),
                   log_em=np.full((m, n_log_em), np.nan), log_newton=np.full((m, n_log_nt), np.nan))
        cdef Options O
        O.em_iter = em_iter
        O.maxiter = maxiter
        O.tol = tol
        O.em_tol = em_tol
        O.quasi = quasi
        O.em_only = em_only
        O.known_dev = known_dev
        O.known = NULL
        cdef double[::1] kn
        if known_theta is not None:
            known = np.ascontiguousarray(known_theta, dtype=np.float64)
            if known.shape[0] != k:
                raise ValueError("known_theta has the wrong length")
            kn = known
            O.known = &kn[0]
        cdef int nt = max(1, min(n_threads, m))
        runner = _Runner.__new__(_Runner)
        with self._lock:
            self._ensure_slots(nt)
            (<_Runner>runner).setup(self, P, O, Yw, res, log)
            parallel_calls((<_Runner>runner).run, [(c, nt) for c in range(nt)], nt)
        for key in ("converged", "joined"):
            res[key] = res[key].astype(bool)
        res["beta"] = res["beta"][:, :p]
        res["se"] = res["se"][:, :p]
        if not log:
            del res["log_em"], res["log_newton"]
        return res


cdef class _Runner:
    """Runs fit_one over the rows of a batch: ``run(slot, n_slots)`` fits rows slot,
    slot + n_slots, ... (interleaved, so threads get an even share of easy and hard
    fits) with workspace ``slot``, the GIL released throughout."""
    cdef Prob P
    cdef Options O
    cdef Problem prob
    cdef const double[:, ::1] Yw
    cdef bint own, log
    cdef double[:, ::1] th, bt, sv, tem, lem, lnt
    cdef double[::1] dv, s2
    cdef int[::1] cv, itv, ev, jv, emv, stv
    cdef Py_ssize_t n_rows

    cdef setup(self, Problem prob, Prob P, Options O, Yw, dict res, bint log):
        self.prob = prob
        self.P = P
        self.O = O
        self.own = Yw is None
        if not self.own:
            self.Yw = Yw
        self.log = log
        self.th, self.bt, self.sv, self.tem = res["theta"], res["beta"], res["se"], res["theta_em"]
        self.lem, self.lnt = res["log_em"], res["log_newton"]
        self.dv, self.s2 = res["deviance"], res["sigma2"]
        self.cv, self.itv, self.ev = res["converged"], res["n_iter"], res["n_evals"]
        self.jv, self.emv, self.stv = res["joined"], res["n_em"], res["status"]
        self.n_rows = self.th.shape[0]

    def run(self, int slot, int n_slots):
        cdef Py_ssize_t r = slot
        cdef Out R
        cdef Work* W = &self.prob.Ws[slot]
        cdef double dummy = 0.0
        with nogil:
            while r < self.n_rows:
                R.dev = &self.dv[r]
                R.beta = &self.bt[r, 0]
                R.se = &self.sv[r, 0]
                R.sig2 = &self.s2[r]
                R.theta_em = &self.tem[r, 0] if self.P.n_theta else &dummy
                R.log_em = &self.lem[r, 0] if self.log else NULL
                R.log_newton = &self.lnt[r, 0] if self.log else NULL
                R.n_iter = &self.itv[r]
                R.n_em = &self.emv[r]
                R.joined = &self.jv[r]
                R.status = &self.stv[r]
                self.cv[r] = fit_one(&self.P, W, NULL if self.own else &self.Yw[r, 0],
                                     &self.th[r, 0] if self.P.n_theta else &dummy, &self.O, R)
                self.ev[r] = W.n_evals
                r += n_slots
