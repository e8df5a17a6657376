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

import dataclasses
from dataclasses import dataclass, field

import numpy as np
from scipy import linalg, sparse

from mlmeta._core._nested import NestedKernel
from mlmeta._core._whiten import block_factors, merged_products, solve_blocks
from mlmeta.gram import is_tall, well_conditioned_gram

__all__ = ["NestedDesign", "build_design", "with_Z"]


#: from this many rows on, the start's least squares take one pass over the orthonormal Xw
#: (:meth:`NestedDesign.start_coefficients`; an SVD-based solve costs 34 ms at 10^6 rows)
LSTSQ_SVD_ROWS = 4096


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
    kernel : the :class:`NestedKernel` holding ZZ, ZA, A'A and workspaces. When the
        deepest level has one row and one effect per group (and the whitening is diagonal,
        no crossed terms), it and ``node_of_group`` / ``offset_of_group`` are built on
        first use: a model that folds that level into the diagonal never needs them.
    upper : then, the node index of the levels above the deepest (``level``, ``parent``,
        ``nq``, ``cluster_ptr``, ``node_of_group``; the order of the full tree's nodes of
        those levels); None otherwise.
    logdet_Lambda : log|Lambda|.
    logdet_XtX : log|X'X| (unweighted), used by the REML constant.
    Lambda : the known sampling covariance (scipy.sparse, sorted rows) when one was
        given instead of variances; None otherwise.
    Xw, yw : the whitened fixed design and response in the working basis the kernel
        uses: Xw = Lambda^-1/2 X B (orthonormal columns) and yw = Lambda^-1/2 (y - X b0).
    orthonormal : whether Xw's columns are orthonormal (B from a well-conditioned QR; else
        B = I, b0 = 0).
    B, b0 : the working basis: the coefficients of X are beta = B beta~ + b0 where
        beta~ are those of (Xw, yw) (for another outcome, not shifted by X b0: B beta~).
    logdet_XtX_work : log|B' X'X B|, the REML constant in the working basis.
    n_tree : the levels of the nested tree (the first ``n_tree`` terms, outermost first);
        the levels after them are crossed with the tree (their ``groups`` are codes in
        label order, their ``group_start`` and ``node_of_group`` are None).
    border : for crossed levels, the engine's border pieces (see
        :class:`mlmeta._core._engine.Problem`): ``n_tree``, ``b_off``, ``cmap_ptr``,
        ``bmap``, ``S0``; None for a nested design.
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
    _node_of_group: list | None
    _kernel: NestedKernel | None
    logdet_Lambda: float
    logdet_XtX: float
    q: list = field(default_factory=list)
    _offset_of_group: list | None = None
    Lambda: object = None
    Xw: np.ndarray | None = None
    yw: np.ndarray | None = None
    B: np.ndarray | None = None
    b0: np.ndarray | None = None
    logdet_XtX_work: float = 0.0
    n_tree: int = 0
    border: dict | None = None
    upper: dict | None = None
    orthonormal: bool = False
    _lazy: tuple | None = None
    _tree_args: dict | None = field(default=None, repr=False)
    # start_coefficients' result (not an init field: a replaced design computes its own)
    _start_beta: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    def _build_tree(self):
        if self._kernel is None and self._lazy is not None:
            fn, kw = self._lazy
            self._kernel, self._node_of_group, self._offset_of_group, _ = fn(**kw)
            self._lazy = None

    @property
    def kernel(self) -> NestedKernel:
        self._build_tree()
        return self._kernel

    @property
    def node_of_group(self) -> list:
        self._build_tree()
        return self._node_of_group

    @property
    def offset_of_group(self) -> list:
        self._build_tree()
        return self._offset_of_group

    @property
    def Zw(self) -> list:
        """Per level, the whitened random design Lambda^-1/2 Z_l (the one the kernel's
        blocks were built from; for a coupled Lambda, whitened block by block)."""
        if self._tree_args is not None:
            return self._tree_args["Zw"]
        return [z * self.weights[:, None] for z in self.Z]

    def start_coefficients(self) -> np.ndarray:
        """The least-squares coefficients of the design's own outcome behind the moment
        start and the natural sizes of the parameters: an SVD-based solve (NumPy's lstsq)
        below :data:`LSTSQ_SVD_ROWS` rows, :meth:`least_squares` (one pass over an
        orthonormal Xw) from there on. The two differ in the last digits, and a fit whose
        optimum depends on those starts from the digits it always started from: with
        Xw'yw everywhere, two of the random designs of ``tools/fuzz.py`` ended at lower
        optima. Computed once per design (the moment start and the natural sizes both
        use it); a copy is returned."""
        if self._start_beta is None:
            if self.n_obs >= LSTSQ_SVD_ROWS:
                self._start_beta = self.least_squares()
            else:
                self._start_beta = np.linalg.lstsq(self.Xw, self.yw, rcond=None)[0]
        return self._start_beta.copy()

    def least_squares(self, yw=None) -> np.ndarray:
        """The least-squares coefficients of the whitened outcome ``yw`` (the design's own
        by default) on Xw, in the working basis: Xw'yw when Xw has orthonormal columns."""
        yw = self.yw if yw is None else yw
        if self.orthonormal:
            return self.Xw.T @ yw
        return np.linalg.lstsq(self.Xw, yw, rcond=None)[0]

    @property
    def tree_built(self) -> bool:
        """Whether the kernel's blocks of every tree level exist (else they are built on
        first use of ``kernel``, ``node_of_group`` or ``offset_of_group``)."""
        return self._kernel is not None

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

    @property
    def crossed(self) -> bool:
        """Whether some levels are crossed with the nested tree."""
        return self.border is not None

    def group_sizes(self, lvl: int) -> np.ndarray:
        """Rows per group of level ``lvl`` (group code order)."""
        return np.bincount(self.groups[lvl], minlength=self.n_groups[lvl])


