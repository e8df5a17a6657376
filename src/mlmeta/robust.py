"""Cluster-robust (sandwich) inference with small-sample corrections, per cluster.

For an estimator ``beta = M sum_j X_j' W_j y_j`` with ``M = (sum_j X_j' W_j X_j)^-1``,
residuals ``r_j = y_j - X_j beta`` and a working covariance ``Phi_j`` (the fitted
model's marginal ``V_j`` after :func:`mlmeta.meregress`; ``I`` for OLS), over J
clusters, N rows and p coefficients:

    V_CR = c M (sum_j E_j r_j r_j' E_j') M,      E_j = X_j' W_j A_j

    CR0   A_j = I, c = 1                 CR1   c = J / (J - 1)
    CR1p  c = J / (J - p)                CR1S  c = J (N - 1) / ((J - 1)(N - p))
    CR2   A_j = D_j' B_j^-1/2 D_j,  Phi_j = D_j' D_j  (D_j upper triangular),
          B_j = D_j (Phi_j - H_j Phi_j - Phi_j H_j' + X_j Omega X_j') D_j',
          H_j = X_j M X_j' W_j,  Omega = M (sum_k X_k' W_k Phi_k W_k X_k) M
          (with W_j = Phi_j^-1 this is B_j = D_j (Phi_j - X_j M X_j') D_j');
          B^-1/2 is the symmetric inverse square root, eigenvalues below
          1e-12 times the largest set to zero (Pustejovsky & Tipton 2018)
    CR3   A_j = (I - X_j M X_j' W_j)^-1  (approximate jackknife)

metafor's ``robust(fit, cluster)`` is CR1p with t tests on J - p df and the omnibus
test Q_W / q ~ F(q, J - p) ("naive-tp" df, "naive-Fp" test), and that is what
``type="CR1p"`` gives when no ``df`` is asked for; every other type defaults to
Satterthwaite df and the HTZ test (clubSandwich's ``coef_test`` / ``Wald_test``),
as does CR1p with ``df="satterthwaite"`` (clubSandwich's CR1p). clubSandwich's CR1
is J / (J - 1); CR1S is the factor of Stata's ``regress, vce(cluster)`` (whose t
tests use J - 1 df: ``df="naive-t"``).

Degrees of freedom. For a q x p constraint matrix C write, per cluster,
``g_j = C M E_j`` (``S_j = g_j Phi_j g_j'``) and ``h_j^(m) = C M E_j F_m`` with
``F_1 = X_j L``, ``F_2 = Phi_j W_j X_j L``, ``F_3 = X_j L_Omega`` (``M = L L'``,
``Omega = L_Omega L_Omega'``). Under the working model, the pieces of
``C V_CR C'`` have covariances built from

    P_jk = delta_jk S_j + sum_{m,m'} Q_{mm'} h_j^(m) h_k^(m')',
    Q = [[0, -1, 0], [-1, 0, 0], [0, 0, 1]] over (m = 1, 2, 3), or
    Q = [-1] with h_j = h_j^(1) only when W_j = Phi_j^-1.

With ``Omega_C = sum_j P_jj`` and ``B_jk = Omega_C^-1/2 P_jk Omega_C^-1/2``:

    Satterthwaite (q = 1):  nu = (sum_j P_jj)^2 / sum_{j,k} P_jk^2
    HTZ:                   nu = q (q + 1) / sum_{j,k} [tr(B_jk B_jk) + tr(B_jk)^2],
                           F = (nu - q + 1) / (nu q) * Q_W  on (q, nu - q + 1) df,
                           Q_W = (C beta - c0)' (C V_CR C')^-1 (C beta - c0).

The double sums never form J x J arrays: with ``z_j`` the stacked rows of the
``h_j^(m)`` and ``K = sum_j z_j z_j'`` (a (3pq)^2 matrix at most),
``sum_{j,k} (z_j' Q z_k)^2 = tr(Q K Q K)``, and the j = k terms are corrected
cluster by cluster. Memory is O(J p^2 + sum_j n_j^2): clusters of equal size are
processed together as (J_s, n_s, n_s) stacks.

The objects returned (:class:`RobustResults`, :class:`WaldTestResult`) live in
:mod:`mlmeta.robust_results`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import linalg, sparse

from mlmeta._threads import blas_threads
from mlmeta.robust_results import RobustResults, WaldTestResult

__all__ = ["DF_METHODS", "TYPES", "RobustResults", "WaldTestResult", "cluster_robust", "robust"]

TYPES = ("CR0", "CR1", "CR1p", "CR1S", "CR2", "CR3")
DF_METHODS = ("satterthwaite", "naive-t", "naive-tp", "z")
_EIG_TOL = 1e-12


def default_df(type, df=None):
    """The df method used when ``df`` is None: "naive-tp" (J - p, metafor's
    ``robust()``) for CR1p, "satterthwaite" (clubSandwich) for every other type."""
    if df is not None:
        return df
    return "naive-tp" if type == "CR1p" else "satterthwaite"


def _factorize(values):
    try:
        codes, labels = pd.factorize(pd.Series(values), sort=True)
    except TypeError:
        codes, labels = pd.factorize(pd.Series(values), sort=False)
    if (codes < 0).any():
        raise ValueError(f"cluster has missing values (first at row {int(np.flatnonzero(codes < 0)[0])})")
    return codes.astype(np.intp), list(labels)


def _powm(vals, vecs, power):
    """vecs diag(vals^power) vecs' over stacks; eigenvalues <= tol * max treated as zero."""
    top = np.max(np.abs(vals), axis=-1, keepdims=True)
    keep = vals > _EIG_TOL * np.where(top > 0, top, 1.0)
    f = np.where(keep, np.abs(vals) ** power, 0.0)
    return (vecs * f[..., None, :]) @ np.swapaxes(vecs, -1, -2)


