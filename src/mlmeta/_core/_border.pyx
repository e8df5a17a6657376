# cython: language_level=3
"""Crossed random effects: the nested tree plus a dense border.

The random effects split into those of the nested tree (the largest chain of nested
grouping terms, factored cluster by cluster as in :mod:`mlmeta._core._nested`) and
the ``nb`` effects of the crossed terms (the border, relative factor ``T_c``, block
diagonal over the crossed groups, except for a level with a known correlation matrix R
across its groups, metafor's ``R=``, whose block is ``t chol(R)``, or a spatial one,
``t F(rho)`` with ``F F' = R(rho)``, see :func:`spatial_pieces`).
With ``M = [Z~_c, A]`` (the crossed terms' whitened columns, X and y) and the tree's
marginal covariance ``V_t = I + Z~_t T_t T_t' Z~_t'``:

    Sb   = M' V_t^-1 M = M'M - sum_j Y_j' Y_j          (the tree kernel, one pass:
                                                        cluster j's columns of M as its
                                                        right-hand sides, m_j + ncol wide)
    C_c  = I + T_c' S_cc T_c = L L',   R = T_c' S_cA
    log|C| = log|C_t| + log|C_c|,      A'V^-1A = S_AA - R' C_c^-1 R

(Woodbury applied twice: ``V = V_t + Z~_c T_c T_c' Z~_c'``). The gradient and EM
moments of the crossed levels come from the border exactly as a dense node's in the
tree kernel, with ``W = C_c^-1 R``, ``Sig = C_c^-1`` and ``K = S_cA - S_cc T_c W``:

    df/dT_l / 2 = sum_g [ (S_cc T_c Sig)_gg - K_g Phi W_g' ],   E_l = sum_g [ Sig_gg + W_g Phi W_g' ]

The tree's levels see the objective through ``Sb`` only; its derivative

    Phi_b = d dev / d Sb = [[ T_c (Sig + W Phi W') T_c',  -T_c W Phi ],
                            [ -Phi W' T_c',                Phi        ]]

is handed to the tree kernel as each cluster's Phi (its local rows and columns), which
then yields the tree levels' gradient and their full (not tree-conditional) EM
moments. Cost per evaluation: the tree's O(sum_j m_j^2) plus O(nb^3) for the border.

Scalar border (:func:`scalar_border`: at least 256 rows, every crossed level one effect
per group, no correlation across groups, clusters not wide): T_c = diag(t) with t constant within a
level, so the products with T_c are scalings, and Sb, C_c and Sig are kept in their
lower triangles only (the clusters' blocks scattered into, and gathered from, the lower
triangle). The crossed levels' first gradient term is then, with F(l, m) the sum of
S_cc o Sig over the rows of level l and the columns of level m,

    sum_g (S_cc T_c Sig)_gg over level l = sum_m t_m F(l, m),

F taken from its lower-triangle sums; Phi_b's blocks are t_i t_k Sig_ik,
-t_i (W Phi)_ic and Phi, gathered into each cluster's local Phi directly.
"""

from libc.math cimport log

from mlmeta._core._linalg cimport (gemm, trsm_left_lower, potrf_lower, potri_lower,
                                   potri_lower_tri, symm_left_lower, zero, copy)
from mlmeta._core._nested cimport Tree, factor_cluster, invert_cluster, accumulate_cluster
from mlmeta._core._problem cimport Prob, Work, ST_BORDER


