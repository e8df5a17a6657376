"""Nested design: rows sorted by cluster, the tree of random-effect nodes, and the
theta-independent cross-products the kernel needs.

For rows sorted lexicographically by their group codes (outermost level first),
every group at every level occupies a contiguous run of rows. With whitened
pieces ``Z~_l = Lambda^{-1/2} Z_l`` and ``A = Lambda^{-1/2} [X, y]`` the kernel
needs, for each node ``a`` (a group at level ``l``) and each ancestor-or-self
``c_k`` (its group at level ``k <= l``), the sums over the rows of ``a``:

    ZZ_{a,k} = sum_i z~_i^(l) z~_i^(k)'     (q_l x q_k)
    ZA_a     = sum_i z~_i^(l) a_i'          (q_l x (p+1))

Everything here is vectorised: building a design costs O(n q^2 L^2).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mlmeta._core._nested import NestedKernel

__all__ = ["NestedDesign", "build_design"]


@dataclass
class NestedDesign:
    """Rows sorted into top-level clusters plus the kernel's precomputed blocks.

    Attributes
    ----------
    perm : (n_obs,) rows of the model frame in sorted order (``y_sorted = y[perm]``).
    y, X, Z : sorted, unwhitened response, fixed design and per-level random designs.
    variance : (n_obs,) known sampling variances (sorted), or None when Lambda = I.
    weights : (n_obs,) ``1 / sqrt(variance)`` (the whitening), ones when Lambda = I.
    groups : per level, (n_obs,) contiguous group codes in sorted order.
    n_groups : per level, number of groups.
    group_start : per level, first row of each group (sorted order), plus n_obs.
    node_of_group : per level, global node index of each group.
    offset_of_group : per level, where the group's effects start inside its node
        (0 except inside the dense node of a cluster with coupled sampling errors).
    kernel : the :class:`NestedKernel` holding ZZ, ZA, A'A and workspaces.
    logdet_Lambda : log|Lambda|.
    logdet_XtX : log|X'X| (unweighted), used by the REML constant.
    """

    perm: np.ndarray
    y: np.ndarray
    X: np.ndarray
    Z: list
    variance: np.ndarray | None
    weights: np.ndarray
    groups: list
    n_groups: list
    group_start: list
    node_of_group: list
    kernel: NestedKernel
    logdet_Lambda: float
    logdet_XtX: float
    q: list = field(default_factory=list)
    offset_of_group: list = field(default_factory=list)

    @property
    def n_obs(self) -> int:
        return self.y.shape[0]

    @property
    def n_fe(self) -> int:
        return self.X.shape[1]

    @property
    def n_levels(self) -> int:
        return len(self.Z)

    @property
    def n_clusters(self) -> int:
        return self.n_groups[0]


def _contiguous_codes(codes_sorted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Renumber sorted-run codes 0..G-1 in order of appearance; return (codes, starts)."""
    n = codes_sorted.shape[0]
    change = np.empty(n, dtype=bool)
    change[0] = True
    np.not_equal(codes_sorted[1:], codes_sorted[:-1], out=change[1:])
    new = np.cumsum(change) - 1
    starts = np.flatnonzero(change)
    return new.astype(np.intp), np.append(starts, n).astype(np.intp)