class _Clusters:
    """Rows grouped into clusters (codes 0..J-1), clusters batched by size.

    ``groups`` holds, per distinct size s, (clusters (J_s,), rows (J_s, s)); the
    rows of a cluster keep their order in the input."""

    def __init__(self, cluster):
        self.codes, self.labels = _factorize(cluster)
        n, J = self.codes.shape[0], len(self.labels)
        order = np.argsort(self.codes, kind="stable")
        self.sizes = np.bincount(self.codes, minlength=J)
        starts = np.concatenate([[0], np.cumsum(self.sizes)])
        self.pos = np.empty(n, dtype=np.intp)
        self.pos[order] = np.arange(n) - starts[self.codes[order]]
        self.groups, self.group_of, self.slot = [], np.empty(J, np.intp), np.empty(J, np.intp)
        for g, s in enumerate(np.unique(self.sizes)):
            cl = np.flatnonzero(self.sizes == s)
            self.groups.append((cl, order[starts[cl][:, None] + np.arange(s)]))
            self.group_of[cl], self.slot[cl] = g, np.arange(cl.shape[0])
        self.n, self.J = n, J

    def matrix(self, spec, what):
        """Per-group stacks (J_s, s, s) of the cluster blocks of ``spec``: None, an (n,)
        diagonal, a dense or scipy.sparse (n, n) matrix, or a list of J blocks."""
        if spec is None:
            return None
        if isinstance(spec, (list, tuple)):
            if len(spec) != self.J:
                raise ValueError(f"{what}: {len(spec)} blocks given for {self.J} clusters")
            out = []
            for cl, rows in self.groups:
                s = rows.shape[1]
                B = np.stack([np.asarray(spec[c], dtype=float).reshape(-1) for c in cl])
                if B.shape[1] != s * s:
                    bad = next(c for c in cl if np.asarray(spec[c]).size != s * s)
                    raise ValueError(f"{what}: block of cluster {self.labels[bad]!r} should be {s} x {s}")
                out.append(B.reshape(-1, s, s))
        elif sparse.issparse(spec) or np.ndim(spec) == 2:
            coo = sparse.coo_matrix(spec)
            if coo.shape != (self.n, self.n):
                raise ValueError(f"{what} has shape {coo.shape}, expected ({self.n}, {self.n})")
            i, k, v = coo.row, coo.col, coo.data
            cross = (self.codes[i] != self.codes[k]) & (v != 0)
            if cross.any():
                a, b = int(i[cross][0]), int(k[cross][0])
                raise ValueError(f"{what} has a nonzero covariance between rows {a} and {b}, which are in "
                                 f"different clusters ({self.labels[self.codes[a]]!r} and "
                                 f"{self.labels[self.codes[b]]!r}); it must be block-diagonal by cluster")
            c = self.codes[i]
            out = [np.zeros((cl.shape[0], rows.shape[1], rows.shape[1])) for cl, rows in self.groups]
            g = self.group_of[c]
            for gi, B in enumerate(out):
                m = g == gi
                np.add.at(B, (self.slot[c[m]], self.pos[i[m]], self.pos[k[m]]), v[m])
        else:
            d = np.asarray(spec, dtype=float)
            if d.shape != (self.n,):
                raise ValueError(f"{what}: a 1-d diagonal must have length {self.n}, got shape {d.shape}")
            out = [np.einsum("js,st->jst", d[rows], np.eye(rows.shape[1])) for _, rows in self.groups]
        for (cl, _), B in zip(self.groups, out):
            asym = np.abs(B - np.swapaxes(B, 1, 2)).max(axis=(1, 2)) > 1e-10 * np.abs(B).max(axis=(1, 2))
            if asym.any():
                label = self.labels[cl[np.argmax(asym)]]
                raise ValueError(f"{what}: block of cluster {label!r} is not symmetric")
        return out