cdef void t_left(const Prob* P, const double* Tlev, const double* bL, bint trans, double alpha,
                 const double* X, Py_ssize_t ldx, double* out, Py_ssize_t ldo,
                 Py_ssize_t ncols) noexcept nogil:
    """out = alpha op(T_c) X over the border rows (X and out nb x ncols; op(T) = T' when
    ``trans``), T_c block diagonal over the crossed groups (column by column, so every
    access is contiguous), or t F over a level with a known or spatial correlation (one
    product; F at bL + b_lo[l])."""
    cdef Py_ssize_t c, l, g, o, i, k, G
    cdef int q
    cdef const double* Tl
    cdef const double* x
    cdef double* y
    cdef double acc
    for l in range(P.n_tree, P.n_levels):
        if P.b_lo[l] >= 0:
            G = <Py_ssize_t>P.n_groups[l]
            o = P.b_off[l]
            gemm(b'T' if trans else b'N', b'N', <int>G, <int>ncols, <int>G, alpha * Tlev[P.t_off[l]],
                 bL + P.b_lo[l], <int>G, X + o, <int>ldx, 0.0, out + o, <int>ldo)
    for c in range(ncols):
        x = X + c * ldx
        y = out + c * ldo
        for l in range(P.n_tree, P.n_levels):
            if P.b_lo[l] >= 0:
                continue
            q = <int>P.q[l]
            Tl = Tlev + P.t_off[l]
            for g in range(<Py_ssize_t>P.n_groups[l]):
                o = P.b_off[l] + g * q
                for i in range(q):
                    acc = 0.0
                    if trans:
                        for k in range(q):
                            acc = acc + Tl[k + i * q] * x[o + k]
                    else:
                        for k in range(q):
                            acc = acc + Tl[i + k * q] * x[o + k]
                    y[o + i] = alpha * acc


cdef void t_right(const Prob* P, const double* Tlev, const double* bL, bint trans, const double* X,
                  Py_ssize_t ldx, double* out, Py_ssize_t ldo, Py_ssize_t nrows) noexcept nogil:
    """out = X op(T_c) over the border columns (X and out nrows x nb)."""
    cdef Py_ssize_t l, g, o, j, k, r, G
    cdef int q
    cdef const double* Tl
    cdef const double* x
    cdef double* y
    cdef double t
    for l in range(P.n_tree, P.n_levels):
        q = <int>P.q[l]
        Tl = Tlev + P.t_off[l]
        if P.b_lo[l] >= 0:
            G = <Py_ssize_t>P.n_groups[l]
            o = P.b_off[l]
            gemm(b'N', b'T' if trans else b'N', <int>nrows, <int>G, <int>G, Tl[0], X + o * ldx,
                 <int>ldx, bL + P.b_lo[l], <int>G, 0.0, out + o * ldo, <int>ldo)
            continue
        for g in range(<Py_ssize_t>P.n_groups[l]):
            o = P.b_off[l] + g * q
            for j in range(q):
                y = out + (o + j) * ldo
                for r in range(nrows):
                    y[r] = 0.0
                for k in range(q):
                    t = Tl[j + k * q] if trans else Tl[k + j * q]
                    x = X + (o + k) * ldx
                    for r in range(nrows):
                        y[r] = y[r] + x[r] * t


#: the scalar path's smallest border
cdef enum:
    SCALAR_MIN_NB = 256


cdef bint scalar_border(const Prob* P) noexcept nogil:
    """Whether the border takes the scalar path (module docstring): at least
    SCALAR_MIN_NB border rows (below that the border's passes cost little), every crossed
    level has one effect per group and no correlation across its groups, and the tree's
    clusters are not wide."""
    cdef Py_ssize_t l
    if P.wide or P.nb < SCALAR_MIN_NB:
        return False
    for l in range(P.n_tree, P.n_levels):
        if P.q[l] != 1 or P.b_lo[l] >= 0:
            return False
    return True


cdef void border_t(const Prob* P, const double* Tlev, double* tv) noexcept nogil:
    """tv[i] = t of border row i (scalar border)."""
    cdef Py_ssize_t l, g
    cdef double t
    for l in range(P.n_tree, P.n_levels):
        t = Tlev[P.t_off[l]]
        for g in range(<Py_ssize_t>P.n_groups[l]):
            tv[P.b_off[l] + g] = t