def _contiguous_codes(codes_sorted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Renumber sorted-run codes 0..G-1 in order of appearance; return (codes, starts)."""
    n = codes_sorted.shape[0]
    change = np.empty(n, dtype=bool)
    change[0] = True
    np.not_equal(codes_sorted[1:], codes_sorted[:-1], out=change[1:])
    new = np.cumsum(change) - 1
    starts = np.flatnonzero(change)
    return new.astype(np.intp), np.append(starts, n).astype(np.intp)


def _cross_sums(U: np.ndarray, W: np.ndarray, starts: np.ndarray, gsel: np.ndarray,
                buf: np.ndarray) -> np.ndarray:
    """For each selected run g of rows (``starts[g]:starts[g+1]``), the block
    U_g' W_g (q_U x q_W) flattened column-major: one row per group of ``gsel``.
    Column products go through the n-vector ``buf``, so no n x q_U x q_W temporary."""
    qu, qw = U.shape[1], W.shape[1]
    out = np.empty((gsel.size, qu * qw))
    if U.shape[0] == 0:
        out[:] = 0.0
        return out
    for j in range(qw):
        for i in range(qu):
            np.multiply(U[:, i], W[:, j], out=buf)
            out[:, i + j * qu] = np.add.reduceat(buf, starts[:-1])[gsel]
    return out


#: a sampling covariance block is numerically singular when a row's relative pivot
#: (its variance not explained by the rows before it, as a share of its variance) is
#: at most this: the whitening would then lose more than half of the digits
PIVOT_TOL = 1e-10


def _block_problem(B, code: int, row: int, pivot: float) -> str:
    """Why block B of V cannot whiten (:func:`mlmeta._core._whiten.block_factors`' verdict:
    code 1, its correlation matrix R = D^-1/2 B D^-1/2 has no Cholesky factor; code 2, the
    squared pivot of ``row``, ``1 - R^2`` of the row on the rows before it, is at most
    :data:`PIVOT_TOL`, a relative threshold: the same answer at any scale of B)."""
    singular = ("numerically singular (e.g. a correlation of 1 between two estimates, or an "
                "estimate entered twice)")
    if code == 2:
        return (f"{singular}: row {row + 1} of the block is a linear combination of the rows "
                f"before it up to a relative pivot of {pivot:.1e} (at most {PIVOT_TOL:g})")
    sd = np.sqrt(np.diag(B))
    w = np.linalg.eigvalsh(B / np.outer(sd, sd))
    if w[0] >= -B.shape[0] * PIVOT_TOL:
        return singular
    return f"not positive definite (its correlation matrix has eigenvalue {w[0]:.3g})"


class BlockFactors:
    """The Cholesky factors of V's whitened blocks, packed as :func:`block_factors`
    returns them; iterating gives (first row, last row + 1, L) per block."""

    def __init__(self):
        self._parts = []
        self._index = None

    def add(self, packed, ptr, starts, sel):
        self._parts.append((packed, ptr, starts, sel))
        self._index = None

    def packed_at(self, first_rows):
        """(packed factors, the offset of the block starting at each of ``first_rows``)."""
        if self._index is None:     # (first rows sorted, their offsets, all factors)
            rows = np.concatenate([starts[sel] for _, _, starts, sel in self._parts])
            base = np.cumsum([0] + [p.size for p, _, _, _ in self._parts])
            offs = np.concatenate([ptr[:-1] + b for (_, ptr, _, _), b in zip(self._parts, base)])
            order = np.argsort(rows, kind="stable")
            packed = (self._parts[0][0] if len(self._parts) == 1
                      else np.concatenate([p for p, _, _, _ in self._parts]))
            self._index = (rows[order], offs[order].astype(np.intp), packed)
        rows, offs, packed = self._index
        return packed, offs[np.searchsorted(rows, first_rows)]

    def of_block(self, a: int, b: int) -> np.ndarray:
        """L of the block of rows a:b."""
        packed, (o,) = self.packed_at([a])
        return packed[o:o + (b - a) ** 2].reshape(b - a, b - a, order="F")

    def __bool__(self):
        return any(sel.size for _, _, _, sel in self._parts)

    def __iter__(self):
        for packed, ptr, starts, sel in self._parts:
            for i, g in enumerate(sel):
                a, b = int(starts[g]), int(starts[g + 1])
                yield a, b, packed[ptr[i]:ptr[i + 1]].reshape(b - a, b - a, order="F")


def _whiten_blocks(Vs, starts, sel, mats, factors: BlockFactors):
    """Whiten rows ``starts[g]:starts[g+1]`` of each matrix in ``mats`` (F order, in place)
    by L^-1, L = chol(V block), for each block g in ``sel`` (compiled loops); returns the
    sum of log|V block| and (the failing block, why) or (-1, ""). The factors go to
    ``factors``."""
    sel = np.ascontiguousarray(sel, dtype=np.intp)
    starts = np.ascontiguousarray(starts, dtype=np.intp)
    packed, ptr, logdet, fail, code, row, pivot = block_factors(
        Vs.indptr.astype(np.int64, copy=False), Vs.indices.astype(np.int64, copy=False),
        np.asarray(Vs.data, dtype=np.float64), starts, sel, PIVOT_TOL)
    if fail >= 0:
        g = int(sel[fail])
        a, b = int(starts[g]), int(starts[g + 1])
        return logdet, (g, _block_problem(Vs[a:b, a:b].toarray(), code, row, pivot))
    for M in mats:
        solve_blocks(packed, ptr, starts, sel, M)
    factors.add(packed, ptr, starts, sel)
    return logdet, (-1, "")


def _centring(X) -> np.ndarray:
    """C with X C = the columns centred on X's constant column (if any) and scaled to
    unit SD; the constant column itself is kept."""
    p = X.shape[1]
    C = np.eye(p)
    mean = X.mean(axis=0)
    sd = X.std(axis=0)
    const = np.ptp(X, axis=0) == 0
    icol = next((j for j in range(p) if const[j] and mean[j] != 0), None)
    for j in range(p):
        if const[j] or not sd[j] > 0:
            continue
        C[j, j] = 1.0 / sd[j]
        if icol is not None:
            C[icol, j] = -(mean[j] / mean[icol]) / sd[j]
    return C


def _logdet_gram(X) -> float:
    """log|X'X| from the R factor of X (no squared condition number), or for a tall,
    well-conditioned X (:mod:`mlmeta.gram`) from the Cholesky factor of X'X."""
    if X.shape[1] == 0:
        return 0.0
    G = well_conditioned_gram(X) if is_tall(X) else None
    if G is not None:
        return 2.0 * float(np.sum(np.log(np.diag(np.linalg.cholesky(G)))))
    R = np.linalg.qr(X, mode="r")
    return 2.0 * float(np.sum(np.log(np.abs(np.diag(R)))))


def _border(Z_c, codes_c, q_c, whiten, A, top_of_row, n_clusters):
    """The crossed levels' border: their whitened columns as one sparse n x nb matrix
    (level by level, group by group; ``whiten`` is Lambda^-1/2 as a sparse operator, as
    a coupled block mixes rows of different crossed groups), each top-level cluster's
    border columns, and S0.

    Returns (Zc, b_off, cmap_ptr, bmap, local_pos, m): ``bmap[cmap_ptr[j]:cmap_ptr[j+1]]``
    lists cluster j's border columns (sorted) then ``nb + 0..ncol-1``; ``local_pos(j, c)``
    maps (cluster, border column) pairs to their local column."""
    n = A.shape[0]
    ncol = A.shape[1]
    G = [int(c.max()) + 1 for c in codes_c]
    b_off = np.concatenate([[0], np.cumsum([g * q for g, q in zip(G, q_c)])]).astype(np.intp)
    nb = int(b_off[-1])
    rows, cols, vals = [], [], []
    for Zl, cl, ql, o in zip(Z_c, codes_c, q_c, b_off):
        for i in range(ql):
            rows.append(np.arange(n))
            cols.append(o + cl * ql + i)
            vals.append(Zl[:, i])
    rows, cols, vals = np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)
    Zc = sparse.csc_matrix(whiten @ sparse.csr_matrix((vals, (rows, cols)), shape=(n, nb)))
    rows, cols = Zc.nonzero()
    # cluster j's border columns: the pattern of Cl' Zc (structural, zeros included)
    pattern = sparse.csr_matrix((np.ones(rows.shape[0]), (top_of_row[rows], cols)),
                                shape=(n_clusters, nb))
    pattern.sum_duplicates()
    pattern.sort_indices()
    m = np.diff(pattern.indptr)
    cmap_ptr = np.concatenate([[0], np.cumsum(m + ncol)]).astype(np.intp)
    bmap = np.empty(int(cmap_ptr[-1]), dtype=np.intp)
    pos_in_map = cmap_ptr[:-1][np.repeat(np.arange(n_clusters), m)] + (
        np.arange(pattern.indices.shape[0]) - np.repeat(pattern.indptr[:-1], m))
    bmap[pos_in_map] = pattern.indices
    tail = cmap_ptr[:-1][:, None] + m[:, None] + np.arange(ncol)[None, :]
    bmap[tail.ravel()] = (nb + np.tile(np.arange(ncol), n_clusters))
    key_sorted = np.repeat(np.arange(n_clusters), m).astype(np.int64) * nb + pattern.indices

    def local_pos(j, c):
        k = np.searchsorted(key_sorted, np.asarray(j, dtype=np.int64) * nb + c)
        return k - pattern.indptr[j]

    return Zc, b_off, cmap_ptr, bmap, local_pos, m


