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
"""

from __future__ import annotations


import numpy as np
import pandas as pd
from scipy import linalg, sparse, stats

from mlmeta._threads import blas_threads
from mlmeta.constraints import linear_hypotheses
from mlmeta.summary import Display, Table, TextDisplay, confidence_level, fmt_f, t_table

__all__ = ["DF_METHODS", "TYPES", "RobustResults", "WaldTestResult", "cluster_robust", "robust"]

TYPES = ("CR0", "CR1", "CR1p", "CR1S", "CR2", "CR3")
DF_METHODS = ("satterthwaite", "naive-t", "naive-tp", "z")
_EIG_TOL = 1e-12
# the Wald test that goes with each df method (the summary's omnibus test, wald_test's default)
_TEST_OF_DF = {"satterthwaite": "HTZ", "naive-t": "naive-F", "naive-tp": "naive-Fp", "z": "chi2"}


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


class WaldTestResult(Display):
    """A Wald test of ``C beta = c0`` with a cluster-robust covariance.

    Prints (and shows at the REPL) as the hypotheses and the test; ``as_html()``,
    ``as_markdown()`` and ``as_latex()`` render the same tables.

    Attributes
    ----------
    test : str
        "HTZ", "chi2", "naive-F" or "naive-Fp".
    statistic : float
        The F statistic (Q_W / q for chi2).
    df_num, df_denom : float
        Numerator and denominator df.
    pvalue : float
        p-value.
    Q : float
        The Wald quadratic form ``Q_W = (C beta - c0)' (C V_CR C')^-1 (C beta - c0)``.
    delta : float
        HTZ scaling ``(nu - q + 1) / nu``.
    constraints : list of str
        The constraints tested.
    dropped : list of str
        Constraints implied by the model's fixed-effect constraints (left out).

    Examples
    --------
    >>> import mlmeta
    >>> dat = mlmeta.datasets.load("berkey")
    >>> res = mlmeta.meregress("yi ~ 0 + outcome + (0 + outcome | trial)", dat, variance="vi")
    >>> rob = res.robust(cluster="trial", type="CR2")
    >>> w = rob.wald_test("outcome[AL] = 0, outcome[PD] = 0")
    >>> print(f"{w.test}: F({w.df_num}, {w.df_denom:.2f}) = {w.statistic:.2f}, p = {w.pvalue:.4f}")
    HTZ: F(2, 2.62) = 48.39, p = 0.0085
    """

    def __init__(self, test, statistic, df_num, df_denom, pvalue, Q, delta, constraints, dropped=()):
        self.test, self.statistic, self.df_num, self.df_denom = test, statistic, df_num, df_denom
        self.pvalue, self.Q, self.delta, self.constraints = pvalue, Q, delta, constraints
        self.dropped = list(dropped)

    def to_dict(self):
        return {k: getattr(self, k) for k in ("test", "statistic", "df_num", "df_denom", "pvalue",
                                              "Q", "delta")}

    def _stats(self) -> list[tuple[str, str]]:
        if self.test == "chi2":
            return [(f"chi2({self.df_num})", fmt_f(self.Q, 2)), ("Prob > chi2", fmt_f(self.pvalue, 4))]
        dd = "inf" if not np.isfinite(self.df_denom) else f"{self.df_denom:.4g}"
        return [(f"F({self.df_num}, {dd})", fmt_f(self.statistic, 2)), ("Prob > F", fmt_f(self.pvalue, 4))]

    def as_text(self) -> str:
        lines = [f"Wald test ({self.test}) of:"]
        lines += [f" ({i:2d})  {c}" for i, c in enumerate(self.constraints, start=1)]
        lines += [""] + [f"{lab:>20} = {val:>8}" for lab, val in self._stats()]
        return "\n".join(lines) + "\n"

    def tables(self) -> list[Table]:
        rows = [[f"({i})", c] for i, c in enumerate(self.constraints, start=1)]
        return [Table(["", "Hypothesis"], rows, f"Wald test ({self.test})"),
                Table(["", ""], [list(r) for r in self._stats()])]


def _describe(row, val, names):
    terms = [(("-" if c < 0 else "+"), ("" if abs(c) == 1 else f"{abs(c):g}*") + nm)
             for c, nm in zip(row, names) if c != 0]
    text = ("-" if terms[0][0] == "-" else "") + terms[0][1]
    return text + "".join(f" {sg} {t}" for sg, t in terms[1:]) + f" = {val:g}"


def constraint_matrix(spec, names, value=None):
    """(C, c0, labels) for ``C beta = c0`` from ``"x1 = 0, x2 = x3"`` (formulaic's
    constraint syntax), a list of such strings or of names (each = 0), or a q x p array
    (null values ``value``, default 0)."""
    names = list(names)
    C, c0 = linear_hypotheses(spec, names, value, what="constraints")
    if np.linalg.matrix_rank(C) < C.shape[0]:
        raise ValueError("the constraints are linearly dependent")
    return C, c0, [_describe(row, val, names) for row, val in zip(C, c0)]


class RobustResults:
    """Cluster-robust inference for the coefficients of a fitted model.

    Attributes
    ----------
    params, bse, df, tvalues, pvalues : pandas.Series over the coefficients
        (``bse`` from the robust covariance; ``df`` per coefficient).
    type : small-sample correction (CR0, CR1, CR1p, CR1S, CR2, CR3).
    df_method : "satterthwaite", "naive-t" (J - 1), "naive-tp" (J - p) or "z".
    n_clusters, nobs, n_fe, cluster_name, cluster_sizes.
    description : e.g. "Cluster-robust CR2 (clubSandwich) standard errors, Satterthwaite df".

    Examples
    --------
    >>> import mlmeta
    >>> dat = mlmeta.datasets.load("berkey")
    >>> res = mlmeta.meregress("yi ~ 0 + outcome + (0 + outcome | trial)", dat, variance="vi")
    >>> rob = res.robust(cluster="trial", type="CR2")
    >>> rob
    <RobustResults CR2 J=5 n=10 df=satterthwaite>
    >>> rob.conf_int().round(4)
                  lower   upper
    outcome[AL] -0.5771 -0.0737
    outcome[PD]  0.1919  0.4972
    """

    def __init__(self, params, names, vcov, pieces, *, type, df, n_clusters, nobs,
                 cluster_name=None, label=None, cluster_sizes=None, A=None):
        self.fe_names = list(names)
        self.params = pd.Series(params, index=self.fe_names, name="coef")
        self._A = np.eye(len(self.fe_names)) if A is None else np.asarray(A, dtype=float)
        self._vcov = self._A @ vcov @ self._A.T
        self._pieces = pieces
        self.type, self.df_method = type, df
        self.n_clusters, self.nobs, self.n_fe = int(n_clusters), int(nobs), int(vcov.shape[0])
        self.cluster_name, self.label, self.cluster_sizes = cluster_name, label, cluster_sizes
        self.bse = pd.Series(np.sqrt(np.maximum(np.diag(self._vcov), 0)), index=self.fe_names,
                             name="robust se")
        J, p = self.n_clusters, self.n_fe
        free = np.any(self._A != 0, axis=1)
        if df == "satterthwaite":
            vals = [pieces.nu(row) if f else np.nan for row, f in zip(self._A, free)]
        else:
            vals = np.where(free, {"naive-t": J - 1, "naive-tp": J - p, "z": np.inf}[df], np.nan)
        self.df = pd.Series(np.asarray(vals, dtype=float), index=self.fe_names, name="df")
        with np.errstate(divide="ignore", invalid="ignore"):
            self.tvalues = pd.Series(np.where(free, self.params / self.bse, np.nan), index=self.fe_names,
                                     name="t")
        self.pvalues = pd.Series(2 * stats.t.sf(np.abs(self.tvalues), self.df), index=self.fe_names,
                                 name="P>|t|")

    def cov_params(self) -> pd.DataFrame:
        """The cluster-robust covariance matrix of the coefficients, ``V_CR``.

        Returns
        -------
        pandas.DataFrame
        """
        return pd.DataFrame(self._vcov, index=self.fe_names, columns=self.fe_names)

    def conf_int(self, level: float = 95.0, *, alpha=None) -> pd.DataFrame:
        """Confidence intervals ``beta -+ t_df se`` with each coefficient's df.

        Parameters
        ----------
        level : float
            Confidence level in percent.
        alpha : float, optional
            ``1 - level / 100``, as statsmodels spells it.

        Returns
        -------
        pandas.DataFrame
            Columns ``lower`` and ``upper``.
        """
        crit = stats.t.ppf(0.5 + confidence_level(level, alpha) / 200.0, self.df)
        return pd.DataFrame({"lower": self.params - crit * self.bse, "upper": self.params + crit * self.bse})

    def wald_test(self, R, value=None, test=None):
        """Test linear constraints ``R beta = value`` with the robust covariance.

        ``R``: a string such as ``"x1 = 0, x2 = 0"`` or ``"x1 = x2"``, a list of
        coefficient names (each = 0), or a q x p array (with ``value``, default 0).
        ``test``: "HTZ" (Hotelling-T^2 approximation, clubSandwich's default),
        "chi2" (Q_W ~ chi2(q)), "naive-F" (Q_W / q ~ F(q, J - 1)) or "naive-Fp"
        (F(q, J - p), metafor's robust() omnibus test); a list gives a DataFrame.
        None (default): the test that goes with the results' df method, as in the
        summary -- HTZ for Satterthwaite df, naive-F for J - 1, naive-Fp for J - p
        (so metafor's F test after ``type="CR1p"``), chi2 for "z".

        Parameters
        ----------
        R : str, list of str or array-like
            Constraints.
        value : array-like, optional
            Right-hand sides when ``R`` is a matrix (default 0).
        test : str or list of str, optional
            The test(s).

        Returns
        -------
        WaldTestResult or pandas.DataFrame
            One test, or one row per test when ``test`` is a list.

        Raises
        ------
        ValueError
            For malformed or linearly dependent constraints or an unknown test.

        Examples
        --------
        >>> import mlmeta
        >>> dat = mlmeta.datasets.load("berkey")
        >>> res = mlmeta.meregress("yi ~ 0 + outcome + (0 + outcome | trial)", dat, variance="vi")
        >>> rob = res.robust(cluster="trial", type="CR1p")          # metafor's robust()
        >>> w = rob.wald_test("outcome[AL] = outcome[PD]")
        >>> print(f"{w.test}: F({w.df_num}, {w.df_denom:.0f}) = {w.statistic:.2f}")
        naive-Fp: F(1, 3) = 71.68
        """
        if test is None:
            test = _TEST_OF_DF[self.df_method]
        if not isinstance(test, str):
            return pd.DataFrame([self.wald_test(R, value, t).to_dict() for t in test])
        C, c0, labels = constraint_matrix(R, self.fe_names, value)
        keep = []                     # drop constraints implied by the model's own (Stata's rule)
        for i in range(C.shape[0]):
            if np.linalg.matrix_rank(C[keep + [i]] @ self._A) == len(keep) + 1:
                keep.append(i)
        if not keep:
            raise ValueError("the constraints only involve coefficients that the model's own constraints fix")
        dropped = [lab for i, lab in enumerate(labels) if i not in keep]
        C, c0, labels = C[keep], c0[keep], [labels[i] for i in keep]
        q, J, p = C.shape[0], self.n_clusters, self.n_fe
        d = C @ self.params.to_numpy() - c0
        Q = float(d @ np.linalg.solve(C @ self._vcov @ C.T, d))
        t = test.lower()
        if t == "htz":
            nu = self._pieces.nu(C @ self._A)
            delta, df2 = max((nu - q + 1) / nu, 0.0), nu - q + 1
            F = delta * Q / q
            pv = float(stats.f.sf(F, q, df2)) if df2 > 0 else np.nan
            return WaldTestResult("HTZ", F, q, df2, pv, Q, delta, labels, dropped)
        if t == "chi2":
            pv = float(stats.chi2.sf(Q, q))
            return WaldTestResult("chi2", Q / q, q, np.inf, pv, Q, 1.0, labels, dropped)
        if t in ("naive-f", "naive-fp"):
            df2 = J - 1 if t == "naive-f" else J - p
            name = "naive-F" if t == "naive-f" else "naive-Fp"
            return WaldTestResult(name, Q / q, q, df2, float(stats.f.sf(Q / q, q, df2)), Q, 1.0, labels,
                                  dropped)
        raise ValueError(f"test must be 'HTZ', 'chi2', 'naive-F' or 'naive-Fp', got {test!r}")

    @property
    def description(self) -> str:
        """What was computed. metafor and Stata are named only where the whole
        procedure is theirs: CR1p with J - p df (and the F(q, J - p) omnibus test) is
        metafor's ``robust()``, CR1S with J - 1 df (and F(q, J - 1)) Stata's
        ``regress, vce(cluster)``; with other df only the factor is given."""
        cr1p = "CR1p (metafor's robust(), J/(J-p))" if self.df_method == "naive-tp" else "CR1p (J/(J-p))"
        cr1s = ("CR1S (Stata's regress, J(N-1)/((J-1)(N-p)))" if self.df_method == "naive-t"
                else "CR1S (J(N-1)/((J-1)(N-p)))")
        kind = {"CR1": "CR1 (clubSandwich's J/(J-1))", "CR1p": cr1p, "CR1S": cr1s,
                "CR2": "CR2 (clubSandwich)", "CR3": "CR3 (approximate jackknife)"}.get(self.type, self.type)
        J, p = self.n_clusters, self.n_fe
        dft = {"satterthwaite": "Satterthwaite df", "naive-t": f"df = J - 1 = {J - 1}",
               "naive-tp": f"df = J - p = {J - p}", "z": "normal reference"}[self.df_method]
        return f"Cluster-robust {kind} standard errors, {dft}"

    @property
    def _omnibus(self):
        idx = [nm for nm in self.fe_names if nm != "_cons"]
        if not idx:
            return None
        return self.wald_test(idx, test=_TEST_OF_DF[self.df_method])

    def summary(self, level: float = 95.0) -> RobustSummary:
        """Coefficient table with robust SEs, df, t tests and confidence intervals, and
        the omnibus Wald test of the moderators.

        Parameters
        ----------
        level : float
            Confidence level in percent.

        Returns
        -------
        RobustSummary
            A str (print it) with HTML for notebooks.
        """
        w = 78
        head = "Cluster-robust inference" + (f": {self.label}" if self.label else "")
        clus = f"Clusters ({self.cluster_name})" if self.cluster_name else "Clusters"
        items = [("Number of obs", f"{self.nobs:>9,}"), (clus[:17], f"{self.n_clusters:>9,}")]
        if self.cluster_sizes is not None:
            sz = self.cluster_sizes
            items.append(("Obs per cluster", f"{int(sz.min())}/{sz.mean():.1f}/{int(sz.max())}"))
        lines = [f"{head if i == 0 else '':<48}{lab:<18}= {val}" for i, (lab, val) in enumerate(items)]
        table = t_table(self.fe_names, self.params, self.bse, self.tvalues, self.df, self.pvalues,
                        self.conf_int(level), level)
        rule = "-" * table.width(w)
        lines += [rule] + table.text_lines("", w) + [rule]
        notes = []
        om = self._omnibus
        if om is not None:
            dd = "inf" if not np.isfinite(om.df_denom) else f"{om.df_denom:.2f}"
            notes.append(f"Wald test ({om.test}) of all coefficients but _cons: F({om.df_num}, {dd}) = "
                         f"{om.statistic:.2f}, Prob > F = {om.pvalue:.4f}")
        notes.append(self.description + ".")
        header = Table(["", ""], [[lab, val.strip()] for lab, val in items], head)
        return RobustSummary("\n".join(lines + notes), [header, table.table("", "Coefficients", notes)])

    def __repr__(self):
        return f"<RobustResults {self.type} J={self.n_clusters} n={self.nobs} df={self.df_method}>"


class RobustSummary(TextDisplay):
    """The rendered table: a str (print it; the REPL shows the table), with ``as_text()``,
    HTML tables for notebooks, ``as_markdown()`` and ``as_latex()``."""


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