cdef void scalar_gradient_terms(const Prob* P, Work* W, const double* tv) noexcept nogil:
    """G_l += sum_m t_m F(l, m) (module docstring) from the lower triangles of S_cc (in
    Sb) and Sig (in Sg): per pair of levels (l >= m) the sum L over the lower triangle of
    their block, F(l, m) = L for l > m and F(l, l) = 2 L - (its diagonal)."""
    cdef Py_ssize_t nb = P.nb
    cdef Py_ssize_t bw = nb + P.ncol
    cdef Py_ssize_t li, lm, h, i, i0, i1
    cdef double acc, dg
    cdef const double* sc
    cdef const double* gc
    for lm in range(P.n_tree, P.n_levels):
        for li in range(lm, P.n_levels):
            acc = 0.0
            dg = 0.0
            i1 = P.b_off[li] + <Py_ssize_t>P.n_groups[li]
            for h in range(P.b_off[lm], P.b_off[lm] + <Py_ssize_t>P.n_groups[lm]):
                sc = W.Sb + h * bw
                gc = W.Sg + h * nb
                i0 = P.b_off[li] if P.b_off[li] > h else h
                if li == lm:
                    dg = dg + sc[h] * gc[h]
                for i in range(i0, i1):
                    acc = acc + sc[i] * gc[i]
            if li == lm:
                W.G[P.t_off[li]] += tv[P.b_off[li]] * (2.0 * acc - dg)
            else:
                W.G[P.t_off[li]] += tv[P.b_off[lm]] * acc
                W.G[P.t_off[lm]] += tv[P.b_off[li]] * acc


cdef void to_rows(const Prob* P, const Tree* t, Py_ssize_t j, const double* B, double* Y) noexcept nogil:
    """Copy cluster j's node blocks of B (nq_a x w_j, za_ptr layout) into the rows y_row[a]..
    of Y (ny x bw), each local column at its border column."""
    cdef Py_ssize_t a, i, c, qa, w = P.cw[j], ny = P.ny
    cdef const Py_ssize_t* mp = P.bmap + P.cmap_ptr[j]
    for a in range(P.cluster_ptr[j], P.cluster_ptr[j + 1]):
        qa = t.nq[a]
        for c in range(w):
            for i in range(qa):
                Y[P.y_row[a] + i + mp[c] * ny] = B[t.za_ptr[a] + i + c * qa]


cdef void from_rows(const Prob* P, const Tree* t, Py_ssize_t j, const double* Y, double* B) noexcept nogil:
    """The inverse of :func:`to_rows`: cluster j's local columns of Y's rows into B."""
    cdef Py_ssize_t a, i, c, qa, w = P.cw[j], ny = P.ny
    cdef const Py_ssize_t* mp = P.bmap + P.cmap_ptr[j]
    for a in range(P.cluster_ptr[j], P.cluster_ptr[j + 1]):
        qa = t.nq[a]
        for c in range(w):
            for i in range(qa):
                B[t.za_ptr[a] + i + c * qa] = Y[P.y_row[a] + i + mp[c] * ny]


cdef void known_R_pieces(const Prob* P, Work* W, Py_ssize_t l, const double* Phi,
                         double* s) noexcept nogil:
    """G_l and E_l of a level with a known correlation R (T_l = t L_R, q = 1; or a spatial
    level, L_R = F(rho)):

        G_l = sum_ij L_ij [(S_cc T_c Sig)_ij - (K Phi W')_ij]  (the block's rows and columns)
        E_l = tr(Sig_bb + W_b Phi W_b')

    with the first sum taken as sum_h sum_i Pb[o+i, h] (Sig[:, block] L')[h, i] and the
    second as sum_i (K_b Phi)_i . (L W_b)_i; ``s`` has room for nb x G + 2 G x ncol."""
    cdef Py_ssize_t nb = P.nb, G = <Py_ssize_t>P.n_groups[l], o = P.b_off[l], h, i, c
    cdef int nc = P.ncol
    cdef const double* LR = W.bL + P.b_lo[l]
    cdef double* M = s
    cdef double* KP = s + nb * G
    cdef double* LW = KP + G * nc
    cdef double acc = 0.0
    cdef double tr = 0.0
    gemm(b'N', b'T', <int>nb, <int>G, <int>G, 1.0, W.Sg + o * nb, <int>nb, LR, <int>G, 0.0, M, <int>nb)
    for i in range(G):
        for h in range(nb):
            acc = acc + W.Pb[o + i + h * nb] * M[h + i * nb]
    gemm(b'N', b'N', <int>G, nc, nc, 1.0, W.Kb + o, <int>nb, Phi, nc, 0.0, KP, <int>G)
    gemm(b'N', b'N', <int>G, nc, <int>G, 1.0, LR, <int>G, W.Wb + o, <int>nb, 0.0, LW, <int>G)
    for c in range(nc):
        for i in range(G):
            acc = acc - KP[i + c * G] * LW[i + c * G]
    gemm(b'N', b'N', <int>G, nc, nc, 1.0, W.Wb + o, <int>nb, Phi, nc, 0.0, KP, <int>G)
    for c in range(nc):
        for i in range(G):
            tr = tr + KP[i + c * G] * W.Wb[o + i + c * nb]
    for i in range(G):
        tr = tr + W.Sg[o + i + (o + i) * nb]
    W.G[P.t_off[l]] += acc
    W.E[P.t_off[l]] += tr


