# cython: language_level=3
"""The engine's optimiser: EM iterations, then projected Newton steps.

EM updates ``Sigma_l <- T_l (E_l / N_l) T_l'`` and projects it back on the level's
structure (:mod:`mlmeta._core._structures`). The Newton loop: parameters held at a
bound by their gradient are fixed for the step (equal bounds fix a parameter); the
rest take a Newton step with a finite-difference Hessian of the analytic gradient
(eigenvalues made positive), backtracking along the projected path; a zero variance
whose increase lowers the deviance is a saddle and is left. Exploratory runs
(``quasi``) update one differenced Hessian by BFGS and may stop on reaching an
optimum already known.
"""

from libc.math cimport sqrt, fabs, INFINITY, NAN

from mlmeta._core._linalg cimport zero, copy, sym_eigen
from mlmeta._core._problem cimport Prob, Work, ST_OK
from mlmeta._core._structures cimport em_update
from mlmeta._core._objective cimport set_response, evaluate, inverse_H

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


cdef void difference_hessian(const Prob* P, Work* W, const double* th, const double* g,
                             const int* idx, int nf, double* H, double* tp,
                             double* gp) noexcept nogil:
    """H (nf x nf, symmetrised) <- forward differences of the analytic gradient g at th
    over the free parameters idx, steps 1e-6 max(scale, |theta_i|) (backwards at the edge
    of the feasible set)."""
    cdef int k = P.n_theta
    cdef int m, i, j
    cdef double h
    for m in range(nf):
        i = idx[m]
        h = 1e-6 * (P.scale if P.scale > fabs(th[i]) else fabs(th[i]))
        copy(th, tp, k)
        tp[i] = tp[i] + h
        if evaluate(P, W, tp, gp, False, 0.0) == INFINITY:
            # at the edge of the feasible set (a custom level's correlations):
            # difference backwards
            h = -h
            tp[i] = th[i] + h
            if evaluate(P, W, tp, gp, False, 0.0) == INFINITY:
                for j in range(k):
                    gp[j] = g[j]
        for j in range(nf):
            H[j + m * nf] = (gp[idx[j]] - g[idx[j]]) / h
    for m in range(nf):
        for j in range(m):
            H[j + m * nf] = 0.5 * (H[j + m * nf] + H[m + j * nf])
            H[m + j * nf] = H[j + m * nf]


cdef inline bint is_free(const Prob* P, const double* th, const double* g, int i) noexcept nogil:
    """Whether theta_i is free for a Newton step: not held at a bound by its gradient."""
    return not ((th[i] <= P.lower[i] + 1e-12 and g[i] >= 0)
                or (th[i] >= P.upper[i] - 1e-12 and g[i] <= 0))


cdef inline double rel_gradient(const Prob* P, const double* th, const double* g,
                                int i) noexcept nogil:
    """|g_i| per relative change of theta_i (at least the sampling scale): the same
    whatever the units of the outcome."""
    return fabs(g[i]) * (fabs(th[i]) if fabs(th[i]) > P.scale else P.scale)


cdef double eigen_decrement(int nf, const int* idx, double* H, double* w, const double* g,
                            double* work, int lw) noexcept nogil:
    """The Newton decrement g'H^-1g over the free parameters idx, H replaced by its
    eigenvectors (eigenvalues in w); INFINITY unless H is positive definite with a
    condition number below 1e8."""
    cdef int j, m, info
    cdef double tt, wmax = 0.0, dec = 0.0
    info = sym_eigen(nf, H, w, work, lw)
    if info != 0 or not w[0] > 0:
        return INFINITY
    for m in range(nf):
        if fabs(w[m]) > wmax:
            wmax = fabs(w[m])
    if not w[0] > 1e-8 * wmax:
        return INFINITY
    for m in range(nf):
        tt = 0.0
        for j in range(nf):
            tt = tt + H[j + m * nf] * g[idx[j]]
        dec = dec + tt * tt / w[m]
    return dec


