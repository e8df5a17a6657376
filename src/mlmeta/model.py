"""The profiled objective of a nested model: deviance(theta), its gradient, EM moments.

With sampling variances known (``Lambda`` fixed) and ``beta`` profiled out by GLS,
the kernel gives ``log|C|`` and ``S = A'V^-1A`` (``A = [X, y]`` whitened). Writing
``H = X'V^-1X``, ``beta = H^-1 X'V^-1 y`` and ``rss = r'V^-1 r``:

    -2 ll_ML   = n log 2pi + log|Lambda| + log|C| + rss
    -2 ll_REML = (n - p) log 2pi + log|Lambda| + log|C| + rss + log|H| - log|X'X|

(the REML convention of Stata and metafor, DESIGN.md section 1). The gradient with
respect to each level's factor T_l is ``2 G_l`` from the kernel with
``Phi = gamma gamma' (+ diag(H^-1, 0) for REML)``, ``gamma = (-beta, 1)``,
and is chained to theta through dT/dtheta.
"""

from __future__ import annotations

import numpy as np
from scipy.linalg.lapack import dpotrf as _dpotrf, dpotrs as _dpotrs

from mlmeta.covstruct import CovStruct
from mlmeta.design import NestedDesign

__all__ = ["NestedModel", "Evaluation"]

LOG2PI = float(np.log(2.0 * np.pi))