def _gram(Zc, A) -> np.ndarray:
    """S0 = [Zc, A]' [Zc, A] (dense, column-major)."""
    nb, ncol = Zc.shape[1], A.shape[1]
    ZcA = Zc.T @ A
    S0 = np.empty((nb + ncol, nb + ncol), order="F")
    S0[:nb, :nb] = (Zc.T @ Zc).toarray()
    S0[:nb, nb:] = ZcA
    S0[nb:, :nb] = ZcA.T
    S0[nb:, nb:] = A.T @ A
    return S0


def build_design(y, X, Z, groups, variance=None, V=None, n_tree=None, known_R=None,
                 cluster_labels=None) -> NestedDesign:
    """Sort rows by cluster and precompute the nested kernel's blocks.

    Parameters
    ----------
    y : (n,) response; X : (n, p) fixed design; Z : list of (n, q_l) per level.
    groups : list of (n,) integer codes per level, outermost first; level l's
        groups must be nested in level l-1's (validated by the model frame).
    variance : (n,) known sampling variances, or None for Lambda = I.
    V : known sampling covariance (scipy.sparse, n x n, rows as y), block-diagonal
        within top-level clusters; replaces ``variance``. Rows are whitened by the
        Cholesky factor of each block: within a deepest-level group when the block
        stays inside one, otherwise the cluster becomes one dense node.
    n_tree : the first ``n_tree`` levels form the nested tree; the others are crossed
        with it (any codes), fitted through the engine's border. Default: all levels.
    known_R : {level: R} known correlation matrices across the groups of crossed levels with
        one effect (metafor's ``R=``), rows and columns in the level's code order:
        Sigma of that level is sigma^2 R.
    cluster_labels : (grouping term, label of each top-level code) naming a cluster whose
        block of ``V`` is not positive definite or numerically singular (relative pivot
        at most :data:`PIVOT_TOL`): a ValueError says which.
    """
    y = np.asarray(y, dtype=np.float64)
    X = np.asarray(X, dtype=np.float64)
    n = y.shape[0]
    L_all = len(Z)
    if L_all != len(groups):
        raise ValueError("one group code array is needed per random-effects level")
    L = L_all if n_tree is None else int(n_tree)
    if not 1 <= L <= L_all:
        raise ValueError("n_tree must be between 1 and the number of levels")
    keys = [np.asarray(g) for g in groups[:L]]
    perm = np.lexsort(keys[::-1]) if L else np.arange(n)
    in_order = bool(np.all(perm[1:] > perm[:-1]))   # rows already sorted: no copies to take
    y_s = y if in_order else y[perm]
    X_s = np.asfortranarray(X if in_order else X[perm])
    Z_s = [np.asfortranarray(np.asarray(z, dtype=np.float64) if in_order
                             else np.asarray(z, dtype=np.float64)[perm]) for z in Z]
    q = [z.shape[1] for z in Z_s]

    # contiguous group codes in sorted order; a level's run must not straddle a parent's
    codes, starts = [], []
    change = np.zeros(max(n - 1, 0), dtype=bool)   # a code of this level or an outer one changes
    for lvl in range(L):
        k = keys[lvl] if in_order else keys[lvl][perm]
        change |= k[1:] != k[:-1]
        flag = np.concatenate([[True], change])
        c = np.cumsum(flag) - 1
        codes.append(c.astype(np.intp))
        starts.append(np.append(np.flatnonzero(flag), n).astype(np.intp))
    n_groups = [len(s) - 1 for s in starts]
    top_of_row = codes[0]

    # whitening: diagonal rows scaled; coupled blocks by their Cholesky factor
    Vs = None
    factors = BlockFactors()          # (a, b, L) of the coupled blocks
    merged = np.zeros(n_groups[0], dtype=bool)
    Zw = [z.copy(order="F") for z in Z_s]
    A = np.empty((n, X_s.shape[1] + 1), order="F")      # A = [Xw, yw] (whitened), one buffer
    A[:, :-1] = X_s
    A[:, -1] = y_s
    Xw, yw = A[:, :-1], A[:, -1]
    if V is not None:
        Vs = sparse.csr_matrix(V)[perm][:, perm].tocsr()
        var_s = np.asarray(Vs.diagonal(), dtype=float)
        coo = Vs.tocoo()
        off = (coo.row != coo.col) & (coo.data != 0)
        ri, ci = coo.row[off], coo.col[off]
        bad = top_of_row[ri] != top_of_row[ci]
        if bad.any():
            raise ValueError(f"V has covariances between different top-level clusters "
                             f"(e.g. sorted rows {int(ri[bad][0])} and {int(ci[bad][0])}); it must "
                             f"be block-diagonal within the outermost grouping")
        leaf = codes[-1]
        coupled_leaf = np.unique(leaf[ri[leaf[ri] == leaf[ci]]])
        merged[np.unique(top_of_row[ri[leaf[ri] != leaf[ci]]])] = True
        coupled_leaf = coupled_leaf[~merged[top_of_row[starts[-1][coupled_leaf]]]]
    elif variance is not None:
        var_s = np.asarray(variance, dtype=np.float64)
        var_s = var_s if in_order else var_s[perm]
    else:
        var_s = None
    if var_s is None:
        w = np.ones(n)
        logdet_Lambda = 0.0
    else:
        w = 1.0 / np.sqrt(var_s)
        plain = np.ones(n, dtype=bool)
        if Vs is not None:
            for g in coupled_leaf:
                plain[starts[-1][g]:starts[-1][g + 1]] = False
            for j in np.flatnonzero(merged):
                plain[starts[0][j]:starts[0][j + 1]] = False
        if Vs is None:   # every row is scaled
            for M in Zw + [A]:
                M *= w[:, None]
            logdet_Lambda = float(np.sum(np.log(var_s)))
        else:
            for M in Zw + [Xw]:
                M[plain] *= w[plain, None]
            yw[plain] *= w[plain]
            logdet_Lambda = float(np.sum(np.log(var_s[plain])))
        if Vs is not None:
            ld, (fail, why) = _whiten_blocks(Vs, starts[-1], coupled_leaf, Zw + [A], factors)
            bad_top = top_of_row[starts[-1][fail]] if fail >= 0 else -1
            if bad_top < 0:
                ld2, (bad_top, why) = _whiten_blocks(Vs, starts[0], np.flatnonzero(merged), Zw + [A],
                                                     factors)
                ld += ld2
            if bad_top >= 0:
                j = int(bad_top)
                k0 = keys[0][int(starts[0][j])] if in_order else keys[0][perm[int(starts[0][j])]]
                if cluster_labels is not None:
                    name, labels = cluster_labels
                    where = f"{name} = {labels[int(k0)]!r}"
                else:
                    where = f"#{j + 1}"
                raise ValueError(f"the sampling covariance V is not valid in top-level cluster {where} "
                                 f"({int(starts[0][j + 1] - starts[0][j])} rows): its block is {why}")
            logdet_Lambda += ld

    # a well-conditioned basis for the fixed part (shifted or scaled moderators and
    # outcomes lose no precision in the cross-products): Xw = Q R, the kernel sees
    # Xw B = Q (B = R^-1) and yw - Xw b0 (b0 = least squares); beta = B beta~ + b0
    p = X_s.shape[1]
    B_fe, b0_fe = np.eye(p), np.zeros(p)
    # first centre the columns on the constant one (an offset of 1e7 would leave the QR
    # below a relative accuracy of 1e-16 * 1e7 / sd), then orthonormalise;
    # log|X'X| = log|C'X'XC| - 2 log|det C|
    C = _centring(X_s) if p else np.eye(0)
    logdet_CXXC = _logdet_gram(X_s @ C) if p <= n else 0.0
    logdet_XtX = logdet_CXXC - 2.0 * float(np.linalg.slogdet(C)[1]) if p <= n else 0.0
    logdet_XtX_work = logdet_XtX
    orthonormal = False
    if 0 < p <= n:
        Xc = A[:, :p] @ C
        Qw, Rw = np.linalg.qr(Xc)
        dR = np.abs(np.diag(Rw))
        if dR.min() > 1e-12 * dR.max():
            B_fe = C @ linalg.solve_triangular(Rw, np.eye(p))
            qty = Qw.T @ A[:, -1]
            b0_fe = C @ linalg.solve_triangular(Rw, qty)
            A[:, -1] -= Qw @ qty
            A[:, :p] = Qw
            logdet_XtX_work = logdet_CXXC - 2.0 * float(np.sum(np.log(dR)))
            orthonormal = True

    tree = dict(q=q, L=L, L_all=L_all, n=n, starts=starts, codes=codes, top_of_row=top_of_row,
                merged=merged, n_groups=n_groups, Zw=Zw, A=A, Z_s=Z_s, w=w, var_s=var_s,
                factors=factors, groups=groups, in_order=in_order, perm=perm, known_R=known_R)
    kernel, node_of_group, offset_of_group, border, upper, lazy = _tree(tree, coupled=Vs is not None)
    return NestedDesign(perm=perm, y=y_s, X=X_s, Z=Z_s, variance=var_s, weights=w,
                        groups=codes, n_groups=n_groups, group_start=starts,
                        _node_of_group=node_of_group, _kernel=kernel,
                        logdet_Lambda=logdet_Lambda, logdet_XtX=float(logdet_XtX), q=q,
                        _offset_of_group=offset_of_group, Lambda=Vs, Xw=Xw, yw=yw, B=B_fe,
                        b0=b0_fe, logdet_XtX_work=logdet_XtX_work, n_tree=L, border=border,
                        upper=upper, orthonormal=orthonormal, _lazy=lazy, _tree_args=tree)