cdef int newton_ready(const Prob* P, Work* W, const double* th, const double* g, double f,
                      int* idx, double* H, double* w, double* tp, double* gp, double* work,
                      int lw, double switch_dec) noexcept nogil:
    """Whether Newton can take over at th (``O.em_switch``): the projected gradient
    vanishes, or the Hessian of the free parameters (differenced into H, then replaced
    by its eigenvectors, eigenvalues in w) is positive definite with a condition number
    below 1e8 and the Newton decrement g'H^-1g is at most switch_dec max(1, |f|)."""
    cdef int k = P.n_theta
    cdef int nf = 0, i
    cdef double gmax = 0.0, fscale
    fscale = fabs(f) if fabs(f) > 1.0 else 1.0
    for i in range(k):
        if is_free(P, th, g, i):
            idx[nf] = i
            nf += 1
            if rel_gradient(P, th, g, i) > gmax:
                gmax = rel_gradient(P, th, g, i)
    if gmax <= 1e-12 * fscale:
        return 1
    difference_hessian(P, W, th, g, idx, nf, H, tp, gp)
    return eigen_decrement(nf, idx, H, w, g, work, lw) <= switch_dec


cdef int secant_certifies(int nf, const int* idx, double* H, double* w, const double* s,
                          const double* yv, const double* g, double* Hb, double* sf,
                          double* yf, double* Hs, double* work, int lw,
                          double stop) noexcept nogil:
    """Whether the Hessian differenced at the previous iterate (eigenvectors in H,
    eigenvalues in w, over the free parameters idx, which are still the free ones),
    carried to this iterate by the BFGS update with its step s and gradient change yv,
    certifies it: positive definite with a condition number below 1e8 and a Newton
    decrement g'H^-1g at most ``stop``. Then H and w hold its eigen-decomposition
    (returns 1); else H and w are left undefined (returns 0)."""
    cdef int i, j, m
    cdef double tt
    for j in range(nf):
        sf[j] = s[idx[j]]
        yf[j] = yv[idx[j]]
        for i in range(nf):
            tt = 0.0
            for m in range(nf):
                tt = tt + H[i + m * nf] * w[m] * H[j + m * nf]
            Hb[i + j * nf] = tt
    bfgs_update(Hb, sf, yf, Hs, nf)
    copy(Hb, H, nf * nf)
    return eigen_decrement(nf, idx, H, w, g, work, lw) <= stop


cdef inline bint lone_parameter(const Prob* P, int i) noexcept nogil:
    """Whether theta_i is its level's only parameter (a scalar variance)."""
    cdef Py_ssize_t l
    for l in range(P.n_levels):
        if P.th_off[l] <= i < P.th_off[l] + P.n_th[l]:
            return P.n_th[l] == 1
    return 0


cdef double off_saddle(const Prob* P, Work* W, const Options* O, double* th, double* g,
                       double f, int i, double* cx, double* gx, double* kept) noexcept nogil:
    """An exploring run just off a saddle at theta_i = 0 (th: theta_i = d small, where the
    deviance F falls): a secant step along theta_i in the variance s = theta_i^2, where F
    is much nearer quadratic than in theta_i. F'(s) at d^2 is g_i / 2d; a trial at
    theta_i = c (the known optimum's theta_i, else the sampling scale) gives F'(c^2), and
    where F' rises between them the secant's zero s* is tried too (within
    (10 max(c, scale))^2). th, g, f and the kept state move to the lowest of the points;
    returns f. One or two evaluations instead of the Newton steps whose model, quadratic
    in theta_i, doubles theta_i per step."""
    cdef int k = P.n_theta
    cdef double d = th[i], s0, g0, c, sc, gs, ss, fx, top
    s0 = d * d
    g0 = g[i] / (2.0 * d)
    c = O.known[i] if O.known != NULL and O.known[i] > 2.0 * d else P.scale
    if c > P.upper[i]:
        c = P.upper[i]
    if not c > 2.0 * d:
        return f
    copy(th, cx, k)
    cx[i] = c
    fx = evaluate(P, W, cx, gx, False, 0.0)
    if not fx < INFINITY:
        return f
    sc = c * c
    gs = gx[i] / (2.0 * c)
    if fx < f:
        copy(cx, th, k)
        copy(gx, g, k)
        f = fx
        keep_state(P, W, kept, f)
    if not gs > g0:
        return f
    ss = s0 - g0 * (sc - s0) / (gs - g0)
    top = 10.0 * (c if c > P.scale else P.scale)
    if ss > top * top:
        ss = top * top
    if not (ss > s0 and fabs(sqrt(ss) - c) > 1e-3 * c) or sqrt(ss) > P.upper[i]:
        return f
    cx[i] = sqrt(ss)
    fx = evaluate(P, W, cx, gx, False, 0.0)
    if fx < f:
        copy(cx, th, k)
        copy(gx, g, k)
        f = fx
        keep_state(P, W, kept, f)
    return f