def _chol(B, cl, labels, what):
    try:
        return np.linalg.cholesky(B)
    except np.linalg.LinAlgError:
        bad = cl[int(np.argmin(np.linalg.eigvalsh(B)[:, 0]))]
        raise ValueError(f"{what}: block of cluster {labels[bad]!r} is not positive definite") from None


def _inv_pd(B, cl, labels, what):
    L = _chol(B, cl, labels, what)
    Li = np.linalg.inv(L)
    return np.swapaxes(Li, 1, 2) @ Li


def _scale(type, J, N, p):
    c = {"CR1": J / (J - 1), "CR1p": J / (J - p) if J > p else np.nan,
         "CR1S": J * (N - 1) / ((J - 1) * (N - p)) if N > p else np.nan}.get(type, 1.0)
    if not np.isfinite(c):
        raise ValueError(f"{type} needs more clusters (J = {J}) and rows (N = {N}) "
                         f"than coefficients (p = {p})")
    return c


def cluster_robust(X, resid, cluster, W_blocks=None, V_blocks=None, type="CR2", bread=None, *,
                   params=None, names=None, df=None, cluster_name=None, label=None, A=None):
    """Cluster-robust covariance, Satterthwaite df and HTZ tests for a linear estimator.

    The sandwich ``V_CR = c M (sum_j E_j r_j r_j' E_j') M`` of the module
    :mod:`mlmeta.robust` (``E_j = X_j' W_j A_j``, ``M = (sum_j X_j' W_j X_j)^-1``) for
    any estimator ``beta = M sum_j X_j' W_j y_j``: OLS (``W = I``), GLS with a working
    covariance, or a fitted mixed model (what :func:`robust` passes). The small-sample
    corrections are

    ====  =====================================================================
    CR0   ``A_j = I``, ``c = 1``
    CR1   ``c = J / (J - 1)``
    CR1p  ``c = J / (J - p)`` (metafor's ``robust()``)
    CR1S  ``c = J (N - 1) / ((J - 1)(N - p))`` (Stata's ``vce(cluster)``)
    CR2   ``A_j = B_j^-1/2`` adjusted to the working model (Bell-McCaffrey,
          Pustejovsky-Tipton; clubSandwich's default)
    CR3   ``A_j = (I - X_j M X_j' W_j)^-1`` (approximate jackknife)
    ====  =====================================================================

    and Satterthwaite df (one constraint) and the HTZ test (several) are those of
    clubSandwich's ``coef_test`` and ``Wald_test``.

    Parameters
    ----------
    X : array-like
        (N, p) design.
    resid : array-like
        (N,) residuals ``y - X beta``.
    cluster : array-like
        (N,) cluster labels.
    W_blocks, V_blocks : optional
        Weights W_j of the estimator ``beta = (X'WX)^-1 X'Wy`` and the working
        covariance Phi_j (the target of CR2 and of the df). Each is None, an (N,)
        diagonal, a dense or scipy.sparse (N, N) matrix that is block-diagonal by
        cluster, or a list of J dense blocks (clusters in sorted label order, rows in
        input order). Missing one: ``W_j = Phi_j^-1`` or ``Phi_j = W_j^-1``; both
        missing: ``W_j = Phi_j = I`` (OLS).
    type : {"CR2", "CR0", "CR1", "CR1p", "CR1S", "CR3"}
        Small-sample correction (table above).
    bread : array-like, optional
        (p, p) matrix M of the sandwich; default ``(sum_j X_j'W_jX_j)^-1``. The
        CR2/CR3 adjustments always use the latter.
    params, names : array-like, list of str, optional
        Estimates and coefficient names for the results.
    df : {None, "satterthwaite", "naive-t", "naive-tp", "z"}
        Satterthwaite, J - 1, J - p or normal reference; None (default):
        "naive-tp" for CR1p (metafor's ``robust()``), else "satterthwaite".
    A : array-like, optional
        Report ``beta = b0 + A gamma`` for the estimator gamma of X (fixed-effect
        constraints): covariance ``A V A'``, df and tests of ``C beta`` from ``C A``;
        ``params`` and ``names`` are then beta's.
    cluster_name : str, optional
        Name of the clusters for the summary.
    label : str, optional
        Title of the summary (the outcome's name).

    Returns
    -------
    RobustResults

    Raises
    ------
    ValueError
        For an unknown ``type`` or ``df``, inputs of different lengths, non-finite
        values, fewer than 2 clusters, or a working covariance that is not
        block-diagonal by cluster or not positive definite in a cluster.

    Examples
    --------
    Cluster-robust OLS by hand (what :func:`mlmeta.ols` does):

    >>> import numpy as np
    >>> import mlmeta
    >>> data, _, _ = mlmeta.simulate.lmm(10, 1, 8, seed=2)
    >>> X = np.column_stack([np.ones(len(data)), data["IV1"]])
    >>> b = np.linalg.lstsq(X, data["DV"], rcond=None)[0]
    >>> rob = mlmeta.cluster_robust(X, data["DV"] - X @ b, data["Group"], type="CR2",
    ...                             params=b, names=["_cons", "IV1"])
    >>> rob.bse.round(4)
    _cons    0.0863
    IV1      0.1216
    Name: robust se, dtype: float64
    >>> rob.df.round(2)
    _cons    7.00
    IV1      6.02
    Name: df, dtype: float64
    """
    with blas_threads(1):
        return _cluster_robust(X, resid, cluster, W_blocks, V_blocks, type, bread, params=params,
                               names=names, df=df, cluster_name=cluster_name, label=label, A=A)


