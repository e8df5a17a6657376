# cython: language_level=3
"""The fitting engine: one compiled objective and one EM + Newton loop for every fit.

A :class:`Problem` holds everything about a nested model that does not depend on
theta (the kernel's tree and cross-products, the covariance structures as maps
theta -> T, the likelihood's constants) plus its workspaces. Every fit of the
package -- the main fit, refits, batches of outcome vectors, profiling with fixed
parameters, EM only, verbose runs -- goes through :meth:`Problem.fit`; every
evaluation of the objective (Satterthwaite df, variance-component information,
postestimation) goes through :meth:`Problem.evaluate`. Both call the one
``evaluate`` of :mod:`mlmeta._core._objective` (the formulas are there); the
covariance structures reach it only as ``T(theta)`` and ``dT/dtheta``
(:mod:`mlmeta._core._structures`), and the EM + Newton loop is
:mod:`mlmeta._core._optimizer`.

A Problem is not reentrant: its workspaces are shared by its calls, so every
Python-level method holds the problem's lock while it runs.
"""

import threading

import numpy as np

from mlmeta._threads import parallel_calls
from libc.math cimport INFINITY
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy

from mlmeta._core._linalg cimport copy
from mlmeta._core._nested cimport NestedKernel
from mlmeta._core._problem cimport (Prob, Work, bind_work, WIDE_NC, K_IDENTITY, K_INDEPENDENT,
                                    K_EXCHANGEABLE, K_UNSTRUCTURED, K_CUSTOM, K_SPATIAL, ST_OK)
from mlmeta._core._structures cimport set_factors, em_project, em_update
from mlmeta._core._objective cimport set_response, factor_all, solve_all, evaluate, inverse_H
from mlmeta._core._optimizer cimport Options, Out, fit_one

from mlmeta._core._atomic cimport mlmeta_fetch_add

cdef enum:
    RUN_CHUNK = 16       # the most rows a thread of a batch takes at a time (_Runner)

KINDS = {"identity": K_IDENTITY, "independent": K_INDEPENDENT, "exchangeable": K_EXCHANGEABLE,
         "unstructured": K_UNSTRUCTURED, "custom": K_CUSTOM, "spatial": K_SPATIAL}