def _group_sums(P: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Sum the rows of P (n, ...) over the contiguous runs that begin at ``starts[:-1]``."""
    if P.shape[0] == 0:
        return np.zeros((len(starts) - 1,) + P.shape[1:])
    return np.add.reduceat(P, starts[:-1], axis=0)


def build_design(y, X, Z, groups, variance=None) -> NestedDesign:
    """Sort rows by cluster and precompute the nested kernel's blocks.

    Parameters
    ----------
    y : (n,) response; X : (n, p) fixed design; Z : list of (n, q_l) per level.
    groups : list of (n,) integer codes per level, outermost first; level l's
        groups must be nested in level l-1's (validated by the model frame).
    variance : (n,) known sampling variances, or None for Lambda = I.
    """
    y = np.asarray(y, dtype=np.float64)
    X = np.asarray(X, dtype=np.float64)
    n = y.shape[0]
    L = len(Z)
    if L != len(groups):
        raise ValueError("one group code array is needed per random-effects level")
    keys = [np.asarray(g) for g in groups]
    perm = np.lexsort(keys[::-1]) if L else np.arange(n)
    y_s = y[perm]
    X_s = np.asfortranarray(X[perm])
    Z_s = [np.asfortranarray(np.asarray(z, dtype=np.float64)[perm]) for z in Z]
    if variance is None:
        var_s = None
        w = np.ones(n)
        logdet_Lambda = 0.0
    else:
        var_s = np.asarray(variance, dtype=np.float64)[perm]
        w = 1.0 / np.sqrt(var_s)
        logdet_Lambda = float(np.sum(np.log(var_s)))
    q = [z.shape[1] for z in Z_s]

    # contiguous group codes in sorted order; a level's run must not straddle a parent's
    codes, starts = [], []
    for lvl in range(L):
        combo = np.column_stack([k[perm] for k in keys[: lvl + 1]])
        change = np.any(combo[1:] != combo[:-1], axis=1) if n > 1 else np.zeros(0, dtype=bool)
        flag = np.concatenate([[True], change])
        c = np.cumsum(flag) - 1
        codes.append(c.astype(np.intp))
        starts.append(np.append(np.flatnonzero(flag), n).astype(np.intp))
    n_groups = [len(s) - 1 for s in starts]

    # node numbering: cluster-major, deepest level first inside a cluster
    top_of_row = codes[0]
    node_cluster, node_level, node_code = [], [], []
    for lvl in range(L):
        first_rows = starts[lvl][:-1]
        node_cluster.append(top_of_row[first_rows])
        node_level.append(np.full(n_groups[lvl], lvl, dtype=np.intp))
        node_code.append(np.arange(n_groups[lvl], dtype=np.intp))
    cl = np.concatenate(node_cluster)
    lv = np.concatenate(node_level)
    cd = np.concatenate(node_code)
    order = np.lexsort((cd, -lv, cl))
    n_nodes = order.shape[0]
    node_index = np.empty(n_nodes, dtype=np.intp)
    node_index[order] = np.arange(n_nodes)
    level_offset = np.concatenate([[0], np.cumsum(n_groups)])
    node_of_group = [node_index[level_offset[lvl]: level_offset[lvl + 1]] for lvl in range(L)]
    level = lv[order]
    parent = np.full(n_nodes, -1, dtype=np.intp)
    for lvl in range(1, L):
        parent_code = codes[lvl - 1][starts[lvl][:-1]]
        parent[node_of_group[lvl]] = node_of_group[lvl - 1][parent_code]
    cluster_of_node = cl[order]
    cluster_ptr = np.searchsorted(cluster_of_node, np.arange(n_groups[0] + 1)).astype(np.intp)

    # block sizes and pointers
    zz_size_level = [sum(q[lvl] * q[k] for k in range(lvl + 1)) for lvl in range(L)]
    zz_size = np.asarray(zz_size_level, dtype=np.intp)[level]
    za_size = np.asarray(q, dtype=np.intp)[level] * (X.shape[1] + 1)
    zz_ptr = np.concatenate([[0], np.cumsum(zz_size)]).astype(np.intp)
    za_ptr = np.concatenate([[0], np.cumsum(za_size)]).astype(np.intp)
    ZZ = np.empty(zz_ptr[-1])
    ZA = np.empty(za_ptr[-1])

    Zw = [z * w[:, None] for z in Z_s]
    A = np.column_stack([X_s * w[:, None], y_s * w])
    for lvl in range(L):
        nodes = node_of_group[lvl]
        blocks = []
        for k in range(lvl + 1):
            P = Zw[lvl][:, :, None] * Zw[k][:, None, :]
            B = _group_sums(P, starts[lvl])                    # (G, q_l, q_k)
            blocks.append(B.transpose(0, 2, 1).reshape(n_groups[lvl], -1))   # column-major
        packed = np.concatenate(blocks, axis=1)
        idx = zz_ptr[nodes][:, None] + np.arange(packed.shape[1])[None, :]
        ZZ[idx] = packed
        P = Zw[lvl][:, :, None] * A[:, None, :]
        B = _group_sums(P, starts[lvl]).transpose(0, 2, 1).reshape(n_groups[lvl], -1)
        idx = za_ptr[nodes][:, None] + np.arange(B.shape[1])[None, :]
        ZA[idx] = B
    AA = A.T @ A
    kernel = NestedKernel(np.asarray(q, dtype=np.intp), level, parent, zz_ptr, za_ptr,
                          cluster_ptr, ZZ, ZA, AA)
    sign, logdet_XtX = np.linalg.slogdet(X_s.T @ X_s) if X.shape[1] else (1.0, 0.0)
    return NestedDesign(perm=perm, y=y_s, X=X_s, Z=Z_s, variance=var_s, weights=w,
                        groups=codes, n_groups=n_groups, group_start=starts,
                        node_of_group=node_of_group, kernel=kernel,
                        logdet_Lambda=logdet_Lambda, logdet_XtX=float(logdet_XtX), q=q,
                        offset_of_group=[np.zeros(g, dtype=np.intp) for g in n_groups])