def _tree(tree: dict, coupled: bool):
    """(kernel, node_of_group, offset_of_group, border, upper, lazy) of the tree described
    by ``tree`` (:func:`_tree_blocks`' arguments): built at once, or, for a deepest level of
    one row and one effect per group under a diagonal whitening (no crossed levels), only
    the node index of the levels above (``upper``) with the rest deferred (``lazy``)."""
    L, q, n_groups = tree["L"], tree["q"], tree["n_groups"]
    if not coupled and L == tree["L_all"] and L >= 2 and q[L - 1] == 1 and n_groups[L - 1] == tree["n"]:
        idx = _node_index(L - 1, tree["starts"], tree["codes"], tree["top_of_row"], tree["merged"],
                          n_groups)
        upper = dict(level=idx["level"], parent=idx["parent"], cluster_ptr=idx["cluster_ptr"],
                     nq=np.asarray(q, dtype=np.intp)[idx["level"]],
                     node_of_group=idx["node_of_group"])
        return None, None, None, None, upper, (_tree_blocks, tree)
    return (*_tree_blocks(**tree), None, None)


def with_Z(d: NestedDesign, Z: list, known_R=None) -> NestedDesign:
    """The design ``d`` with each level's random design replaced by ``Z[l]`` (rows in
    ``d``'s sorted order, any number of columns): the sort, the whitening, the working
    basis of the fixed part and the group codes are kept, the kernel's blocks are built
    for the new Z. Equal to ``build_design`` of the sorted data with these Z. A design
    with a coupled sampling covariance (``Lambda``) is built again in full."""
    args = d._tree_args
    if d.Lambda is not None or args is None:
        return build_design(d.y, d.X, Z, d.groups, d.variance, V=d.Lambda, n_tree=d.n_tree,
                            known_R=known_R)
    L = args["L"]
    Z_s = [np.asfortranarray(np.asarray(z, dtype=np.float64)) for z in Z]
    tree = {**args, "q": [z.shape[1] for z in Z_s], "Z_s": Z_s,
            "Zw": [z * d.weights[:, None] for z in Z_s], "codes": list(d.groups[:L]),
            "n_groups": list(d.n_groups[:L]), "starts": list(d.group_start[:L]), "known_R": known_R}
    kernel, node_of_group, offset_of_group, border, upper, lazy = _tree(tree, coupled=False)
    return dataclasses.replace(d, Z=Z_s, q=tree["q"], groups=tree["codes"], n_groups=tree["n_groups"],
                               group_start=tree["starts"], _node_of_group=node_of_group,
                               _kernel=kernel, _offset_of_group=offset_of_group, border=border,
                               upper=upper, _lazy=lazy, _tree_args=tree)


