"""Dense NumPy reference implementations (brute force, O(n^3)) for tests."""

import numpy as np


def dense_Z(Z, groups):
    """Full random-effects design: one block of columns per group and level.

    Returns (Zfull, T_index) where columns are ordered level by level, group by group."""
    blocks = []
    for z, g in zip(Z, groups):
        g = np.asarray(g)
        uniq, inv = np.unique(g, return_inverse=True)
        q = z.shape[1]
        B = np.zeros((z.shape[0], len(uniq) * q))
        for j in range(len(uniq)):
            rows = inv == j
            B[rows, j * q:(j + 1) * q] = z[rows]
        blocks.append((B, len(uniq)))
    return blocks


def dense_V(Z, groups, Sigmas, Lambda):
    """V = Lambda + sum_l Z_l (I (x) Sigma_l) Z_l'."""
    V = np.array(Lambda, dtype=float) if np.ndim(Lambda) == 2 else np.diag(Lambda)
    for (B, G), S in zip(dense_Z(Z, groups), Sigmas):
        V = V + B @ np.kron(np.eye(G), S) @ B.T
    return V


def dense_loglik(y, X, V, method="reml"):
    """Stata/metafor log-likelihood (DESIGN.md section 1) with beta profiled by GLS."""
    n, p = X.shape
    Vi = np.linalg.inv(V)
    H = X.T @ Vi @ X
    beta = np.linalg.solve(H, X.T @ Vi @ y)
    r = y - X @ beta
    ll = -0.5 * (n * np.log(2 * np.pi) + np.linalg.slogdet(V)[1] + r @ Vi @ r)
    if method == "reml":
        ll += -0.5 * (np.linalg.slogdet(H)[1] - np.linalg.slogdet(X.T @ X)[1]) + 0.5 * p * np.log(2 * np.pi)
    return ll, beta, np.linalg.inv(H)


def dense_ZT(Z, groups, Ts):
    """The full random-effects design times the full relative factor, Z (I (x) T_l) per
    level, columns level by level and group by group (as :func:`dense_Z`)."""
    cols = []
    for (B, G), T in zip(dense_Z(Z, groups), Ts):
        q = T.shape[0]
        cols.append((B.reshape(B.shape[0], G, q) @ T).reshape(B.shape[0], G * q))
    return np.hstack(cols) if cols else np.zeros((len(groups[0]) if groups else 0, 0))


def _whiten(Lambda, rows, M):
    """(L^-1 M[rows], log|Lambda_rows|) for the rows' block of Lambda (None: identity)."""
    from scipy import linalg

    if Lambda is None:
        return M[rows], 0.0
    if np.ndim(Lambda) == 1:
        s = np.sqrt(np.asarray(Lambda, dtype=float)[rows])
        return M[rows] / (s[:, None] if M.ndim == 2 else s), 2.0 * float(np.sum(np.log(s)))
    L = np.linalg.cholesky(np.asarray(Lambda, dtype=float)[np.ix_(rows, rows)])
    return (linalg.solve_triangular(L, M[rows], lower=True), 2.0 * float(np.sum(np.log(np.diag(L)))))