def _cluster_robust(X, resid, cluster, W_blocks=None, V_blocks=None, type="CR2", bread=None, *,
                    params=None, names=None, df=None, cluster_name=None, label=None,
                    A=None):
    """The body of :func:`cluster_robust` (its docstring states the parameters)."""
    if type not in TYPES:
        raise ValueError(f"type must be one of {TYPES}, got {type!r}")
    df = str(default_df(type, df)).lower()
    if df not in DF_METHODS:
        raise ValueError(f"df must be one of {DF_METHODS}, got {df!r}")
    X = np.asarray(X, dtype=float)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-dimensional, got shape {X.shape}")
    N, p = X.shape
    r = np.asarray(resid, dtype=float).reshape(-1)
    if r.shape[0] != N or np.shape(cluster)[0] != N:
        raise ValueError(f"X has {N} rows, resid {r.shape[0]} and cluster {np.shape(cluster)[0]}")
    if not (np.isfinite(X).all() and np.isfinite(r).all()):
        raise ValueError("X and resid must be finite")
    cls = _Clusters(cluster)
    J = cls.J
    if J < 2:
        raise ValueError("cluster-robust inference needs at least 2 clusters")
    W = cls.matrix(W_blocks, "W_blocks")
    Phi = cls.matrix(V_blocks, "V_blocks")
    inverse_var = W is None or Phi is None
    Xg = [X[rows] for _, rows in cls.groups]
    rg = [r[rows] for _, rows in cls.groups]
    eye = [np.broadcast_to(np.eye(rows.shape[1]), (rows.shape[0],) + (rows.shape[1],) * 2)
           for _, rows in cls.groups]
    if W is None and Phi is None:
        W = Phi = eye
    elif W is None:
        W = [_inv_pd(P, cl, cls.labels, "V_blocks") for (cl, _), P in zip(cls.groups, Phi)]
    elif Phi is None:
        Phi = [_inv_pd(B, cl, cls.labels, "W_blocks") for (cl, _), B in zip(cls.groups, W)]
    WX = [w @ x for x, w in zip(Xg, W)]
    XWX = sum(np.einsum("jsa,jsb->ab", x, wx) for x, wx in zip(Xg, WX))
    try:
        M_fit = linalg.cho_solve(linalg.cho_factor(XWX, lower=True), np.eye(p))
    except linalg.LinAlgError:
        raise ValueError("X'WX is not positive definite (collinear columns?)") from None
    M = M_fit if bread is None else np.asarray(bread, dtype=float)
    if M.shape != (p, p):
        raise ValueError(f"bread must be {p} x {p}, got shape {M.shape}")
    L_M = np.linalg.cholesky(0.5 * (M + M.T))
    if not inverse_var:
        XWPWX = sum(np.einsum("jsa,jst,jtb->ab", wx, P, wx) for wx, P in zip(WX, Phi))
        Omega = M_fit @ XWPWX @ M_fit
        O_M = M @ XWPWX @ M
        L_O = np.linalg.cholesky(0.5 * (O_M + O_M.T))
    c = _scale(type, J, N, p)
    k = 1 if inverse_var else 3
    meat = np.zeros((p, p))
    S = np.empty((J, p, p))
    Hs = np.empty((J, p, k * p))
    for (cl, _), x, wx, rr, P, eye_j in zip(cls.groups, Xg, WX, rg, Phi, eye):
        xt = np.swapaxes(x, 1, 2)
        E = np.swapaxes(wx, 1, 2)                                    # X_j' W_j  (J_s, p, s)
        if type == "CR2":
            D = np.swapaxes(_chol(P, cl, cls.labels, "V_blocks"), 1, 2)   # Phi = D'D
            if inverse_var:
                inner = P - x @ M_fit @ xt
            else:
                H = x @ M_fit @ E
                inner = P - H @ P - P @ np.swapaxes(H, 1, 2) + x @ Omega @ xt
            Bj = D @ inner @ np.swapaxes(D, 1, 2)
            vals, vecs = np.linalg.eigh(0.5 * (Bj + np.swapaxes(Bj, 1, 2)))
            E = E @ (np.swapaxes(D, 1, 2) @ _powm(vals, vecs, -0.5) @ D)
        elif type == "CR3":
            try:
                E = E @ np.linalg.inv(eye_j - x @ M_fit @ E)
            except np.linalg.LinAlgError:
                raise ValueError("CR3: I - X_j M X_j'W_j is singular for some cluster (a coefficient "
                                 "is determined by one cluster alone)") from None
        E = E * np.sqrt(c)
        u = np.einsum("jas,js->ja", E, rr)
        meat += u.T @ u
        ME = M @ E
        S[cl] = ME @ P @ np.swapaxes(ME, 1, 2)
        MEX = ME @ x
        if inverse_var:
            Hs[cl] = MEX @ L_M
        else:
            Hs[cl] = np.concatenate([MEX @ L_M, ME @ P @ wx @ L_M, MEX @ L_O], axis=2)
    vcov = M @ meat @ M
    vcov = 0.5 * (vcov + vcov.T)
    Q = np.array([[-1.0]]) if inverse_var else np.array([[0, -1.0, 0], [-1.0, 0, 0], [0, 0, 1.0]])
    pieces = _Pieces(S, Hs, np.kron(Q, np.eye(p)))
    p_out = p if A is None else np.shape(A)[0]
    names = list(names) if names is not None else [f"x{i}" for i in range(p_out)]
    params = np.full(p_out, np.nan) if params is None else np.asarray(params, dtype=float).reshape(-1)
    if params.shape != (p_out,) or len(names) != p_out:
        raise ValueError(f"params and names need {p_out} entries")
    return RobustResults(params, names, vcov, pieces, type=type, df=df, n_clusters=J, nobs=N,
                         cluster_name=cluster_name, label=label, cluster_sizes=cls.sizes, A=A)


