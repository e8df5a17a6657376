# cython: language_level=3
"""Covariance structures in the engine: theta -> T (a square root of Sigma), dT/dtheta
and the EM projection Sigma -> theta, per level.

Identity, independent, exchangeable and unstructured levels are linear in theta:
``T_flat = M theta`` with the constant ``M`` (the problem's ``M``, the structures'
``dT`` from :mod:`mlmeta.covstruct`). A custom (Stata pattern) level has
``T = D chol(R)``, ``D = diag(sd)``, ``R_ij = rho_c^(d_ij)`` for a free correlation
(c = corr_map[i, j]; lags d = 1 for a Stata pattern, ``|i - j|`` or ``|t_i - t_j|`` for
metafor's AR, HAR, CAR) and the fixed value otherwise, with

    dT / d sd_a   = diag(1[sd_map == a]) chol(R)
    dT / d rho_b  = D L Psi(L^-1 dR_b L^-T),  Psi(M) = tril(M, -1) + diag(M) / 2 ,
    (dR_b)_ij     = d_ij rho_b^(d_ij - 1)  where corr_map[i, j] == b  (0 elsewhere),

the derivative taken at |rho| = RHO_FLOOR when d < 1 and |rho| is below it (it is
infinite at 0), as :func:`mlmeta.covstruct.dpower`.

A spatial level (``K_SPATIAL``, metafor's SPEXP, SPGAU, SPLIN, SPRAT, SPSPH over a crossed
level's G groups, q = 1) has theta = (s, rho): its entry of T is s (linear, as identity)
and its border block is ``s F``, ``F F' = R(rho)`` (:func:`spatial_factor`; x = d / rho,
d the distance between two groups):

    SPEXP  exp(-x)                 SPGAU  exp(-x^2)            SPRAT  1 / (1 + x^2)
    SPLIN  (1 - x) [x < 1]         SPSPH  (1 - 3x/2 + x^3/2) [x < 1]

with ``dR/drho`` kept for the gradient (:mod:`mlmeta._core._border`). F is chol(R); where
R(rho) is numerically singular (a Gaussian structure at a long range, sites at one
place) it is ``Q diag(sqrt(max(w, 0)))`` from R = Q diag(w) Q', eigenvalues down to
``-SPATIAL_TOL max(1, w_max)`` (rounding) set to 0; a more negative one (SPLIN in two
dimensions can lose positive definiteness) makes the evaluation fail with ST_SPATIAL.

The maps are tested against :mod:`mlmeta.covstruct` through
:meth:`Problem.factors <mlmeta._core._engine.Problem.factors>` and
:meth:`Problem.em_project <mlmeta._core._engine.Problem.em_project>`.
"""

from libc.math cimport sqrt, fabs, pow, log, exp, copysign, INFINITY
from scipy.linalg.cython_lapack cimport dpotrf, dsyev

from mlmeta._core._linalg cimport gemm, copy, potrf_lower, trsm_left_lower
from mlmeta._core._problem cimport (Prob, Work, K_IDENTITY, K_INDEPENDENT, K_EXCHANGEABLE,
                                    K_UNSTRUCTURED, K_CUSTOM, K_SPATIAL, ST_OK, ST_R, ST_NONFINITE,
                                    ST_SPATIAL)

cdef double RHO_FLOOR = 1e-8
cdef double SPATIAL_TOL = 1e-10


cdef inline void spatial_corr(Py_ssize_t form, double d, double rho, double* R,
                              double* dR) noexcept nogil:
    """R(d; rho) and dR/drho of a spatial structure (module docstring), x = d / rho."""
    cdef double x = d / rho, e
    if form == 1:
        e = exp(-x)
        R[0] = e
        dR[0] = e * x / rho
    elif form == 2:
        e = exp(-x * x)
        R[0] = e
        dR[0] = 2.0 * e * x * x / rho
    elif form == 3:
        R[0] = 1.0 - x if x < 1.0 else 0.0
        dR[0] = x / rho if x < 1.0 else 0.0
    elif form == 4:
        e = 1.0 + x * x
        R[0] = 1.0 / e
        dR[0] = 2.0 * x * x / (rho * e * e)
    else:
        R[0] = 1.0 - 1.5 * x + 0.5 * x * x * x if x < 1.0 else 0.0
        dR[0] = 1.5 * x * (1.0 - x * x) / rho if x < 1.0 else 0.0