cdef inline bint known_rows(const double* Hk, const int* idx, int nf, int k) noexcept nogil:
    """Whether Hk (k x k, NULL: none) is known (not NaN) in the rows of idx[:nf]."""
    cdef int j
    if Hk == NULL:
        return 0
    for j in range(nf):
        if Hk[idx[j] + idx[j] * k] != Hk[idx[j] + idx[j] * k]:
            return 0
    return 1


cdef void positive_hessian(const double* H, const double* w, const int* idx, int nf, int k,
                           double wmax, double* out) noexcept nogil:
    """out[idx, idx] (k x k) <- U max(|w|, 1e-10 max|w|) U' (U the eigenvectors of the free
    parameters idx[:nf] in H, eigenvalues in w): the Hessian made positive definite, as a
    step takes it; the other entries of out are left as they are."""
    cdef int i, j, m
    cdef double tt, h
    for m in range(nf):
        for j in range(nf):
            tt = 0.0
            for i in range(nf):
                h = fabs(w[i]) if fabs(w[i]) > 1e-10 * wmax else 1e-10 * wmax
                tt = tt + H[j + i * nf] * h * H[m + i * nf]
            out[idx[j] + idx[m] * k] = tt


cdef void record_hessian(const double* H, const double* w, const int* idx, int nf, int k,
                         double wmax, double* out) noexcept nogil:
    """out (k x k) <- :func:`positive_hessian` over the free parameters idx[:nf], exactly
    symmetric (the upper triangle in idx's order mirrored), NaN in the rows and columns of
    the others."""
    cdef int i, j, m
    for i in range(k * k):
        out[i] = NAN
    positive_hessian(H, w, idx, nf, k, wmax, out)
    for m in range(nf):
        for j in range(m):
            out[idx[m] + idx[j] * k] = out[idx[j] + idx[m] * k]


cdef inline void keep_state(const Prob* P, const Work* W, double* kept, double f) noexcept nogil:
    """kept <- (f, sigma^2, beta, the Cholesky factor of H) of the evaluation just made."""
    kept[0] = f
    kept[1] = W.sigma2
    copy(W.beta, kept + 2, P.p)
    copy(W.Hc, kept + 2 + P.p, P.p * P.p)


cdef bint step_to(const Prob* P, const double* th, const double* step, const int* idx, int nf,
                  double t, double* out, int k) noexcept nogil:
    """out = th + t step over the free parameters idx[:nf] (step indexed by position in
    idx), projected onto the bounds; returns whether a bound clipped it."""
    cdef int i, j
    cdef bint clipped = 0
    copy(th, out, k)
    for j in range(nf):
        i = idx[j]
        out[i] = th[i] + t * step[j]
        if out[i] < P.lower[i]:
            out[i] = P.lower[i]
            clipped = 1
        if out[i] > P.upper[i]:
            out[i] = P.upper[i]
            clipped = 1
    return clipped