def _node_index(L, starts, codes, top_of_row, merged, n_groups) -> dict:
    """The nodes of the first ``L`` tree levels: cluster-major, deepest level first inside
    a cluster (a merged cluster is one node). Returns level, parent, cluster_ptr (per
    node), node_of_group and offset_of_group (per level), and node_code, keep (the group
    codes behind each level's nodes; the groups outside merged clusters) and n_nodes."""
    keep = [~merged[top_of_row[starts[lvl][:-1]]] for lvl in range(L)]
    node_cluster, node_level, node_code = [], [], []
    for lvl in range(L):
        gsel = np.flatnonzero(keep[lvl] | (lvl == 0))
        node_cluster.append(top_of_row[starts[lvl][gsel]])
        node_level.append(np.full(gsel.size, lvl, dtype=np.intp))
        node_code.append(gsel.astype(np.intp))
    cl = np.concatenate(node_cluster)
    lv = np.concatenate(node_level)
    cd = np.concatenate(node_code)
    order = np.lexsort((cd, -lv, cl))
    n_nodes = order.shape[0]
    node_index = np.empty(n_nodes, dtype=np.intp)
    node_index[order] = np.arange(n_nodes)
    sizes = np.concatenate([[0], np.cumsum([len(c) for c in node_code])])
    node_of_group, offset_of_group = [], []
    for lvl in range(L):
        nog = np.full(n_groups[lvl], -1, dtype=np.intp)
        nog[node_code[lvl]] = node_index[sizes[lvl]:sizes[lvl + 1]]
        node_of_group.append(nog)
        offset_of_group.append(np.zeros(n_groups[lvl], dtype=np.intp))
    level = lv[order]
    parent = np.full(n_nodes, -1, dtype=np.intp)
    for lvl in range(1, L):
        gsel = node_code[lvl]
        parent_code = codes[lvl - 1][starts[lvl][gsel]]
        parent[node_of_group[lvl][gsel]] = node_of_group[lvl - 1][parent_code]
    cluster_of_node = cl[order]
    cluster_ptr = np.searchsorted(cluster_of_node, np.arange(n_groups[0] + 1)).astype(np.intp)

    return dict(level=level, parent=parent, cluster_ptr=cluster_ptr, node_of_group=node_of_group,
                offset_of_group=offset_of_group, node_code=node_code, keep=keep, n_nodes=n_nodes,
                cluster_of_node=cluster_of_node)


