# cython: language_level=3
"""Per-cluster kernels for nested (multilevel) linear mixed models.

Notation (whitened by the known sampling covariance, ``Z~ = Lambda^{-1/2} Z``,
``A = Lambda^{-1/2} [X, y]``; ``ncol = p + 1``). The random effects of a top-level
cluster form a tree of *nodes*: one node per group at each level, a node at
level ``l`` carrying ``q_l`` effects ``u_a = T_l v_a`` with ``v ~ N(0, I)``.
With ``C = I + T' Z~' Z~ T`` (relative-factor form):

    V          = I + Z~ T T' Z~'                     (whitened marginal covariance)
    log|V|     = log|C|                               (determinant lemma)
    A' V^-1 A  = A'A - R' C^-1 R,   R = T' Z~' A      (Woodbury)

Two nodes' effects share rows only if one is an ancestor of the other, so ``C``
is a tree of blocks whose ancestor chains are dense: eliminating nodes deepest
level first (children before parents) Schur-complements each node into its
ancestors without fill. Cost per evaluation: O(sum over nodes of depth^2 q^3).

Layout (all blocks column-major). Nodes are numbered cluster by cluster, deepest
level first inside a cluster, so ``cluster_ptr[j]:cluster_ptr[j+1]`` lists the
nodes of top-level cluster j with its root last. Node ``a`` carries ``nq[a]``
effects: ``q_l`` for a group at level ``l``, or, for a cluster whose known
sampling covariance couples rows of different groups, one dense node holding
every effect of the cluster (its factor is block-diagonal in the level factors).
For node ``a`` at level ``l`` with ancestors ``c_0 (top), ..., c_{l-1}``, ``c_l = a``:

    ZZ[zz_ptr[a] + off_k :]   (nq_a x nq_{c_k}) = Z~_a' Z~_{c_k} over the rows of a
    ZA[za_ptr[a] :]           (nq_a x ncol)     = Z~_a' A       over the rows of a

with ``off_k = sum_{k' < k} nq_a nq_{c_k'}``. The node factors ``Tn`` (one
``nq x nq`` block per node at ``tn_ptr``) are assembled from the level factors
``T_l`` by :func:`assemble_factors`; per-node gradient pieces are summed back
into the levels the same way.

``factor_cluster`` overwrites a workspace with the same layout as ZZ by the block
Cholesky factor: the (l, l) block holds ``L_aa`` and the (l, k) block holds
``U_ak = L_aa^-1 C_{a c_k}`` (the transpose of the factor's off-diagonal block).
``invert_cluster`` then computes, top-down, ``W = C^-1 R`` and the blocks of
``C^-1`` on the same pattern (Takahashi's recurrences):

    W_a        = L_aa^-T (Y_a - sum_k U_ak W_{c_k})
    Sig_{a,ck} = -L_aa^-T sum_m U_am Sig_{c_m c_k}                     (k < l)
    Sig_aa     = L_aa^-T (L_aa^-1 - sum_m U_am Sig_{a c_m}')

``accumulate_cluster`` turns these into the gradient of ``f = log|C| + tr(Phi A'V^-1 A)``
style objectives with respect to each level's factor T_l and the EM moments:

    df/dT_l / 2 = sum_{g in level l} [ (Z~'Z~ T C^-1)_gg - K_g Phi W_g' ],  K_g = Z~_g' V^-1 A
    E_l         = sum_{g in level l} [ Sig_gg + W_g Phi W_g' ]

where ``Phi`` is the symmetric (ncol x ncol) matrix given by the caller (for ML
``gamma gamma'`` with ``gamma = (-beta, 1)``; REML adds ``(X'V^-1X)^-1`` in the
leading block). Kernels never allocate and never raise: they return 0 or
``1 + index`` of the node whose factorisation failed.
"""

import numpy as np

from libc.math cimport log, sqrt
from mlmeta._core._linalg cimport gemm, trsm_left_lower, potrf_lower, zero, copy

cdef inline void chain(const Tree* t, Py_ssize_t a, Py_ssize_t* anc, Py_ssize_t* off) noexcept nogil:
    """anc[k] = ancestor of node a at level k (anc[level(a)] = a); off[k] = offset of the
    (a, c_k) block inside node a's ZZ blocks."""
    cdef Py_ssize_t l = t.level[a]
    cdef Py_ssize_t c = a
    cdef Py_ssize_t k
    anc[l] = a
    while l > 0:
        c = t.parent[c]
        l -= 1
        anc[l] = c
    off[0] = 0
    for k in range(t.level[a]):
        off[k + 1] = off[k] + t.nq[a] * t.nq[anc[k]]


