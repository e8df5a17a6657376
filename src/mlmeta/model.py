"""The model object of a nested linear mixed model: design, structures, objective.

The objective itself (deviance, beta by GLS, (X'V^-1X)^-1, its gradient and EM
moments) is assembled once, in compiled code, by the engine's :class:`Problem`
(:mod:`mlmeta._core._engine`, whose docstring states the formulas): ML and REML
with Stata's and metafor's constant, a known or profiled residual variance. This
module builds that problem from a design and its covariance structures and gives
Python-level access to it (results, postestimation, inference).
"""

from __future__ import annotations

import copyreg
from functools import cached_property

import numpy as np
from scipy import linalg, sparse

from mlmeta._core._engine import Problem
from mlmeta._threads import blas_threads, border_blas_threads, start_threads
from mlmeta._core._nested import NestedKernel
from mlmeta.covstruct import CovStruct
from mlmeta.design import NestedDesign

__all__ = ["NestedModel", "Evaluation"]


def _kernel_from_pieces(args, kwargs, force_general):
    kernel = NestedKernel(*args, **kwargs)
    kernel.force_general = force_general
    return kernel


def _reduce_kernel(kernel):
    """Pickle a :class:`NestedKernel` by the arrays it is built from (its workspaces are
    the engine's, made anew)."""
    K = kernel
    return _kernel_from_pieces, ((K.q, K.level, K.parent, K.zz_ptr, K.za_ptr, K.cluster_ptr, K.ZZ,
                                  K.ZA, K.AA),
                                 {"nq": K.nq, "sub_node": K.sub_node, "sub_level": K.sub_level,
                                  "sub_off": K.sub_off}, bool(K.force_general))


copyreg.pickle(NestedKernel, _reduce_kernel)


class Evaluation:
    """What one evaluation at theta produced (deviance, beta, cov of beta, ...)."""

    __slots__ = ("theta", "deviance", "beta", "cov_beta", "rss", "grad", "E", "logdet_C",
                 "logdet_H", "Hinv", "sigma2", "beta_work", "Hinv_work")

    def __init__(self, **kw):
        for k in self.__slots__:
            setattr(self, k, kw.get(k))

    def copy(self) -> Evaluation:
        """A copy whose arrays are the caller's own."""
        return Evaluation(**{k: (v.copy() if isinstance(v, np.ndarray) else v)
                             for k in self.__slots__ for v in (getattr(self, k),)})


#: the deepest level is folded into the diagonal only below this many columns in [X, y]
#: (wider designs take the tree's per-node products as BLAS calls instead)
FOLD_MAX_NCOL = 16


def _median(v: np.ndarray) -> float:
    """np.median of a 1-d array without NaN (the same number: the middle value, or the
    mean of the two middle values), from one partition."""
    k = v.size // 2
    if v.size % 2:
        return float(np.partition(v, k)[k])
    part = np.partition(v, (k - 1, k))
    return float((part[k - 1] + part[k]) / 2.0)


