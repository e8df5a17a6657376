# cython: language_level=3
"""Many fits of one nested model in compiled code.

One model specification (design, covariance structures) is fitted to many
outcome vectors (the columns of ``Yw``, already whitened and sorted like the
design). Each fit runs entirely without the GIL:

1. the outcome-dependent pieces are refreshed: ``Z~_a' y~`` per node (the last
   column of each node's ``ZA`` block) and ``X~' y~``, ``y~' y~`` in ``A'A``;
2. ``em_iter`` EM iterations, ``Sigma_l <- T_l (E_l / N_l) T_l'`` projected on
   the level's structure;
3. projected Newton steps with a finite-difference Hessian of the analytic
   gradient (the same rules as :func:`mlmeta.optimize._local`: parameters held at
   a bound by their gradient are fixed, eigenvalues made positive, backtracking
   along the projected path, a saddle at a zero variance is left).

Structures must be linear in theta (``T_flat = M theta``): identity, independent,
exchangeable and unstructured. Outcome vectors are shared out over threads, each
with its own workspace.
"""

import numpy as np

from mlmeta._threads import parallel_calls
from libc.math cimport log, sqrt, fabs, INFINITY
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


cdef struct Prob:
    Tree tree
    SubBlocks sb
    Py_ssize_t n_clusters, n_nodes, n_levels, n_obs
    const Py_ssize_t* cluster_ptr
    const Py_ssize_t* q
    const Py_ssize_t* t_off
    const Py_ssize_t* kind
    const Py_ssize_t* th_off
    const double* n_groups
    const double* M
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
    int n_theta, p, ncol, reml, profiled
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
    double* tmp      # optimiser scratch: see fit_one
    double sigma2
    int n_evals


cdef inline void assemble(const Prob* P, Work* W) noexcept nogil:
    zero(W.Tn, P.tn_len)
    assemble_factors(&P.sb, W.Tlev, W.Tn)


cdef inline void reduce_levels(const Prob* P, const double* N, double* out) noexcept nogil:
    zero(out, P.t_len)
    reduce_factors(&P.sb, N, out)


cdef void set_response(const Prob* P, Work* W, const double* y) noexcept nogil:
    """Refresh the outcome-dependent parts of ZA and A'A for the whitened outcome y."""
    cdef Py_ssize_t a, l, i, r, j, ql
    cdef int p = P.p
    cdef double acc
    copy(P.ZA0, W.ZA, P.za_len)
    copy(P.AA0, W.AA, P.ncol * P.ncol)
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