cdef void spatial_pieces(const Prob* P, Work* W, Py_ssize_t l, const double* Phi) noexcept nogil:
    """d dev / d rho of a spatial level (Sigma_l = t^2 R(rho) over its G groups, border
    rows o..o+G): with the derivative of the deviance with respect to the border's Sigma_c,

        G_Sig = S_cc - S_cc T_c Sig T_c' S_cc - K Phi K'        (G_Sig T_c = the G of above)

    d dev / d rho = t^2 sum_ij (G_Sig)_ij (dR/drho)_ij over the level's block, added into
    W.Gx. Scratch W.sp: G x nb + G x G + G x ncol."""
    cdef Py_ssize_t nb = P.nb, G = <Py_ssize_t>P.n_groups[l], o = P.b_off[l], i, j
    cdef Py_ssize_t bw = nb + P.ncol
    cdef int nc = P.ncol
    cdef double* M1 = W.sp
    cdef double* Gs = M1 + G * nb
    cdef double* KP = Gs + G * G
    cdef const double* dR = W.dR + P.b_lo[l]
    cdef double t = W.Tlev[P.t_off[l]]
    cdef double acc = 0.0
    for j in range(G):
        for i in range(G):
            Gs[i + j * G] = W.Sb[o + i + (o + j) * bw]
    gemm(b'N', b'N', <int>G, <int>nb, <int>nb, 1.0, W.Pb + o, <int>nb, W.Sg, <int>nb, 0.0, M1, <int>G)
    gemm(b'N', b'T', <int>G, <int>G, <int>nb, -1.0, M1, <int>G, W.Pb + o, <int>nb, 1.0, Gs, <int>G)
    gemm(b'N', b'N', <int>G, nc, nc, 1.0, W.Kb + o, <int>nb, Phi, nc, 0.0, KP, <int>G)
    gemm(b'N', b'T', <int>G, <int>G, nc, -1.0, KP, <int>G, W.Kb + o, <int>nb, 1.0, Gs, <int>G)
    for i in range(G * G):
        acc = acc + Gs[i] * dR[i]
    W.Gx[P.th_off[l] + 1] += t * t * acc


