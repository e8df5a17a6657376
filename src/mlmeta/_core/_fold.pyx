# cython: language_level=3
"""A deepest level of one-row groups folded into the diagonal.

When every group of the deepest level ``L`` holds one row and carries one effect
(``(1 | study:es)`` with one effect size per ``es``), its contribution to the whitened
marginal covariance is diagonal: row r adds ``t^2 z_r^2`` (``t`` = T_L, ``z_r`` = the
row's whitened Z of level L). With ``D = diag(d_r)``, ``d_r = 1 + t^2 z_r^2`` and
``w_r = 1 / d_r``,

    V          = D^1/2 V'' D^1/2,     V'' = I + Z'' T T' Z''',  Z'' = D^-1/2 Z_up
    log|V|     = sum_r log d_r + log|C''|
    A' V^-1 A  = A'' V''^-1 A'',       A'' = D^-1/2 A

so the tree of the levels above L (no nodes at level L) is factored with the
cross-products ``Z_up' W Z_up``, ``Z_up' W A`` and ``A' W A`` recomputed at each
evaluation (:func:`fold_prepare`). The level-L pieces of the gradient and EM moments
come from one pass over the rows after the tree's solve (:func:`fold_pieces`): with
``m_r = z_r,up T W_chain`` (the row's upper Z times the node solutions of its chain),
``s_r = z_r,up T Sig_chain T' z_r,up'``,

    (V^-1)_rr   = w_r - w_r^2 s_r ,    k_r = (V^-1 A)_r = w_r (a_r - m_r)
    h_r         = (V^-1)_rr - k_r Phi k_r'
    G_L         = sum_r t z_r^2 h_r                      (= d f / d T_L / 2)
    E_L         = sum_r (1 - t^2 z_r^2 h_r)               (Sig_rr + W_r Phi W_r')

(the identities C^-1 = I - T'Z'V^-1 Z T and C^-1 T'Z' = T'Z'V^-1 for the folded
effects). Cost per evaluation: O(n (depth q + ncol)^2) in plain loops, no node of
level L. The rows of a node of the tree are contiguous (``node_r0 .. node_r1``);
``W.Ar`` holds the rows of A = [X, y] (row-major, the current outcome).
"""

from libc.math cimport log
from mlmeta._core._linalg cimport zero
from mlmeta._core._problem cimport Prob, Work


cdef inline Py_ssize_t zrow(const Prob* P, Py_ssize_t l, Py_ssize_t r) noexcept nogil:
    """Offset of row r of level l's whitened Z (row-major, q_l per row) in P.Zw."""
    return P.zw_off[l] + r * P.q[l]


cdef inline void chain_of(const Prob* P, Py_ssize_t a, Py_ssize_t deep,
                          Py_ssize_t* anc) noexcept nogil:
    """anc[k] = the ancestor of node a (at level ``deep``) at level k, anc[deep] = a."""
    cdef Py_ssize_t k
    for k in range(deep, -1, -1):
        anc[k] = a
        a = P.tree.parent[a]


cdef inline double quad(const double* Phi, const double* k, int nc) noexcept nogil:
    """k Phi k' for a symmetric Phi (its upper triangle)."""
    cdef int i, j
    cdef double acc, out = 0.0
    for j in range(nc):
        acc = 0.5 * Phi[j + j * nc] * k[j]
        for i in range(j):
            acc += Phi[i + j * nc] * k[i]
        out += acc * k[j]
    return 2.0 * out