# Scalar trees (every node carries one effect, nq == 1: random intercepts at every
# level, no dense cluster nodes). The recurrences below are those of the general
# kernels with every block a number, so node a's blocks sit at zz_ptr[a] + k
# (k = 0..level(a)), its own factor at Tn[tn_ptr[a]], and no BLAS call or chain
# offset is needed.

cdef inline void ancestors(const Tree* t, Py_ssize_t a, Py_ssize_t l, Py_ssize_t* anc) noexcept nogil:
    """anc[k] = ancestor of node a at level k, k < l = level(a); anc[l] = a."""
    cdef Py_ssize_t k
    anc[l] = a
    for k in range(l - 1, -1, -1):
        a = t.parent[a]
        anc[k] = a


cdef Py_ssize_t factor_scalar(const Tree* t, Py_ssize_t a0, Py_ssize_t a1, double* WB,
                              double* WR, double* S, double* logdet) noexcept nogil:
    """C_{a c_k} = t_a ZZ_ak t_{c_k} (+1 on the diagonal), R_a = t_a ZA_a; then
    L_aa = sqrt(C_aa), U_ak = C_{a c_k} / L_aa, Y_a = R_a / L_aa, Schur-complemented
    into the ancestors; S -= Y_a' Y_a."""
    cdef Py_ssize_t a, l, k, m, z, zc, ra, rc, i, j
    cdef int nc = t.ncol
    cdef Py_ssize_t anc[MAXLEV]
    cdef double ta, d, inv, uk
    cdef double prod = 1.0     # product of pivots (each >= 1, as C >= I), logged in chunks
    for a in range(a0, a1):
        l = t.level[a]
        z = t.zz_ptr[a]
        ta = t.T[t.tn_ptr[a]]
        ancestors(t, a, l, anc)
        for k in range(l):
            WB[z + k] = ta * t.ZZ[z + k] * t.T[t.tn_ptr[anc[k]]]
        WB[z + l] = ta * t.ZZ[z + l] * ta + 1.0
        ra = t.za_ptr[a]
        for i in range(nc):
            WR[ra + i] = ta * t.ZA[ra + i]
    for a in range(a0, a1):
        l = t.level[a]
        z = t.zz_ptr[a]
        d = WB[z + l]
        if not d > 0.0:
            return a + 1
        prod *= d
        if prod > 1e150:
            logdet[0] += log(prod)
            prod = 1.0
        d = sqrt(d)
        inv = 1.0 / d
        WB[z + l] = d
        for k in range(l):
            WB[z + k] *= inv
        ra = t.za_ptr[a]
        for i in range(nc):
            WR[ra + i] *= inv
        ancestors(t, a, l, anc)
        for k in range(l):
            uk = WB[z + k]
            zc = t.zz_ptr[anc[k]]
            for m in range(k + 1):
                WB[zc + m] -= uk * WB[z + m]
            rc = t.za_ptr[anc[k]]
            for i in range(nc):
                WR[rc + i] -= uk * WR[ra + i]
        if not t.no_S:
            for j in range(nc):
                for i in range(nc):
                    S[i + j * nc] -= WR[ra + i] * WR[ra + j]
    logdet[0] += log(prod)
    return 0


cdef void invert_scalar(const Tree* t, Py_ssize_t a0, Py_ssize_t a1, const double* WB,
                        const double* WR, double* SB, double* WW) noexcept nogil:
    """Top-down: W_a = (Y_a - sum_k U_ak W_{c_k}) / L_aa,
    Sig_{a c_k} = -sum_m U_am Sig_{c_m c_k} / L_aa, Sig_aa = (1/L_aa - sum_m U_am Sig_{a c_m}) / L_aa."""
    cdef Py_ssize_t a, l, k, m, z, ra, i
    cdef int nc = t.ncol
    cdef Py_ssize_t anc[MAXLEV]
    cdef double inv, acc
    for a in range(a1 - 1, a0 - 1, -1):
        l = t.level[a]
        z = t.zz_ptr[a]
        ra = t.za_ptr[a]
        inv = 1.0 / WB[z + l]
        ancestors(t, a, l, anc)
        for i in range(nc):
            acc = WR[ra + i]
            for k in range(l):
                acc -= WB[z + k] * WW[t.za_ptr[anc[k]] + i]
            WW[ra + i] = acc * inv
        for k in range(l):
            acc = 0.0
            for m in range(l):
                if m >= k:
                    acc -= WB[z + m] * SB[t.zz_ptr[anc[m]] + k]
                else:
                    acc -= WB[z + m] * SB[t.zz_ptr[anc[k]] + m]
            SB[z + k] = acc * inv
        acc = inv
        for m in range(l):
            acc -= WB[z + m] * SB[z + m]
        SB[z + l] = acc * inv


