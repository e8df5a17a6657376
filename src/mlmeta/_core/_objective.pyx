# cython: language_level=3
"""The objective of a nested model, assembled once from the kernel's pieces.

With the kernel's ``log|C|`` and ``S = A'V^-1 A`` (``A = [X, y]`` whitened),
``H = X'V^-1X``, ``beta = H^-1 X'V^-1 y`` and ``rss = y'V^-1 y - beta' X'V^-1 y``:

    known Lambda:     dev = n log 2pi + log|Lambda| + log|C| + rss
    profiled sigma^2: dev = dof (log 2pi + log sigma^2 + 1) + log|C|,  sigma^2 = rss / dof
    sigma^2 given:    dev = dof (log 2pi + log sigma^2) + log|C| + rss / sigma^2
    REML adds         log|H| - log|X'X| (and -p log 2pi with known Lambda)

with dof = n - p (REML) or n (ML); ``Lambda`` is relative to sigma^2 in the last
two forms (DESIGN.md section 1: the REML constant of Stata and metafor). The
gradient with respect to each level's factor ``T_l`` is ``2 G_l`` (the kernel's
accumulation with ``Phi = fac gamma gamma' (+ [H^-1, 0; 0, 0] for REML)``,
``gamma = (-beta, 1)``, ``fac = 1 / sigma^2`` or 1), chained to theta by

    d dev / d theta_k = sum_ij (dT / d theta_k)_ij (2 G)_ij  (+ Gx_k) ,

``Gx`` holding the terms a level's T does not carry: a spatial level's range rho,
whose correlation R(rho) lives in the border (:func:`mlmeta._core._border.spatial_pieces`).
"""

from libc.math cimport log, INFINITY

from scipy.linalg.cython_blas cimport dsyrk
from mlmeta._core._linalg cimport zero, copy, gemm, potrf_lower, trsm_left_lower
from mlmeta._core._nested cimport (Tree, factor_cluster, invert_cluster, accumulate_cluster,
                                   assemble_factors, reduce_factors)
from mlmeta._core._problem cimport Prob, Work, ST_OK, ST_H, ST_SIGMA, WIDE_NC
from mlmeta._core._structures cimport set_factors
from mlmeta._core._border cimport factor_crossed, solve_crossed
from mlmeta._core._fold cimport fold_prepare, fold_pieces, two_level, factor_two, solve_two

cdef double LOG2PI = 1.8378770664093453

cdef void set_response(const Prob* P, Work* W, const double* y) noexcept nogil:
    """The outcome-dependent parts of ZA and A'A for a whitened outcome y (NULL: the
    design's own outcome, whose pieces the kernel holds)."""
    cdef Py_ssize_t a, l, i, r, j, ql
    cdef int p = P.p
    cdef double acc
    if P.fold >= 0:        # the cross-products are rebuilt per evaluation from the rows
        W.own = y == NULL
        for r in range(P.n_obs):
            for j in range(p):
                W.Ar[r * P.ncol + j] = P.Xw[r * p + j]
            W.Ar[r * P.ncol + p] = P.yw[r] if y == NULL else y[r]
        return
    copy(P.ZA0, W.ZA, P.za_len)
    copy(P.AA0, W.AA, P.ncol * P.ncol)
    W.own = y == NULL
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
    if P.fold >= 0:
        if two_level(P):
            return factor_two(P, W, logdet)
        fold_prepare(P, W, logdet)
        t.ZZ = W.ZZf
    if P.nb > 0:
        return factor_crossed(P, W, &t, logdet)
    copy(W.AA, W.S, P.ncol * P.ncol)
    t.no_S = P.tree.scalar and P.n_nodes > 0     # S -= Y'Y in one pass at the end
    for j in range(P.n_clusters):
        st = factor_cluster(&t, P.cluster_ptr[j], P.cluster_ptr[j + 1], W.WB, W.WR, W.S, logdet,
                            W.scratch)
        if st != 0:
            return st
    if t.no_S:
        if P.ncol >= WIDE_NC:
            subtract_gram(P.ncol, P.n_nodes, W.WR, W.S)
        else:
            subtract_gram_small(P.ncol, P.n_nodes, W.WR, W.S)
    return 0


cdef inline bint wide_scalar(const Prob* P) noexcept nogil:
    """Whether the scalar tree's per-node products go to BLAS over all nodes at once
    (a tree of one effect per node and at least WIDE_NC columns in [X, y])."""
    return P.tree.scalar and P.ncol >= WIDE_NC and P.n_nodes > 0