cdef void prepare_scalar(const Prob* P, Work* W) noexcept nogil:
    """:func:`fold_prepare`'s cross-products for a tree of one effect per node: node a
    at level l has l + 1 numbers in ZZ (z_l z_k, k <= l) and ncol in ZA; A'WA is summed
    over the rows of the deepest tree level (each row once). Sums run in locals (no
    store through the workspaces inside the row loops)."""
    cdef Py_ssize_t a, l, k, r, i, j, r0, r1
    cdef Py_ssize_t deep = P.fold - 1
    cdef int nc = P.ncol
    cdef double wr, wz, wz2, zl
    cdef double zz[64]
    cdef double acc[64]
    cdef double aa[64 * 64]
    cdef const double* zk[64]
    cdef const double* ar
    cdef const double* Ar = W.Ar
    cdef const double* w = W.wr
    cdef const double* Zl
    cdef double* ZZf = W.ZZf
    cdef double* ZA = W.ZA
    for k in range(deep + 1):
        zk[k] = P.Zw + P.zw_off[k]
    for j in range(nc):
        for i in range(j + 1):
            aa[i + j * nc] = 0.0
    for a in range(P.n_nodes):
        l = P.tree.level[a]
        r0 = P.node_r0[a]
        r1 = P.node_r1[a]
        Zl = zk[l]
        for k in range(l + 1):
            zz[k] = 0.0
        for i in range(nc):
            acc[i] = 0.0
        if l == deep:
            for r in range(r0, r1):
                wr = w[r]
                ar = Ar + r * nc
                zl = Zl[r]
                wz = wr * zl
                for k in range(l):
                    zz[k] += wz * zk[k][r]
                zz[l] += wz * zl
                for j in range(nc):
                    acc[j] += wz * ar[j]
                    wz2 = wr * ar[j]
                    for i in range(j + 1):
                        aa[i + j * nc] += wz2 * ar[i]
        else:
            for r in range(r0, r1):
                wz = w[r] * Zl[r]
                ar = Ar + r * nc
                for k in range(l + 1):
                    zz[k] += wz * zk[k][r]
                for j in range(nc):
                    acc[j] += wz * ar[j]
        for k in range(l + 1):
            ZZf[P.tree.zz_ptr[a] + k] = zz[k]
        for i in range(nc):
            ZA[P.tree.za_ptr[a] + i] = acc[i]
    for j in range(nc):
        for i in range(j + 1):
            W.AA[i + j * nc] = aa[i + j * nc]
            W.AA[j + i * nc] = aa[i + j * nc]


cdef void fold_prepare(const Prob* P, Work* W, double* logdet) noexcept nogil:
    """W.wr = 1 / (1 + t^2 z_r^2), logdet += sum_r log(1 + t^2 z_r^2), and the tree's
    cross-products reweighted by w: W.ZZf (ZZ layout), W.ZA and W.AA."""
    cdef Py_ssize_t L = P.fold
    cdef Py_ssize_t n = P.n_obs, r, a, l, k, i, j, c, qa, qk, z0, base
    cdef int nc = P.ncol
    cdef double t = W.Tlev[P.t_off[L]]
    cdef double tt = t * t
    cdef double zr, d, wr, wz, prod = 1.0
    cdef const double* Zl = P.Zw + P.zw_off[L]
    cdef const double* ar
    cdef double* AA = W.AA
    for r in range(n):
        zr = Zl[r]
        d = 1.0 + tt * zr * zr
        W.wr[r] = 1.0 / d
        prod *= d
        if prod > 1e150:
            logdet[0] += log(prod)
            prod = 1.0
    logdet[0] += log(prod)
    if P.tree.scalar:
        prepare_scalar(P, W)
        return
    zero(AA, nc * nc)
    zero(W.ZZf, P.zz_len)
    zero(W.ZA, P.za_len)
    for a in range(P.n_nodes):
        l = P.tree.level[a]
        qa = P.q[l]
        for r in range(P.node_r0[a], P.node_r1[a]):
            wr = W.wr[r]
            ar = W.Ar + r * nc
            base = P.tree.zz_ptr[a]
            for k in range(l + 1):
                qk = P.q[k]
                for j in range(qk):
                    for i in range(qa):
                        W.ZZf[base + i + j * qa] += wr * P.Zw[zrow(P, l, r) + i] * P.Zw[zrow(P, k, r) + j]
                base += qa * qk
            z0 = P.tree.za_ptr[a]
            for i in range(qa):
                wz = wr * P.Zw[zrow(P, l, r) + i]
                for c in range(nc):
                    W.ZA[z0 + i + c * qa] += wz * ar[c]
    for r in range(n):
        wr = W.wr[r]
        ar = W.Ar + r * nc
        for j in range(nc):
            wz = wr * ar[j]
            for i in range(j + 1):
                AA[i + j * nc] += wz * ar[i]
    for j in range(nc):
        for i in range(j):
            AA[j + i * nc] = AA[i + j * nc]