cdef Py_ssize_t factor_crossed(const Prob* P, Work* W, Tree* t, double* logdet) noexcept nogil:
    """Factor the tree (t: node factors assembled) cluster by cluster into W.Sb, then the
    border: W.Cb = chol(C_c), W.Wb = L^-1 R, W.S = A'V^-1A; logdet += log|C|. Returns 0,
    1 + a failed tree node, or ST_BORDER."""
    cdef Py_ssize_t nb = P.nb
    cdef int nc = P.ncol
    cdef Py_ssize_t bw = nb + nc
    cdef Py_ssize_t j, w, i, k, st, ck
    cdef const Py_ssize_t* mp
    cdef int info
    cdef bint fast = scalar_border(P)
    cdef double* tv = W.Pb          # the scalar path's t per border row (Pb is unused there)
    cdef double tk
    if fast:
        for k in range(bw):
            copy(P.S0 + k + k * bw, W.Sb + k + k * bw, bw - k)
    else:
        copy(P.S0, W.Sb, bw * bw)
    if P.wide:
        zero(W.Ym, P.ny * bw)
        t.no_S = 1
    for j in range(P.n_clusters):
        w = P.cw[j]
        t.ncol = <int>w
        mp = P.bmap + P.cmap_ptr[j]
        if P.wide:
            st = factor_cluster(t, P.cluster_ptr[j], P.cluster_ptr[j + 1], W.WB, W.WR, W.Sl, logdet,
                                W.scratch)
            if st != 0:
                return st
            to_rows(P, t, j, W.WR, W.Ym)
            continue
        zero(W.Sl, w * w)
        st = factor_cluster(t, P.cluster_ptr[j], P.cluster_ptr[j + 1], W.WB, W.WR, W.Sl, logdet,
                            W.scratch)
        if st != 0:
            return st
        if fast:        # the lower triangle (a cluster's border columns are sorted)
            for k in range(w):
                ck = mp[k] * bw
                for i in range(k, w):
                    W.Sb[mp[i] + ck] += W.Sl[i + k * w]
            continue
        for k in range(w):
            for i in range(w):
                W.Sb[mp[i] + mp[k] * bw] += W.Sl[i + k * w]
    if P.wide:      # Sb = S0 - Y'Y in one product
        t.no_S = 0
        gemm(b'T', b'N', <int>bw, <int>bw, <int>P.ny, -1.0, W.Ym, <int>P.ny, W.Ym, <int>P.ny, 1.0,
             W.Sb, <int>bw)
    if fast:        # C_c = I + t t' o S_cc (lower), R = t o S_cA (S_cA read from S_Ac)
        border_t(P, W.Tlev, tv)
        for k in range(nb):
            tk = tv[k]
            for i in range(k, nb):
                W.Cb[i + k * nb] = tv[i] * tk * W.Sb[i + k * bw]
        for k in range(nc):
            for i in range(nb):
                W.Wb[i + k * nb] = tv[i] * W.Sb[nb + k + i * bw]
    else:
        # Pb = S_cc T_c, then C_c = I + T_c' Pb and R = T_c' S_cA
        t_right(P, W.Tlev, W.bL, False, W.Sb, bw, W.Pb, nb, nb)
        t_left(P, W.Tlev, W.bL, True, 1.0, W.Pb, nb, W.Cb, nb, nb)
        t_left(P, W.Tlev, W.bL, True, 1.0, W.Sb + nb * bw, bw, W.Wb, nb, nc)
    for i in range(nb):
        W.Cb[i + i * nb] += 1.0
    info = potrf_lower(<int>nb, W.Cb, <int>nb)
    if info != 0:
        return ST_BORDER
    for i in range(nb):
        logdet[0] += 2.0 * log(W.Cb[i + i * nb])
    trsm_left_lower(b'N', <int>nb, nc, W.Cb, <int>nb, W.Wb, <int>nb)
    for k in range(nc):
        for i in range(nc):      # from the lower triangle (all the scalar path keeps)
            W.S[i + k * nc] = W.Sb[nb + (i if i >= k else k) + (nb + (k if i >= k else i)) * bw]
    gemm(b'T', b'N', nc, nc, <int>nb, -1.0, W.Wb, <int>nb, W.Wb, <int>nb, 1.0, W.S, nc)
    return 0