cdef void subtract_gram_small(int nc, Py_ssize_t n_nodes, const double* Y,
                              double* S) noexcept nogil:
    """S -= Y Y' as :func:`subtract_gram`, for nc < WIDE_NC: one pass over the nodes
    summing the lower triangle (in registers for nc <= 3)."""
    cdef double acc[136]        # WIDE_NC (WIDE_NC + 1) / 2
    cdef double s00 = 0.0, s10 = 0.0, s11 = 0.0, s20 = 0.0, s21 = 0.0, s22 = 0.0
    cdef double y0, y1, y2
    cdef const double* y
    cdef Py_ssize_t a
    cdef int i, j, m
    if nc == 2:
        for a in range(n_nodes):
            y0 = Y[2 * a]
            y1 = Y[2 * a + 1]
            s00 += y0 * y0
            s10 += y1 * y0
            s11 += y1 * y1
        acc[0] = s00
        acc[1] = s10
        acc[2] = s11
    elif nc == 3:
        for a in range(n_nodes):
            y0 = Y[3 * a]
            y1 = Y[3 * a + 1]
            y2 = Y[3 * a + 2]
            s00 += y0 * y0
            s10 += y1 * y0
            s20 += y2 * y0
            s11 += y1 * y1
            s21 += y2 * y1
            s22 += y2 * y2
        acc[0] = s00
        acc[1] = s10
        acc[2] = s20
        acc[3] = s11
        acc[4] = s21
        acc[5] = s22
    else:
        for m in range(nc * (nc + 1) // 2):
            acc[m] = 0.0
        for a in range(n_nodes):
            y = Y + a * nc
            m = 0
            for j in range(nc):
                y0 = y[j]
                for i in range(j, nc):
                    acc[m] += y[i] * y0
                    m += 1
    m = 0
    for j in range(nc):
        for i in range(j, nc):
            S[i + j * nc] -= acc[m]
            if i != j:
                S[j + i * nc] = S[i + j * nc]
            m += 1


cdef void subtract_gram(int nc, Py_ssize_t n_nodes, const double* Y, double* S) noexcept nogil:
    """S -= Y Y' for the nc x n_nodes column-major Y (one row Y_a per node of a scalar
    tree), both triangles."""
    cdef char lo = b'L'
    cdef char no = b'N'
    cdef int n = nc
    cdef int k = <int>n_nodes
    cdef double alpha = -1.0
    cdef double one = 1.0
    cdef int i, j
    dsyrk(&lo, &no, &n, &k, &alpha, <double*>Y, &n, &one, S, &n)
    for j in range(nc):
        for i in range(j):
            S[i + j * nc] = S[j + i * nc]


cdef void solve_all(const Prob* P, Work* W, const double* Phi, bint want_G,
                    bint want_E) noexcept nogil:
    """After factor_all: the selected inverse and node solution of every cluster, and
    (as asked for) the per-level gradient pieces W.G and EM moments W.E for this Phi."""
    cdef Tree t = P.tree
    cdef Py_ssize_t j
    t.ZA = W.ZA
    t.T = W.Tn
    if P.fold >= 0:
        t.ZZ = W.ZZf
    zero(W.G, P.t_len)
    zero(W.E, P.t_len)
    zero(W.Gx, P.n_theta)
    if P.fold >= 0 and two_level(P):
        solve_two(P, W, Phi)
        return
    if P.nb > 0:     # the border's levels go straight into G and E
        solve_crossed(P, W, &t, Phi)
    elif wide_scalar(P):
        # every node's W_a first, then Phi W_a' for all nodes in one product
        for j in range(P.n_clusters):
            invert_cluster(&t, P.cluster_ptr[j], P.cluster_ptr[j + 1], W.WB, W.WR, W.SB, W.WW)
        gemm(b'N', b'N', P.ncol, <int>P.n_nodes, P.ncol, 1.0, Phi, P.ncol, W.WW, P.ncol, 0.0,
             W.PWn, P.ncol)
        t.PW = W.PWn
        for j in range(P.n_clusters):
            accumulate_cluster(&t, P.cluster_ptr[j], P.cluster_ptr[j + 1], W.SB, W.WW, W.KK, Phi,
                               W.GN, W.EN, W.scratch, P.maxq)
    else:
        for j in range(P.n_clusters):
            invert_cluster(&t, P.cluster_ptr[j], P.cluster_ptr[j + 1], W.WB, W.WR, W.SB, W.WW)
            accumulate_cluster(&t, P.cluster_ptr[j], P.cluster_ptr[j + 1], W.SB, W.WW, W.KK, Phi,
                               W.GN, W.EN, W.scratch, P.maxq)
    if want_G:
        reduce_factors(&P.sb, W.GN, W.G)
    if want_E:
        reduce_factors(&P.sb, W.EN, W.E)
    if P.fold >= 0:
        fold_pieces(P, W, Phi)


cdef void inverse_H(const Prob* P, Work* W) noexcept nogil:
    """W.Hinv = (X'V^-1X)^-1 from its Cholesky factor W.Hc (after a finite evaluate)."""
    cdef int j, p = P.p
    if p == 0:
        return
    zero(W.Hinv, p * p)
    for j in range(p):
        W.Hinv[j + j * p] = 1.0
    trsm_left_lower(b'N', p, p, W.Hc, p, W.Hinv, p)
    trsm_left_lower(b'T', p, p, W.Hc, p, W.Hinv, p)


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
    inverse_H(P, W)
    # Phi = fac gamma gamma' (+ [H^-1, 0; 0, 0] for REML), gamma = (-beta, 1)
    for j in range(nc):
        for i in range(nc):
            W.Phi[i + j * nc] = fac * (-W.beta[i] if i < p else 1.0) * (-W.beta[j] if j < p else 1.0)
    if P.reml:
        for j in range(p):
            for i in range(p):
                W.Phi[i + j * nc] += W.Hinv[i + j * p]
    solve_all(P, W, W.Phi, grad != NULL, em)
    if grad != NULL:
        for k in range(P.n_theta):
            acc = 0.0
            for i in range(P.t_len):
                acc = acc + W.D[i + k * P.t_len] * W.G[i]
            grad[k] = 2.0 * acc + W.Gx[k]
    return dev