cdef void pieces_scalar(const Prob* P, Work* W, const double* Phi, double* gl,
                        double* el) noexcept nogil:
    """:func:`fold_pieces` for a tree of one effect per node: each chain's factors,
    blocks of C^-1 and node solutions are read once per node of the deepest tree level
    into locals."""
    cdef Py_ssize_t deep = P.fold - 1
    cdef Py_ssize_t a, r, k, m, i, r0, r1
    cdef int nc = P.ncol
    cdef double t = W.Tlev[P.t_off[P.fold]]
    cdef double tt = t * t
    cdef double wr, s, acc, h, z2, zr, g = 0.0, e = 0.0
    cdef double tk[64]
    cdef double u[64]
    cdef double sig[64 * 64]
    cdef double kv[64]
    cdef double wch[64 * 64]          # the chain's node solutions, (deep + 1) x ncol
    cdef double ph[64 * 64]
    cdef const double* zk[64]
    cdef const double* Zl = P.Zw + P.zw_off[P.fold]
    cdef const double* Ar = W.Ar
    cdef const double* w = W.wr
    cdef const double* ar
    cdef Py_ssize_t anc[64]
    for k in range(deep + 1):
        zk[k] = P.Zw + P.zw_off[k]
    for i in range(nc * nc):
        ph[i] = Phi[i]
    for a in range(P.n_nodes):
        if P.tree.level[a] != deep:
            continue
        chain_of(P, a, deep, anc)
        for k in range(deep + 1):
            tk[k] = W.Tn[P.tree.tn_ptr[anc[k]]]
            for m in range(k + 1):
                sig[k * 64 + m] = W.SB[P.tree.zz_ptr[anc[k]] + m] * (1.0 if m == k else 2.0)
            for i in range(nc):
                wch[k * nc + i] = W.WW[P.tree.za_ptr[anc[k]] + i]
        r0 = P.node_r0[a]
        r1 = P.node_r1[a]
        for r in range(r0, r1):
            for k in range(deep + 1):
                u[k] = zk[k][r] * tk[k]
            s = 0.0
            for k in range(deep + 1):
                acc = 0.0
                for m in range(k + 1):
                    acc += sig[k * 64 + m] * u[m]
                s += acc * u[k]
            wr = w[r]
            ar = Ar + r * nc
            for i in range(nc):
                acc = ar[i]
                for k in range(deep + 1):
                    acc -= u[k] * wch[k * nc + i]
                kv[i] = wr * acc
            zr = Zl[r]
            z2 = zr * zr
            h = wr - wr * wr * s - quad(ph, kv, nc)
            g += t * z2 * h
            e += 1.0 - tt * z2 * h
    gl[0] += g
    el[0] += e