cdef void accumulate_scalar(const Tree* t, Py_ssize_t a0, Py_ssize_t a1, const double* SB,
                            const double* WW, double* KK, const double* Phi, double* GN,
                            double* EN) noexcept nogil:
    """GN_a and EN_a of :func:`accumulate_cluster` for a scalar tree."""
    cdef Py_ssize_t a, l, k, z, ra, rc, c, i, j
    cdef int nc = t.ncol
    cdef Py_ssize_t anc[MAXLEV]
    cdef double ta, f, g, sak, acc
    for a in range(a0, a1):
        ra = t.za_ptr[a]
        for i in range(nc):
            KK[ra + i] = t.ZA[ra + i]
        GN[t.tn_ptr[a]] = 0.0
        EN[t.tn_ptr[a]] = 0.0
    for a in range(a0, a1):
        l = t.level[a]
        z = t.zz_ptr[a]
        ra = t.za_ptr[a]
        ta = t.T[t.tn_ptr[a]]
        ancestors(t, a, l, anc)
        for k in range(l + 1):
            c = anc[k]
            rc = t.za_ptr[c]
            sak = SB[z + k]
            # K_a -= ZZ_ak t_c W_c ;  G_a += ZZ_ak t_c Sig_{c a}
            f = t.ZZ[z + k] * t.T[t.tn_ptr[c]]
            for i in range(nc):
                KK[ra + i] -= f * WW[rc + i]
            GN[t.tn_ptr[a]] += f * sak
            if k < l:
                # K_c -= ZZ_ak t_a W_a ;  G_c += ZZ_ak t_a Sig_{a c}
                g = t.ZZ[z + k] * ta
                for i in range(nc):
                    KK[rc + i] -= g * WW[ra + i]
                GN[t.tn_ptr[c]] += g * sak
        # K_a is complete (descendants come first): s3 = Phi W_a' ; G_a -= K_a s3 ;
        # E_a += Sig_aa + W_a s3
        f = 0.0
        g = 0.0
        if t.PW != NULL:            # (Phi W_a')_j given
            for j in range(nc):
                f += KK[ra + j] * t.PW[ra + j]
                g += WW[ra + j] * t.PW[ra + j]
        else:
            for j in range(nc):         # (one pass: no stores reloaded as wide vectors)
                acc = 0.0
                for i in range(nc):
                    acc += Phi[j + i * nc] * WW[ra + i]
                f += KK[ra + j] * acc
                g += WW[ra + j] * acc
        GN[t.tn_ptr[a]] -= f
        EN[t.tn_ptr[a]] += g + SB[t.zz_ptr[a] + l]