cdef int spatial_factor(const Prob* P, Work* W, Py_ssize_t l, double rho) noexcept nogil:
    """W.bL's block of level l = F with F F' = R(rho) (chol, else the eigen square root of
    the module docstring) and W.dR's = dR/drho. Returns ST_SPATIAL if R is not positive
    semi-definite (beyond rounding) or rho is not positive."""
    cdef int G = <int>P.n_groups[l], info = 0, lwork = <int>(P.sp_scratch - G)
    cdef Py_ssize_t i, j, form = P.sp_form[l]
    cdef double* F = W.bL + P.b_lo[l]
    cdef double* dR = W.dR + P.b_lo[l]
    cdef const double* D = P.sp_D + P.b_lo[l]
    cdef double* w = W.sp
    cdef double tol, c
    cdef char jobv = b'V'
    cdef char lo = b'L'
    if not (rho > 0):
        return ST_SPATIAL
    for j in range(G):
        for i in range(G):
            spatial_corr(form, D[i + j * G], rho, &F[i + j * G], &dR[i + j * G])
    if potrf_lower(G, F, G) == 0:
        for j in range(G):
            for i in range(j):
                F[i + j * G] = 0.0
        return ST_OK
    for j in range(G):
        for i in range(G):
            spatial_corr(form, D[i + j * G], rho, &F[i + j * G], &c)
    dsyev(&jobv, &lo, &G, F, &G, w, w + G, &lwork, &info)
    if info != 0:
        return ST_SPATIAL
    tol = SPATIAL_TOL * (w[G - 1] if w[G - 1] > 1.0 else 1.0)
    if w[0] < -tol:
        return ST_SPATIAL
    for j in range(G):
        c = sqrt(w[j]) if w[j] > 0 else 0.0
        for i in range(G):
            F[i + j * G] = F[i + j * G] * c
    return ST_OK


cdef inline double dpower(double rho, double d) noexcept nogil:
    """d rho^d / d rho = d rho^(d - 1), at RHO_FLOOR when d < 1 and |rho| < RHO_FLOOR."""
    if d == 1.0:
        return 1.0
    if d < 1.0 and fabs(rho) < RHO_FLOOR:
        rho = RHO_FLOOR
    return d * pow(rho, d - 1.0)


cdef inline void correlation_matrix(const Prob* P, Py_ssize_t l, const double* th,
                                    double* R) noexcept nogil:
    """R (q x q) of a custom level at theta: 1 on the diagonal, free correlations
    rho^d from theta, fixed ones from the pattern."""
    cdef Py_ssize_t q = P.q[l], o = P.th_off[l], i, j
    cdef const Py_ssize_t* cmap = P.cmap + P.c_off[l] + q
    cdef const double* cfix = P.cfix + P.c_off[l] + q
    cdef const double* clag = P.clag + P.c_off[l] + q
    cdef double rho, d
    for j in range(q):
        for i in range(q):
            if i == j:
                R[i + j * q] = 1.0
            elif cmap[i + j * q] >= 0:
                rho = th[o + cmap[i + j * q]]
                d = clag[i + j * q]
                R[i + j * q] = rho if d == 1.0 else pow(rho, d)
            else:
                R[i + j * q] = cfix[i + j * q]