cdef void fold_pieces(const Prob* P, Work* W, const double* Phi) noexcept nogil:
    """After the tree's solve (W.WW, W.SB at the node factors W.Tn): the folded level's
    gradient piece and EM moment added into W.G and W.E (module docstring)."""
    cdef Py_ssize_t L = P.fold
    cdef Py_ssize_t deep = L - 1
    cdef Py_ssize_t a, r, k, m, i, j, c, qk, qm, o, uo, zb
    cdef int nc = P.ncol
    cdef double t = W.Tlev[P.t_off[L]]
    cdef double tt = t * t
    cdef double gl = 0.0, el = 0.0
    cdef double zr, wr, s, acc, h, z2
    cdef const double* Zl = P.Zw + P.zw_off[L]
    cdef const double* ar
    cdef const double* Tc
    cdef Py_ssize_t anc[64]
    cdef Py_ssize_t anc_sum[65]
    cdef double* u = W.fu                    # the chain's z T (sum of q over levels < L)
    cdef double* mv = W.fu + P.t_len          # k_r (ncol)
    if P.tree.scalar:
        pieces_scalar(P, W, Phi, &gl, &el)
        W.G[P.t_off[L]] += gl
        W.E[P.t_off[L]] += el
        return
    anc_sum[0] = 0
    for k in range(L):
        anc_sum[k + 1] = anc_sum[k] + P.q[k]
    for a in range(P.n_nodes):
        if P.tree.level[a] != deep:
            continue
        chain_of(P, a, deep, anc)
        for r in range(P.node_r0[a], P.node_r1[a]):
            # u_k = z_{r,k} T_{c_k} (1 x q_k) for every level of the chain
            for k in range(deep + 1):
                qk = P.q[k]
                Tc = W.Tn + P.tree.tn_ptr[anc[k]]
                uo = anc_sum[k]
                for j in range(qk):
                    acc = 0.0
                    for i in range(qk):
                        acc += P.Zw[zrow(P, k, r) + i] * Tc[i + j * qk]
                    u[uo + j] = acc
            # s = u Sig_chain u' (Sig_{c_k c_m}, m <= k, in node c_k's blocks)
            s = 0.0
            for k in range(deep + 1):
                qk = P.q[k]
                zb = P.tree.zz_ptr[anc[k]]
                for m in range(k + 1):
                    qm = P.q[m]
                    o = zb + qk * anc_sum[m]
                    acc = 0.0
                    for j in range(qm):
                        for i in range(qk):
                            acc += u[anc_sum[k] + i] * W.SB[o + i + j * qk] * u[anc_sum[m] + j]
                    s += acc if m == k else 2.0 * acc
            # m = u W_chain; k_r = w (a_r - m)
            wr = W.wr[r]
            ar = W.Ar + r * nc
            for c in range(nc):
                acc = 0.0
                for k in range(deep + 1):
                    qk = P.q[k]
                    o = P.tree.za_ptr[anc[k]]
                    for i in range(qk):
                        acc += u[anc_sum[k] + i] * W.WW[o + i + c * qk]
                mv[c] = wr * (ar[c] - acc)
            zr = Zl[r]
            z2 = zr * zr
            h = wr - wr * wr * s - quad(Phi, mv, nc)
            gl += t * z2 * h
            el += 1.0 - tt * z2 * h
    W.G[P.t_off[L]] += gl
    W.E[P.t_off[L]] += el


# Two levels, the deeper one folded: every node is a top-level cluster carrying one
# effect (``(1 | study) + (1 | study:es)`` with one effect per es). Factor and solve run
# as one pass over each cluster's rows with the per-cluster algebra in scalars (no tree
# kernels): with s = sum w z0^2, b = sum w z0 a, C = 1 + t0^2 s,
#
#     log|C''| = sum log C,   S = A'WA - sum t0^2 b b' / C,   W_a = t0 b / C,  Sig = 1 / C,
#     K_a = b - s t0 W_a,     G_0 = sum_a [s t0 Sig - K_a Phi W_a'],
#     E_0 = sum_a [Sig + W_a Phi W_a'],
#
# and the folded level's pieces per row as in :func:`pieces_scalar`. The row loops are
# written once (:func:`factor_two_nc`, :func:`solve_two_nc`) and specialised by the
# compiler for ncol = 2, 3, 4 (one to three fixed effects), which keeps the sums in
# registers. From TWO_SPLIT_ROWS rows the clusters are taken in two halves, each with
# its own partial sums (:func:`two_parts`), on two threads where the run may use them.

cdef enum:
    TWO_MAX_NCOL = 16        # the two-level kernels' partial sums hold ncol^2 numbers