cdef double evaluate(const Prob* P, Work* W, const double* th, double* grad, bint em) noexcept nogil:
    """Deviance at theta (INFINITY if a factorisation fails); the gradient into
    ``grad`` when it is not NULL, and the EM moments into W.E when ``em``."""
    cdef Py_ssize_t i, k, j
    cdef int p = P.p
    cdef int nc = P.ncol
    cdef int info = 0
    cdef int one = 1
    cdef char lo = b'L'
    cdef double logdet = 0.0
    cdef double rss, logdet_H, dev, dof, fac, acc
    cdef Tree t = P.tree
    t.ZA = W.ZA
    t.T = W.Tn
    W.n_evals += 1
    for i in range(P.t_len):
        acc = 0.0
        for k in range(P.n_theta):
            acc = acc + P.M[i + k * P.t_len] * th[k]
        W.Tlev[i] = acc
    assemble(P, W)
    copy(W.AA, W.S, nc * nc)
    for j in range(P.n_clusters):
        if factor_cluster(&t, P.cluster_ptr[j], P.cluster_ptr[j + 1], W.WB, W.WR, W.S, &logdet,
                          W.scratch) != 0:
            return INFINITY
    logdet_H = 0.0
    if p > 0:
        for j in range(p):
            for i in range(p):
                W.Hc[i + j * p] = W.S[i + j * nc]
            W.beta[j] = W.S[j + p * nc]
        if potrf_lower(p, W.Hc, p) != 0:
            return INFINITY
        trsm_left_lower(b'N', p, 1, W.Hc, p, W.beta, p)
        trsm_left_lower(b'T', p, 1, W.Hc, p, W.beta, p)
        for j in range(p):
            logdet_H = logdet_H + 2.0 * log(W.Hc[j + j * p])
    rss = W.S[p + p * nc]
    for j in range(p):
        rss = rss - W.S[p + j * nc] * W.beta[j]
    if P.profiled:
        dof = <double>(P.n_obs - p) if P.reml else <double>P.n_obs
        W.sigma2 = rss / dof
        if not (W.sigma2 > 0):
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
    # H^-1 and Phi = fac gamma gamma' (+ [H^-1, 0; 0, 0] for REML), gamma = (-beta, 1)
    if p > 0:
        zero(W.Hinv, p * p)
        for j in range(p):
            W.Hinv[j + j * p] = 1.0
        trsm_left_lower(b'N', p, p, W.Hc, p, W.Hinv, p)
        trsm_left_lower(b'T', p, p, W.Hc, p, W.Hinv, p)
    for j in range(nc):
        for i in range(nc):
            W.Phi[i + j * nc] = fac * (-W.beta[i] if i < p else 1.0) * (-W.beta[j] if j < p else 1.0)
    if P.reml:
        for j in range(p):
            for i in range(p):
                W.Phi[i + j * nc] += W.Hinv[i + j * p]
    for j in range(P.n_clusters):
        invert_cluster(&t, P.cluster_ptr[j], P.cluster_ptr[j + 1], W.WB, W.WR, W.SB, W.WW)
        accumulate_cluster(&t, P.cluster_ptr[j], P.cluster_ptr[j + 1], W.SB, W.WW, W.KK, W.Phi,
                           W.GN, W.EN, W.scratch, P.maxq)
    if grad != NULL:
        reduce_levels(P, W.GN, W.G)
        for k in range(P.n_theta):
            acc = 0.0
            for i in range(P.t_len):
                acc = acc + P.M[i + k * P.t_len] * W.G[i]
            grad[k] = 2.0 * acc
    if em:
        reduce_levels(P, W.EN, W.E)
    return dev


cdef void em_update(const Prob* P, Work* W, double* th) noexcept nogil:
    """Sigma_l <- T_l (E_l / N_l) T_l' (after an evaluation with em), projected."""
    cdef Py_ssize_t l, i, j, k, q, o, c
    cdef double* T
    cdef double* E
    cdef double* Sig = W.scratch
    cdef double* tmp = W.scratch + P.maxq * P.maxq
    cdef double v, cov, a, g
    cdef int qi, info = 0
    cdef char lo = b'L'
    for l in range(P.n_levels):
        q = P.q[l]
        qi = <int>q
        T = W.Tlev + P.t_off[l]
        E = W.E + P.t_off[l]
        gemm(b'N', b'N', qi, qi, qi, 1.0 / P.n_groups[l], T, qi, E, qi, 0.0, tmp, qi)
        gemm(b'N', b'T', qi, qi, qi, 1.0, tmp, qi, T, qi, 0.0, Sig, qi)
        o = P.th_off[l]
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
        else:
            dpotrf(&lo, &qi, Sig, &qi, &info)
            if info != 0:
                continue
            c = 0
            for j in range(q):
                for i in range(j, q):
                    th[o + c] = Sig[i + j * q]
                    c += 1


cdef struct Options:
    int em_iter, maxiter
    double tol, em_tol      # em_tol: EM stops when the deviance changes by <= em_tol (|f| + em_tol)
    bint quasi              # BFGS updates of one finite-difference Hessian (exploratory runs)
    bint refresh            # rebuild Z~'y~ and A'A for each outcome (else: the design's own y)
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