cdef int custom_T(const Prob* P, Py_ssize_t l, const double* th, double* T, double* D,
                  double* cs) noexcept nogil:
    """T = D chol(R) of a custom level and its derivatives (columns th_off..th_off+n_th
    of the t_len-row matrix D, rows t_off[l]..). Returns ST_R if R is not positive definite."""
    cdef Py_ssize_t q = P.q[l], o = P.th_off[l], r0 = P.t_off[l], k, i, j, m
    cdef const Py_ssize_t* smap = P.cmap + P.c_off[l]
    cdef const Py_ssize_t* cmap = smap + q
    cdef const double* sfix = P.cfix + P.c_off[l]
    cdef const double* clag = P.clag + P.c_off[l] + q
    cdef double* sd = cs
    cdef double* L = sd + q
    cdef double* Li = L + q * q
    cdef double* A = Li + q * q
    cdef double* Ps = A + q * q
    cdef double acc
    cdef int qi = <int>q
    for i in range(q):
        sd[i] = th[o + smap[i]] if smap[i] >= 0 else sfix[i]
    correlation_matrix(P, l, th, L)
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
        # dR_k (in Ps: d_ij rho_k^(d_ij - 1) where corr_map == k), A = Li dR_k, Ps = A Li'
        for j in range(q):
            for i in range(q):
                Ps[i + j * q] = (dpower(th[o + k], clag[i + j * q])
                                 if i != j and cmap[i + j * q] == k else 0.0)
        for j in range(q):
            for i in range(q):
                acc = 0.0
                for m in range(q):
                    acc += Li[i + m * q] * Ps[m + j * q]
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
    """W.Tlev = T(theta) for every level (column-major blocks at t_off) and W.D = dT/dtheta;
    the spatial levels' F(rho) and dR/drho into W.bL and W.dR."""
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
    if P.has_spatial:
        for l in range(P.n_levels):
            if P.kind[l] == K_SPATIAL:
                st = spatial_factor(P, W, l, th[P.th_off[l] + 1])
                if st != ST_OK:
                    return st
    return ST_OK


cdef void em_project(const Prob* P, Py_ssize_t l, const double* Sig, double* th,
                     double* scratch) noexcept nogil:
    """theta of level l from Sigma_l (q x q, symmetric): the structure's moment projection.

    identity (and a spatial level's s, rho held): s = sqrt(mean diag); independent:
    s_i = sqrt(Sigma_ii); exchangeable: a = sqrt(v - c), g = (-a + sqrt(a^2 + q c)) / q
    with v = mean diag and c = mean off-diagonal (clipped to [-v/(q-1), v]);
    unstructured: vech(chol(Sigma)) (kept if Sigma is not positive definite); custom:
    each free SD the mean of its elements' SDs, each free correlation parameter by
    :func:`project_rho`, within [max(lower, -0.95), 0.95], then kept feasible
    (:func:`feasible_correlations`)."""
    cdef Py_ssize_t q = P.q[l], o = P.th_off[l], i, j, c, n
    cdef double v, cov, a, g, acc, rlo
    cdef int qi = <int>q, info = 0
    cdef char lo = b'L'
    cdef const Py_ssize_t* smap
    if P.kind[l] == K_IDENTITY or P.kind[l] == K_SPATIAL:
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
        n = P.n_th[l] - P.n_sd[l]
        copy(th + o + P.n_sd[l], scratch + q, n)          # the previous correlations
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
            acc = project_rho(P, l, c, Sig, scratch)
            rlo = P.lower[o + c] if P.lower[o + c] > -0.95 else -0.95
            th[o + c] = rlo if acc < rlo else (0.95 if acc > 0.95 else acc)
        n = P.n_th[l] - P.n_sd[l]
        feasible_correlations(P, l, th, scratch + q, scratch + q + n)