cdef bint two_level(const Prob* P) noexcept nogil:
    """Whether the folded problem is the two-level scalar case above (with at most
    TWO_MAX_NCOL columns in [X, y]; wider ones take the general fold)."""
    return (P.fold == 1 and P.tree.scalar and P.nb == 0 and P.n_nodes == P.n_clusters
            and P.ncol <= TWO_MAX_NCOL)


cdef extern from *:
    """
    /* Run fn(a) on a new thread and fn(b) on this one, then join; serially where
       threads are not available (or cannot be started). */
    #if defined(_WIN32)
    static int mlmeta_pair(void (*fn)(void*), void* a, void* b) { fn(b); fn(a); return 1; }
    #else
    #include <pthread.h>
    typedef struct { void (*fn)(void*); void* arg; } mlmeta_job;
    static void* mlmeta_job_run(void* p) { mlmeta_job* j = (mlmeta_job*)p; j->fn(j->arg); return NULL; }
    static int mlmeta_pair(void (*fn)(void*), void* a, void* b) {
        pthread_t t;
        mlmeta_job j;
        j.fn = fn;
        j.arg = a;
        if (pthread_create(&t, NULL, mlmeta_job_run, &j) != 0) { fn(b); fn(a); return 1; }
        fn(b);
        pthread_join(t, NULL);
        return 0;
    }
    #endif
    """
    int mlmeta_pair(void (*fn)(void*) noexcept nogil, void* a, void* b) nogil


cdef enum:
    # a two-level folded problem of at least this many rows is evaluated as two halves of
    # its clusters (each with its own partial sums, added in a fixed order: the same
    # numbers on one thread or two), on two threads where P.eval_threads allows
    TWO_SPLIT_ROWS = 65536


cdef struct TwoPart:
    const Prob* P
    Work* W
    const double* Phi
    Py_ssize_t a0, a1
    Py_ssize_t status
    double logdet, g0, em0, gz, n_rows
    double aa[256]          # A'WA and sum t0^2 b b' / C (upper triangles, ncol <= 16)
    double yy[256]


cdef inline void factor_two_nc(TwoPart* T, const int nc) noexcept nogil:
    """One pass over the rows of clusters a0..a1: weights, log-determinant, the clusters'
    s (ZZf), b (ZA) and Sig = 1 / C (SB), and the partial A'WA (aa) and sum t0^2 b b' / C
    (yy)."""
    cdef const Prob* P = T.P
    cdef Work* W = T.W
    cdef Py_ssize_t a, r, i, j, ra
    cdef double t = W.Tlev[P.t_off[P.fold]]
    cdef double tt = t * t
    cdef double t0, zr, z0, d, wr, wz, wa, s, c, inv, y_i
    cdef double prod = 1.0, logdet = 0.0
    cdef double b[64]
    cdef double aa[64 * 64]
    cdef double yy[64 * 64]
    cdef const double* Z0 = P.Zw + P.zw_off[0]
    cdef const double* Zl = P.Zw + P.zw_off[P.fold]
    cdef const double* ar
    cdef double* wrow = W.wr
    T.status = 0
    for j in range(nc):
        for i in range(nc):
            aa[i + j * nc] = 0.0
            yy[i + j * nc] = 0.0
    for a in range(T.a0, T.a1):
        t0 = W.Tn[P.tree.tn_ptr[a]]
        s = 0.0
        for i in range(nc):
            b[i] = 0.0
        for r in range(P.node_r0[a], P.node_r1[a]):
            zr = Zl[r]
            d = 1.0 + tt * zr * zr
            prod *= d
            if prod > 1e150:
                logdet += log(prod)
                prod = 1.0
            wr = 1.0 / d
            wrow[r] = wr
            z0 = Z0[r]
            wz = wr * z0
            s += wz * z0
            ar = W.Ar + r * nc
            for j in range(nc):
                b[j] += wz * ar[j]
                wa = wr * ar[j]
                for i in range(j + 1):
                    aa[i + j * nc] += wa * ar[i]
        c = 1.0 + t0 * t0 * s
        if not c > 0.0:
            T.status = a + 1
            return
        prod *= c
        if prod > 1e150:
            logdet += log(prod)
            prod = 1.0
        W.ZZf[P.tree.zz_ptr[a]] = s
        W.SB[P.tree.zz_ptr[a]] = 1.0 / c         # Sig = C^-1 (the solve's)
        ra = P.tree.za_ptr[a]
        inv = t0 * t0 / c
        for j in range(nc):
            W.ZA[ra + j] = b[j]
            y_i = inv * b[j]
            for i in range(j + 1):
                yy[i + j * nc] += y_i * b[i]
    T.logdet = logdet + log(prod)
    for j in range(nc):
        for i in range(j + 1):
            T.aa[i + j * nc] = aa[i + j * nc]
            T.yy[i + j * nc] = yy[i + j * nc]


