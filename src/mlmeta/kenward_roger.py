"""Kenward-Roger inference for the fixed effects of a linear mixed model (pbkrtest).

The model's marginal covariance is written linearly in the variance-covariance
parameters gamma (pbkrtest's parameterisation): for each grouping term l and each
element of its structure's linear basis ``Sigma_l = sum_k gamma_lk E_lk`` (the lower
triangle of an unstructured Sigma_l, the variances of an independent one, ...),

    V = sum_r gamma_r G_r,   G_lk = Z_l (I (x) E_lk) Z_l',   G_resid = I  (gamma = sigma^2).

With Phi = (X'V^-1X)^-1 (the unadjusted covariance of beta-hat) and

    P_r = -X'V^-1 G_r V^-1 X,   Q_rs = X'V^-1 G_r V^-1 G_s V^-1 X,
    I_rs = tr(V^-1 G_r V^-1 G_s) - 2 tr(Phi Q_rs) + tr(Phi P_r Phi P_s)   (REML expected
           information, times 2),
    W = 2 I^-1   (Moore-Penrose inverse when I is near singular),

the adjusted covariance is ``Phi_A = Phi + 2 Phi U Phi``, U = sum_rs W_rs (Q_rs - P_r Phi P_s)
(pbkrtest's ``vcovAdj``; the second-derivative term of Kenward and Roger (1997) vanishes
because V is linear in gamma). For a hypothesis L beta = 0 with q rows, Theta =
L'(L Phi L')^-1 L and u_r = Theta Phi P_r Phi:

    A1 = sum_rs W_rs tr(u_r) tr(u_s),   A2 = sum_rs W_rs tr(u_r u_s),   B = (A1 + 6 A2) / (2q)
    g = ((q+1) A1 - (q+4) A2) / ((q+2) A2),   c1 = g / (3q + 2(1-g)),
    c2 = (q-g) / (3q + 2(1-g)),   c3 = (q+2-g) / (3q + 2(1-g))
    rho = (1 - A2/q)^2 / (1 - c2 B)^2 * (1 + c1 B) / (1 - c3 B) / q
    ddf = 4 + (q + 2) / (q rho - 1),   lambda = ddf (1 - A2/q) / (ddf - 2)

and F = lambda (L b)'(L Phi_A L')^-1 (L b) / q on (q, ddf) (pbkrtest's ``KRmodcomp``,
lmerTest's ``anova(ddf="Kenward-Roger")``; lambda = 1 when |ddf - 2| < 0.01).

V is block diagonal over the top-level clusters, so every sum above is accumulated one
cluster at a time with dense n_j x n_j blocks (pbkrtest forms the whole n x n matrix).
The cost is O(sum_j n_j^3 m) for m parameters; a cluster of more than
:data:`MAX_CLUSTER_ROWS` rows is refused.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import pandas as pd
from scipy import linalg

from mlmeta import _dist

__all__ = ["KenwardRoger", "kenward_roger", "MAX_CLUSTER_ROWS", "linear_basis"]

#: Largest top-level cluster (rows) whose dense n_j x n_j blocks are formed.
MAX_CLUSTER_ROWS = 3000
_COND_TOL = 1e-10          # pbkrtest: solve(I) unless its smallest |eigenvalue| is below this


def linear_basis(struct) -> list[np.ndarray]:
    """The matrices E_k of a structure written as ``Sigma = sum_k gamma_k E_k``: unstructured
    -> the lower triangle, column by column (E_ii, E_ij + E_ji), as lme4's VarCorr;
    independent -> E_ii; identity -> I; exchangeable -> I and J - I."""
    q = struct.q
    kind = struct.kind
    if kind == "unstructured":
        out = []
        for j in range(q):
            for i in range(j, q):
                E = np.zeros((q, q))
                E[i, j] = E[j, i] = 1.0
                out.append(E)
        return out
    if kind == "independent":
        return [np.diag(np.eye(q)[i]) for i in range(q)]
    if kind == "identity":
        return [np.eye(q)]
    if kind == "exchangeable":
        return [np.eye(q)] + ([np.ones((q, q)) - np.eye(q)] if q > 1 else [])
    raise ValueError(f"Kenward-Roger inference needs covariance structures that are linear in "
                     f"their variances and covariances (unstructured, independent, identity, "
                     f"exchangeable); this model has a {struct.title or kind} structure")


class KenwardRoger:
    """Kenward-Roger pieces of a REML mixed-model fit (see the module docstring).

    Attributes
    ----------
    Phi, Phi_A : unadjusted and adjusted covariance of the free fixed effects (the
        design's coefficients; with fixed-effect constraints, the free combinations).
    P : (m, p, p) the P_r; W : (m, m) 2 I^-1; condition : smallest |eigenvalue| of I.
    names : coefficient names of the results.
    """

    def __init__(self, res):
        model = res.model
        if getattr(model, "residual", None) != "profiled":
            raise ValueError("Kenward-Roger inference needs a mixed model with an estimated "
                             "residual variance (mlmeta.mixed)")
        if model.method != "reml":
            raise ValueError("Kenward-Roger inference is only available for REML fits "
                             "(as in pbkrtest and lmerTest); refit with method='reml'")
        d = model.design
        sizes = np.diff(d.group_start[0])
        if sizes.max() > MAX_CLUSTER_ROWS:
            j = int(np.argmax(sizes))
            raise ValueError(
                f"Kenward-Roger inference forms dense n_j x n_j blocks per top-level cluster; "
                f"{model.cluster_label(j)} has {int(sizes[j])} rows (limit "
                f"mlmeta.kenward_roger.MAX_CLUSTER_ROWS = {MAX_CLUSTER_ROWS}); use Satterthwaite df")
        bases = [(lvl, E) for lvl, s in enumerate(model.structs) for E in linear_basis(s)]
        theta = np.asarray(res.theta, dtype=float)
        ev = model.evaluate(theta)
        Phi = np.asarray(ev.cov_beta, dtype=float)
        p, m = d.n_fe, len(bases) + 1
        P = np.zeros((m, p, p))
        Q = np.zeros((m, m, p, p))
        K = np.zeros((m, m))
        for a, b, V in model.marginal_blocks(theta):
            Vinv = linalg.cho_solve(linalg.cho_factor(V, lower=True), np.eye(b - a))
            Xj = d.X[a:b]
            SX = Vinv @ Xj
            G = []
            for lvl, E in bases:
                Z, g = d.Z[lvl][a:b], d.groups[lvl][a:b]
                G.append((Z @ E @ Z.T) * (g[:, None] == g[None, :]))
            G.append(np.eye(b - a))
            H = [Gr @ Vinv for Gr in G]                  # G_r V^-1
            O = [Gr @ SX for Gr in G]                    # G_r V^-1 X
            SO = [Vinv @ Or for Or in O]                 # V^-1 G_r V^-1 X
            for r in range(m):
                P[r] -= O[r].T @ SX
                for s in range(r, m):
                    Q[r, s] += O[r].T @ SO[s]
                    K[r, s] += np.sum(H[r].T * H[s])     # tr(G_r V^-1 G_s V^-1)
        for r in range(m):
            for s in range(r):
                Q[r, s] = Q[s, r].T
                K[r, s] = K[s, r]
        PPhi = P @ Phi
        info = (K - 2 * np.einsum("ab,rsba->rs", Phi, Q)
                + np.einsum("rab,sba->rs", PPhi, PPhi))
        info = 0.5 * (info + info.T)
        condition = float(np.min(np.abs(np.linalg.eigvalsh(info))))
        W = 2 * (np.linalg.inv(info) if condition > _COND_TOL
                 else np.linalg.pinv(info, rcond=np.sqrt(np.finfo(float).eps)))
        U = np.einsum("rs,rsab->ab", W, Q) - np.einsum("rs,rab,sbc->ac", W, PPhi, P)
        self.Phi = Phi
        self.Phi_A = Phi + 2 * Phi @ U @ Phi
        self.P, self.W, self.info, self.condition = P, W, info, condition
        self.names = list(res.fe_names)
        fc = getattr(model, "fe_constraints", None)
        self._N = fc.N if fc is not None else None
        self._params = np.asarray(res.params.values, dtype=float)

    # -- coefficient space ----------------------------------------------------------
    def _reduce(self, L):
        """Contrasts over the results' coefficients -> over the design's coefficients."""
        L = np.atleast_2d(np.asarray(L, dtype=float))
        if L.shape[1] != len(self.names):
            raise ValueError(f"L has {L.shape[1]} columns for {len(self.names)} coefficients")
        return L if self._N is None else L @ self._N

    @cached_property
    def cov_params(self) -> pd.DataFrame:
        """The adjusted covariance of the coefficients (pbkrtest's ``vcovAdj``)."""
        V = self.Phi_A if self._N is None else self._N @ self.Phi_A @ self._N.T
        return pd.DataFrame(V, index=self.names, columns=self.names)

    def _A(self, Lr):
        """(A1, A2) of the hypothesis rows Lr (design coefficients)."""
        M = Lr @ self.Phi @ Lr.T
        try:
            Theta = Lr.T @ np.linalg.solve(M, Lr)
        except np.linalg.LinAlgError:
            raise ValueError("L Phi L' is singular: the hypotheses are linearly dependent or "
                             "involve coefficients fixed by constraints") from None
        u = np.einsum("ab,bc,rcd,de->rae", Theta, self.Phi, self.P, self.Phi)
        tr = np.einsum("raa->r", u)
        A1 = float(tr @ self.W @ tr)
        A2 = float(np.einsum("rs,rab,sba->", self.W, u, u))
        return A1, A2

    @staticmethod
    def _ddf(A1, A2, q):
        """pbkrtest's ``Lb_ddf`` / ``.KR_adjust``: (ddf, F scaling lambda)."""
        B = (A1 + 6 * A2) / (2 * q)
        g = ((q + 1) * A1 - (q + 4) * A2) / ((q + 2) * A2)
        den = 3 * q + 2 * (1 - g)
        c1, c2, c3 = g / den, (q - g) / den, (q + 2 - g) / den
        V0 = 1 + c1 * B
        V0 = 0.0 if abs(V0) < 1e-10 else V0
        V1, V2 = 1 - c2 * B, 1 - c3 * B
        ratio = 0.0 if abs(V1) < 1e-14 else (1 - A2 / q) / V1
        rho = ratio ** 2 * V0 / V2 / q
        ddf = 4 + (q + 2) / (q * rho - 1)
        scale = 1.0 if abs(ddf - 2) < 0.01 else ddf * (1 - A2 / q) / (ddf - 2)
        return float(ddf), float(scale)

    def df(self, L) -> np.ndarray:
        """Kenward-Roger df of each row c of L as a one-row hypothesis (pbkrtest's
        ``Lb_ddf(c, ...)``, lmerTest's summary and contest1D)."""
        Lr = self._reduce(L)
        return np.array([self._ddf(*self._A(row[None, :]), 1)[0] for row in Lr])

    def coef_df(self) -> pd.Series:
        return pd.Series(self.df(np.eye(len(self.names))), index=self.names, name="df")

    def f_test(self, L, rhs=None) -> dict:
        """F test of ``L beta = rhs`` (pbkrtest's ``KRmodcomp``, as lmerTest reports it):
        F (scaled by lambda), F_unscaled, df_num = rank(L), df_den, scaling, pvalue."""
        L = np.atleast_2d(np.asarray(L, dtype=float))
        r = np.zeros(L.shape[0]) if rhs is None else np.broadcast_to(np.asarray(rhs, float), (L.shape[0],))
        Lr = self._reduce(L)
        q = int(np.linalg.matrix_rank(Lr))
        A1, A2 = self._A(Lr)
        ddf, scale = self._ddf(A1, A2, q)
        diff = L @ self._params - r
        Fu = float(diff @ np.linalg.solve(Lr @ self.Phi_A @ Lr.T, diff)) / q
        F = scale * Fu
        return {"F": F, "F_unscaled": Fu, "df_num": q, "df_den": ddf, "scaling": scale,
                "pvalue": float(_dist.f_sf(F, q, ddf))}


def kenward_roger(res) -> KenwardRoger:
    """The :class:`KenwardRoger` pieces of a REML :func:`mlmeta.mixed` fit (cached on it)."""
    cached = res.__dict__.get("_kenward_roger")
    if cached is None:
        cached = res.__dict__["_kenward_roger"] = KenwardRoger(res)
    return cached
