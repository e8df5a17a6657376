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
nodes of top-level cluster j with its root last. For node ``a`` at level ``l``
with ancestors ``c_0 (top), ..., c_{l-1}`` and ``c_l = a``:

    ZZ[zz_ptr[a] + boff[l, k] :]   (q_l x q_k) = Z~_a' Z~_{c_k} over the rows of a
    ZA[za_ptr[a] :]                (q_l x ncol) = Z~_a' A       over the rows of a

``factor`` overwrites a workspace with the same layout as ZZ by the block
Cholesky factor: the (l, l) block holds ``L_aa`` and the (l, k) block holds
``U_ak = L_aa^-1 C_{a c_k}`` (the transpose of the factor's off-diagonal block).
``selected_inverse`` then computes, top-down, ``W = C^-1 R`` and the blocks of
``C^-1`` on the same pattern (Takahashi's recurrences):

    W_a        = L_aa^-T (Y_a - sum_k U_ak W_{c_k})
    Sig_{a,ck} = -L_aa^-T sum_m U_am Sig_{c_m c_k}                     (k < l)
    Sig_aa     = L_aa^-T (L_aa^-1 - sum_m U_am Sig_{a c_m}')

``accumulate`` turns these into the gradient of ``f = log|C| + tr(Phi A'V^-1 A)``
style objectives with respect to each level's factor T_l and the EM moments:

    df/dT_l / 2 = sum_{g in level l} [ (Z~'Z~ T C^-1)_gg - K_g Phi W_g' ],  K_g = Z~_g' V^-1 A
    E_l         = sum_{g in level l} [ Sig_gg + W_g Phi W_g' ]

where ``Phi`` is the symmetric (ncol x ncol) matrix given by the caller (for ML
``gamma gamma'`` with ``gamma = (-beta, 1)``; REML adds ``(X'V^-1X)^-1`` in the
leading block). Kernels never allocate and never raise: they return 0 or
``1 + index`` of the node whose factorisation failed.
"""

import numpy as np
from libc.math cimport log
from mlmeta._core._linalg cimport gemm, trsm_left_lower, potrf_lower, zero, copy

cdef enum:
    MAXLEV = 64


cdef struct Tree:
    Py_ssize_t n_levels
    int ncol
    const Py_ssize_t* q
    const Py_ssize_t* boff      # (n_levels * n_levels): block offset of (l, k) inside a node
    const Py_ssize_t* level
    const Py_ssize_t* parent
    const Py_ssize_t* zz_ptr
    const Py_ssize_t* za_ptr
    const Py_ssize_t* t_off
    const double* ZZ
    const double* ZA
    const double* T


cdef inline void chain(const Tree* t, Py_ssize_t a, Py_ssize_t* anc) noexcept nogil:
    """anc[k] = ancestor of node a at level k (anc[level(a)] = a)."""
    cdef Py_ssize_t l = t.level[a]
    cdef Py_ssize_t c = a
    anc[l] = a
    while l > 0:
        c = t.parent[c]
        l -= 1
        anc[l] = c


cdef Py_ssize_t factor_cluster(const Tree* t, Py_ssize_t a0, Py_ssize_t a1,
                               double* WB, double* WR, double* S, double* logdet,
                               double* scratch) noexcept nogil:
    cdef Py_ssize_t a, l, k, m, i, c, L = t.n_levels
    cdef int ql, qk, qm, info
    cdef int nc = t.ncol
    cdef Py_ssize_t anc[MAXLEV]
    cdef const double* Tl
    cdef double* Laa
    cdef double* Ua_k
    cdef double* Ya
    # C blocks: T_l' ZZ_{a,k} T_k (+ I on the diagonal); R_a = T_l' ZA_a
    for a in range(a0, a1):
        l = t.level[a]
        ql = <int>t.q[l]
        Tl = t.T + t.t_off[l]
        for k in range(l + 1):
            qk = <int>t.q[k]
            gemm(b'T', b'N', ql, qk, ql, 1.0, Tl, ql, t.ZZ + t.zz_ptr[a] + t.boff[l * L + k], ql,
                 0.0, scratch, ql)
            gemm(b'N', b'N', ql, qk, qk, 1.0, scratch, ql, t.T + t.t_off[k], qk,
                 0.0, WB + t.zz_ptr[a] + t.boff[l * L + k], ql)
        Laa = WB + t.zz_ptr[a] + t.boff[l * L + l]
        for i in range(ql):
            Laa[i + i * ql] += 1.0
        gemm(b'T', b'N', ql, nc, ql, 1.0, Tl, ql, t.ZA + t.za_ptr[a], ql, 0.0, WR + t.za_ptr[a], ql)
    # eliminate deepest first; Schur-complement into the ancestors
    for a in range(a0, a1):
        l = t.level[a]
        ql = <int>t.q[l]
        chain(t, a, anc)
        Laa = WB + t.zz_ptr[a] + t.boff[l * L + l]
        info = potrf_lower(ql, Laa, ql)
        if info != 0:
            return a + 1
        for i in range(ql):
            logdet[0] += 2.0 * log(Laa[i + i * ql])
        Ya = WR + t.za_ptr[a]
        for k in range(l):
            trsm_left_lower(b'N', ql, <int>t.q[k], Laa, ql, WB + t.zz_ptr[a] + t.boff[l * L + k], ql)
        trsm_left_lower(b'N', ql, nc, Laa, ql, Ya, ql)
        for k in range(l):
            c = anc[k]
            qk = <int>t.q[k]
            Ua_k = WB + t.zz_ptr[a] + t.boff[l * L + k]
            for m in range(k + 1):
                qm = <int>t.q[m]
                gemm(b'T', b'N', qk, qm, ql, -1.0, Ua_k, ql, WB + t.zz_ptr[a] + t.boff[l * L + m], ql,
                     1.0, WB + t.zz_ptr[c] + t.boff[k * L + m], qk)
            gemm(b'T', b'N', qk, nc, ql, -1.0, Ua_k, ql, Ya, ql, 1.0, WR + t.za_ptr[c], qk)
        gemm(b'T', b'N', nc, nc, ql, -1.0, Ya, ql, Ya, ql, 1.0, S, nc)
    return 0


cdef void invert_cluster(const Tree* t, Py_ssize_t a0, Py_ssize_t a1, const double* WB,
                         const double* WR, double* SB, double* WW) noexcept nogil:
    cdef Py_ssize_t a, l, k, m, i, L = t.n_levels
    cdef int ql, qk, qm
    cdef int nc = t.ncol
    cdef Py_ssize_t anc[MAXLEV]
    cdef const double* Laa
    cdef double* Wa
    cdef double* blk
    cdef double* D
    for a in range(a1 - 1, a0 - 1, -1):
        l = t.level[a]
        ql = <int>t.q[l]
        chain(t, a, anc)
        Laa = WB + t.zz_ptr[a] + t.boff[l * L + l]
        # W_a = L_aa^-T (Y_a - sum_k U_ak W_{c_k})
        Wa = WW + t.za_ptr[a]
        copy(WR + t.za_ptr[a], Wa, ql * nc)
        for k in range(l):
            qk = <int>t.q[k]
            gemm(b'N', b'N', ql, nc, qk, -1.0, WB + t.zz_ptr[a] + t.boff[l * L + k], ql,
                 WW + t.za_ptr[anc[k]], qk, 1.0, Wa, ql)
        trsm_left_lower(b'T', ql, nc, Laa, ql, Wa, ql)
        # Sig_{a, c_k} = -L_aa^-T sum_m U_am Sig_{c_m c_k}
        for k in range(l):
            qk = <int>t.q[k]
            blk = SB + t.zz_ptr[a] + t.boff[l * L + k]
            zero(blk, ql * qk)
            for m in range(l):
                qm = <int>t.q[m]
                if m >= k:
                    gemm(b'N', b'N', ql, qk, qm, -1.0, WB + t.zz_ptr[a] + t.boff[l * L + m], ql,
                         SB + t.zz_ptr[anc[m]] + t.boff[m * L + k], qm, 1.0, blk, ql)
                else:
                    gemm(b'N', b'T', ql, qk, qm, -1.0, WB + t.zz_ptr[a] + t.boff[l * L + m], ql,
                         SB + t.zz_ptr[anc[k]] + t.boff[k * L + m], qk, 1.0, blk, ql)
            trsm_left_lower(b'T', ql, qk, Laa, ql, blk, ql)
        # Sig_aa = L_aa^-T (L_aa^-1 - sum_m U_am Sig_{a c_m}')
        D = SB + t.zz_ptr[a] + t.boff[l * L + l]
        zero(D, ql * ql)
        for i in range(ql):
            D[i + i * ql] = 1.0
        trsm_left_lower(b'N', ql, ql, Laa, ql, D, ql)
        for m in range(l):
            qm = <int>t.q[m]
            gemm(b'N', b'T', ql, ql, qm, -1.0, WB + t.zz_ptr[a] + t.boff[l * L + m], ql,
                 SB + t.zz_ptr[a] + t.boff[l * L + m], ql, 1.0, D, ql)
        trsm_left_lower(b'T', ql, ql, Laa, ql, D, ql)


cdef void accumulate_cluster(const Tree* t, Py_ssize_t a0, Py_ssize_t a1, const double* SB,
                             const double* WW, double* KK, const double* Phi, double* G,
                             double* E, double* scratch, Py_ssize_t maxq) noexcept nogil:
    cdef Py_ssize_t a, l, k, i, c, L = t.n_levels
    cdef int ql, qk
    cdef int nc = t.ncol
    cdef Py_ssize_t anc[MAXLEV]
    cdef const double* ZZak
    cdef const double* Tl
    cdef const double* Tk
    cdef const double* SBak
    cdef double* s1 = scratch
    cdef double* s2 = scratch + maxq * nc
    cdef double* s3 = s2 + maxq * maxq
    cdef double* El
    cdef const double* Saa
    for a in range(a0, a1):
        copy(t.ZA + t.za_ptr[a], KK + t.za_ptr[a], t.q[t.level[a]] * nc)
    for a in range(a0, a1):
        l = t.level[a]
        ql = <int>t.q[l]
        Tl = t.T + t.t_off[l]
        chain(t, a, anc)
        for k in range(l + 1):
            qk = <int>t.q[k]
            c = anc[k]
            Tk = t.T + t.t_off[k]
            ZZak = t.ZZ + t.zz_ptr[a] + t.boff[l * L + k]
            SBak = SB + t.zz_ptr[a] + t.boff[l * L + k]
            # K_a -= ZZ_ak T_k W_c
            gemm(b'N', b'N', qk, nc, qk, 1.0, Tk, qk, WW + t.za_ptr[c], qk, 0.0, s1, qk)
            gemm(b'N', b'N', ql, nc, qk, -1.0, ZZak, ql, s1, qk, 1.0, KK + t.za_ptr[a], ql)
            # G_l += ZZ_ak T_k Sig_{c a}
            gemm(b'N', b'N', ql, qk, qk, 1.0, ZZak, ql, Tk, qk, 0.0, s2, ql)
            gemm(b'N', b'T', ql, ql, qk, 1.0, s2, ql, SBak, ql, 1.0, G + t.t_off[l], ql)
            if k < l:
                # K_c -= ZZ_ak' T_l W_a ;  G_k += ZZ_ak' T_l Sig_{a c}
                gemm(b'N', b'N', ql, nc, ql, 1.0, Tl, ql, WW + t.za_ptr[a], ql, 0.0, s1, ql)
                gemm(b'T', b'N', qk, nc, ql, -1.0, ZZak, ql, s1, ql, 1.0, KK + t.za_ptr[c], qk)
                gemm(b'T', b'N', qk, ql, ql, 1.0, ZZak, ql, Tl, ql, 0.0, s2, qk)
                gemm(b'N', b'N', qk, qk, ql, 1.0, s2, qk, SBak, ql, 1.0, G + t.t_off[k], qk)
    for a in range(a0, a1):
        l = t.level[a]
        ql = <int>t.q[l]
        # s3 = Phi W_a' ; G_l -= K_a s3 ; E_l += Sig_aa + W_a s3
        gemm(b'N', b'T', nc, ql, nc, 1.0, Phi, nc, WW + t.za_ptr[a], ql, 0.0, s3, nc)
        gemm(b'N', b'N', ql, ql, nc, -1.0, KK + t.za_ptr[a], ql, s3, nc, 1.0, G + t.t_off[l], ql)
        gemm(b'N', b'N', ql, ql, nc, 1.0, WW + t.za_ptr[a], ql, s3, nc, 1.0, E + t.t_off[l], ql)
        El = E + t.t_off[l]
        Saa = SB + t.zz_ptr[a] + t.boff[l * L + l]
        for i in range(ql * ql):
            El[i] += Saa[i]


cdef class NestedKernel:
    """The theta-independent pieces of a nested model and its workspaces.

    Python owns every array; the methods release the GIL around the kernels.
    Arguments are described in the module docstring.
    """
    cdef readonly Py_ssize_t n_levels, n_nodes, n_clusters, ncol, maxq
    cdef readonly object q, boff, level, parent, zz_ptr, za_ptr, t_off, cluster_ptr
    cdef readonly object ZZ, ZA, AA
    cdef readonly object WB, WR, SB, WW, KK, scratch
    cdef Py_ssize_t[::1] _q, _boff, _level, _parent, _zz_ptr, _za_ptr, _t_off, _cluster_ptr
    cdef double[::1] _ZZ, _ZA, _WB, _WR, _SB, _WW, _KK, _scratch
    cdef bint _have_inverse

    def __init__(self, q, level, parent, zz_ptr, za_ptr, cluster_ptr, ZZ, ZA, AA):
        self.q = np.ascontiguousarray(q, dtype=np.intp)
        self.n_levels = self.q.shape[0]
        if self.n_levels < 1 or self.n_levels > MAXLEV:
            raise ValueError(f"between 1 and {MAXLEV} levels are supported")
        L = self.n_levels
        boff = np.zeros(L * L, dtype=np.intp)
        for l in range(L):
            off = 0
            for k in range(l + 1):
                boff[l * L + k] = off
                off += self.q[l] * self.q[k]
        self.boff = boff
        t_off = np.zeros(L + 1, dtype=np.intp)
        t_off[1:] = np.cumsum(self.q * self.q)
        self.t_off = t_off
        self.level = np.ascontiguousarray(level, dtype=np.intp)
        self.parent = np.ascontiguousarray(parent, dtype=np.intp)
        self.zz_ptr = np.ascontiguousarray(zz_ptr, dtype=np.intp)
        self.za_ptr = np.ascontiguousarray(za_ptr, dtype=np.intp)
        self.cluster_ptr = np.ascontiguousarray(cluster_ptr, dtype=np.intp)
        self.ZZ = np.ascontiguousarray(ZZ, dtype=np.float64)
        self.ZA = np.ascontiguousarray(ZA, dtype=np.float64)
        self.AA = np.asfortranarray(AA, dtype=np.float64)
        self.n_nodes = self.level.shape[0]
        self.n_clusters = self.cluster_ptr.shape[0] - 1
        self.ncol = self.AA.shape[0]
        self.maxq = int(self.q.max())
        if self.zz_ptr.shape[0] != self.n_nodes + 1 or self.za_ptr.shape[0] != self.n_nodes + 1:
            raise ValueError("zz_ptr and za_ptr need one entry per node plus one")
        if self.ZZ.shape[0] != self.zz_ptr[-1] or self.ZA.shape[0] != self.za_ptr[-1]:
            raise ValueError("ZZ/ZA sizes do not match their pointers")
        self.WB = np.empty_like(self.ZZ)
        self.SB = np.empty_like(self.ZZ)
        self.WR = np.empty_like(self.ZA)
        self.WW = np.empty_like(self.ZA)
        self.KK = np.empty_like(self.ZA)
        self.scratch = np.empty(3 * self.maxq * max(self.maxq, self.ncol) + 16, dtype=np.float64)
        self._q = self.q; self._boff = self.boff; self._level = self.level
        self._parent = self.parent; self._zz_ptr = self.zz_ptr; self._za_ptr = self.za_ptr
        self._t_off = self.t_off; self._cluster_ptr = self.cluster_ptr
        self._ZZ = self.ZZ; self._ZA = self.ZA; self._WB = self.WB; self._WR = self.WR
        self._SB = self.SB; self._WW = self.WW; self._KK = self.KK; self._scratch = self.scratch
        self._have_inverse = False

    cdef Tree _tree(self, const double[::1] T):
        cdef Tree t
        t.n_levels = self.n_levels
        t.ncol = <int>self.ncol
        t.q = &self._q[0]
        t.boff = &self._boff[0]
        t.level = &self._level[0]
        t.parent = &self._parent[0]
        t.zz_ptr = &self._zz_ptr[0]
        t.za_ptr = &self._za_ptr[0]
        t.t_off = &self._t_off[0]
        t.ZZ = &self._ZZ[0] if self._ZZ.shape[0] > 0 else NULL
        t.ZA = &self._ZA[0] if self._ZA.shape[0] > 0 else NULL
        t.T = &T[0]
        return t

    def pack_T(self, Ts):
        """Flatten the per-level factors T_l (q_l x q_l) column-major."""
        out = np.empty(self.t_off[-1], dtype=np.float64)
        for l, Tl in enumerate(Ts):
            out[self.t_off[l]:self.t_off[l + 1]] = np.asarray(Tl, dtype=np.float64).ravel(order="F")
        return out

    def factor(self, const double[::1] T):
        """Factor C(T) for every cluster; return (log|C|, S = A'V^-1 A, status).

        ``status`` is 0, or 1 + the node index whose block was not positive definite.
        """
        if T.shape[0] != self.t_off[-1]:
            raise ValueError("T has the wrong length")
        S = np.array(self.AA, dtype=np.float64, order="F", copy=True)
        cdef double[::1, :] Sv = S
        cdef double logdet = 0.0
        cdef Py_ssize_t j, status = 0
        cdef Tree t = self._tree(T)
        cdef Py_ssize_t[::1] cp = self._cluster_ptr
        cdef double* WB = &self._WB[0]
        cdef double* WR = &self._WR[0]
        cdef double* scratch = &self._scratch[0]
        with nogil:
            for j in range(cp.shape[0] - 1):
                status = factor_cluster(&t, cp[j], cp[j + 1], WB, WR, &Sv[0, 0], &logdet, scratch)
                if status != 0:
                    break
        self._have_inverse = False
        return logdet, S, int(status)

    def gradient_pieces(self, const double[::1] T, Phi):
        """After :meth:`factor` at the same T: per-level G_l and E_l (see module docstring).

        Returns (G, E) flattened like T (level blocks column-major).
        """
        cdef double[::1, :] Ph = np.asfortranarray(Phi, dtype=np.float64)
        if Ph.shape[0] != self.ncol or Ph.shape[1] != self.ncol:
            raise ValueError("Phi must be (p+1) x (p+1)")
        G = np.zeros(self.t_off[-1], dtype=np.float64)
        E = np.zeros(self.t_off[-1], dtype=np.float64)
        cdef double[::1] Gv = G
        cdef double[::1] Ev = E
        cdef Tree t = self._tree(T)
        cdef Py_ssize_t j
        cdef Py_ssize_t[::1] cp = self._cluster_ptr
        cdef double* WB = &self._WB[0]
        cdef double* WR = &self._WR[0]
        cdef double* SB = &self._SB[0]
        cdef double* WW = &self._WW[0]
        cdef double* KK = &self._KK[0]
        cdef double* scratch = &self._scratch[0]
        cdef Py_ssize_t maxq = self.maxq
        with nogil:
            for j in range(cp.shape[0] - 1):
                invert_cluster(&t, cp[j], cp[j + 1], WB, WR, SB, WW)
                accumulate_cluster(&t, cp[j], cp[j + 1], SB, WW, KK, &Ph[0, 0], &Gv[0], &Ev[0],
                                   scratch, maxq)
        self._have_inverse = True
        return G, E

    def node_solution(self):
        """After :meth:`gradient_pieces`: W (= C^-1 R per node, q_l x ncol blocks) and the
        diagonal blocks Sig_aa of C^-1, as flat arrays with the ZA / ZZ layouts."""
        if not self._have_inverse:
            raise RuntimeError("call gradient_pieces first")
        return self.WW, self.SB