cdef void factor_part(void* arg) noexcept nogil:
    cdef TwoPart* T = <TwoPart*>arg
    cdef int nc = T.P.ncol
    if nc == 2:
        factor_two_nc(T, 2)
    elif nc == 3:
        factor_two_nc(T, 3)
    elif nc == 4:
        factor_two_nc(T, 4)
    else:
        factor_two_nc(T, nc)


cdef inline void solve_two_nc(TwoPart* T, const int nc) noexcept nogil:
    """The clusters a0..a1's node solutions W.WW (Sig = 1 / C from the factor pass in
    W.SB), and the partial sums of G_0, E_0 and the folded level's sum z^2 h and row
    count."""
    cdef const Prob* P = T.P
    cdef Work* W = T.W
    cdef Py_ssize_t a, r, i, j, ra, z
    cdef double t0, s, sig, u, wr, zr, h, acc, f, e0, kq
    cdef double g0 = 0.0, em0 = 0.0, gz = 0.0, n_rows = 0.0
    cdef double ph[64 * 64]
    cdef double wa[64]
    cdef double pw[64]
    cdef double kv[64]
    cdef const double* Z0 = P.Zw + P.zw_off[0]
    cdef const double* Zl = P.Zw + P.zw_off[P.fold]
    cdef const double* ar
    for j in range(nc):
        for i in range(nc):
            ph[i + j * nc] = T.Phi[i + j * nc]
    for a in range(T.a0, T.a1):
        t0 = W.Tn[P.tree.tn_ptr[a]]
        z = P.tree.zz_ptr[a]
        ra = P.tree.za_ptr[a]
        s = W.ZZf[z]
        sig = W.SB[z]
        for i in range(nc):
            wa[i] = t0 * W.ZA[ra + i] * sig
        # Phi W_a', then G_0 and E_0 of the node
        f = 0.0
        e0 = 0.0
        for j in range(nc):
            acc = 0.0
            for i in range(nc):
                acc += ph[j + i * nc] * wa[i]
            pw[j] = acc
            f += (W.ZA[ra + j] - s * t0 * wa[j]) * acc
            e0 += wa[j] * acc
        g0 += s * t0 * sig - f
        em0 += sig + e0
        for i in range(nc):
            W.WW[ra + i] = wa[i]
        # the folded level: h_r = w - w^2 Sig u^2 - k Phi k', k = w (a - u W_a)
        for r in range(P.node_r0[a], P.node_r1[a]):
            u = Z0[r] * t0
            wr = W.wr[r]
            ar = W.Ar + r * nc
            for i in range(nc):
                kv[i] = wr * (ar[i] - u * wa[i])
            kq = 0.0
            for j in range(nc):
                acc = 0.5 * ph[j + j * nc] * kv[j]
                for i in range(j):
                    acc += ph[i + j * nc] * kv[i]
                kq += acc * kv[j]
            zr = Zl[r]
            h = wr - wr * wr * sig * u * u - 2.0 * kq
            gz += zr * zr * h
            n_rows += 1.0
    T.g0 = g0
    T.em0 = em0
    T.gz = gz
    T.n_rows = n_rows


