"""Profile-likelihood intervals for the variance parameters of a mixed model on raw data
(lme4's ``confint(fit, method="profile")``): random-effect SDs and correlations on the
absolute scale, and the residual SD sigma.

As lme4 (``profile.merMod`` refits by ML first), a REML fit is refitted by maximum
likelihood and the ML deviance is profiled, so the intervals bracket the ML estimates;
``ml=False`` profiles the fit's own (restricted) deviance instead.

Each level is written with its standard deviations and correlations as parameters
(theta = SDs relative to sigma, then correlations: ``Sigma_l = sigma^2 D R D``), and sigma
is a parameter of its own, so the (restricted) deviance is the one not profiled over
sigma^2 (:func:`mlmeta.satterthwaite.nonprofiled_deviance`):

    dev(theta, s) = dof log(2 pi s) + log|C(theta)| + rss(theta) / s  [+ log|H| - log|X'X|],

with ``d dev / d s = dof / s - rss / s^2`` and the engine's gradient in theta at fixed s.
The profile of an absolute SD a = sigma theta_i holds theta_i = a / sigma and minimises
over sigma and the other parameters; of a correlation, holds it; of sigma, holds s. The
limits solve ``dev_profile(v) - dev_min = chi2_1(level)`` (lme4's |zeta| = z_{1-alpha/2}),
by Brent's method on each side of the estimate. When the profile at a bound (an SD of 0,
a correlation of -+1) stays below the cutoff, the bound is the limit, as lme4 reports.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from mlmeta import _dist
from mlmeta.covstruct import Custom, FactorLevels
from mlmeta.model import NestedModel
from mlmeta.optimize import fit_nested
from mlmeta.summary import confidence_level

__all__ = ["mixed_profile_ci", "MixedProfile"]


class MixedProfile:
    """The profile deviance of each variance parameter of a :func:`mlmeta.mixed` fit.

    ``params``: (kind, theta index or None for sigma, group, label) in report order;
    ``estimate(k)``: the k-th parameter at the fit; ``deviance(k, v)``: the minimum of
    dev over the other parameters with parameter k held at v (L-BFGS-B with the analytic
    gradient, started from the solution at the nearest value between the estimate and v)."""

    def __init__(self, res, ml=True):
        model = res.model
        if getattr(model, "residual", None) != "profiled":
            raise ValueError("this profile is for mixed models with an estimated residual variance")
        theta_fit = np.asarray(res.theta, dtype=float)
        if ml and model.method != "ml":
            model = NestedModel(model.design, model.structs, "ml", residual="profiled",
                                fe_constraints=model.fe_constraints,
                                cluster_labels=model.cluster_labels)
            theta_fit = np.asarray(fit_nested(model, theta0=theta_fit).theta, dtype=float)
        dev_fit = model.evaluate(theta_fit).deviance
        structs, thetas, params, off = [], [], [], 0
        for g, s, sl in zip(res.group_names, model.structs, model.theta_slices):
            names = list(s.effect_names)
            th = theta_fit[sl]
            if s.kind in ("unstructured", "exchangeable"):
                q = len(names)
                if s.kind == "unstructured":
                    pattern = [[None] * q for _ in range(q)]
                else:
                    pattern = [["sd" if i == j else (None if q == 2 else "rho") for j in range(q)]
                               for i in range(q)]
                c = Custom(names, pattern)
                s, th = c, c.from_Sigma(s.Sigma(th), corr_bound=c.CORR_BOUND)
            if s.kind == "identity":
                params.append(("sd", off, g, f"sd({' '.join(names)})"))
            elif s.kind == "independent":
                params += [("sd", off + i, g, f"sd({e})") for i, e in enumerate(names)]
            elif isinstance(s, FactorLevels):      # theta = (SDs, rho), labelled as reported
                k = len(s.sd_groups)
                params += [("sd" if j < k else "corr", off + j, g, lab)
                           for j, lab in enumerate(s.labels())]
            elif s.kind == "custom":
                k = len(s.sd_groups)
                params += [("sd", off + a, g, f"sd({' '.join(names[i] for i in w)})")
                           for a, w in enumerate(s.sd_groups)]
                params += [("corr", off + k + b, g, "corr(" + ",".join(f"{names[i]},{names[j]}"
                                                                       for i, j in w[:1]) + ")")
                           for b, w in enumerate(s.corr_groups)]
            else:
                raise ValueError(f"profile intervals are not available for the {s.title} structure "
                                 f"of level {g!r}")
            structs.append(s)
            thetas.append(np.asarray(th, dtype=float))
            off += len(thetas[-1])
        params.append(("sigma", None, "Residual", "sd(Residual)"))
        self.model = NestedModel(model.design, structs, model.method, residual="profiled",
                                 fe_constraints=model.fe_constraints,
                                 cluster_labels=model.cluster_labels)
        self.theta = np.concatenate(thetas)
        ev = self.model.evaluate(self.theta)
        if abs(ev.deviance - dev_fit) > 1e-7 * max(1.0, abs(dev_fit)):
            raise RuntimeError("the profiling parameterisation does not reproduce the fit")
        self.sigma = float(np.sqrt(ev.sigma2))
        self.dev_min = float(ev.deviance)
        n, p = model.n_obs, model.n_fe
        self.dof = n - p if model.method == "reml" else n
        self.params = params
        self._starts = {}

    def estimate(self, k) -> float:
        kind, i, _, _ = self.params[k]
        if kind == "sigma":
            return self.sigma
        return float(self.theta[i] * (self.sigma if kind == "sd" else 1.0))

    def corr_range(self, k):
        """Where correlation parameter k can go, the others at the estimate: its bounds
        (CAR: rho >= 0), within which R is positive definite (exchangeable, HCS)."""
        i = self.params[k][1]
        for s, sl in zip(self.model.structs, self.model.theta_slices):
            if sl.start <= i < sl.stop:
                return s.rho_range(self.theta[sl], i - sl.start)
        raise ValueError(f"no parameter {k}")

    def _dev(self, theta, s, grad):
        """dev(theta, s) and its gradient in (theta, s)."""
        ev = self.model.evaluate(theta, gradient=grad, sigma2=s)
        if not grad:
            return ev.deviance, None, None
        return ev.deviance, np.asarray(ev.grad, dtype=float), self.dof / s - ev.rss / s ** 2

    def deviance(self, k, value) -> float:
        """min dev with parameter k held at ``value`` (warm-started from the nearest point
        profiled before)."""
        from scipy import optimize
        kind, i, _, _ = self.params[k]
        m = self.theta.size
        free = [j for j in range(m) if j != i]
        lo, hi = self.model.lower, self.model.upper
        est = self.estimate(k)
        starts = self._starts.setdefault(k, [(est, self.theta.copy(), self.sigma ** 2)])
        # warm start from the nearest point profiled before on the way out from the estimate
        inside = [t for t in starts if min(est, value) <= t[0] <= max(est, value)]
        _, theta0, s0 = min(inside, key=lambda t: abs(t[0] - value))

        if kind == "sigma":
            s = value ** 2

            def unpack(z):
                return z, s

            z0 = theta0.copy()
            bounds = list(zip(lo, hi))

            def fun(z):
                d, g, _ = self._dev(z, s, True)
                return d, g
        else:
            def unpack(z):
                theta = np.empty(m)
                theta[free] = z[1:]
                sig = np.exp(z[0])
                theta[i] = value / sig if kind == "sd" else value
                return theta, sig ** 2

            z0 = np.concatenate([[0.5 * np.log(s0)], theta0[free]])
            bounds = [(None, None)] + [(lo[j], hi[j]) for j in free]

            def fun(z):
                theta, s = unpack(z)
                try:
                    d, g, ds = self._dev(theta, s, True)
                except FloatingPointError:
                    return np.inf, np.zeros_like(z)
                gz = np.empty_like(z)
                gz[1:] = g[free]
                sig = np.exp(z[0])
                gz[0] = ds * 2 * s + (g[i] * (-value / sig) if kind == "sd" else 0.0)
                return d, gz

        if len(z0) == 0:
            return self._dev(*unpack(z0), False)[0]
        z0 = np.clip(z0, [b[0] if b[0] is not None else -np.inf for b in bounds],
                     [b[1] if b[1] is not None else np.inf for b in bounds])
        out = optimize.minimize(fun, z0, jac=True, method="L-BFGS-B", bounds=bounds,
                                options={"ftol": 1e-15, "gtol": 1e-10, "maxiter": 5000})
        theta, s = unpack(out.x)
        starts.append((value, theta.copy(), s))
        return float(out.fun)


def mixed_profile_ci(res, level: float = 95.0, ml: bool = True) -> pd.DataFrame:
    """Profile-likelihood confidence intervals of the random-effect SDs, correlations and the
    residual SD of a :func:`mlmeta.mixed` fit (lme4's ``confint(fit, method="profile")``
    for its ``sd_``, ``cor_`` and ``sigma`` rows). Columns: group, param, estimate, lower,
    upper (SD or correlation scale); estimate is the ML estimate when ``ml`` (lme4's rule,
    see the module docstring), else the fit's."""
    from scipy import optimize
    level = confidence_level(level)
    prof = MixedProfile(res, ml=ml)
    cut = _dist.chi2_ppf(level / 100.0, 1)
    rows = []
    for k, (kind, _, group, label) in enumerate(prof.params):
        est = prof.estimate(k)

        def f(v, k=k):
            return prof.deviance(k, v) - prof.dev_min - cut

        if kind == "corr":
            b = Custom.CORR_BOUND
            lo, hi = prof.corr_range(k)
            lower = ((-1.0 if lo <= -b else lo) if est <= lo or f(lo) <= 0
                     else optimize.brentq(f, lo, est, xtol=1e-10))
            upper = ((1.0 if hi >= b else hi) if est >= hi or f(hi) <= 0
                     else optimize.brentq(f, est, hi, xtol=1e-10))
        else:
            scale = max(est, 1e-4 * prof.sigma)
            tol = 1e-10 * scale
            if kind == "sigma":
                lo = est / 2
                while f(lo) <= 0:
                    lo /= 2
                lower = optimize.brentq(f, lo, est, xtol=tol)
            else:
                lower = 0.0 if est == 0 or f(0.0) <= 0 else optimize.brentq(f, 0.0, est, xtol=tol)
            hi = est + scale
            for _ in range(60):
                if f(hi) > 0:
                    break
                hi = est + 2 * (hi - est)
            upper = optimize.brentq(f, est, hi, xtol=tol) if f(hi) > 0 else np.inf
        rows.append((group, label, est, lower, upper))
    return pd.DataFrame(rows, columns=["group", "param", "estimate", "lower", "upper"])