cdef void solve_scalar(const Prob* P, Work* W, Tree* t, const double* Phi) noexcept nogil:
    """:func:`solve_crossed` on the scalar path (module docstring), W.Wb = C_c^-1 R
    already; Sig and Sb lower triangles only."""
    cdef Py_ssize_t nb = P.nb
    cdef int nc = P.ncol
    cdef Py_ssize_t bw = nb + nc
    cdef Py_ssize_t i, k, j, w, l, g, o, c, d, ck, ci
    cdef const Py_ssize_t* mp
    cdef const double* tv = W.Pb
    cdef double* TW = W.PhiB        # t o W (nb x nc); PhiB is not used on this path
    cdef double* s = W.Sl           # Phi W_o' (nc)
    cdef double acc, gk, ek, v
    for k in range(nb):
        copy(W.Cb + k + k * nb, W.Sg + k + k * nb, nb - k)
    potri_lower_tri(<int>nb, W.Sg, <int>nb)
    # K = S_cA - S_cc T_c W
    for c in range(nc):
        for i in range(nb):
            W.Kb[i + c * nb] = W.Sb[nb + c + i * bw]
            TW[i + c * nb] = tv[i] * W.Wb[i + c * nb]
    symm_left_lower(<int>nb, nc, -1.0, W.Sb, <int>bw, TW, <int>nb, 1.0, W.Kb, <int>nb)
    scalar_gradient_terms(P, W, tv)
    for l in range(P.n_tree, P.n_levels):
        gk = 0.0
        ek = 0.0
        for g in range(<Py_ssize_t>P.n_groups[l]):
            o = P.b_off[l] + g
            for c in range(nc):
                acc = 0.0
                for d in range(nc):
                    acc = acc + Phi[c + d * nc] * W.Wb[o + d * nb]
                s[c] = acc
            for c in range(nc):
                gk = gk - W.Kb[o + c * nb] * s[c]
                ek = ek + W.Wb[o + c * nb] * s[c]
            ek = ek + W.Sg[o + o * nb]
        W.G[P.t_off[l]] += gk
        W.E[P.t_off[l]] += ek
    # Kb <- W Phi; Sg <- Sig + W Phi W' (lower)
    gemm(b'N', b'N', <int>nb, nc, nc, 1.0, W.Wb, <int>nb, Phi, nc, 0.0, W.Kb, <int>nb)
    for k in range(nb):
        for c in range(nc):
            v = W.Wb[k + c * nb]
            for i in range(k, nb):
                W.Sg[i + k * nb] += W.Kb[i + c * nb] * v
    # the tree, each cluster with its rows and columns of Phi_b: t_i t_k Sg_ik, -t_i Kb_ic, Phi
    for j in range(P.n_clusters):
        w = P.cw[j]
        t.ncol = <int>w
        mp = P.bmap + P.cmap_ptr[j]
        for k in range(w):
            ck = mp[k]
            for i in range(k, w):
                ci = mp[i]
                if ci < nb:
                    v = tv[ci] * tv[ck] * W.Sg[ci + ck * nb]
                elif ck < nb:
                    v = -tv[ck] * W.Kb[ck + (ci - nb) * nb]
                else:
                    v = Phi[ci - nb + (ck - nb) * nc]
                W.Sl[i + k * w] = v
                W.Sl[k + i * w] = v
        invert_cluster(t, P.cluster_ptr[j], P.cluster_ptr[j + 1], W.WB, W.WR, W.SB, W.WW)
        accumulate_cluster(t, P.cluster_ptr[j], P.cluster_ptr[j + 1], W.SB, W.WW, W.KK, W.Sl,
                           W.GN, W.EN, W.scratch, P.maxq)