cdef void solve_part(void* arg) noexcept nogil:
    cdef TwoPart* T = <TwoPart*>arg
    cdef int nc = T.P.ncol
    if nc == 2:
        solve_two_nc(T, 2)
    elif nc == 3:
        solve_two_nc(T, 3)
    elif nc == 4:
        solve_two_nc(T, 4)
    else:
        solve_two_nc(T, nc)


cdef int two_parts(const Prob* P, Work* W, const double* Phi, TwoPart* T,
                   void (*fn)(void*) noexcept nogil) noexcept nogil:
    """Run ``fn`` over the clusters as one part or, from TWO_SPLIT_ROWS rows, as two
    halves of the rows (on two threads where P.eval_threads >= 2); the number of parts."""
    cdef Py_ssize_t mid, half, lo, hi
    T[0].P = P
    T[0].W = W
    T[0].Phi = Phi
    T[0].a0 = 0
    T[0].a1 = P.n_nodes
    if P.n_obs < TWO_SPLIT_ROWS or P.n_nodes < 2:
        fn(&T[0])
        return 1
    # the first cluster starting at or after the middle row (bisection: the clusters'
    # rows are in order), at least one cluster in each half
    half = P.node_r1[P.n_nodes - 1] // 2
    lo = 1
    hi = P.n_nodes - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if P.node_r0[mid] < half:
            lo = mid + 1
        else:
            hi = mid
    mid = lo
    T[1] = T[0]
    T[0].a1 = mid
    T[1].a0 = mid
    if P.eval_threads >= 2:
        mlmeta_pair(fn, &T[1], &T[0])
    else:
        fn(&T[0])
        fn(&T[1])
    return 2


cdef Py_ssize_t factor_two(const Prob* P, Work* W, double* logdet) noexcept nogil:
    """The weights W.wr, log|V''| + sum log d_r into logdet, W.AA, W.S = A'V^-1A, and the
    clusters' s (ZZf), b (ZA) and Sig = 1 / C (SB); 0, or 1 + the node whose C failed."""
    cdef TwoPart T[2]
    cdef int nc = P.ncol
    cdef int k, m, i, j
    m = two_parts(P, W, NULL, T, factor_part)
    for k in range(m):
        if T[k].status != 0:
            return T[k].status
    for j in range(nc):
        for i in range(j + 1):
            W.AA[i + j * nc] = T[0].aa[i + j * nc]
            W.S[i + j * nc] = T[0].yy[i + j * nc]
            for k in range(1, m):
                W.AA[i + j * nc] += T[k].aa[i + j * nc]
                W.S[i + j * nc] += T[k].yy[i + j * nc]
            W.S[i + j * nc] = W.AA[i + j * nc] - W.S[i + j * nc]
            W.AA[j + i * nc] = W.AA[i + j * nc]
            W.S[j + i * nc] = W.S[i + j * nc]
    for k in range(m):
        logdet[0] += T[k].logdet
    return 0


cdef void solve_two(const Prob* P, Work* W, const double* Phi) noexcept nogil:
    """After :func:`factor_two`: the node solutions W.WW, Sig (W.SB), and both levels'
    gradient pieces and EM moments added into W.G and W.E."""
    cdef TwoPart T[2]
    cdef int k, m
    cdef double t = W.Tlev[P.t_off[P.fold]]
    cdef double g0 = 0.0, em0 = 0.0, gz = 0.0, n_rows = 0.0
    m = two_parts(P, W, Phi, T, solve_part)
    for k in range(m):
        g0 += T[k].g0
        em0 += T[k].em0
        gz += T[k].gz
        n_rows += T[k].n_rows
    W.G[P.t_off[0]] += g0
    W.E[P.t_off[0]] += em0
    W.G[P.t_off[P.fold]] += t * gz
    W.E[P.t_off[P.fold]] += n_rows - t * t * gz