cdef double project_rho(const Prob* P, Py_ssize_t l, Py_ssize_t c, const double* Sig,
                        const double* sd) noexcept nogil:
    """rho_c of a custom level from the correlations r_ij of Sigma (r = 0 where an SD is
    0) over the pairs with corr_map == c: when rho_c >= 0 (lower bound >= 0), the
    least-squares fit of log r_ij = d_ij log rho over the pairs with r_ij > 0 (0 if
    none); otherwise the mean r of the pairs at the smallest lag d_min, as
    sign(r) |r|^(1 / d_min) (the mean correlation of a pattern, d = 1)."""
    cdef Py_ssize_t q = P.q[l], o = P.th_off[l], i, j, n = 0
    cdef const Py_ssize_t* cmap = P.cmap + P.c_off[l] + q
    cdef const double* clag = P.clag + P.c_off[l] + q
    cdef double r, d, dmin = INFINITY, sxy = 0.0, sxx = 0.0, acc = 0.0
    cdef bint nonneg = P.lower[o + c] >= 0.0
    for j in range(q):
        for i in range(j):
            if cmap[i + j * q] == c and clag[i + j * q] < dmin:
                dmin = clag[i + j * q]
    for j in range(q):
        for i in range(j):
            if cmap[i + j * q] != c:
                continue
            d = clag[i + j * q]
            r = 0.0
            if sd[i] > 0 and sd[j] > 0:
                r = 0.5 * (Sig[i + j * q] + Sig[j + i * q]) / (sd[i] * sd[j])
            if nonneg:
                if r > 0:
                    sxy += d * log(r)
                    sxx += d * d
            elif d == dmin:
                acc += r
                n += 1
    if nonneg:
        return exp(sxy / sxx) if sxx > 0 else 0.0
    acc = acc / n if n > 0 else 0.0
    return acc if dmin == 1.0 else copysign(pow(fabs(acc), 1.0 / dmin), acc)


cdef double min_pivot(const Prob* P, Py_ssize_t l, const double* th, double* R) noexcept nogil:
    """The smallest diagonal element of the Cholesky factor of the custom level's
    correlation matrix at theta (-1 if it is not positive definite)."""
    cdef Py_ssize_t q = P.q[l], i
    cdef double m
    correlation_matrix(P, l, th, R)
    if potrf_lower(<int>q, R, <int>q) != 0:
        return -1.0
    m = R[0]
    for i in range(q):
        if R[i + i * q] < m:
            m = R[i + i * q]
    return m


cdef void feasible_correlations(const Prob* P, Py_ssize_t l, double* th, double* prev,
                                double* work) noexcept nogil:
    """Keep a custom level's EM projection inside the feasible set. The averaged free
    correlations (the target) need not form a positive definite matrix with the fixed
    ones; then they move from an anchor towards the target by halving the step until
    it is. The anchor is ``prev`` (the previous correlations) when feasible, else the
    common value of all free correlations on the grid -0.95, -0.90, ..., 0.95 with the
    largest smallest Cholesky pivot. ``work``: n_corr + q^2 doubles."""
    cdef Py_ssize_t o = P.th_off[l] + P.n_sd[l], n = P.n_th[l] - P.n_sd[l], c
    cdef double* target = work
    cdef double* R = work + n
    cdef double lam, best, m, rho
    cdef int g
    if n == 0 or min_pivot(P, l, th, R) > 0:
        return
    copy(th + o, target, n)
    copy(prev, th + o, n)
    if not min_pivot(P, l, th, R) > 0:
        best = -1.0
        for g in range(39):
            rho = -0.95 + 0.05 * g
            for c in range(n):
                th[o + c] = rho
            m = min_pivot(P, l, th, R)
            if m > best:
                best = m
                for c in range(n):
                    prev[c] = rho
        copy(prev, th + o, n)
        if not best > 0:
            return                   # no feasible anchor: the evaluation will say so
    lam = 1.0
    for _ in range(50):
        lam *= 0.5
        for c in range(n):
            th[o + c] = prev[c] + lam * (target[c] - prev[c])
        if min_pivot(P, l, th, R) > 0:
            return
    copy(prev, th + o, n)


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