cdef Py_ssize_t factor_cluster(const Tree* t, Py_ssize_t a0, Py_ssize_t a1,
                               double* WB, double* WR, double* S, double* logdet,
                               double* scratch) noexcept nogil:
    cdef Py_ssize_t a, l, k, m, i, c
    cdef int qa, qk, qm, info
    cdef int nc = t.ncol
    cdef Py_ssize_t anc[MAXLEV]
    cdef Py_ssize_t off[MAXLEV + 1]
    cdef Py_ssize_t offc[MAXLEV + 1]
    cdef Py_ssize_t anc_c[MAXLEV]
    cdef const double* Ta
    cdef double* Laa
    cdef double* Ua_k
    cdef double* Ya
    if t.scalar:
        return factor_scalar(t, a0, a1, WB, WR, S, logdet)
    # C blocks: T_a' ZZ_{a,k} T_{c_k} (+ I on the diagonal); R_a = T_a' ZA_a
    for a in range(a0, a1):
        l = t.level[a]
        qa = <int>t.nq[a]
        chain(t, a, anc, off)
        Ta = t.T + t.tn_ptr[a]
        for k in range(l + 1):
            qk = <int>t.nq[anc[k]]
            gemm(b'T', b'N', qa, qk, qa, 1.0, Ta, qa, t.ZZ + t.zz_ptr[a] + off[k], qa,
                 0.0, scratch, qa)
            gemm(b'N', b'N', qa, qk, qk, 1.0, scratch, qa, t.T + t.tn_ptr[anc[k]], qk,
                 0.0, WB + t.zz_ptr[a] + off[k], qa)
        Laa = WB + t.zz_ptr[a] + off[l]
        for i in range(qa):
            Laa[i + i * qa] += 1.0
        gemm(b'T', b'N', qa, nc, qa, 1.0, Ta, qa, t.ZA + t.za_ptr[a], qa, 0.0, WR + t.za_ptr[a], qa)
    # eliminate deepest first; Schur-complement into the ancestors
    for a in range(a0, a1):
        l = t.level[a]
        qa = <int>t.nq[a]
        chain(t, a, anc, off)
        Laa = WB + t.zz_ptr[a] + off[l]
        info = potrf_lower(qa, Laa, qa)
        if info != 0:
            return a + 1
        for i in range(qa):
            logdet[0] += 2.0 * log(Laa[i + i * qa])
        Ya = WR + t.za_ptr[a]
        for k in range(l):
            trsm_left_lower(b'N', qa, <int>t.nq[anc[k]], Laa, qa, WB + t.zz_ptr[a] + off[k], qa)
        trsm_left_lower(b'N', qa, nc, Laa, qa, Ya, qa)
        for k in range(l):
            c = anc[k]
            qk = <int>t.nq[c]
            chain(t, c, anc_c, offc)
            Ua_k = WB + t.zz_ptr[a] + off[k]
            for m in range(k + 1):
                qm = <int>t.nq[anc[m]]
                gemm(b'T', b'N', qk, qm, qa, -1.0, Ua_k, qa, WB + t.zz_ptr[a] + off[m], qa,
                     1.0, WB + t.zz_ptr[c] + offc[m], qk)
            gemm(b'T', b'N', qk, nc, qa, -1.0, Ua_k, qa, Ya, qa, 1.0, WR + t.za_ptr[c], qk)
        if not t.no_S:
            gemm(b'T', b'N', nc, nc, qa, -1.0, Ya, qa, Ya, qa, 1.0, S, nc)
    return 0


cdef void invert_cluster(const Tree* t, Py_ssize_t a0, Py_ssize_t a1, const double* WB,
                         const double* WR, double* SB, double* WW) noexcept nogil:
    cdef Py_ssize_t a, l, k, m, i
    cdef int qa, qk, qm
    cdef int nc = t.ncol
    cdef Py_ssize_t anc[MAXLEV]
    cdef Py_ssize_t off[MAXLEV + 1]
    cdef Py_ssize_t offm[MAXLEV + 1]
    cdef Py_ssize_t anc_m[MAXLEV]
    cdef const double* Laa
    cdef double* Wa
    cdef double* blk
    cdef double* D
    if t.scalar:
        invert_scalar(t, a0, a1, WB, WR, SB, WW)
        return
    for a in range(a1 - 1, a0 - 1, -1):
        l = t.level[a]
        qa = <int>t.nq[a]
        chain(t, a, anc, off)
        Laa = WB + t.zz_ptr[a] + off[l]
        # W_a = L_aa^-T (Y_a - sum_k U_ak W_{c_k})
        Wa = WW + t.za_ptr[a]
        copy(WR + t.za_ptr[a], Wa, qa * nc)
        for k in range(l):
            qk = <int>t.nq[anc[k]]
            gemm(b'N', b'N', qa, nc, qk, -1.0, WB + t.zz_ptr[a] + off[k], qa,
                 WW + t.za_ptr[anc[k]], qk, 1.0, Wa, qa)
        trsm_left_lower(b'T', qa, nc, Laa, qa, Wa, qa)
        # Sig_{a, c_k} = -L_aa^-T sum_m U_am Sig_{c_m c_k}
        for k in range(l):
            qk = <int>t.nq[anc[k]]
            blk = SB + t.zz_ptr[a] + off[k]
            zero(blk, qa * qk)
            for m in range(l):
                qm = <int>t.nq[anc[m]]
                if m >= k:
                    chain(t, anc[m], anc_m, offm)
                    gemm(b'N', b'N', qa, qk, qm, -1.0, WB + t.zz_ptr[a] + off[m], qa,
                         SB + t.zz_ptr[anc[m]] + offm[k], qm, 1.0, blk, qa)
                else:
                    chain(t, anc[k], anc_m, offm)
                    gemm(b'N', b'T', qa, qk, qm, -1.0, WB + t.zz_ptr[a] + off[m], qa,
                         SB + t.zz_ptr[anc[k]] + offm[m], qk, 1.0, blk, qa)
            trsm_left_lower(b'T', qa, qk, Laa, qa, blk, qa)
        # Sig_aa = L_aa^-T (L_aa^-1 - sum_m U_am Sig_{a c_m}')
        D = SB + t.zz_ptr[a] + off[l]
        zero(D, qa * qa)
        for i in range(qa):
            D[i + i * qa] = 1.0
        trsm_left_lower(b'N', qa, qa, Laa, qa, D, qa)
        for m in range(l):
            qm = <int>t.nq[anc[m]]
            gemm(b'N', b'T', qa, qa, qm, -1.0, WB + t.zz_ptr[a] + off[m], qa,
                 SB + t.zz_ptr[a] + off[m], qa, 1.0, D, qa)
        trsm_left_lower(b'T', qa, qa, Laa, qa, D, qa)