class _Pieces:
    """Per-cluster pieces of the df computations: S_j = M E_j Phi_j E_j' M (J, p, p),
    the stacked h_j^(m) (J, p, k p) and kron(Q, I_p)."""

    def __init__(self, S, H, Qb):
        self.S, self.H, self.Qb = S, H, Qb

    def nu(self, C):
        """Degrees of freedom of the Hotelling-T^2 approximation for the rows of C
        (Satterthwaite's df when C has one row)."""
        C = np.atleast_2d(np.asarray(C, dtype=float))
        q = C.shape[0]
        Om = np.einsum("sa,jab,tb->st", C, self.S, C) + self._F(C).sum(axis=0)
        vals, vecs = np.linalg.eigh(0.5 * (Om + Om.T))
        Ct = _powm(vals, vecs, -0.5) @ C
        SC = np.einsum("sa,jab,tb->jst", Ct, self.S, Ct)
        Z = np.einsum("sa,jab->jsb", Ct, self.H)
        F = np.einsum("jsa,ab,jtb->jst", Z, self.Qb, Z)
        K = np.einsum("jsa,jtc->satc", Z, Z)
        Qb = self.Qb
        pairs = (np.einsum("ab,cd,satc,tbsd->", Qb, Qb, K, K, optimize=True)
                 + np.einsum("ab,cd,satc,sbtd->", Qb, Qb, K, K, optimize=True))

        def f(B):
            return np.einsum("jst,jts->", B, B) + np.sum(np.trace(B, axis1=1, axis2=2) ** 2)

        total = pairs + f(SC + F) - f(F)
        return q * (q + 1) / total if total > 0 else np.nan

    def _F(self, C):
        Z = np.einsum("sa,jab->jsb", C, self.H)
        return np.einsum("jsa,ab,jtb->jst", Z, self.Qb, Z)