cdef void solve_crossed(const Prob* P, Work* W, Tree* t, const double* Phi) noexcept nogil:
    """After factor_crossed: W.Wb = C_c^-1 R; the crossed levels' gradient pieces and EM
    moments added into W.G and W.E (a spatial level's rho into W.Gx); Phi_b (module
    docstring) into W.PhiB; then the tree's selected inverse, node solutions and
    per-node pieces (W.GN, W.EN) with each cluster's rows and columns of Phi_b. W.G
    and W.E must be zeroed by the caller."""
    cdef Py_ssize_t nb = P.nb
    cdef int nc = P.ncol
    cdef Py_ssize_t bw = nb + nc
    cdef Py_ssize_t i, k, j, w, l, g, o, h
    cdef int q
    cdef const Py_ssize_t* mp
    cdef double* Gl
    cdef double* El
    cdef double* s = W.Sl        # nc x q scratch (the local Phi buffer is free until the tree)
    trsm_left_lower(b'T', <int>nb, nc, W.Cb, <int>nb, W.Wb, <int>nb)
    if scalar_border(P):
        solve_scalar(P, W, t, Phi)
        return
    copy(W.Cb, W.Sg, nb * nb)
    potri_lower(<int>nb, W.Sg, <int>nb)
    for k in range(nc):
        copy(W.Sb + (nb + k) * bw, W.Kb + k * nb, nb)
    gemm(b'N', b'N', <int>nb, nc, <int>nb, -1.0, W.Pb, <int>nb, W.Wb, <int>nb, 1.0, W.Kb, <int>nb)
    # (S_cc T_c Sig)_gg = sum_h Pb[g, h] Sig[g, h] (Sig symmetric): down the columns
    for h in range(nb):
        for l in range(P.n_tree, P.n_levels):
            if P.b_lo[l] >= 0:
                continue
            q = <int>P.q[l]
            Gl = W.G + P.t_off[l]
            for g in range(<Py_ssize_t>P.n_groups[l]):
                o = P.b_off[l] + g * q
                for k in range(q):
                    for i in range(q):
                        Gl[i + k * q] += W.Pb[o + i + h * nb] * W.Sg[o + k + h * nb]
    for l in range(P.n_tree, P.n_levels):
        if P.b_lo[l] >= 0:
            known_R_pieces(P, W, l, Phi, W.PhiB)     # PhiB is free until the tree's Phi below
            if P.sp_form[l] > 0:
                spatial_pieces(P, W, l, Phi)
            continue
        q = <int>P.q[l]
        Gl = W.G + P.t_off[l]
        El = W.E + P.t_off[l]
        for g in range(<Py_ssize_t>P.n_groups[l]):
            o = P.b_off[l] + g * q
            gemm(b'N', b'T', nc, q, nc, 1.0, Phi, nc, W.Wb + o, <int>nb, 0.0, s, nc)
            gemm(b'N', b'N', q, q, nc, -1.0, W.Kb + o, <int>nb, s, nc, 1.0, Gl, q)
            gemm(b'N', b'N', q, q, nc, 1.0, W.Wb + o, <int>nb, s, nc, 1.0, El, q)
            for k in range(q):
                for i in range(q):
                    El[i + k * q] += W.Sg[o + i + (o + k) * nb]
    # Phi_b: Kb <- W Phi; Sg <- Sig + W Phi W'; Pb <- Sg T_c'; blocks of T_c Pb and -T_c Kb
    gemm(b'N', b'N', <int>nb, nc, nc, 1.0, W.Wb, <int>nb, Phi, nc, 0.0, W.Kb, <int>nb)
    gemm(b'N', b'T', <int>nb, <int>nb, nc, 1.0, W.Kb, <int>nb, W.Wb, <int>nb, 1.0, W.Sg, <int>nb)
    t_right(P, W.Tlev, W.bL, True, W.Sg, nb, W.Pb, nb, nb)
    t_left(P, W.Tlev, W.bL, False, 1.0, W.Pb, nb, W.PhiB, bw, nb)
    t_left(P, W.Tlev, W.bL, False, -1.0, W.Kb, nb, W.PhiB + nb * bw, bw, nc)
    for k in range(nc):
        for i in range(nb):
            W.PhiB[nb + k + i * bw] = W.PhiB[i + (nb + k) * bw]
        for i in range(nc):
            W.PhiB[nb + i + (nb + k) * bw] = Phi[i + k * nc]
    # the tree, each cluster with its rows and columns of Phi_b
    if P.wide:     # W Phi_b for every node in one product, handed to the kernel as PW
        zero(W.Ym, P.ny * bw)
        for j in range(P.n_clusters):
            t.ncol = <int>P.cw[j]
            invert_cluster(t, P.cluster_ptr[j], P.cluster_ptr[j + 1], W.WB, W.WR, W.SB, W.WW)
            to_rows(P, t, j, W.WW, W.Ym)
        gemm(b'N', b'N', <int>P.ny, <int>bw, <int>bw, 1.0, W.Ym, <int>P.ny, W.PhiB, <int>bw, 0.0,
             W.Yp, <int>P.ny)
        for j in range(P.n_clusters):
            t.ncol = <int>P.cw[j]
            from_rows(P, t, j, W.Yp, W.PWn)
        t.PW = W.PWn
        for j in range(P.n_clusters):
            t.ncol = <int>P.cw[j]
            accumulate_cluster(t, P.cluster_ptr[j], P.cluster_ptr[j + 1], W.SB, W.WW, W.KK, W.Sl,
                               W.GN, W.EN, W.scratch, P.maxq)
        t.PW = NULL
        return
    for j in range(P.n_clusters):
        w = P.cw[j]
        t.ncol = <int>w
        mp = P.bmap + P.cmap_ptr[j]
        for k in range(w):
            for i in range(w):
                W.Sl[i + k * w] = W.PhiB[mp[i] + mp[k] * bw]
        invert_cluster(t, P.cluster_ptr[j], P.cluster_ptr[j + 1], W.WB, W.WR, W.SB, W.WW)
        accumulate_cluster(t, P.cluster_ptr[j], P.cluster_ptr[j + 1], W.SB, W.WW, W.KK, W.Sl,
                           W.GN, W.EN, W.scratch, P.maxq)