cdef void accumulate_cluster(const Tree* t, Py_ssize_t a0, Py_ssize_t a1, const double* SB,
                             const double* WW, double* KK, const double* Phi, double* GN,
                             double* EN, double* scratch, Py_ssize_t maxq) noexcept nogil:
    """Per-node gradient pieces GN_a (df/dT_a / 2) and EM moments EN_a."""
    cdef Py_ssize_t a, l, k, i, c
    cdef int qa, qk
    cdef int nc = t.ncol
    cdef Py_ssize_t anc[MAXLEV]
    cdef Py_ssize_t off[MAXLEV + 1]
    cdef const double* ZZak
    cdef const double* Ta
    cdef const double* Tk
    cdef const double* SBak
    cdef double* s1 = scratch
    cdef double* s2 = scratch + maxq * nc
    cdef double* s3 = s2 + maxq * maxq
    cdef double* Ea
    cdef const double* Saa
    if t.scalar:
        accumulate_scalar(t, a0, a1, SB, WW, KK, Phi, GN, EN)
        return
    for a in range(a0, a1):
        copy(t.ZA + t.za_ptr[a], KK + t.za_ptr[a], t.nq[a] * nc)
        zero(GN + t.tn_ptr[a], t.nq[a] * t.nq[a])
        zero(EN + t.tn_ptr[a], t.nq[a] * t.nq[a])
    for a in range(a0, a1):
        l = t.level[a]
        qa = <int>t.nq[a]
        Ta = t.T + t.tn_ptr[a]
        chain(t, a, anc, off)
        for k in range(l + 1):
            c = anc[k]
            qk = <int>t.nq[c]
            Tk = t.T + t.tn_ptr[c]
            ZZak = t.ZZ + t.zz_ptr[a] + off[k]
            SBak = SB + t.zz_ptr[a] + off[k]
            # K_a -= ZZ_ak T_k W_c
            gemm(b'N', b'N', qk, nc, qk, 1.0, Tk, qk, WW + t.za_ptr[c], qk, 0.0, s1, qk)
            gemm(b'N', b'N', qa, nc, qk, -1.0, ZZak, qa, s1, qk, 1.0, KK + t.za_ptr[a], qa)
            # G_a += ZZ_ak T_k Sig_{c a}
            gemm(b'N', b'N', qa, qk, qk, 1.0, ZZak, qa, Tk, qk, 0.0, s2, qa)
            gemm(b'N', b'T', qa, qa, qk, 1.0, s2, qa, SBak, qa, 1.0, GN + t.tn_ptr[a], qa)
            if k < l:
                # K_c -= ZZ_ak' T_a W_a ;  G_c += ZZ_ak' T_a Sig_{a c}
                gemm(b'N', b'N', qa, nc, qa, 1.0, Ta, qa, WW + t.za_ptr[a], qa, 0.0, s1, qa)
                gemm(b'T', b'N', qk, nc, qa, -1.0, ZZak, qa, s1, qa, 1.0, KK + t.za_ptr[c], qk)
                gemm(b'T', b'N', qk, qa, qa, 1.0, ZZak, qa, Ta, qa, 0.0, s2, qk)
                gemm(b'N', b'N', qk, qk, qa, 1.0, s2, qk, SBak, qa, 1.0, GN + t.tn_ptr[c], qk)
    for a in range(a0, a1):
        l = t.level[a]
        qa = <int>t.nq[a]
        chain(t, a, anc, off)
        # s3 = Phi W_a' (given transposed in PW) ; G_a -= K_a s3 ; E_a += Sig_aa + W_a s3
        if t.PW != NULL:
            for i in range(qa):
                for k in range(nc):
                    s3[k + i * nc] = t.PW[t.za_ptr[a] + i + k * qa]
        else:
            gemm(b'N', b'T', nc, qa, nc, 1.0, Phi, nc, WW + t.za_ptr[a], qa, 0.0, s3, nc)
        gemm(b'N', b'N', qa, qa, nc, -1.0, KK + t.za_ptr[a], qa, s3, nc, 1.0, GN + t.tn_ptr[a], qa)
        gemm(b'N', b'N', qa, qa, nc, 1.0, WW + t.za_ptr[a], qa, s3, nc, 1.0, EN + t.tn_ptr[a], qa)
        Ea = EN + t.tn_ptr[a]
        Saa = SB + t.zz_ptr[a] + off[l]
        for i in range(qa * qa):
            Ea[i] += Saa[i]