class NestedModel:
    """A nested linear mixed model with known sampling variances.

    Attributes
    ----------
    design : NestedDesign (sorted rows, kernel with precomputed blocks).
    structs : list of CovStruct, one per level (outermost first).
    method : "reml" or "ml".
    residual : "known" (Lambda = known sampling covariance) or "profiled"
        (Lambda = sigma^2 I with sigma^2 profiled out, as lme4; theta is then
        relative to sigma: Sigma_l = sigma^2 T_l T_l').
    theta_slices : slice of the flat theta vector belonging to each level.
    n_theta : total number of covariance parameters.
    lower, upper : bounds of theta.
    scale : a typical sampling SD (1 for a profiled residual): the size of the
        optimiser's finite-difference steps and saddle probes.
    fe_constraints : linear constraints on the fixed effects (the design holds the
        constrained coefficients), or None.
    cluster_labels : (grouping term, labels of the top-level groups in code order),
        used to name a cluster in error messages; or None.
    scale : as above; given, it replaces the median's (a model standing in for another
        takes the other's, so its steps and probes are the same).
    problem : the engine's :class:`~mlmeta._core._engine.Problem` (objective,
        optimiser and workspaces), built once here.

    The model is not changed after construction. It pickles without its problem (C
    workspaces), which is rebuilt from the design and structures on first use.
    """

    def __init__(self, design: NestedDesign, structs: list[CovStruct], method: str = "reml",
                 residual: str = "known", fe_constraints=None, cluster_labels=None,
                 scale: float | None = None):
        method = str(method).lower()
        if residual not in ("known", "profiled"):
            raise ValueError("residual must be 'known' (sampling variances) or 'profiled'")
        if residual == "profiled" and design.variance is not None:
            raise ValueError("a profiled residual variance needs a design without sampling variances")
        self.residual = residual
        if method not in ("reml", "ml"):
            raise ValueError(f"method must be 'reml' or 'ml', got {method!r}")
        if len(structs) != design.n_levels:
            raise ValueError("one covariance structure is needed per level")
        for s, q in zip(structs, design.q):
            if s.q != q:
                raise ValueError(f"structure {s!r} has {s.q} effects but the level has {q}")
        self.design = design
        self.structs = list(structs)
        self.method = method
        self.fe_constraints = fe_constraints
        self.cluster_labels = cluster_labels
        sizes = [s.n_theta for s in structs]
        offs = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        self.theta_slices = [slice(offs[i], offs[i + 1]) for i in range(len(sizes))]
        self.n_theta = int(offs[-1])
        self.lower = np.concatenate([s.lower for s in structs]) if structs else np.zeros(0)
        self.upper = np.concatenate([s.upper for s in structs]) if structs else np.zeros(0)
        if scale is not None:
            self.scale = float(scale)
        else:
            self.scale = float(np.sqrt(_median(design.variance))) if design.variance is not None else 1.0
        self.problem = self._problem()
        self._last = None        # the last evaluation of the design's own outcome (evaluate)

    def _fold_level(self):
        """The deepest level when it can be folded into the diagonal (:mod:`mlmeta._core._fold`):
        one effect, one row per group, a diagonal whitening, no crossed terms, a linear
        structure and fewer than :data:`FOLD_MAX_NCOL` columns in [X, y]; else None."""
        d = self.design
        L = d.n_levels - 1
        if (d.crossed or d.Lambda is not None or L < 1 or d.q[L] != 1 or d.n_groups[L] != d.n_obs
                or self.structs[L].kind in ("custom", "spatial") or d.n_fe + 1 >= FOLD_MAX_NCOL):
            return None
        return L

    def _problem(self) -> Problem:
        L = self._fold_level()
        return self._tree_problem() if L is None else self._folded_problem(L)

    def _folded_problem(self, L) -> Problem:
        """The problem with the deepest level ``L`` folded into the diagonal: the kernel
        keeps the nodes of the levels above (cross-products rebuilt per evaluation)."""
        d = self.design
        q = np.asarray(d.q, dtype=np.intp)
        up = d.upper          # a design that folds keeps the node index of the levels above
        lv, parent, nq, cluster_ptr = up["level"], up["parent"], up["nq"], up["cluster_ptr"]
        anc_sum = np.concatenate([[0], np.cumsum(q)])
        ncol = d.n_fe + 1
        zz_ptr = np.concatenate([[0], np.cumsum(nq * (anc_sum[lv] + nq))]).astype(np.intp)
        za_ptr = np.concatenate([[0], np.cumsum(nq * ncol)]).astype(np.intp)
        kernel = NestedKernel(q, lv, parent, zz_ptr, za_ptr, cluster_ptr, np.zeros(zz_ptr[-1]),
                              np.zeros(za_ptr[-1]), np.zeros((ncol, ncol)))
        node_r0 = np.zeros(kernel.n_nodes, dtype=np.intp)
        node_r1 = np.zeros(kernel.n_nodes, dtype=np.intp)
        for lvl in range(L):
            nodes = up["node_of_group"][lvl]
            node_r0[nodes] = d.group_start[lvl][:-1]
            node_r1[nodes] = d.group_start[lvl][1:]
        return Problem(kernel, [s.engine_spec() for s in self.structs], self.lower, self.upper,
                       np.asarray(d.n_groups, dtype=float), d.n_obs, self.method == "reml",
                       self.residual == "profiled", float(d.logdet_Lambda),
                       float(d.logdet_XtX_work), self.scale, Zw=d.Zw,
                       Xw=d.Xw, node_rows=(node_r0, node_r1), fold=dict(level=L, yw=d.yw))

    def _tree_problem(self) -> Problem:
        """The problem on the design's own kernel (every level's nodes)."""
        d = self.design
        K = d.kernel
        new = {}
        spatial = {lvl: s.engine_spec()["spatial"] for lvl, s in enumerate(self.structs)
                   if s.kind == "spatial"}
        if any(lvl < d.n_tree for lvl in spatial):
            raise ValueError("a spatial structure correlates the groups of a term: the term must be "
                             "crossed with the nested terms (kept out of the design's tree)")
        if d.crossed:
            new = dict(border={**d.border, "spatial": spatial})
        elif d.Lambda is None:     # a diagonal whitening: new outcomes can be whitened alike
            node_r0 = np.zeros(K.n_nodes, dtype=np.intp)
            node_r1 = np.zeros(K.n_nodes, dtype=np.intp)
            for lvl in range(d.n_levels):
                node_r0[d.node_of_group[lvl]] = d.group_start[lvl][:-1]
                node_r1[d.node_of_group[lvl]] = d.group_start[lvl][1:]
            new = dict(Zw=d.Zw, Xw=d.Xw, node_rows=(node_r0, node_r1))
        return Problem(K, [s.engine_spec() for s in self.structs], self.lower, self.upper,
                       np.asarray(d.n_groups, dtype=float), d.n_obs, self.method == "reml",
                       self.residual == "profiled", float(d.logdet_Lambda), float(d.logdet_XtX_work),
                       self.scale, **new)

    #: after unpickling, the problem is built again on first use
    problem = cached_property(_problem)

    @cached_property
    def tree_problem(self) -> Problem:
        """The problem with a node per group of every level (the per-node solutions of
        :meth:`random_effects`): ``problem`` itself unless a level is folded."""
        return self.problem if self._fold_level() is None else self._tree_problem()

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("problem", None)
        state.pop("tree_problem", None)
        state["_last"] = None
        return state

    # -- theta <-> per-level quantities ---------------------------------------
    def T_list(self, theta):
        return [s.T(theta[sl]) for s, sl in zip(self.structs, self.theta_slices)]

    def Sigma_list(self, theta):
        return [s.Sigma(theta[sl]) for s, sl in zip(self.structs, self.theta_slices)]

    def theta_from_Sigmas(self, Sigmas):
        return np.concatenate([s.from_Sigma(S) for s, S in zip(self.structs, Sigmas)])

    @property
    def n_obs(self):
        return self.design.n_obs

    @property
    def n_fe(self):
        return self.design.n_fe

    # -- evaluation -----------------------------------------------------------
    def evaluate(self, theta, gradient=False, em=False, sigma2=None, y=None) -> Evaluation:
        """Deviance (-2 log-likelihood) at theta; optionally its gradient and EM moments.
        ``sigma2``: for a profiled-residual model, the deviance at that residual variance
        (not profiled over it). ``y``: another outcome, whitened and in the design's row
        order (``problem.new_outcomes`` models; beta is then in the kernel's basis, not
        shifted by the design's b0). Raises FloatingPointError where it is not defined.

        The last evaluation of the design's own outcome is kept: asked again at the same
        theta (with no more than it computed), it is returned (a copy) without another
        pass (a fit's estimates are evaluated by the results, the variance components,
        the accuracy checks and the stationarity check alike)."""
        theta = np.array(theta, dtype=np.float64)
        key = theta.tobytes() if sigma2 is None and y is None else None
        last = self._last
        if (key is not None and last is not None and last[0] == key and (last[1] or not gradient)
                and (last[2] or not em)):
            return last[3].copy()
        with blas_threads(border_blas_threads(self.problem.nb)):
            out = self.problem.evaluate(theta, gradient=gradient, em=em, sigma2=sigma2, y=y,
                                        n_threads=self.eval_threads())
            if not np.isfinite(out["deviance"]):
                raise FloatingPointError(self.failure_message(out["status"]))
            d = self.design
            # the kernel works in the design's basis (Xw B, yw - Xw b0): map back
            beta = d.B @ out["beta"] + (d.b0 if y is None else 0.0)
            Hinv = d.B @ out["Hinv"] @ d.B.T
        cov_beta = out["sigma2"] * Hinv if self.residual == "profiled" else Hinv
        ev = Evaluation(theta=theta, deviance=float(out["deviance"]),
                        beta=beta, cov_beta=cov_beta, rss=out["rss"],
                        logdet_C=out["logdet_C"], logdet_H=out["logdet_H"], Hinv=Hinv,
                        sigma2=float(out["sigma2"]), grad=out.get("grad"), E=out.get("E"),
                        beta_work=out["beta"], Hinv_work=out["Hinv"])
        if key is not None:
            self._last = (key, gradient, em, ev.copy())
        return ev

    def eval_threads(self) -> int:
        """Threads for the evaluations of one run or one evaluation (a large two-level fold
        splits each in two halves): the extra starts' (:func:`mlmeta._threads.start_threads`),
        one with a crossed border (its dense algebra takes the cores through BLAS)."""
        return start_threads(self.n_obs) if self.problem.nb == 0 else 1

    def failure_message(self, status) -> str:
        """What an engine status code means, naming the top-level cluster and level of a
        failed factorisation."""
        status = int(status)
        if status > 0:
            node = status - 1
            L = self._fold_level()
            # a node of the folded problem's tree is numbered over the levels above L
            if L is not None:
                cluster_ptr, level = self.design.upper["cluster_ptr"], self.design.upper["level"]
            else:
                cluster_ptr, level = self.design.kernel.cluster_ptr, self.design.kernel.level
            cluster = int(np.searchsorted(cluster_ptr, node, side="right") - 1)
            lvl = int(level[node])
            label = self.cluster_label(cluster)
            return (f"the random-effects factorisation failed in top-level cluster {label} "
                    f"(level {lvl + 1}): a block is not positive definite or not finite")
        return {-1: "X'V^-1X is not positive definite (collinear moderators?)",
                -2: "a custom structure's correlation matrix is not positive definite",
                -3: "the residual variance is zero (the model fits exactly)",
                -4: "theta is not finite"}.get(status, f"the objective failed (status {status})")

    def cluster_label(self, j: int) -> str:
        """The j-th top-level cluster (design order) as ``term = label``, or ``#j``."""
        if self.cluster_labels is not None:
            name, labels = self.cluster_labels
            if j < len(labels):
                return f"{name} = {labels[j]!r}"
        return f"#{j + 1}"

    @property
    def ll_label(self) -> str:
        """How Stata labels the objective: "Log restricted-likelihood" or "Log likelihood"."""
        return "Log restricted-likelihood" if self.method == "reml" else "Log likelihood"

    def deviance(self, theta):
        return self.evaluate(theta).deviance

    def gradient(self, theta):
        return self.evaluate(theta, gradient=True).grad

    def loglik(self, theta):
        return -0.5 * self.deviance(theta)

    def random_effects(self, theta):
        """Conditional modes (BLUPs) of the random effects and their prediction-error
        covariances, per level, in the design's group order.

        With ``W_a = C^-1 T' Z~_a' A`` and ``gamma = (-beta, 1)``:

            u_a   = T_l W_a gamma                                   (E[u_a | y] at beta-hat)
            PEV_a = T_l (Sig_aa + W_aX H^-1 W_aX') T_l'             (Var(u_a - u_a-hat))

        ``Sig_aa`` is the (a, a) block of C^-1 and ``W_aX`` the first p columns of
        W_a; the second term carries the uncertainty of beta-hat (as metafor's ranef).
        Returns a list of (u: (G_l, q_l), pev: (G_l, q_l, q_l)).

        With crossed levels (the border, :mod:`mlmeta._core._border`) the same formulas
        hold with the full solution: for a crossed group ``W_g`` and ``Sig_gg`` come from
        the border (``W_c = C_c^-1 R``, ``Sig_c = C_c^-1``); a tree node's tree-only
        solution is corrected by its columns ``W_ac`` for the crossed effects,
        ``W_a <- W_aA - W_ac T_c W_c`` and ``Sig_aa <- Sig_aa + W_ac T_c Sig_c T_c' W_ac'``.
        """
        theta = np.asarray(theta, dtype=np.float64)
        ev = self.evaluate(theta)
        d = self.design
        K = d.kernel
        with blas_threads(1):
            WW, SB = self.tree_problem.node_solution(theta)
        p = d.n_fe
        nc = p + 1
        gamma = np.append(-ev.beta_work, 1.0)
        Ts = self.T_list(theta)
        m_local = np.zeros(d.n_clusters, dtype=np.intp)
        # levels correlated across their groups (known R, spatial R(rho)): block t F, F F' = R
        known = self.problem.border_factors(theta) if d.crossed else {}
        if d.crossed:
            with blas_threads(1):
                Wb, Lb = self.problem.border_solution(theta)
            nb = Wb.shape[0]
            Sig_b = linalg.cho_solve((Lb, True), np.eye(nb))
            Tc = sparse.block_diag([Ts[lvl][0, 0] * known[lvl] if lvl in known else
                                    sparse.kron(sparse.identity(d.n_groups[lvl]), Ts[lvl])
                                    for lvl in range(d.n_tree, d.n_levels)], format="csr")
            TcWc = Tc @ Wb
            TcSTc = Tc @ (Tc @ Sig_b).T
            cmap_ptr, bmap = d.border["cmap_ptr"], d.border["bmap"]
            m_local = np.diff(cmap_ptr) - nc
        out = []
        for lvl, T in enumerate(Ts):
            q = T.shape[0]
            r = np.arange(q)
            if lvl in known:          # t L_R across the groups: u = t L_R v, PEV = t^2 L_R Var L_R'
                o = d.border["b_off"][lvl]
                blk = slice(o, o + d.n_groups[lvl])
                WX = Wb[blk, :p]
                inner = Sig_b[blk, blk] + WX @ ev.Hinv_work @ WX.T
                LR = T[0, 0] * known[lvl]
                u = (LR @ (Wb[blk] @ gamma))[:, None]
                pev = ev.sigma2 * np.einsum("gi,ij,gj->g", LR, inner, LR)[:, None, None]
                out.append((u, pev))
                continue
            if lvl >= d.n_tree:       # a crossed level: the border's rows
                o = d.border["b_off"][lvl] + np.arange(d.n_groups[lvl]) * q
                W = Wb[o[:, None] + r[None, :]]                                    # (G, q, ncol)
                Sig = Sig_b[(o[:, None] + r[None, :])[:, :, None], (o[:, None] + r[None, :])[:, None, :]]
            else:
                nodes = d.node_of_group[lvl]
                o = d.offset_of_group[lvl]
                na = K.nq[nodes]
                cl = np.searchsorted(K.cluster_ptr, nodes, side="right") - 1
                m = m_local[cl]
                # W_a rows o..o+q, the ncol columns of A (after the cluster's m crossed columns;
                # node blocks are column-major nq_a x width)
                rows = K.za_ptr[nodes][:, None, None] + (o[:, None, None] + r[None, :, None])
                idx = rows + (m[:, None, None] + np.arange(nc)[None, None, :]) * na[:, None, None]
                W = WW[idx]                                                      # (G, q, ncol)
                base = K.zz_ptr[nodes] + K.diag_offset(nodes)
                idx = (base[:, None, None] + (o[:, None, None] + r[None, :, None])
                       + (o[:, None, None] + r[None, None, :]) * na[:, None, None])
                Sig = SB[idx]                                                    # (G, q, q)
                if d.crossed:
                    for g in np.flatnonzero(m):
                        cols = bmap[cmap_ptr[cl[g]]:cmap_ptr[cl[g]] + m[g]]
                        Wac = WW[rows[g, :, 0][:, None] + np.arange(m[g])[None, :] * na[g]]
                        W[g] -= Wac @ TcWc[cols]
                        Sig[g] += Wac @ TcSTc[np.ix_(cols, cols)] @ Wac.T
            u = np.einsum("ij,gjk,k->gi", T, W, gamma)
            WX = W[:, :, :p]
            inner = Sig + np.einsum("gip,pr,gjr->gij", WX, ev.Hinv_work, WX)
            pev = ev.sigma2 * np.einsum("ij,gjk,lk->gil", T, inner, T)
            out.append((u, pev))
        return out

    def marginal_blocks(self, theta):
        """Yield (start, stop, V_j) per top-level cluster j (rows start:stop of the
        sorted design), with the dense marginal covariance

            V_j = Lambda_j + sum_l Z_lj (I (x) Sigma_l) Z_lj'

        (times sigma^2, with Lambda_j = I, when the residual variance is profiled).

        For per-cluster postestimation (robust variances, diagnostics); O(n_j^2) each.
        Raises ValueError when crossed levels couple the clusters (V is then not
        block-diagonal by top-level cluster)."""
        d = self.design
        if d.crossed:
            raise ValueError(
                "this needs the marginal covariance block-diagonal by top-level cluster, but "
                "crossed random effects couple the clusters: it is not available for crossed "
                "designs yet")
        Sigmas = self.Sigma_list(theta)
        starts = d.group_start[0]
        lam = d.variance if d.variance is not None else np.ones(d.n_obs)
        scale = self.evaluate(theta).sigma2 if self.residual == "profiled" else 1.0
        for j in range(d.n_clusters):
            a, b = int(starts[j]), int(starts[j + 1])
            if d.Lambda is not None:
                V = d.Lambda[a:b, a:b].toarray()
            else:
                V = np.diag(lam[a:b]).astype(float)
            for Z, g, S in zip(d.Z, d.groups, Sigmas):
                Zj = Z[a:b]
                same = g[a:b][:, None] == g[a:b][None, :]
                V += (Zj @ S @ Zj.T) * same
            yield a, b, scale * V

    def em_step(self, theta):
        """One EM update, Sigma_l <- T_l (E_l / N_l) T_l' projected on each structure:
        (theta', deviance at theta)."""
        return self.problem.em_step(np.asarray(theta, dtype=np.float64))