def _model_covariance(model, theta, n):
    """The fitted marginal covariance, block-diagonal by top-level cluster, as a sparse
    (n, n) matrix in the design's sorted row order."""
    starts, sizes, vals = [], [], []
    for a, b, V in model.marginal_blocks(theta):
        starts.append(a)
        sizes.append(b - a)
        vals.append(np.asarray(V, dtype=float).reshape(-1))
    starts, sizes = np.asarray(starts, np.intp), np.asarray(sizes, np.intp)
    nn = sizes * sizes
    blk = np.repeat(np.arange(sizes.shape[0]), nn)
    k = np.arange(nn.sum()) - np.repeat(np.cumsum(nn) - nn, nn)
    rows, cols = starts[blk] + k // sizes[blk], starts[blk] + k % sizes[blk]
    return sparse.coo_matrix((np.concatenate(vals), (rows, cols)), shape=(n, n))


def _robust_labels(res, cluster, data):
    """Cluster labels over the model frame's rows, and a name for them."""
    frame, n_used = res.frame, int(res.nobs)
    names = list(getattr(res, "group_names", [t.group for t in frame.terms]))
    if cluster is None:
        return np.asarray(frame.groups[0]), names[0]
    if isinstance(cluster, str):
        if cluster in names:
            return np.asarray(frame.groups[names.index(cluster)]), cluster
        if data is None:
            raise ValueError(f"cluster={cluster!r} is not a grouping term of the model ({names}); "
                             f"pass data= to take it from a column of the data")
        if cluster not in data:
            raise ValueError(f"unknown column {cluster!r} in data")
        values, label = np.asarray(data[cluster]), cluster
    else:
        values, label = np.asarray(cluster), None
    sample = np.asarray(res.sample, dtype=bool)
    if values.shape[0] == sample.shape[0]:
        values = values[sample]
    elif values.shape[0] != n_used:
        raise ValueError(f"cluster has {values.shape[0]} values; expected one per data row "
                         f"({sample.shape[0]}) or per row used in the fit ({n_used})")
    if pd.isna(values).any():
        raise ValueError("cluster has missing values in rows used by the model")
    return values, label