def _tree_blocks(*, q, L, L_all, n, starts, codes, top_of_row, merged, n_groups, Zw, A, Z_s, w,
                 var_s, factors, groups, in_order, perm, known_R):
    """The kernel of the tree (every node's ZZ and ZA blocks, A'A) and the border of the
    crossed levels: (kernel, node_of_group, offset_of_group, border). The crossed levels'
    codes, counts and (None) starts are appended to ``codes``, ``n_groups``, ``starts``."""
    idx = _node_index(L, starts, codes, top_of_row, merged, n_groups)
    level, parent, cluster_ptr = idx["level"], idx["parent"], idx["cluster_ptr"]
    node_of_group, offset_of_group = idx["node_of_group"], idx["offset_of_group"]
    node_code, keep, n_nodes = idx["node_code"], idx["keep"], idx["n_nodes"]
    cluster_of_node = idx["cluster_of_node"]
    # merged clusters: every group of the cluster is a sub-block of the top node
    nq = np.asarray(q, dtype=np.intp)[level].copy()
    sub_node = [np.arange(n_nodes, dtype=np.intp)]
    sub_level = [level.copy()]
    sub_off = [np.zeros(n_nodes, dtype=np.intp)]
    # a merged cluster's columns: level 0's, then each level's groups in order
    tops = np.flatnonzero(merged)
    top_node = node_of_group[0][tops]
    first, last = starts[0][tops], starts[0][tops + 1]
    # the column of each row's group, per level (rows of merged clusters only)
    colpos = np.zeros((n, L) if tops.size else (0, L), dtype=np.intp, order="F")
    pos = np.full(tops.size, q[0], dtype=np.intp)
    cl, lv, off = [], [], []
    rows = np.flatnonzero(merged[top_of_row]) if tops.size else np.zeros(0, dtype=np.intp)
    for lvl in range(1, L if tops.size else 1):
        g_lo = codes[lvl][first]
        count = codes[lvl][last - 1] - g_lo + 1
        c = np.repeat(np.arange(tops.size), count)
        k = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)
        g = g_lo[c] + k
        node_of_group[lvl][g] = top_node[c]
        offset_of_group[lvl][g] = pos[c] + k * q[lvl]
        cl.append(c)
        lv.append(np.full(c.size, lvl, dtype=level.dtype))
        off.append(offset_of_group[lvl][g])
        pos += count * q[lvl]
        colpos[rows, lvl] = offset_of_group[lvl][codes[lvl][rows]]
    nq[top_node] = pos
    if cl:      # sub-blocks in the order of the cluster, then the level, then the group
        cl, lv, off = (np.concatenate(v) for v in (cl, lv, off))
        order = np.lexsort((off, cl))
        sub_node.append(top_node[cl[order]])
        sub_level.append(lv[order])
        sub_off.append(off[order])

    # crossed levels: the border's columns and each cluster's local columns
    border = None
    ncol = A.shape[1]
    width = np.full(n_groups[0], ncol, dtype=np.intp)
    if L < L_all:
        codes_c = [np.unique(np.asarray(g) if in_order else np.asarray(g)[perm], return_inverse=True)[1]
                   .astype(np.intp) for g in groups[L:]]
        whiten = sparse.diags(w if var_s is not None else np.ones(n))
        if factors:
            whiten = whiten.tolil()
            for a, b, Lc in factors:
                whiten[a:b, a:b] = linalg.solve_triangular(Lc, np.eye(b - a), lower=True)
        Zc, b_off_c, cmap_ptr, bmap, local_pos, m_local = _border(Z_s[L:], codes_c, q[L:],
                                                                whiten.tocsr(), A, top_of_row,
                                                                n_groups[0])
        width = m_local + ncol
        codes += codes_c
        n_groups += [int(c.max()) + 1 for c in codes_c]
        starts += [None] * (L_all - L)
        node_of_group += [None] * (L_all - L)
        offset_of_group += [None] * (L_all - L)
        b_off = np.full(L_all, -1, dtype=np.intp)
        b_off[L:] = b_off_c[:-1]
        border = dict(n_tree=L, b_off=b_off, cmap_ptr=cmap_ptr, bmap=bmap, S0=None, known_R={})
        for lvl, R in (known_R or {}).items():
            R = np.asarray(R, dtype=float)
            if not L <= lvl < L_all or q[lvl] != 1 or R.shape != (n_groups[lvl],) * 2:
                raise ValueError(f"a known correlation matrix needs a crossed level with one "
                                 f"effect and {n_groups[lvl]} x {n_groups[lvl]} entries")
            border["known_R"][lvl] = np.linalg.cholesky(R)
    elif known_R:
        raise ValueError("known correlation matrices apply to crossed levels (n_tree < levels)")

    # block sizes and pointers (a node's ZA block: its cluster's local columns, then A)
    anc_sum = np.concatenate([[0], np.cumsum(q[:L])])     # sum of q over levels < l
    zz_size = nq * (anc_sum[level] + nq)           # merged nodes are top-level: nq * nq
    za_size = nq * width[cluster_of_node]
    zz_ptr = np.concatenate([[0], np.cumsum(zz_size)]).astype(np.intp)
    za_ptr = np.concatenate([[0], np.cumsum(za_size)]).astype(np.intp)
    ZZ = np.empty(zz_ptr[-1])
    ZA = np.zeros(za_ptr[-1])
    a_start = (width - ncol)[cluster_of_node] * nq         # where A's columns start in a ZA block

    buf = np.empty(n)
    for lvl in range(L):
        gsel = node_code[lvl] if lvl else node_code[0][keep[0][node_code[0]]]
        if gsel.size == 0:
            continue
        nodes = node_of_group[lvl][gsel]
        blocks = [_cross_sums(Zw[lvl], Zw[k], starts[lvl], gsel, buf) for k in range(lvl + 1)]
        packed = np.concatenate(blocks, axis=1)
        idx = zz_ptr[nodes][:, None] + np.arange(packed.shape[1])[None, :]
        ZZ[idx] = packed
        B = _cross_sums(Zw[lvl], A, starts[lvl], gsel, buf)
        idx = (za_ptr[nodes] + a_start[nodes])[:, None] + np.arange(B.shape[1])[None, :]
        ZA[idx] = B
        if border is not None:      # Z~_a' Z~_c at the cluster's local columns
            ql = q[lvl]
            r = np.arange(n)
            Zt = sparse.csr_matrix((Zw[lvl].ravel(), (np.repeat(r, ql), (codes[lvl][:, None] * ql
                                    + np.arange(ql)[None, :]).ravel())), shape=(n, n_groups[lvl] * ql))
            prod = (Zt.T @ Zc).tocoo()
            g, i = prod.row // ql, prod.row % ql
            sel = keep[lvl][g] if lvl else ~merged[g]
            g, i, c, v = g[sel], i[sel], prod.col[sel], prod.data[sel]
            node = node_of_group[lvl][g]
            j = top_of_row[starts[lvl][g]]
            ZA[za_ptr[node] + i + local_pos(j, c) * ql] = v
    if tops.size and border is None:
        packed, loff = factors.packed_at(first)
        Zcat = np.asfortranarray(np.hstack(Z_s[:L]))
        qoff = np.concatenate([[0], np.cumsum(q[:L])[:-1]]).astype(np.intp)
        merged_products(packed, loff, first, last, nq[top_node], Zcat, qoff,
                        np.asarray(q[:L], dtype=np.intp), colpos, A, ZZ, zz_ptr[top_node], ZA,
                        za_ptr[top_node])
    for a, a0, b0 in zip(top_node if border is not None else (), first, last):
        Zf = np.zeros((b0 - a0, nq[a]))
        for lvl in range(L):
            Zf[np.arange(b0 - a0)[:, None], colpos[a0:b0, lvl][:, None] + np.arange(q[lvl])] = \
                Z_s[lvl][a0:b0]
        Zt = linalg.solve_triangular(factors.of_block(a0, b0), Zf, lower=True)
        ZZ[zz_ptr[a]:zz_ptr[a + 1]] = (Zt.T @ Zt).ravel(order="F")
        j = int(top_of_row[a0])
        mine = bmap[cmap_ptr[j]:cmap_ptr[j + 1] - ncol]
        Mj = np.hstack([Zc[a0:b0][:, mine].toarray(), A[a0:b0]])
        ZA[za_ptr[a]:za_ptr[a + 1]] = (Zt.T @ Mj).ravel(order="F")
    if border is not None:
        border["S0"] = _gram(Zc, A)
    AA = A.T @ A
    kernel = NestedKernel(np.asarray(q, dtype=np.intp), level, parent, zz_ptr, za_ptr,
                          cluster_ptr, ZZ, ZA, AA, nq=nq,
                          sub_node=np.concatenate(sub_node), sub_level=np.concatenate(sub_level),
                          sub_off=np.concatenate(sub_off))
    return kernel, node_of_group, offset_of_group, border