cdef int fit_one(const Prob* P, Work* W, const double* y, double* th, const Options* O,
                 double* out_dev, double* out_beta, double* out_se,
                 int* out_iter, double* out_sig2, int* out_joined, int* out_em,
                 double* out_theta_em) noexcept nogil:
    """Fit one outcome vector from theta ``th`` (updated in place); returns 1 if converged.

    With ``O.quasi`` the Hessian is differenced once (and again when a parameter
    leaves a bound) and then updated by BFGS; such runs stop at a decrement of
    1e-10 max(1, |f|) and serve to explore, not to certify. With ``O.known`` a run
    that comes within 5 % of that optimum without a lower deviance stops there
    (``out_joined``), since it would only find it again.
    """
    cdef int k = P.n_theta
    cdef int it, i, j, m, nf, lw, info = 0, n_half, accepted, moved, pd, converged, have_h, joined
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
    if O.refresh:
        set_response(P, W, y)
    else:
        copy(P.ZA0, W.ZA, P.za_len)
        copy(P.AA0, W.AA, P.ncol * P.ncol)
    fc = INFINITY
    out_em[0] = 0
    for it in range(O.em_iter):
        f = evaluate(P, W, th, NULL, True)
        if f == INFINITY:
            break
        em_update(P, W, th)
        out_em[0] = it + 1
        if fabs(fc - f) <= O.em_tol * (fabs(f) + O.em_tol):
            break
        fc = f
    for i in range(k):
        if th[i] < P.lower[i]:
            th[i] = P.lower[i]
        if th[i] > P.upper[i]:
            th[i] = P.upper[i]
    copy(th, out_theta_em, k)
    f = evaluate(P, W, th, g, False)
    converged = 0
    pd = 0
    dec = INFINITY
    it = 0
    while it < O.maxiter and f < INFINITY:
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
                    evaluate(P, W, tp, gp, False)
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
                    fc = evaluate(P, W, tp, gp, False)
                    if gp[i] < 0 and fc < f:
                        copy(tp, th, k)
                        copy(gp, g, k)
                        f = fc
                        moved = 1
                        have_h = 0
            if not moved:
                converged = 1
                break
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
            fc = evaluate(P, W, cand, gc, False)
            if fc < INFINITY and fc <= f + 1e-4 * armijo + 1e-14 * fscale:
                accepted = 1
                break
            tt = tt * 0.5
        if not accepted:
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
    if not converged and f < INFINITY:
        fscale = fabs(f) if fabs(f) > 1.0 else 1.0
        converged = 1 if (pd and dec <= O.tol * fscale) else 0
    out_iter[0] = it
    out_joined[0] = joined
    # one evaluation with the gradient gives the deviance, beta and H^-1 for the SEs
    out_dev[0] = evaluate(P, W, th, gp, False) if f < INFINITY else INFINITY
    for j in range(P.p):
        out_beta[j] = W.beta[j]
    if out_dev[0] < INFINITY:
        for j in range(P.p):
            out_se[j] = sqrt(W.sigma2 * W.Hinv[j + j * P.p])
    out_sig2[0] = W.sigma2
    return converged


cdef class _Runner:
    """Runs fit_one over the rows of a batch: ``run(slot, n_slots)`` fits rows slot,
    slot + n_slots, ... (interleaved, so threads get an even share of easy and hard
    fits) with workspace ``slot``, the GIL released throughout. Several Python threads
    may call it at once with different slots."""
    cdef Prob P
    cdef Options O
    cdef Work* Ws
    cdef const double[:, ::1] Yw
    cdef double[:, ::1] th, bt, sv, tem
    cdef double[::1] dv, s2
    cdef int[::1] cv, itv, ev, jv, emv
    cdef Py_ssize_t n_rows

    def __dealloc__(self):
        free(self.Ws)

    def run(self, int slot, int n_slots):
        cdef Py_ssize_t r = slot
        with nogil:
            while r < self.n_rows:
                self.cv[r] = fit_one(&self.P, &self.Ws[slot], &self.Yw[r, 0], &self.th[r, 0],
                                     &self.O, &self.dv[r], &self.bt[r, 0], &self.sv[r, 0],
                                     &self.itv[r], &self.s2[r], &self.jv[r], &self.emv[r],
                                     &self.tem[r, 0])
                self.ev[r] = self.Ws[slot].n_evals
                r += n_slots