cdef void assemble_factors(const SubBlocks* sb, const double* T, double* Tn) noexcept nogil:
    """Tn_a = block-diag of the level factors T_l of the groups node a holds (the
    off-diagonal parts of a dense node's factor stay 0)."""
    cdef Py_ssize_t s, a, l, o, i, j, na, ql
    for s in range(sb.n_sub):
        a = sb.sub_node[s]
        l = sb.sub_level[s]
        ql = sb.q[l]
        if ql == 1 and sb.nq[a] == 1:       # a node of one effect: one number
            Tn[sb.tn_ptr[a]] = T[sb.t_off[l]]
            continue
        o = sb.sub_off[s]
        na = sb.nq[a]
        for j in range(ql):
            for i in range(ql):
                Tn[sb.tn_ptr[a] + (o + i) + (o + j) * na] = T[sb.t_off[l] + i + j * ql]


cdef void reduce_factors(const SubBlocks* sb, const double* N, double* out) noexcept nogil:
    """out_l += the diagonal sub-blocks of the per-node buffer N held by level l."""
    cdef Py_ssize_t s, a, l, o, i, j, na, ql
    for s in range(sb.n_sub):
        a = sb.sub_node[s]
        l = sb.sub_level[s]
        ql = sb.q[l]
        if ql == 1 and sb.nq[a] == 1:
            out[sb.t_off[l]] += N[sb.tn_ptr[a]]
            continue
        o = sb.sub_off[s]
        na = sb.nq[a]
        for j in range(ql):
            for i in range(ql):
                out[sb.t_off[l] + i + j * ql] += N[sb.tn_ptr[a] + (o + i) + (o + j) * na]