cdef int fit_one(const Prob* P, Work* W, const double* y, double* th, const Options* O,
                 Out R) noexcept nogil:
    """Fit one outcome vector (NULL: the design's own) from theta ``th`` (updated in
    place); returns 1 if converged, 2 if converged with a certificate: the last Newton
    iteration differenced the Hessian of the free parameters (or carried the one
    differenced at the iterate before by the BFGS update with the step between them,
    the free set unchanged), found it positive definite with a condition number below
    1e8 and a decrement g'H^-1g below 1e-14 max(1, |f|) (1e-10 max(1, |f|) where no
    step lowers the deviance beyond rounding), or the projected gradient vanished to
    1e-12 max(1, |f|) per relative change of theta.

    Converged means: the Hessian of the free parameters is positive definite and the
    Newton decrement g'H^-1g is at most ``tol max(1, |f|)`` (EM only: the deviance
    changed by at most em_tol in the last EM iteration). With ``O.quasi`` the Hessian
    is differenced once (and again when a parameter leaves a bound) and then updated
    by BFGS; such runs stop at a decrement of 1e-10 max(1, |f|) and serve to explore,
    not to certify. With ``O.known`` a run that comes within 5 % of that optimum
    without a lower deviance stops there (``joined``), since it would only find it again.
    An exploring run whose first probe takes a scalar level's variance off zero, the only
    one at zero, goes on along it by a secant step in the variance (``off_saddle``).
    An exploring run given the known optimum's Hessian (``O.known_H``) takes it as the
    model Hessian of its first iteration instead of differencing one, where it is known
    in the rows of every free parameter (BFGS updates follow as usual).
    With ``R.hess`` the run leaves there the Hessian of the free parameters of its last
    Newton iteration that had one (differenced, handed over by EM or carried by the BFGS
    update of the certificate), eigenvalues taken positive as for a step, NaN in the rows
    and columns of the other parameters (all NaN if no iteration had one).
    Such exploring runs (``O.quasi`` or ``O.known``) also lengthen a full step 4, 16, ...
    times while the deviance falls, where the step lowered it by more than twice what
    the quadratic model predicts (a variance parameter crawling off zero).

    With ``O.em_switch`` = s > 0, EM may hand over to Newton at the first iterate from
    the s-th on where the pace of its steps puts the optimum within ``O.switch_dec`` / 2
    (steps d_1 > d_2, falling by r = d_2 / d_1, leave d_2 r / (1 - r)): it does
    when the Hessian differenced there (the free parameters) is positive definite, with a
    condition number below 1e8, and the Newton decrement g'H^-1g is at most
    ``O.switch_dec`` too (deviance units, whatever the size of the deviance): the
    quadratic model then puts the optimum of the iterate's basin within switch_dec / 2,
    and Newton's first iteration takes that Hessian. Otherwise EM goes on (tried once).

    The evaluation at the final theta is the one that took the run there (its deviance,
    beta and the factor of H kept), so no evaluation is repeated at the end.
    """
    cdef int k = P.n_theta
    cdef int it, i, j, m, nf, lw, info = 0, n_half, accepted, moved, pd, converged, have_h, joined
    cdef int hess_ok = 0
    cdef int left = 0, n_zero, probed = 0
    cdef int em_done = 0
    cdef bint switch, tried = 0
    cdef double fl = INFINITY, fl2 = INFINITY
    cdef double f, fc, fx, fscale, gmax, dec, h, wmax, big, smax, tt, armijo, stop, near, reach
    cdef double mult
    cdef bint clipped
    cdef double* g = W.tmp
    cdef double* gc = g + k
    cdef double* cand = gc + k
    cdef double* step = cand + k
    cdef double* tp = step + k
    cdef double* gp = tp + k
    cdef double* H = gp + k
    cdef double* w = H + k * k
    cdef double* work = w + k
    cdef int* idx = <int*>(work + 2 * k * k + 4 * k + 8)     # work: sym_eigen's (dsyev or Jacobi)
    cdef double* Hq = work + 2 * k * k + 5 * k + 8
    cdef double* Hs = Hq + k * k
    cdef double* hk = Hs + k          # 1 where Hq holds a differenced (or updated) row
    cdef double* kept = hk + k        # keep_state: f, sigma2, beta (p), Hc (p x p)
    cdef double* was_free = kept + 2 + P.p + P.p * P.p    # the last iteration's free set
    cdef double* cx = was_free + k    # an expanded step's theta and gradient
    cdef double* gx = cx + k
    cdef int have_kept = 0, h_ready = 0, have_pair = 0, same
    lw = 2 * k * k + 4 * k + 8
    W.n_evals = 0
    joined = 0
    have_h = 0
    if R.hess != NULL:
        for i in range(k * k):
            R.hess[i] = NAN
    set_response(P, W, y)
    fc = INFINITY
    R.n_em[0] = 0
    for i in range(k):
        if th[i] < P.lower[i]:
            th[i] = P.lower[i]
        if th[i] > P.upper[i]:
            th[i] = P.upper[i]
    for it in range(O.em_iter):
        # Newton may take over at the first iterate from em_switch on where EM's own
        # pace says that the optimum is within switch_dec / 2: steps falling by a ratio
        # r < 1 leave d r / (1 - r) after a step d (tried once; the deviance of this
        # iterate is known after its evaluation only, so the test looks at the steps before)
        switch = (O.em_switch > 0 and not tried and it >= O.em_switch and not O.em_only
                  and O.maxiter > 0 and fl - fc < fl2 - fl
                  and (fl - fc) * (fl - fc) <= 0.5 * O.switch_dec * ((fl2 - fl) - (fl - fc)))
        f = evaluate(P, W, th, g if switch else NULL, True, 0.0)
        if it > 0 and not (f <= fc + 1e-10 * (fabs(fc) if fabs(fc) > 1.0 else 1.0)):
            # the last update lowered the likelihood or left the parameter space (the
            # projection of a constrained structure is not an exact M-step): undo it
            copy(tp, th, k)
            R.n_em[0] = it - 1
            break
        if f == INFINITY:
            break
        if R.log_em != NULL:
            R.log_em[it] = f
        if switch:
            tried = 1
            keep_state(P, W, kept, f)
            if newton_ready(P, W, th, g, f, idx, H, w, tp, gp, work, lw, O.switch_dec):
                h_ready = 1
                have_kept = 1
                break
            # EM goes on from here: its moments at th again (the differences overwrote them)
            evaluate(P, W, th, NULL, True, 0.0)
        copy(th, tp, k)
        em_update(P, W, th)
        R.n_em[0] = it + 1
        if fabs(fc - f) <= O.em_tol * (fabs(f) + O.em_tol):
            em_done = 1
            break
        fl2 = fl
        fl = fc
        fc = f
    copy(th, R.theta_em, k)
    if not h_ready:
        # the gradient only where Newton steps follow (a run of no iterations, or EM
        # only, needs the deviance and beta alone)
        f = evaluate(P, W, th, g if O.maxiter > 0 and not O.em_only else NULL, False, 0.0)
        keep_state(P, W, kept, f)
        have_kept = 1
    converged = 0
    pd = 0
    dec = INFINITY
    it = 0
    if O.em_only:
        converged = em_done if f < INFINITY else 0
    while not O.em_only and it < O.maxiter and f < INFINITY:
        it += 1
        if it > 1:
            h_ready = 0
        fscale = fabs(f) if fabs(f) > 1.0 else 1.0
        stop = (1e-10 if O.quasi else 1e-14) * fscale
        nf = 0
        gmax = 0.0
        for i in range(k):
            if is_free(P, th, g, i):
                idx[nf] = i
                nf += 1
                # the gradient per relative change of theta_i: the same test whatever
                # the units of the outcome
                h = rel_gradient(P, th, g, i)
                if h > gmax:
                    gmax = h
                if not hk[i]:
                    have_h = 0
        hess_ok = 0
        if O.quasi:
            have_pair = 0
        if gmax <= 1e-12 * fscale:
            # a gradient that vanishes to rounding (after EM, typically): quasi-Newton
            # steps from here have nothing to follow either
            dec = 0.0
            pd = 1
            hess_ok = 1
        else:
            same = have_pair
            for i in range(k):
                if (was_free[i] != 0.0) != is_free(P, th, g, i):
                    same = 0
            if h_ready:
                pass            # EM's hand-over left H's eigenvectors and w (newton_ready)
            elif same and secant_certifies(nf, idx, H, w, tp, gp, g, Hq, step, cand, Hs, work,
                                           lw, stop):
                # the last differenced Hessian, carried here by the step's secant pair,
                # is positive definite and the decrement vanishes: certified (the decrement
                # is then far below what a Hessian's error of a step's size could change)
                h_ready = 1
            elif O.quasi and (have_h or (it == 1 and known_rows(O.known_H, idx, nf, k))):
                if not have_h:
                    # the run's first model Hessian: the known optimum's (no differences);
                    # its unknown rows (parameters at a bound there) as the updates' start
                    for i in range(k):
                        hk[i] = 1.0 if O.known_H[i + i * k] == O.known_H[i + i * k] else 0.0
                    for j in range(k):
                        for i in range(k):
                            Hq[i + j * k] = (O.known_H[i + j * k] if hk[i] != 0.0 and hk[j] != 0.0
                                             else (1.0 if i == j else 0.0))
                    have_h = 1
                for m in range(nf):
                    for j in range(nf):
                        H[j + m * nf] = Hq[idx[j] + idx[m] * k]
            else:
                difference_hessian(P, W, th, g, idx, nf, H, tp, gp)
            if not h_ready:
                info = sym_eigen(nf, H, w, work, lw)
                if info != 0:
                    break
            pd = 1 if w[0] > 0 else 0
            wmax = 0.0
            for m in range(nf):
                if fabs(w[m]) > wmax:
                    wmax = fabs(w[m])
            # a certificate needs the Newton step unregularised (no eigenvalue raised to
            # 1e-10 of the largest: along such flat directions the decrement says little)
            hess_ok = pd and not O.quasi and w[0] > 1e-8 * wmax
            if R.hess != NULL:
                record_hessian(H, w, idx, nf, k, wmax, R.hess)
            if O.quasi and not have_h:
                # start the updates from the differenced Hessian made positive definite
                # (U max(|w|, 1e-10 max|w|) U'); BFGS keeps it so
                zero(Hq, k * k)
                for i in range(k):
                    hk[i] = 0.0
                    Hq[i + i * k] = 1.0
                for m in range(nf):
                    hk[idx[m]] = 1.0
                positive_hessian(H, w, idx, nf, k, wmax, Hq)
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
            n_zero = 0
            for i in range(k):
                if (P.lower[i] == 0.0 and P.upper[i] > 0.0 and th[i] <= 0.0
                        and fabs(g[i]) * P.scale <= 1e-10 * fscale):
                    n_zero += 1
                    copy(th, tp, k)
                    tp[i] = 1e-3 * P.scale
                    fc = evaluate(P, W, tp, gp, False, 0.0)
                    if gp[i] < 0 and fc < f:
                        copy(tp, th, k)
                        copy(gp, g, k)
                        f = fc
                        moved = moved + 1
                        have_h = 0
                        have_pair = 0
                        keep_state(P, W, kept, f)
                        left = i
            if (n_zero == 1 and moved and not probed and (O.quasi or O.known != NULL)
                    and lone_parameter(P, left)):
                # the run's first probe (a start with a scalar level at zero, its slice
                # explored) took the one variance at zero off it: on along it in the
                # variance scale
                f = off_saddle(P, W, O, th, g, f, left, cx, gx, kept)
            probed = 1
            if not moved:
                converged = 2 if hess_ok else 1
                if R.log_newton != NULL:
                    R.log_newton[it - 1] = f
                break
            if R.log_newton != NULL:
                R.log_newton[it - 1] = f
            continue
        smax = 0.0                        # the longest component of the step
        for j in range(nf):
            if fabs(step[j]) > smax:
                smax = fabs(step[j])
        tt = P.scale
        for j in range(nf):
            if fabs(th[idx[j]]) > tt:
                tt = fabs(th[idx[j]])
        reach = 10.0 * tt                 # the longest step allowed from th
        big = smax / reach
        if big > 1.0:
            for j in range(nf):
                step[j] = step[j] / big
        n_half = 5 if dec <= 1e-10 * fscale else 40
        tt = 1.0
        accepted = 0
        clipped = 0
        for _ in range(n_half):
            clipped = step_to(P, th, step, idx, nf, tt, cand, k)
            armijo = 0.0
            for j in range(nf):
                armijo = armijo + g[idx[j]] * (cand[idx[j]] - th[idx[j]])
            fc = evaluate(P, W, cand, gc, False, 0.0)
            if fc < INFINITY and fc <= f + 1e-4 * armijo + 1e-14 * fscale:
                accepted = 1
                break
            tt = tt * 0.5
        if not accepted:
            if R.log_newton != NULL:
                R.log_newton[it - 1] = f
            if dec <= 1e-10 * fscale:
                # no step lowers the deviance beyond rounding: certified as above when
                # the Hessian was (the decrement is then below what rounding hides)
                converged = (2 if hess_ok else 1) if pd else 0
            elif O.quasi and have_h:
                have_h = 0          # a poor model Hessian: difference it again
                continue
            break
        keep_state(P, W, kept, fc)
        mult = 1.0
        if ((O.quasi or O.known != NULL) and (O.quasi or not pd) and tt == 1.0 and big <= 1.0
                and not clipped and dec > 1e-8 * fscale and f - fc > dec):
            # an exploring run (quasi-Newton, or one that may join a known optimum) whose
            # full step lowered the deviance by more than twice what the quadratic model
            # says (dec / 2): the model, BFGS-updated or a differenced Hessian with
            # negative eigenvalues taken positive, overstates the curvature along it (a
            # variance parameter near zero, where the deviance is flat in theta, would
            # double per step). Steps 4, 16, ... times as long (within the longest step
            # allowed) while the deviance goes on falling.
            while 4.0 * mult * smax <= reach and not clipped:
                mult = 4.0 * mult
                clipped = step_to(P, th, step, idx, nf, mult, cx, k)
                fx = evaluate(P, W, cx, gx, False, 0.0)
                if not fx < fc - 1e-14 * fscale:
                    break
                copy(cx, cand, k)
                copy(gx, gc, k)
                fc = fx
                keep_state(P, W, kept, fc)
        for i in range(k):
            tp[i] = cand[i] - th[i]
            gp[i] = gc[i] - g[i]
            was_free[i] = 0.0
        for m in range(nf):
            was_free[idx[m]] = 1.0
        # a secant pair for the Hessian differenced in this iteration (secant_certifies)
        have_pair = hess_ok and mult == 1.0
        if O.quasi and mult > 1.0:
            have_h = 0          # the model Hessian was wrong along the step: difference it
        elif O.quasi:
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
            fscale = fabs(O.known_dev) if fabs(O.known_dev) > 1.0 else 1.0
            if near <= 0.05 * tt and f >= O.known_dev - 1e-9 * fscale:
                copy(O.known, th, k)
                f = O.known_dev
                joined = 1
                have_kept = 0
                converged = 1
                break
    if not O.em_only and not converged and f < INFINITY:
        fscale = fabs(f) if fabs(f) > 1.0 else 1.0
        converged = 1 if (pd and dec <= O.tol * fscale) else 0
    R.n_iter[0] = it
    R.joined[0] = joined
    if have_kept and kept[0] < INFINITY:
        # the evaluation that took the run to th: its deviance, beta and factor of H
        R.dev[0] = kept[0]
        W.status = ST_OK
        W.sigma2 = kept[1]
        copy(kept + 2, W.beta, P.p)
        copy(kept + 2 + P.p, W.Hc, P.p * P.p)
    else:
        # one more evaluation gives the deviance, beta and H^-1 at the final theta
        R.dev[0] = evaluate(P, W, th, NULL, False, 0.0)
    R.status[0] = W.status
    R.sig2[0] = W.sigma2
    if R.dev[0] < INFINITY:
        inverse_H(P, W)
        for j in range(P.p):
            R.beta[j] = W.beta[j]
            R.se[j] = sqrt(W.sigma2 * W.Hinv[j + j * P.p])
        copy(W.Hinv, R.Hinv, P.p * P.p)
    else:
        converged = 0
        for j in range(P.p):
            R.beta[j] = NAN
            R.se[j] = NAN
        for j in range(P.p * P.p):
            R.Hinv[j] = NAN
    return converged
