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