def robust(res, cluster=None, type="CR2", df=None, *, data=None) -> RobustResults:
    """Cluster-robust inference after :func:`mlmeta.meregress`, with the fitted model
    as working covariance (``Phi_j = V_j``, ``W_j = V_j^-1``; module docstring).

    Parameters
    ----------
    res : MeregressResults
        A fit of :func:`meregress` (or :func:`mixed`).
    cluster : str or array-like, optional
        None (the top-level grouping), a grouping term of the model, a column of
        ``data`` (the data the model was fitted to), or an array with one value per
        data row (restricted to ``res.sample``) or per row used in the fit.
    type : {"CR2", "CR0", "CR1", "CR1p", "CR1S", "CR3"}
        Small-sample correction: CR1 multiplies CR0 by J/(J-1), CR1p by J/(J-p).
    df : {None, "satterthwaite", "naive-t", "naive-tp", "z"}
        Satterthwaite, J - 1, J - p or normal reference; None (default): "naive-tp"
        for CR1p, "satterthwaite" for every other type.
    data : pandas.DataFrame, optional
        The data holding a ``cluster`` column that is not a grouping term.

    clubSandwich's ``coef_test(fit, vcov = "CR2", test = "Satterthwaite")`` is the
    default. ``type="CR1p"`` is metafor's ``robust(fit, cluster)``: the CR0 matrix
    times J/(J-p), t tests and intervals on J - p df, and the omnibus test (summary,
    and ``wald_test``'s default) Q_W / q on (q, J - p) df; ``df="satterthwaite"``
    gives clubSandwich's CR1p instead. The model's top-level groups must nest within
    the robust clusters. Otherwise only CR0/CR1/CR1p/CR1S with naive or z df are
    available (the sandwich then uses the weighted design V^-1 X row by row, as
    metafor does).

    Returns
    -------
    RobustResults

    Raises
    ------
    ValueError
        For an unknown cluster column, cluster labels of the wrong length or with
        missing values, fewer than 2 clusters, CR2/CR3/Satterthwaite df when the
        model's top-level groups span several clusters, or a crossed design (its
        marginal covariance is not block-diagonal by cluster; not available yet).

    Examples
    --------
    Two correlated outcomes per trial (berkey), an unstructured trial level and
    sampling errors treated as independent; CR2 guards against the misspecified
    sampling covariance (clubSandwich's ``coef_test(fit, vcov = "CR2")``):

    >>> import mlmeta
    >>> dat = mlmeta.datasets.load("berkey")
    >>> res = mlmeta.meregress("yi ~ 0 + outcome + (0 + outcome | trial)", dat, variance="vi")
    >>> rob = mlmeta.robust(res, cluster="trial", type="CR2")
    >>> rob.bse.round(4)
    outcome[AL]    0.0891
    outcome[PD]    0.0536
    Name: robust se, dtype: float64
    >>> rob.df.round(2)
    outcome[AL]    3.84
    outcome[PD]    3.76
    Name: df, dtype: float64
    """
    df = default_df(type, df)
    model, theta = res.model, np.asarray(res.theta, dtype=float)
    d = model.design
    labels, name = _robust_labels(res, cluster, data if data is not None else getattr(res, "data", None))
    cl = labels[d.perm]
    codes, uniq = _factorize(cl)
    first = d.group_start[0][:-1]                     # top-level groups are contiguous runs
    spans = np.maximum.reduceat(codes, first) != np.minimum.reduceat(codes, first)
    fc = getattr(model, "fe_constraints", None)
    gamma = model.evaluate(theta).beta                # coefficients of the design's X
    resid = d.y - d.X @ gamma
    kw = {"params": np.asarray(res.params, dtype=float), "names": res.fe_names, "df": df,
          "cluster_name": name, "label": getattr(res, "depvar", None)}
    if fc is not None:
        kw["A"] = fc.N
    if not spans.any():
        V = _model_covariance(model, theta, d.n_obs)
        return cluster_robust(d.X, resid, cl, V_blocks=V, type=type, **kw)
    g = int(np.flatnonzero(spans)[0])
    hit = [uniq[c] for c in np.unique(codes[first[g]:d.group_start[0][g + 1]])][:3]
    top_name = res.group_names[0] if getattr(res, "group_names", None) else "top level"
    if type in ("CR2", "CR3") or df == "satterthwaite":
        raise ValueError(
            f"the model's {top_name!r} groups are not nested within the robust clusters: a "
            f"{top_name!r} group spans clusters {hit}. {type} with the fitted model as working "
            f"covariance (and Satterthwaite df) needs every {top_name!r} group inside one cluster; "
            f"cluster by {top_name!r} or a coarser variable, or use type='CR0'/'CR1'/'CR1p'/'CR1S' "
            f"with df='naive-tp'")
    WX = np.empty_like(d.X)
    for a, b, Vj in model.marginal_blocks(theta):
        WX[a:b] = np.linalg.solve(Vj, d.X[a:b])
    bread = np.linalg.inv(d.X.T @ WX)
    return cluster_robust(WX, resid, cl, type=type, bread=bread, **kw)