cdef class NestedKernel:
    """The theta-independent pieces of a nested model and its workspaces.

    Python owns every array. The kernels run on these pieces inside the fitting
    engine (:mod:`mlmeta._core._engine`), which holds the workspaces.
    ``sub_node``, ``sub_level``, ``sub_off`` list where each group's level factor
    sits inside its node's factor (one entry per node for ordinary nodes; one per
    group for dense cluster nodes).
    """
    # attributes and C methods are declared in _nested.pxd (the batch optimiser uses them)

    def __init__(self, q, level, parent, zz_ptr, za_ptr, cluster_ptr, ZZ, ZA, AA,
                 nq=None, sub_node=None, sub_level=None, sub_off=None):
        self.q = np.ascontiguousarray(q, dtype=np.intp)
        self.n_levels = self.q.shape[0]
        if self.n_levels < 1 or self.n_levels > MAXLEV:
            raise ValueError(f"between 1 and {MAXLEV} levels are supported")
        L = self.n_levels
        t_off = np.zeros(L + 1, dtype=np.intp)
        t_off[1:] = np.cumsum(self.q * self.q)
        self.t_off = t_off
        self.level = np.ascontiguousarray(level, dtype=np.intp)
        self.parent = np.ascontiguousarray(parent, dtype=np.intp)
        self.n_nodes = self.level.shape[0]
        if nq is None:
            nq = self.q[self.level]
            sub_node = np.arange(self.n_nodes, dtype=np.intp)
            sub_level = self.level
            sub_off = np.zeros(self.n_nodes, dtype=np.intp)
        self.nq = np.ascontiguousarray(nq, dtype=np.intp)
        self.sub_node = np.ascontiguousarray(sub_node, dtype=np.intp)
        self.sub_level = np.ascontiguousarray(sub_level, dtype=np.intp)
        self.sub_off = np.ascontiguousarray(sub_off, dtype=np.intp)
        tn_ptr = np.zeros(self.n_nodes + 1, dtype=np.intp)
        tn_ptr[1:] = np.cumsum(self.nq * self.nq)
        self.tn_ptr = tn_ptr
        self.zz_ptr = np.ascontiguousarray(zz_ptr, dtype=np.intp)
        self.za_ptr = np.ascontiguousarray(za_ptr, dtype=np.intp)
        self.cluster_ptr = np.ascontiguousarray(cluster_ptr, dtype=np.intp)
        self.ZZ = np.ascontiguousarray(ZZ, dtype=np.float64)
        self.ZA = np.ascontiguousarray(ZA, dtype=np.float64)
        self.AA = np.asfortranarray(AA, dtype=np.float64)
        self.n_clusters = self.cluster_ptr.shape[0] - 1
        self.ncol = self.AA.shape[0]
        self.maxq = int(self.nq.max()) if self.n_nodes else 1
        if self.zz_ptr.shape[0] != self.n_nodes + 1 or self.za_ptr.shape[0] != self.n_nodes + 1:
            raise ValueError("zz_ptr and za_ptr need one entry per node plus one")
        if self.ZZ.shape[0] != self.zz_ptr[-1] or self.ZA.shape[0] != self.za_ptr[-1]:
            raise ValueError("ZZ/ZA sizes do not match their pointers")
        self.force_general = False
        self._q = self.q; self._nq = self.nq; self._level = self.level
        self._parent = self.parent; self._zz_ptr = self.zz_ptr; self._za_ptr = self.za_ptr
        self._tn_ptr = self.tn_ptr; self._t_off = self.t_off; self._cluster_ptr = self.cluster_ptr
        self._sub_node = self.sub_node; self._sub_level = self.sub_level; self._sub_off = self.sub_off
        self._ZZ = self.ZZ; self._ZA = self.ZA

    cdef Tree _tree(self):
        cdef Tree t
        t.n_levels = self.n_levels
        t.ncol = <int>self.ncol
        t.nq = &self._nq[0]
        t.level = &self._level[0]
        t.parent = &self._parent[0]
        t.zz_ptr = &self._zz_ptr[0]
        t.za_ptr = &self._za_ptr[0]
        t.tn_ptr = &self._tn_ptr[0]
        t.ZZ = &self._ZZ[0] if self._ZZ.shape[0] > 0 else NULL
        t.ZA = &self._ZA[0] if self._ZA.shape[0] > 0 else NULL
        t.T = NULL     # the node factors live in the engine's workspaces
        t.scalar = self.maxq == 1 and self.force_general == 0
        t.no_S = 0
        t.PW = NULL
        return t

    def pack_T(self, Ts):
        """Flatten the per-level factors T_l (q_l x q_l) column-major."""
        out = np.empty(self.t_off[-1], dtype=np.float64)
        for l, Tl in enumerate(Ts):
            out[self.t_off[l]:self.t_off[l + 1]] = np.asarray(Tl, dtype=np.float64).ravel(order="F")
        return out

    cdef SubBlocks _subblocks(self) noexcept nogil:
        cdef SubBlocks sb
        sb.n_sub = self._sub_node.shape[0]
        sb.sub_node = &self._sub_node[0]
        sb.sub_level = &self._sub_level[0]
        sb.sub_off = &self._sub_off[0]
        sb.nq = &self._nq[0]
        sb.tn_ptr = &self._tn_ptr[0]
        sb.q = &self._q[0]
        sb.t_off = &self._t_off[0]
        return sb

    def diag_offset(self, nodes):
        """Offset of each node's own (a, a) block inside its ZZ/SB blocks."""
        nodes = np.asarray(nodes, dtype=np.intp)
        tot = np.zeros(nodes.shape[0], dtype=np.intp)
        cur = nodes.copy()
        lev = self.level[nodes].copy()
        while (lev > 0).any():
            m = lev > 0
            cur[m] = self.parent[cur[m]]
            tot[m] += self.nq[nodes[m]] * self.nq[cur[m]]
            lev[m] -= 1
        return tot