class Evaluation:
    """What one evaluation at theta produced (deviance, beta, cov of beta, ...)."""

    __slots__ = ("theta", "deviance", "beta", "cov_beta", "rss", "grad", "E", "logdet_C",
                 "logdet_H", "Hinv", "sigma2")

    def __init__(self, **kw):
        for k in self.__slots__:
            setattr(self, k, kw.get(k))


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
    """

    def __init__(self, design: NestedDesign, structs: list[CovStruct], method: str = "reml",
                 residual: str = "known"):
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
        sizes = [s.n_theta for s in structs]
        offs = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        self.theta_slices = [slice(offs[i], offs[i + 1]) for i in range(len(sizes))]
        self.n_theta = int(offs[-1])
        self.lower = np.concatenate([s.lower for s in structs]) if structs else np.zeros(0)
        self.upper = np.concatenate([s.upper for s in structs]) if structs else np.zeros(0)
        self.fe_constraints = None      # set by the API when R beta = r constraints apply
        # Structures linear in theta (all but custom): T_flat = M theta, dT/dtheta = M.
        self._linear = all(getattr(s, "kind", "") != "custom" for s in structs)
        if self._linear and self.n_theta:
            K = design.kernel
            M = np.zeros((int(K.t_off[-1]), self.n_theta))
            for lvl, (s, sl) in enumerate(zip(self.structs, self.theta_slices)):
                dT = s.dT(np.zeros(s.n_theta))
                M[K.t_off[lvl]:K.t_off[lvl + 1], sl] = np.stack([d.ravel(order="F") for d in dT], axis=1)
            self._M = M
        else:
            self._M = None
        self._eye_p = np.eye(design.n_fe)

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
    def evaluate(self, theta, gradient=False, em=False) -> Evaluation:
        """Deviance (-2 log-likelihood) at theta; optionally its gradient and EM moments."""
        theta = np.asarray(theta, dtype=np.float64)
        d = self.design
        K = d.kernel
        Tflat = self._M @ theta if self._M is not None else K.pack_T(self.T_list(theta))
        logdet_C, S, status = K.factor(Tflat)
        if status:
            raise FloatingPointError(f"factorisation failed at random-effects node {status - 1}")
        p = d.n_fe
        n = d.n_obs
        if p:
            cH, info = _dpotrf(S[:p, :p], lower=1, clean=1)
            if info != 0:
                raise FloatingPointError("X'V^-1X is not positive definite (collinear moderators?)")
            beta, _ = _dpotrs(cH, S[:p, p], lower=1)
            rss = float(S[p, p] - S[p, :p] @ beta)
            logdet_H = 2.0 * float(np.sum(np.log(np.diag(cH))))
            cov_beta, _ = _dpotrs(cH, self._eye_p, lower=1)
        else:
            beta = np.zeros(0)
            rss = float(S[0, 0])
            logdet_H = 0.0
            cov_beta = np.zeros((0, 0))
        Hinv = cov_beta
        sigma2 = 1.0
        if self.residual == "known":
            dev = n * LOG2PI + d.logdet_Lambda + logdet_C + rss
            if self.method == "reml":
                dev += -p * LOG2PI + logdet_H - d.logdet_XtX
        else:
            dof = n - p if self.method == "reml" else n
            sigma2 = rss / dof
            if not sigma2 > 0:
                raise FloatingPointError("the residual variance is zero (the model fits exactly)")
            dev = dof * (LOG2PI + np.log(sigma2) + 1.0) + logdet_C
            if self.method == "reml":
                dev += logdet_H - d.logdet_XtX
            cov_beta = sigma2 * Hinv
        ev = Evaluation(theta=theta, deviance=float(dev), beta=beta, cov_beta=cov_beta,
                        rss=rss, logdet_C=float(logdet_C), logdet_H=logdet_H, Hinv=Hinv,
                        sigma2=float(sigma2))
        if gradient or em:
            G, E = K.gradient_pieces(Tflat, self.phi(beta, Hinv, rss))
            if gradient:
                ev.grad = self._chain(2.0 * G, theta)
            if em:
                ev.E = E
        return ev

    def phi(self, beta, Hinv, rss=None):
        """The kernel's Phi, with gamma = (-beta, 1) and H^-1 = (X'V^-1X)^-1:

        known Lambda:        Phi = gamma gamma' (+ [H^-1, 0; 0, 0] for REML)
        profiled sigma^2:    Phi = gamma gamma' / sigma^2 (+ [H^-1, 0; 0, 0] for REML)

        with sigma^2 = rss / dof, dof = n - p (REML) or n (ML). The same Phi gives the
        gradient of the profiled deviance (d[dof log rss] = (dof / rss) d rss) and the
        EM moments in the relative (sigma-scaled) metric."""
        gamma = np.append(-beta, 1.0)
        Phi = np.outer(gamma, gamma)
        if self.residual == "profiled":
            dof = self.n_obs - self.n_fe if self.method == "reml" else self.n_obs
            Phi *= dof / rss
        if self.method == "reml":
            Phi[:-1, :-1] += Hinv
        return Phi

    def _chain(self, dT_flat, theta):
        """d deviance / d theta from d deviance / d T (flat, column-major per level)."""
        if self._M is not None:
            return self._M.T @ dT_flat
        K = self.design.kernel
        g = np.empty(self.n_theta)
        for lvl, (s, sl) in enumerate(zip(self.structs, self.theta_slices)):
            q = s.q
            dTl = dT_flat[K.t_off[lvl]:K.t_off[lvl + 1]].reshape(q, q, order="F")
            g[sl] = np.einsum("kij,ij->k", s.dT(theta[sl]), dTl)
        return g

    def _ll_label(self):
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
        """
        ev = self.evaluate(theta, em=True)
        K = self.design.kernel
        WW, SB = K.node_solution()
        p = self.design.n_fe
        nc = p + 1
        gamma = np.append(-ev.beta, 1.0)
        out = []
        for lvl, T in enumerate(self.T_list(theta)):
            q = T.shape[0]
            nodes = self.design.node_of_group[lvl]
            o = self.design.offset_of_group[lvl]
            na = K.nq[nodes]
            r = np.arange(q)
            # W_a rows o..o+q, all columns (node blocks are column-major nq_a x ncol)
            idx = (K.za_ptr[nodes][:, None, None] + (o[:, None, None] + r[None, :, None])
                   + np.arange(nc)[None, None, :] * na[:, None, None])
            W = WW[idx]                                                      # (G, q, ncol)
            base = K.zz_ptr[nodes] + K.diag_offset(nodes)
            idx = (base[:, None, None] + (o[:, None, None] + r[None, :, None])
                   + (o[:, None, None] + r[None, None, :]) * na[:, None, None])
            Sig = SB[idx]                                                    # (G, q, q)
            u = np.einsum("ij,gjk,k->gi", T, W, gamma)
            WX = W[:, :, :p]
            inner = Sig + np.einsum("gip,pr,gjr->gij", WX, ev.Hinv, WX)
            pev = ev.sigma2 * np.einsum("ij,gjk,lk->gil", T, inner, T)
            out.append((u, pev))
        return out

    def marginal_blocks(self, theta):
        """Yield (start, stop, V_j) per top-level cluster j (rows start:stop of the
        sorted design), with the dense marginal covariance

            V_j = Lambda_j + sum_l Z_lj (I (x) Sigma_l) Z_lj'

        (times sigma^2, with Lambda_j = I, when the residual variance is profiled).

        For per-cluster postestimation (robust variances, diagnostics); O(n_j^2) each."""
        d = self.design
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
        """One EM update: Sigma_l <- T_l (E_l / N_l) T_l', projected on each structure."""
        ev = self.evaluate(theta, em=True)
        K = self.design.kernel
        Sigmas = []
        for lvl, (s, T) in enumerate(zip(self.structs, self.T_list(theta))):
            q = s.q
            El = ev.E[K.t_off[lvl]:K.t_off[lvl + 1]].reshape(q, q, order="F")
            Sig = T @ (El / self.design.n_groups[lvl]) @ T.T
            Sigmas.append(0.5 * (Sig + Sig.T))
        return self.theta_from_Sigmas(Sigmas), ev