class DenseDeviance:
    """-2 log-likelihood by orthogonal factorisation (lme4's penalised least squares,
    no inverse of V, no normal equations): accurate when V is badly conditioned.

    With ``Lambda = L L'`` (``None``: sigma^2 I with sigma^2 profiled out and T relative
    to sigma; a vector: diagonal), whitened ``Zw = L^-1 Z (I (x) T)``, ``Xw``, ``yw``,

        [[Zw, Xw, yw], [I, 0, 0]] = Q R,   R = [[R_ZZ, R_ZX, r_Zy], [0, R_XX, r_Xy], [0, 0, rho]]

    gives ``log|C| = 2 sum log|diag R_ZZ|`` (C = I + Zw'Zw), ``X'V^-1X = R_XX'R_XX``,
    ``rho^2 = r'V^-1r`` at the GLS beta ``R_XX^-1 r_Xy``, and

        ML:   n log 2pi + log|Lambda| + log|C| + rho^2
        REML: (n - p) log 2pi + log|Lambda| + log|C| + rho^2 + log|X'V^-1X| - log|X'X|

    (profiled: sigma^2 = rho^2 / n or rho^2 / (n - p) replaces Lambda = sigma^2 I).

    ``cluster`` (n codes; Lambda block-diagonal by them): the same factorisation taken
    cluster by cluster. A level whose groups each lie in one cluster has its columns
    eliminated within the cluster; the other (crossed) levels' columns, X and y are
    carried to one last factorisation of the stacked remainders.

    ``DenseDeviance(y, X, Z, groups, Lambda, method, cluster)(Ts, y=None)`` returns
    (deviance, beta, sigma2) at the relative factors ``Ts`` (one per level)."""

    def __init__(self, y, X, Z, groups, Lambda=None, method="reml", cluster=None):
        X = np.asarray(X, dtype=float)
        n, p = X.shape
        self.n, self.p, self.method, self.profiled = n, p, method, Lambda is None
        self.q = [z.shape[1] for z in Z]
        Bs = dense_Z(Z, groups)
        if cluster is None:
            inside = [False] * len(Bs)
            parts = [np.arange(n)]
        else:
            cluster = np.asarray(cluster)
            inside = [all(np.unique(cluster[np.asarray(g) == k]).size == 1 for k in np.unique(g))
                      for g in groups]
            parts = [np.flatnonzero(cluster == k) for k in np.unique(cluster)]
        self.inside = inside
        ZG = [B for (B, _), w in zip(Bs, inside) if not w]
        self.G = [G for _, G in Bs]
        # per cluster: whitened local and crossed columns, X and the whitening of y
        self.parts = []
        self.logdet_L = 0.0
        for rows in parts:
            blocks = []
            for lvl, ((B, _), w) in enumerate(zip(Bs, inside)):
                if w:
                    cols = np.unique(np.unique(groups[lvl], return_inverse=True)[1][rows])
                    Bw, _ = _whiten(Lambda, rows, B[:, (cols[:, None] * self.q[lvl]
                                                        + np.arange(self.q[lvl])).ravel()])
                    blocks.append((lvl, Bw, cols.size))
            Gw = [(lvl, _whiten(Lambda, rows, B)[0]) for lvl, ((B, _), w) in enumerate(zip(Bs, inside))
                  if not w]
            Xw, ld = _whiten(Lambda, rows, X)
            self.logdet_L += ld
            self.parts.append((rows, blocks, Gw, Xw))
        self.Lambda = Lambda
        self.NG = sum(B.shape[1] for B in ZG)
        R = np.linalg.qr(X, mode="r") if p else np.zeros((0, 0))
        self.logdet_XX = 2.0 * float(np.sum(np.log(np.abs(np.diag(R)))))
        self.y = np.asarray(y, dtype=float)

    def __call__(self, Ts, y=None):
        from scipy import linalg

        y = self.y if y is None else np.asarray(y, dtype=float)
        n, p, NG = self.n, self.p, self.NG
        logdet_C = 0.0
        rest = []
        for rows, blocks, Gw, Xw in self.parts:
            yw, _ = _whiten(self.Lambda, rows, y)
            ZL = [(Bw.reshape(-1, k, self.q[lvl]) @ Ts[lvl]).reshape(-1, k * self.q[lvl])
                  for lvl, Bw, k in blocks]
            ZG = [(Bw.reshape(-1, self.G[lvl], self.q[lvl]) @ Ts[lvl]).reshape(-1, Bw.shape[1])
                  for lvl, Bw in Gw]
            nl = sum(z.shape[1] for z in ZL)
            M = np.zeros((rows.size + nl, nl + NG + p + 1))
            M[:rows.size] = np.column_stack(ZL + ZG + [Xw, yw])
            M[rows.size:, :nl] = np.eye(nl)
            R = np.linalg.qr(M, mode="r")
            logdet_C += 2.0 * float(np.sum(np.log(np.abs(np.diag(R)[:nl]))))
            rest.append(R[nl:, nl:])
        rest.append(np.hstack([np.eye(NG), np.zeros((NG, p + 1))]))
        R = np.linalg.qr(np.vstack(rest), mode="r")
        d = np.abs(np.diag(R))
        logdet_C += 2.0 * float(np.sum(np.log(d[:NG])))
        logdet_H = 2.0 * float(np.sum(np.log(d[NG:NG + p])))
        rho2 = float(R[NG + p, NG + p]) ** 2 if R.shape[0] > NG + p else 0.0
        beta = linalg.solve_triangular(R[NG:NG + p, NG:NG + p], R[NG:NG + p, -1]) if p else np.zeros(0)
        dof = n - p if self.method == "reml" else n
        reml = (logdet_H - self.logdet_XX) if self.method == "reml" else 0.0
        if self.profiled:
            s2 = rho2 / dof
            dev = dof * (1.0 + np.log(2 * np.pi * s2)) + logdet_C + reml
        else:
            s2 = 1.0
            dev = dof * np.log(2 * np.pi) + self.logdet_L + logdet_C + rho2 + reml
        return float(dev), beta, s2


def dense_deviance(y, X, Z, groups, Ts, Lambda=None, method="reml", cluster=None):
    """:class:`DenseDeviance` at ``Ts``: (deviance, beta, sigma2)."""
    return DenseDeviance(y, X, Z, groups, Lambda, method, cluster)(Ts)