#: metafor's spatial structures, in the engine's codes (sp_form)
SPATIAL_FORMS = {"SPEXP": 1, "SPGAU": 2, "SPLIN": 3, "SPRAT": 4, "SPSPH": 5}


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
        ``corr_fixed`` and optionally ``corr_lag`` (q x q lags d, R_ij = rho^d_ij; default 1);
        ``spatial`` is q = 1, theta = (s, rho), ``dT`` = [[[1]], [[0]]], its correlation
        across the groups given by ``border["spatial"]``.
    lower, upper : bounds of theta.
    n_groups : groups per level.
    n_obs : number of observations.
    reml, profiled : method, and whether the residual variance is profiled out.
    logdet_Lambda, logdet_XtX, scale : constants of the likelihood; scale is the size
        of a typical sampling SD (finite-difference steps, saddle probes).
    Zw, Xw, node_rows : per level the whitened random design (n x q_l), the whitened
        fixed design and each node's sorted rows (first, last + 1): needed only to fit
        new outcome vectors (a diagonal Lambda); None when the problem fits its own.
    border : for crossed terms (:mod:`mlmeta._core._border`), a dict with ``n_tree`` (the
        kernel's tree levels; the levels after them are crossed), ``b_off`` (per level,
        the first border effect of a crossed level), ``cmap_ptr`` and ``bmap`` (per
        top-level cluster, the rows of ``S0`` of its local columns: its border effects,
        then the ncol of [X, y]), ``S0`` (the Gram matrix of the whitened
        [Z_cross, X, y]) and optionally ``known_R`` ({level: lower Cholesky factor of a
        known correlation matrix across the level's groups}) and ``spatial`` ({level:
        (form, D)}: a key of ``SPATIAL_FORMS`` and the G x G distances between the level's
        groups, in the units of its rho, for a level of kind ``spatial``); None for a
        nested model.
    fold : a deepest level of one-row, one-effect groups folded into the diagonal
        (:mod:`mlmeta._core._fold`): a dict with ``level`` (the kernel then has no nodes
        at that level) and ``yw`` (the design's own whitened outcome, n); needs Zw, Xw
        and node_rows. None otherwise.
    """
    cdef Prob P
    cdef NestedKernel K
    cdef object _keep, _lock, _bufs
    cdef Work* Ws
    cdef int n_slots
    cdef readonly int n_theta, p
    cdef readonly Py_ssize_t nb
    cdef readonly bint new_outcomes
    cdef readonly object lower, upper, t_off, q

    def __init__(self, NestedKernel kernel, structs, lower, upper, n_groups, Py_ssize_t n_obs,
                 bint reml, bint profiled, double logdet_Lambda, double logdet_XtX,
                 double scale, Zw=None, Xw=None, node_rows=None, border=None, fold=None):
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
        cmap, cfix, clag = [], [], []
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
                lag = np.asarray(s.get("corr_lag", np.ones((ql, ql))), dtype=float)
                if lag.shape != (ql, ql) or not (lag[~np.eye(ql, dtype=bool)] > 0).all():
                    raise ValueError(f"corr_lag of level {l} must be {ql} x {ql}, positive off "
                                     f"the diagonal")
                clag += [np.ones(ql), lag.ravel(order="F")]
                c_off[l + 1] = c_off[l] + ql + ql * ql
            else:
                c_off[l + 1] = c_off[l]
                dT = np.asarray(s["dT"], dtype=float)
                for i in range(n_th[l]):
                    M[t_off[l]:t_off[l + 1], th_off[l] + i] = dT[i].ravel(order="F")
        cmap = np.concatenate(cmap) if cmap else np.zeros(1, dtype=np.intp)
        cfix = np.concatenate(cfix) if cfix else np.zeros(1)
        clag = np.concatenate(clag) if clag else np.ones(1)
        lower = np.ascontiguousarray(lower, dtype=float)
        upper = np.ascontiguousarray(upper, dtype=float)
        if lower.shape[0] != k or upper.shape[0] != k:
            raise ValueError("lower/upper need one entry per theta")
        n_groups = np.ascontiguousarray(n_groups, dtype=float)
        self.new_outcomes = Zw is not None
        fold_level = -1 if fold is None else int(fold["level"])
        yw = np.zeros(1)
        if fold is not None:
            yw = np.ascontiguousarray(fold["yw"], dtype=float)
            if (Zw is None or border is not None or fold_level != L - 1 or fold_level < 1
                    or q[fold_level] != 1 or yw.shape[0] != n_obs or K.ncol >= 64
                    or (np.asarray(K.level) == fold_level).any() or kind[fold_level] == K_CUSTOM
                    or kind[fold_level] == K_SPATIAL):
                raise ValueError("fold: the deepest level (one effect, no nodes in the kernel) "
                                 "of a nested problem with Zw, Xw, node_rows and yw")
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
        ncol = int(K.ncol)
        sp_form = np.zeros(L, dtype=np.intp)
        sp_scratch = 1
        if (kind == K_SPATIAL).sum() != len((border or {}).get("spatial") or {}):
            raise ValueError("every spatial level needs its distances in border['spatial']")
        if border is None:
            n_tree, nb = L, 0
            b_off = np.full(L, -1, dtype=np.intp)
            cmap_ptr = np.zeros(K.n_clusters + 1, dtype=np.intp)
            bmap = np.zeros(1, dtype=np.intp)
            b_lo = np.full(L, -1, dtype=np.intp)
            bL = np.zeros(1)
            sp_D = np.zeros(1)
            S0 = np.zeros((1, 1), order="F")
            cw = np.full(K.n_clusters, ncol, dtype=np.intp)
        else:
            if Zw is not None and Zw[0].shape[0]:
                raise ValueError("a problem with crossed terms fits only its own outcome")
            n_tree = int(border["n_tree"])
            b_off = np.ascontiguousarray(border["b_off"], dtype=np.intp)
            cmap_ptr = np.ascontiguousarray(border["cmap_ptr"], dtype=np.intp)
            bmap = np.ascontiguousarray(border["bmap"], dtype=np.intp)
            S0 = np.asfortranarray(border["S0"], dtype=float)
            nb = S0.shape[0] - ncol
            cw = np.diff(cmap_ptr).astype(np.intp)
            b_lo = np.full(L, -1, dtype=np.intp)
            known_R = border.get("known_R") or {}
            spatial = border.get("spatial") or {}
            pieces, dists, at = [], [], 0
            for l in sorted(set(known_R) | set(spatial)):
                G = int(n_groups[l])
                if l in spatial:
                    form, Dl = spatial[l]
                    Dl = np.asfortranarray(Dl, dtype=float)
                    if form not in SPATIAL_FORMS or kind[l] != K_SPATIAL or l in known_R:
                        raise ValueError(f"border: level {l} needs a spatial structure (kind "
                                         f"'spatial', a form in {list(SPATIAL_FORMS)}) and no R")
                    sp_form[l] = SPATIAL_FORMS[form]
                    LR = np.zeros((G, G), order="F")
                else:
                    LR, Dl = np.asfortranarray(known_R[l], dtype=float), np.zeros((G, G), order="F")
                if not n_tree <= l < L or q[l] != 1 or LR.shape != (G, G) or Dl.shape != (G, G):
                    raise ValueError(f"border: level {l}'s known or spatial correlation must be a "
                                     f"{G} x {G} matrix on a crossed level with one effect")
                b_lo[l] = at
                pieces.append(LR.ravel(order="F"))
                dists.append(Dl.ravel(order="F"))
                at += G * G
                if l in spatial:
                    sp_scratch = max(sp_scratch, 35 * G + 8, G * (nb + G + ncol))
            bL = np.concatenate(pieces) if pieces else np.zeros(1)
            sp_D = np.concatenate(dists) if dists else np.zeros(1)
            if not 1 <= n_tree < L or b_off.shape[0] != L or cmap_ptr.shape[0] != K.n_clusters + 1:
                raise ValueError("border: n_tree, b_off or cmap_ptr do not match the kernel")
            if nb < 1 or S0.shape != (nb + ncol, nb + ncol) or bmap.shape[0] != cmap_ptr[-1]:
                raise ValueError("border: S0 or bmap has the wrong shape")
            if bmap.shape[0] and (bmap.min() < 0 or bmap.max() >= nb + ncol):
                raise ValueError("border: bmap indexes outside S0")
            ends = b_off[n_tree:] + q[n_tree:] * n_groups[n_tree:].astype(np.intp)
            if (b_off[n_tree:] < 0).any() or ends.max() > nb:
                raise ValueError("border: the crossed levels' effects do not fit in S0")
        maxw = int(cw.max()) if cw.shape[0] else ncol
        # wide clusters: one ny x bw product beats per-cluster w_j^2 loops when the clusters
        # see most of the border (subjects x items); kept to ny x bw <= 2e7 doubles
        nq_nodes = np.asarray(K.nq)
        y_row = np.concatenate([[0], np.cumsum(nq_nodes)]).astype(np.intp)
        ny = int(y_row[-1])
        bw = nb + ncol
        loops = float(np.sum(nq_nodes * cw[np.searchsorted(np.asarray(K.cluster_ptr),
                                                           np.arange(K.n_nodes), side="right") - 1]
                             .astype(float) ** 2)) if nb else 0.0
        wide = bool(nb and ny * bw * bw <= 2.0 * loops and ny * bw <= 2e7)
        self.nb = nb
        self._keep = (q, t_off, n_th, th_off, kind, M, n_sd, c_off, cmap, cfix, clag, lower, upper,
                      n_groups, Zw_flat, zw_off, Xw, node_r0, node_r1, AA, b_off, cmap_ptr, bmap,
                      S0, cw, b_lo, bL, y_row, sp_form, sp_D, yw)
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
        cdef double[::1] v_clag = clag
        cdef double[::1] v_cfix = cfix, v_ng = n_groups, v_lo = lower, v_up = upper, v_zw = Zw_flat
        cdef double[::1, :] v_M = M
        cdef double[::1, :] v_AA = AA
        cdef double[::1, :] v_S0 = S0
        cdef Py_ssize_t[::1] v_boff = b_off, v_cptr = cmap_ptr, v_bmap = bmap, v_cw = cw
        cdef Py_ssize_t[::1] v_blo = b_lo, v_yrow = y_row
        cdef double[::1] v_bL = bL, v_spD = sp_D, v_yw = yw
        cdef Py_ssize_t[::1] v_spf = sp_form
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
        P.clag = &v_clag[0]
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
        P.maxq = max(K.maxq, int(q.max()))
        P.nb = nb
        P.n_tree = n_tree
        P.maxw = maxw
        P.cw = &v_cw[0] if cw.shape[0] else NULL
        P.cmap_ptr = &v_cptr[0]
        P.bmap = &v_bmap[0]
        P.b_off = &v_boff[0]
        P.S0 = &v_S0[0, 0]
        P.b_lo = &v_blo[0]
        P.wide = wide
        P.ny = ny
        P.y_row = &v_yrow[0]
        P.bL = &v_bL[0]
        P.bl_len = bL.shape[0]
        P.sp_form = &v_spf[0]
        P.sp_D = &v_spD[0]
        P.sp_scratch = sp_scratch
        P.has_spatial = bool((kind == K_SPATIAL).any())
        P.fold = fold_level
        P.eval_threads = 1
        P.yw = &v_yw[0]
        # the kernels' scratch, and (EM) Sigma, a product and the projections' q x q room
        P.scratch_len = 3 * P.maxq * max(P.maxq, maxw) + 3 * P.maxq * P.maxq + 16
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

    @property
    def wide(self):
        """Whether the tree's clusters go through the border as one dense product."""
        return bool(self.P.wide)

    cdef void _ensure_slots(self, int n) except *:
        """Workspaces for n simultaneous fits (kept; grown when more are asked for: the
        slots already made keep their buffers and state, the new ones get a buffer of their
        own)."""
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
                 5 * ms * ms + ms + 8, 19 * k + 4 * k * k + 32 + p * p + p]
        nb = P.nb
        bw = nb + nc if nb else 0
        wide = P.ny * bw if P.wide else 0
        sizes += [max(x, 1) for x in (bw * bw, nb * nb, nb * nb, nb * nb, nb * nc, nb * nc, bw * bw,
                                      P.maxw * P.maxw if nb else 0, wide, wide,
                                      P.za_len if P.wide or (P.tree.scalar and nc >= WIDE_NC)
                                      else 0)]
        sizes += [P.bl_len, P.bl_len, max(k, 1), P.sp_scratch]
        folded = P.fold >= 0
        sizes += [P.n_obs * nc if folded else 1, P.n_obs if folded else 1,
                  max(P.zz_len, 1) if folded else 1, (P.t_len + 1) * (nc + 1)]
        # a gap of two cache lines after the last array: the buffers of the slots are the
        # rows of one array, each written by its own thread
        sizes.append(16)
        offs = np.concatenate([[0], np.cumsum(sizes)]).astype(np.intp)
        cdef int n0 = self.n_slots
        buf = np.zeros((n - n0, int(offs[-1])), dtype=np.float64)
        cdef double[:, ::1] B = buf
        cdef Py_ssize_t[::1] o = offs
        cdef Work* Ws = <Work*>malloc(n * sizeof(Work))
        if Ws == NULL:
            raise MemoryError()
        cdef int c
        if n0:
            memcpy(Ws, self.Ws, n0 * sizeof(Work))
        for c in range(n - n0):
            bind_work(&Ws[n0 + c], &B[c, 0], &o[0])
            copy(P.bL, Ws[n0 + c].bL, P.bl_len)
            if k:
                copy(P.M, Ws[n0 + c].D, P.t_len * k)
            Ws[n0 + c].n_evals = 0
            Ws[n0 + c].status = 0
            Ws[n0 + c].own = 0
        free(self.Ws)
        self.Ws = Ws
        self._bufs = (self._bufs or []) + [buf]
        self.n_slots = n

    cdef Work* _slot0(self) except NULL:
        self._ensure_slots(1)
        if not self.Ws[0].own:       # a batch fit left another outcome there
            set_response(&self.P, &self.Ws[0], NULL)
        return &self.Ws[0]

    cdef double _eval(self, double[::1] tv, double* grad, bint em, double s2,
                      const double* y=NULL) except? -1:
        """evaluate() on workspace 0 at the design's own outcome, or at the whitened sorted
        outcome ``y`` (the lock must be held)."""
        cdef Work* W = self._slot0()
        cdef const double* tp = &tv[0] if self.n_theta else NULL
        cdef double dev
        if y != NULL:
            set_response(&self.P, W, y)
        with nogil:
            dev = evaluate(&self.P, W, tp, grad, em, s2)
            if dev < INFINITY:
                inverse_H(&self.P, W)
        return dev

    def _check_theta(self, theta):
        th = np.ascontiguousarray(theta, dtype=np.float64)
        if th.ndim != 1 or th.shape[0] != self.n_theta:
            raise ValueError(f"theta must have {self.n_theta} elements, got shape {th.shape}")
        return th

    def evaluate(self, theta, bint gradient=False, bint em=False, sigma2=None, y=None,
                 int n_threads=1):
        """The objective at theta (the design's own outcome). Returns a dict with
        deviance (inf where undefined, with ``status`` saying why), beta, Hinv
        (= (X'V^-1X)^-1, relative to sigma^2), rss, logdet_C, logdet_H, sigma2, and
        ``grad`` (d deviance / d theta) and ``E`` (per-level EM moments, flattened like
        T) when asked for. ``sigma2``: evaluate a profiled-residual model at this
        residual variance (the deviance not profiled over it). ``y``: another outcome
        (whitened, rows sorted as the design's; a problem built for new outcomes).
        ``n_threads``: 2 or more lets a large two-level fold split the evaluation in two
        halves on two threads (the same numbers as on one)."""
        th = self._check_theta(theta)
        cdef const double[::1] yv
        cdef const double* yp = NULL
        if y is not None:
            if not self.new_outcomes:
                raise ValueError("this problem fits only its own outcome")
            yv = np.ascontiguousarray(y, dtype=np.float64)
            if yv.shape[0] != self.P.n_obs:
                raise ValueError(f"y must have {self.P.n_obs} elements")
            yp = &yv[0]
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
            self.P.eval_threads = 2 if n_threads >= 2 else 1
            dev = self._eval(tv, gptr, em, s2, yp)
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

    cdef Work* _factors_at(self, theta) except NULL:
        """The first workspace with T(theta) and dT/dtheta set (the caller holds the lock);
        FloatingPointError where T is not defined at theta."""
        th = self._check_theta(theta)
        cdef double[::1] tv = th
        self._ensure_slots(1)
        cdef Work* W = &self.Ws[0]
        cdef int st = set_factors(&self.P, W, &tv[0] if self.n_theta else NULL)
        if st != ST_OK:
            raise FloatingPointError(f"T(theta) is not defined at theta = {th} (status {st})")
        return W

    def factors(self, theta):
        """(T, dT/dtheta) at theta: T flattened by level (column-major blocks at t_off),
        dT as a (t_len, n_theta) array. A test twin of the structures' maps."""
        cdef Work* W
        with self._lock:
            W = self._factors_at(theta)
            T = self._vec(W.Tlev, self.P.t_len)
            D = self._vec(W.D, self.P.t_len * self.n_theta)
            D = D.reshape(self.P.t_len, self.n_theta, order="F")
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

    def border_solution(self, theta):
        """Evaluate at theta and return (W, L) of the crossed terms' border: W = C_c^-1 R
        (nb x ncol) and the lower Cholesky factor L of C_c (nb x nb, C_c^-1 = L^-T L^-1)."""
        th = self._check_theta(theta)
        cdef double[::1] tv = th
        cdef double dev
        cdef Py_ssize_t nb = self.nb
        if nb == 0:
            raise ValueError("the model has no crossed terms")
        with self._lock:
            dev = self._eval(tv, NULL, True, 0.0)
            if dev == INFINITY:
                raise FloatingPointError(f"the objective is not defined at theta = {th}")
            Wb = self._vec(self.Ws[0].Wb, nb * self.P.ncol).reshape(nb, self.P.ncol, order="F")
            Lb = np.tril(self._vec(self.Ws[0].Cb, nb * nb).reshape(nb, nb, order="F"))
        return Wb, Lb

    def border_factors(self, theta):
        """{level: F} at theta for the crossed levels with a known or spatial correlation
        across their groups: the border block of such a level is t F (F F' = R, for a
        spatial level R(rho) as the engine factors it)."""
        cdef Work* W
        cdef Py_ssize_t l, G
        out = {}
        with self._lock:
            W = self._factors_at(theta)
            for l in range(self.P.n_levels):
                if self.P.b_lo[l] >= 0:
                    G = <Py_ssize_t>self.P.n_groups[l]
                    out[l] = self._vec(W.bL + self.P.b_lo[l], G * G).reshape(G, G, order="F")
        return out

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
            solve_all(P, W, &Pv[0, 0], True, True)
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
            int em_switch=0, double switch_dec=1.0, known_theta=None,
            double known_dev=INFINITY, known_hess=None, int n_threads=1, bint log=False,
            bint hessian=False):
        """Fit the rows of ``theta0`` (m x n_theta starts) to the design's own outcome
        (``Yw`` None) or to the rows of ``Yw`` (m x n whitened, sorted outcomes).

        ``lower``/``upper`` replace the problem's bounds (equal bounds fix a parameter).
        ``em_switch`` > 0: EM may hand over to Newton from that iterate on, where an EM
        step and the Newton decrement are at most ``switch_dec`` with a well-conditioned
        positive definite Hessian (``fit_one``).
        ``known_hess`` (n_theta x n_theta, NaN rows unknown): the Hessian at
        ``known_theta``, the first model Hessian of the exploring runs (``quasi``) where
        it is known in every free parameter's row; ``hessian``: return each run's last
        Hessian of its Newton iterations (``hess``, n_theta x n_theta per run, NaN rows
        for parameters not free then; ``fit_one``).
        Runs are shared out over ``n_threads`` threads, each with its own workspace; a
        single run may split a large evaluation over two of them (the numbers do not
        depend on it).
        Returns a dict of arrays: theta, theta_em (after EM), deviance, beta, se, Hinv
        ((X'V^-1X)^-1 per fit; beta, se and Hinv in the design's working basis, see
        :class:`mlmeta.design.NestedDesign`), converged, n_iter (Newton), n_em, n_evals,
        sigma2, joined, certified (converged with the Newton certificate of
        ``fit_one``), status and, with ``log``, log_em / log_newton (deviance per
        iteration, NaN past the end)."""
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
                   Hinv=np.zeros((m, max(p, 1), max(p, 1))),
                   sigma2=np.ones(m), converged=np.zeros(m, dtype=np.intc),
                   n_iter=np.zeros(m, dtype=np.intc), n_em=np.zeros(m, dtype=np.intc),
                   n_evals=np.zeros(m, dtype=np.intc), joined=np.zeros(m, dtype=np.intc),
                   status=np.zeros(m, dtype=np.intc),
                   log_em=np.full((m, n_log_em), np.nan), log_newton=np.full((m, n_log_nt), np.nan),
                   hess=np.full((m, max(k, 1) * max(k, 1)) if hessian else (1, 1), np.nan))
        cdef Options O
        O.em_iter = em_iter
        O.maxiter = maxiter
        O.tol = tol
        O.em_tol = em_tol
        O.quasi = quasi
        O.em_only = em_only
        O.em_switch = em_switch
        O.switch_dec = switch_dec
        O.known_dev = known_dev
        O.known = NULL
        cdef double[::1] kn
        if known_theta is not None:
            known = np.ascontiguousarray(known_theta, dtype=np.float64)
            if known.shape[0] != k:
                raise ValueError("known_theta has the wrong length")
            kn = known
            O.known = &kn[0]
        O.known_H = NULL
        cdef double[::1] kh
        if known_hess is not None:
            kh_arr = np.ascontiguousarray(known_hess, dtype=np.float64).ravel()
            if kh_arr.shape[0] != k * k:
                raise ValueError("known_hess must be n_theta x n_theta")
            kh = kh_arr
            O.known_H = &kh[0]
        cdef int nt = max(1, min(n_threads, m))
        # threads left over by a single run go to its evaluations (two-level folds)
        P.eval_threads = 2 if nt == 1 and n_threads >= 2 else 1
        runner = _Runner.__new__(_Runner)
        with self._lock:
            self._ensure_slots(nt)
            # runs of rows per take: about 8 takes per thread, at most RUN_CHUNK rows
            (<_Runner>runner).setup(self, P, O, Yw, res, log,
                                    max(1, min(RUN_CHUNK, m // (8 * nt))) if nt > 1 else m,
                                    hessian)
            parallel_calls((<_Runner>runner).run, [(c,) for c in range(nt)], nt)
        res["certified"] = res["converged"] == 2
        for key in ("converged", "joined"):
            res[key] = res[key].astype(bool)
        res["beta"] = res["beta"][:, :p]
        res["se"] = res["se"][:, :p]
        # the kernel's cells are column-major: transpose each p x p block
        res["Hinv"] = np.ascontiguousarray(res["Hinv"][:, :p, :p].transpose(0, 2, 1))
        if not log:
            del res["log_em"], res["log_newton"]
        if hessian:
            res["hess"] = res["hess"][:, :k * k].reshape(m, k, k).transpose(0, 2, 1).copy()
        else:
            del res["hess"]
        return res


cdef class _Runner:
    """Runs fit_one over the rows of a batch: ``run(slot)`` takes the next
    ``chunk`` rows not yet taken, until none are left (so a thread that drew easy fits
    takes more of them), and fits them with workspace ``slot`` and its own copy of
    theta, the GIL released throughout. A row's numbers do not depend on the thread
    that fits it; rows taken in runs of ``chunk`` keep each thread's writes to the
    result arrays off the other's cache lines."""
    cdef Prob P
    cdef Options O
    cdef Problem prob
    cdef const double[:, ::1] Yw
    cdef bint own, log
    cdef double[:, ::1] th, bt, sv, tem, lem, lnt, here, hs
    cdef bint hessian
    cdef double[:, :, ::1] hv
    cdef double[::1] dv, s2
    cdef int[::1] cv, itv, ev, jv, emv, stv
    cdef Py_ssize_t n_rows, next_row, chunk

    cdef setup(self, Problem prob, Prob P, Options O, Yw, dict res, bint log, Py_ssize_t chunk,
               bint hessian=False):
        self.prob = prob
        self.P = P
        self.O = O
        self.own = Yw is None
        if not self.own:
            self.Yw = Yw
        self.log = log
        self.th, self.bt, self.sv, self.tem = res["theta"], res["beta"], res["se"], res["theta_em"]
        self.hv = res["Hinv"]
        self.lem, self.lnt = res["log_em"], res["log_newton"]
        self.hs = res["hess"]
        self.hessian = hessian and P.n_theta > 0
        self.dv, self.s2 = res["deviance"], res["sigma2"]
        self.cv, self.itv, self.ev = res["converged"], res["n_iter"], res["n_evals"]
        self.jv, self.emv, self.stv = res["joined"], res["n_em"], res["status"]
        self.n_rows = self.th.shape[0]
        self.next_row = 0
        self.chunk = max(chunk, 1)
        # each thread's theta while it fits a row, a cache line (8 doubles) apart from the
        # next thread's: the rows of the result, written at every step, would share lines
        k = max(P.n_theta, 1)
        self.here = np.zeros((prob.n_slots, 8 * (k // 8 + 2)))

    def run(self, int slot):
        cdef Py_ssize_t r, r0, r1
        cdef Out R
        cdef Work* W = &self.prob.Ws[slot]
        cdef double dummy = 0.0
        with nogil:
            while True:
                r0 = mlmeta_fetch_add(&self.next_row, self.chunk)
                if r0 >= self.n_rows:
                    break
                r1 = min(r0 + self.chunk, self.n_rows)
                for r in range(r0, r1):
                    R.dev = &self.dv[r]
                    R.beta = &self.bt[r, 0]
                    R.se = &self.sv[r, 0]
                    R.Hinv = &self.hv[r, 0, 0]
                    R.sig2 = &self.s2[r]
                    R.theta_em = &self.tem[r, 0] if self.P.n_theta else &dummy
                    R.log_em = &self.lem[r, 0] if self.log else NULL
                    R.log_newton = &self.lnt[r, 0] if self.log else NULL
                    R.hess = &self.hs[r, 0] if self.hessian else NULL
                    R.n_iter = &self.itv[r]
                    R.n_em = &self.emv[r]
                    R.joined = &self.jv[r]
                    R.status = &self.stv[r]
                    if self.P.n_theta:
                        copy(&self.th[r, 0], &self.here[slot, 8], self.P.n_theta)
                    self.cv[r] = fit_one(&self.P, W, NULL if self.own else &self.Yw[r, 0],
                                         &self.here[slot, 8], &self.O, R)
                    if self.P.n_theta:
                        copy(&self.here[slot, 8], &self.th[r, 0], self.P.n_theta)
                    self.ev[r] = W.n_evals