def fit_many(kernel, const double[:, ::1] Yw, const double[:, ::1] theta0, const double[::1, :] M,
             const double[::1] lower, const double[::1] upper, const Py_ssize_t[::1] kind,
             const Py_ssize_t[::1] th_off, const double[::1] n_groups, const double[::1] Zw,
             const Py_ssize_t[::1] zw_off, const double[:, ::1] Xw, const Py_ssize_t[::1] node_r0,
             const Py_ssize_t[::1] node_r1, bint reml, bint profiled, double logdet_Lambda,
             double logdet_XtX, double scale, int em_iter, int maxiter, double tol, int n_threads,
             bint quasi=False, known_theta=None, double known_dev=INFINITY, double em_tol=0.0,
             bint refresh=True):
    """Fit every column of ``Yw`` (m x n, whitened and sorted); returns a dict of
    arrays: theta (m x k), theta_em (after EM, m x k), deviance, beta (m x p), se (m x p),
    converged, n_iter (Newton), n_em (EM iterations), n_evals, sigma2 and joined (m each). ``quasi``, ``known_theta``/``known_dev``:
    see :func:`fit_one` (exploratory runs from extra starts). ``refresh=False``: every
    column is the design's own outcome, whose pieces the kernel already holds (the
    only case for a design whitened by a full sampling covariance V)."""
    cdef Py_ssize_t m = Yw.shape[0]
    cdef int k = M.shape[1]
    cdef int p = Xw.shape[1]
    cdef Prob P
    cdef double[::1, :] AA = np.asfortranarray(kernel.AA)
    cdef NestedKernel K = kernel
    P.tree = K._tree()
    P.tree.ZA = NULL        # per workspace (the outcome's pieces) ...
    P.tree.T = NULL         # ... and per evaluation
    P.sb = K._subblocks()
    P.n_clusters = K.n_clusters
    P.n_nodes = K.n_nodes
    P.n_levels = K.n_levels
    P.n_obs = Yw.shape[1]
    P.cluster_ptr = &K._cluster_ptr[0]
    P.q = &K._q[0]
    P.t_off = &K._t_off[0]
    P.kind = &kind[0]
    P.th_off = &th_off[0]
    P.n_groups = &n_groups[0]
    P.M = &M[0, 0]
    P.lower = &lower[0]
    P.upper = &upper[0]
    P.ZA0 = &K._ZA[0]
    P.AA0 = &AA[0, 0]
    P.Zw = &Zw[0]
    P.zw_off = &zw_off[0]
    P.Xw = &Xw[0, 0] if p > 0 else NULL
    P.node_r0 = &node_r0[0]
    P.node_r1 = &node_r1[0]
    P.zz_len = K._ZZ.shape[0]
    P.za_len = K._ZA.shape[0]
    P.tn_len = K._tn_ptr[K._tn_ptr.shape[0] - 1]
    P.t_len = M.shape[0]
    P.maxq = K.maxq
    P.scratch_len = 3 * P.maxq * max(P.maxq, <Py_ssize_t>P.tree.ncol) + 16
    P.n_theta = k
    P.p = p
    P.ncol = p + 1
    P.reml = reml
    P.profiled = profiled
    P.logdet_Lambda = logdet_Lambda
    P.logdet_XtX = logdet_XtX
    P.scale = scale
    cdef int nt = max(1, min(n_threads, m))
    nc = p + 1
    sizes = [P.zz_len, P.zz_len, P.za_len, P.za_len, P.za_len, P.tn_len, P.tn_len, P.tn_len,
             P.za_len, nc * nc, nc * nc, P.scratch_len, P.t_len, P.t_len, P.t_len, max(p * p, 1),
             max(p * p, 1), max(p, 1), nc * nc, 16 * k + 2 * k * k + 32]
    offs = np.concatenate([[0], np.cumsum(sizes)]).astype(np.intp)
    buf = np.zeros((nt, int(offs[-1])), dtype=np.float64)
    cdef double[:, ::1] B = buf
    cdef Py_ssize_t[::1] o = offs
    theta = np.array(theta0, dtype=np.float64, copy=True)
    dev = np.empty(m)
    beta = np.zeros((m, max(p, 1)))
    se = np.zeros((m, max(p, 1)))
    conv = np.zeros(m, dtype=np.intc)
    iters = np.zeros(m, dtype=np.intc)
    evals = np.zeros(m, dtype=np.intc)
    sig2 = np.ones(m)
    cdef double[::1] s2 = sig2
    cdef double[:, ::1] th = theta
    cdef double[::1] dv = dev
    cdef double[:, ::1] bt = beta
    cdef double[:, ::1] sv = se
    cdef int[::1] cv = conv
    cdef int[::1] itv = iters
    cdef int[::1] ev = evals
    cdef int c
    joined = np.zeros(m, dtype=np.intc)
    n_em = np.zeros(m, dtype=np.intc)
    cdef int[::1] jv = joined
    cdef int[::1] emv = n_em
    cdef Options O
    O.em_iter = em_iter
    O.maxiter = maxiter
    O.tol = tol
    O.em_tol = em_tol
    O.quasi = quasi
    O.refresh = refresh
    O.known_dev = known_dev
    known = None
    cdef double[::1] kn
    O.known = NULL
    if known_theta is not None:
        known = np.ascontiguousarray(known_theta, dtype=np.float64)
        if known.shape[0] != k:
            raise ValueError("known_theta has the wrong length")
        kn = known
        O.known = &kn[0]
    cdef _Runner run = _Runner.__new__(_Runner)
    run.Ws = <Work*>malloc(nt * sizeof(Work))
    if run.Ws == NULL:
        raise MemoryError()
    for c in range(nt):
        run.Ws[c].WB = &B[c, o[0]]
        run.Ws[c].SB = &B[c, o[1]]
        run.Ws[c].WR = &B[c, o[2]]
        run.Ws[c].WW = &B[c, o[3]]
        run.Ws[c].KK = &B[c, o[4]]
        run.Ws[c].Tn = &B[c, o[5]]
        run.Ws[c].GN = &B[c, o[6]]
        run.Ws[c].EN = &B[c, o[7]]
        run.Ws[c].ZA = &B[c, o[8]]
        run.Ws[c].AA = &B[c, o[9]]
        run.Ws[c].S = &B[c, o[10]]
        run.Ws[c].scratch = &B[c, o[11]]
        run.Ws[c].Tlev = &B[c, o[12]]
        run.Ws[c].G = &B[c, o[13]]
        run.Ws[c].E = &B[c, o[14]]
        run.Ws[c].Hc = &B[c, o[15]]
        run.Ws[c].Hinv = &B[c, o[16]]
        run.Ws[c].beta = &B[c, o[17]]
        run.Ws[c].Phi = &B[c, o[18]]
        run.Ws[c].tmp = &B[c, o[19]]
    run.P = P
    run.O = O
    run.Yw = Yw
    theta_em = np.empty_like(theta)
    run.th, run.bt, run.sv, run.dv, run.s2, run.tem = th, bt, sv, dv, s2, theta_em
    run.cv, run.itv, run.ev, run.jv, run.emv = cv, itv, ev, jv, emv
    run.n_rows = m
    parallel_calls(run.run, [(c, nt) for c in range(nt)], nt)
    return dict(theta=theta, deviance=dev, beta=beta[:, :p], se=se[:, :p], converged=conv.astype(bool),
                n_iter=iters, n_evals=evals, sigma2=sig2, joined=joined.astype(bool), n_em=n_em,
                theta_em=theta_em)
