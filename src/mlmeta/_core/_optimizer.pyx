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
from scipy.linalg.cython_lapack cimport dsyev

from mlmeta._core._linalg cimport zero, copy
from mlmeta._core._problem cimport Prob, Work
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


cdef int fit_one(const Prob* P, Work* W, const double* y, double* th, const Options* O,
                 Out R) noexcept nogil:
    """Fit one outcome vector (NULL: the design's own) from theta ``th`` (updated in
    place); returns 1 if converged, 2 if converged with a certificate: the last Newton
    iteration differenced the Hessian of the free parameters, found it positive
    definite with a condition number below 1e8 and a decrement g'H^-1g below
    1e-14 max(1, |f|) (1e-10 max(1, |f|) where no step lowers the deviance beyond
    rounding), or the projected gradient vanished to 1e-12 max(1, |f|) per
    relative change of theta.

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
    cdef int hess_ok = 0
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
        copy(th, tp, k)
        em_update(P, W, th)
        R.n_em[0] = it + 1
        if fabs(fc - f) <= O.em_tol * (fabs(f) + O.em_tol):
            em_done = 1
            break
        fc = f
    copy(th, R.theta_em, k)
    if O.maxiter == 0 and not O.em_only:
        # no Newton step will use the gradient: the one evaluation below is the answer
        f = INFINITY
    else:
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
                # the gradient per relative change of theta_i (at least the sampling
                # scale): the same test whatever the units of the outcome
                h = fabs(g[i]) * (fabs(th[i]) if fabs(th[i]) > P.scale else P.scale)
                if h > gmax:
                    gmax = h
                if not hk[i]:
                    have_h = 0
        hess_ok = 0
        if gmax <= 1e-12 * fscale:
            # a gradient that vanishes to rounding (after EM, typically): quasi-Newton
            # steps from here have nothing to follow either
            dec = 0.0
            pd = 1
            hess_ok = 1
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
            dsyev(&jobv, &lo, &nf, H, &nf, w, work, &lw, &info)
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
                if (P.lower[i] == 0.0 and P.upper[i] > 0.0 and th[i] <= 0.0
                        and fabs(g[i]) * P.scale <= 1e-10 * fscale):
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
                converged = 2 if hess_ok else 1
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
        for _ in range(n_half):
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
                # no step lowers the deviance beyond rounding: certified as above when
                # the Hessian was (the decrement is then below what rounding hides)
                converged = (2 if hess_ok else 1) if pd else 0
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
            fscale = fabs(O.known_dev) if fabs(O.known_dev) > 1.0 else 1.0
            if near <= 0.05 * tt and f >= O.known_dev - 1e-9 * fscale:
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
