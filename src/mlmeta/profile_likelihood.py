"""Profile likelihoods of the variance components of a meta-regression (metafor's
``profile.rma.mv`` and ``confint.rma.mv``).

:class:`ProfileMixin` adds ``profile()`` and ``profile_ci()`` to the results of
:func:`mlmeta.meregress`. For a variance sigma_l^2 (or a correlation rho) of a random
effect, the profile (restricted) log-likelihood is

    llf_p(v) = max over the other covariance parameters of llf(theta), with the
               parameter held at v (beta profiled out by GLS),

and the level-(1 - alpha) interval is ``{v : llf_p(v) >= llf_max - chi2_1(1 - alpha) / 2}``,
its ends found by Brent's method (a variance interval starts at 0 when the estimate is 0
or the profile stays above the cutoff there; correlations are bounded by -1 and 1).
Levels with correlated effects are written as custom patterns (SDs then correlations,
``Sigma = D R D``) so that each variance and correlation is one element of theta.
Mixed models on raw data profile their parameters in :mod:`mlmeta.mixed_profile`.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import pandas as pd

from mlmeta import _dist
from mlmeta.covstruct import Custom, FactorLevels
from mlmeta.optimize import fit_nested
from mlmeta.summary import confidence_level
from mlmeta.vcomp import corr_lower

__all__ = ["ProfileMixin"]


class ProfileMixin:
    """Profile likelihood of the variance components (a mixin of the results)."""

    @cached_property
    def _profile_setup(self):
        """(model, theta, params) for profiling. Levels with correlated effects are
        written as Stata custom patterns (theta = SDs then correlations, ``Sigma = D R D``
        exactly), so that every variance and correlation is one theta element; params
        lists (theta index, grouping term, label, "var" | "corr")."""
        from mlmeta.model import NestedModel

        if self._profiled():
            raise ValueError("profile likelihoods are available for models with known "
                             "sampling variances")
        m = self.model
        structs, thetas, params, off = [], [], [], 0
        for g, s, sl in zip(self.group_names, m.structs, m.theta_slices):
            names = list(s.effect_names)
            if s.kind in ("unstructured", "exchangeable"):
                q = len(names)
                if s.kind == "unstructured":
                    pattern = [[None] * q for _ in range(q)]
                else:    # one SD, one correlation (a label needs two or more places)
                    pattern = [["sd" if i == j else (None if q == 2 else "rho") for j in range(q)]
                               for i in range(q)]
                c = Custom(names, pattern)
                if s.kind == "exchangeable":   # (sd, rho), rho held just inside (-1/(q-1), 1)
                    lo = corr_lower(s)
                    sd, rho = s.report_values(self.theta[sl])
                    th = np.array([sd, np.clip(rho, lo + 1e-9 * (1 - lo), c.CORR_BOUND)])
                else:
                    th = c.from_Sigma(s.Sigma(self.theta[sl]), corr_bound=c.CORR_BOUND)
                s = c
            else:
                th = self.theta[sl]
            if s.kind == "identity":
                params.append((off, g, f"var({' '.join(names)})", "var"))
            elif s.kind == "independent":
                params += [(off + i, g, f"var({e})", "var") for i, e in enumerate(names)]
            elif isinstance(s, FactorLevels):      # theta = (SDs, rho), labelled as reported
                k = len(s.sd_groups)
                params += [(off + j, g, lab, "var" if j < k else "corr")
                           for j, lab in enumerate(s.labels(variance=True))]
            elif s.kind == "custom":
                k = len(s.sd_groups)
                params += [(off + a, g, f"var({' '.join(names[i] for i in w)})", "var")
                           for a, w in enumerate(s.sd_groups)]
                params += [(off + k + b, g, "corr(" + ",".join(f"{names[i]},{names[j]}" for i, j in w[:1])
                            + ")", "corr") for b, w in enumerate(s.corr_groups)]
            structs.append(s)
            thetas.append(np.asarray(th, dtype=float))
            off += len(thetas[-1])
        if all(a is b for a, b in zip(structs, m.structs)):
            return m, self.theta.copy(), params
        pm = NestedModel(m.design, structs, m.method, residual=m.residual,
                         fe_constraints=m.fe_constraints, cluster_labels=m.cluster_labels)
        theta = np.concatenate(thetas)
        if abs(pm.deviance(theta) + 2.0 * self.llf) > 1e-7 * max(1.0, abs(self.llf)):
            raise RuntimeError("the profiling parameterisation does not reproduce the fit")
        return pm, theta, params

    def _profile_params(self):
        """(theta index, grouping term, label, kind) of every profiled parameter."""
        return self._profile_setup[2]

    def _resolve_param(self, param):
        params = self._profile_params()
        if isinstance(param, (int, np.integer)):
            hits = [p for p in params if p[0] == param]
        elif isinstance(param, tuple):
            hits = [p for p in params if p[1] == param[0] and p[2] in (param[1], f"var({param[1]})")]
        else:
            hits = [p for p in params if p[1] == param]
        if len(hits) != 1:
            avail = [(p[1], p[2]) for p in params]
            raise ValueError(f"cannot profile {param!r}: give a grouping term with one variance, "
                             f"a (term, effect) or (term, label) pair or a theta index; "
                             f"profileable: {avail}")
        return hits[0]

    def _profile_llf(self, i, value, kind="var", start=None):
        """max over the other parameters of the (restricted) log-likelihood with the
        variance (theta_i = sqrt(value)) or correlation (theta_i = value) held;
        returns (llf, theta)."""
        model, theta_hat, _ = self._profile_setup
        theta0 = (theta_hat if start is None else start).copy()
        theta0[i] = np.sqrt(max(value, 0.0)) if kind == "var" else value
        if model.n_theta == 1:
            return -0.5 * model.deviance(theta0), theta0
        # Newton from the warm start (EM steps would move the held element's partners as
        # if it were free); a run that does not converge is repeated from the estimate
        rec = fit_nested(model, theta0=theta0, fixed=[i], em_iter=0, safeguard=False)
        if not rec.converged and start is not None:
            theta1 = theta_hat.copy()
            theta1[i] = theta0[i]
            alt = fit_nested(model, theta0=theta1, fixed=[i], em_iter=0, safeguard=False)
            if alt.deviance < rec.deviance:
                rec = alt
        return -0.5 * rec.deviance, np.asarray(rec.theta, float)

    def _corr_range(self, i):
        """Where correlation parameter theta_i can go, the others at the estimate: its
        bounds (CAR: rho >= 0), within which R is positive definite (exchangeable and HCS
        over q effects: rho > -1 / (q - 1))."""
        model, theta, _ = self._profile_setup
        for s, sl in zip(model.structs, model.theta_slices):
            if sl.start <= i < sl.stop:
                lo, hi = s.rho_range(theta[sl], i - sl.start)
                exact = -1.0 / max(s.q - 1, 1)     # the exchangeable bound, not its bisection
                return (exact if abs(lo - exact) <= 1e-12 else lo), hi
        raise ValueError(f"no parameter {i}")

    def _profile_estimate(self, i, kind):
        t = self._profile_setup[1][i]
        return float(t ** 2) if kind == "var" else float(t)

    def profile(self, param=None, n: int = 20, values=None) -> pd.DataFrame:
        """Profile (restricted) log-likelihood of a variance component or correlation.

        ``param``: a grouping term (random intercept), a (term, effect) pair, a
        (term, label) pair with a label of :meth:`profile_ci` (e.g.
        ``("trial", "corr(outcome[AL],outcome[PD])")``) or a theta index; default:
        the first. Variances are profiled in the variance metric sigma^2 (metafor's
        ``profile.rma.mv``), correlations in rho: llf = max over the other covariance
        parameters (beta profiled out). ``values`` sets the grid; by default ``n``
        points spanning the profile-likelihood CI with a margin.

        Parameters
        ----------
        param : str, tuple or int, optional
            The parameter (see above); default the first variance.
        n : int
            Number of grid points.
        values : array-like, optional
            The grid, in the variance (or correlation) metric.

        Returns
        -------
        pandas.DataFrame
            Columns sigma2, sd, llf (variances) or rho, llf (correlations);
            ``attrs`` hold the estimate, llf_max, the parameter and its theta index.

        Raises
        ------
        ValueError
            For an unknown parameter or one held fixed.

        Examples
        --------
        >>> import mlmeta
        >>> df = mlmeta.datasets.load("schoolcal")
        >>> res = mlmeta.meregress("stdmdiff ~ 1 + (1 | district) + (1 | district:school)",
        ...                        df, variance="var")
        >>> prof = res.profile("district", values=[0.0, 0.0651, 0.2])
        >>> prof.round(4)
           sigma2      sd      llf
        0  0.0000  0.0000 -16.8455
        1  0.0651  0.2551  -7.9587
        2  0.2000  0.4472  -9.7741
        """
        i, g, label, kind = self._resolve_param(param if param is not None
                                                else self._profile_params()[0][0])
        est = self._profile_estimate(i, kind)
        if values is None:
            ci = self.profile_ci(params=[i]).iloc[0]
            lo, hi = float(ci.lower), float(ci.upper)
            if kind == "corr":
                values = np.linspace(max(-1.0, lo - 0.1), min(1.0, hi + 0.1), n)
                values = np.clip(values, *self._corr_range(i))
            else:
                if not np.isfinite(hi):
                    hi = lo + 4.0 * max(est, 1e-8)
                span = hi - lo
                values = np.linspace(max(0.0, lo - 0.25 * span), hi + 0.25 * span, n)
            values = np.union1d(values, [est])
        values = np.asarray(values, dtype=float)
        llf = np.empty(values.size)
        start = None
        order = np.argsort(np.abs(values - est))
        for k in order:      # outward from the estimate, warm-starting each fit
            llf[k], start = self._profile_llf(i, values[k], kind, start)
        if kind == "corr":
            df = pd.DataFrame({"rho": values, "llf": llf})
        else:
            df = pd.DataFrame({"sigma2": values, "sd": np.sqrt(values), "llf": llf})
        df.attrs.update(param=(g, label), theta_index=i, estimate=est, llf_max=float(self.llf))
        return df

    def profile_ci(self, level: float = 95.0, params=None) -> pd.DataFrame:
        """Profile-likelihood confidence intervals for the variance components and the
        correlations of correlated random effects (metafor's ``confint``).

        The limits solve 2 (llf_max - llf(value)) = chi2_1(level) (brentq on each side
        of the estimate). When the profile at a variance of 0 (a correlation of -1 or
        1, or the end of its feasible range: rho > -1 / (q - 1) for exchangeable and
        HCS, rho >= 0 for CAR) stays above the cutoff, that bound is the limit, as in
        metafor. Rows: each variance (and each correlation of unstructured,
        exchangeable and custom levels, rho of AR, HAR, CAR and HCS). Columns: group,
        param, estimate, lower, upper (variances or correlations), sd, sd_lower,
        sd_upper (NaN for correlations).

        Parameters
        ----------
        level : float
            Confidence level in percent.
        params : list of int, optional
            Theta indices to compute (default all).

        Returns
        -------
        pandas.DataFrame

        Examples
        --------
        >>> import mlmeta
        >>> df = mlmeta.datasets.load("schoolcal")
        >>> res = mlmeta.meregress("stdmdiff ~ 1 + (1 | district) + (1 | district:school)",
        ...                        df, variance="var")
        >>> res.profile_ci()[["group", "param", "estimate", "lower", "upper"]].round(4)
                     group       param  estimate   lower   upper
        0         district  var(_cons)    0.0651  0.0222  0.2072
        1  district:school  var(_cons)    0.0327  0.0163  0.0628
        """
        from scipy import optimize
        confidence_level(level)             # validates the level
        cut = self.llf - 0.5 * _dist.chi2_ppf(level / 100.0, 1)
        v = self.model.design.variance
        vscale = float(np.median(v)) if v is not None else 1.0
        bound = Custom.CORR_BOUND
        rows = []
        for i, g, label, kind in self._profile_params():
            if params is not None and i not in params:
                continue
            est = self._profile_estimate(i, kind)
            cache = {}

            def f(x, i=i, kind=kind, cache=cache):  # bound now: f is built anew for each parameter
                if x not in cache:
                    cache[x] = self._profile_llf(i, x, kind)[0]
                return cache[x] - cut

            if kind == "corr":
                tol = 1e-10
                lo, hi = self._corr_range(i)
                # a bound where R turns singular (exchangeable: -1/(q-1)) is probed just inside
                lo_in = lo if lo <= -bound else lo + 1e-9 * (1.0 - lo)
                lower = ((-1.0 if lo <= -bound else lo) if est <= lo_in or f(lo_in) >= 0
                         else optimize.brentq(f, lo_in, est, xtol=tol))
                upper = ((1.0 if hi >= bound else hi) if est >= hi or f(hi) >= 0
                         else optimize.brentq(f, est, hi, xtol=tol))
                rows.append((g, label, est, lower, upper, kind))
                continue
            scale = max(est, 1e-4 * vscale)
            tol = 1e-10 * scale
            lower = 0.0 if est == 0 or f(0.0) >= 0 else optimize.brentq(f, 0.0, est, xtol=tol)
            hi = est + scale
            for _ in range(60):
                if f(hi) < 0:
                    break
                hi = est + 2 * (hi - est)
            upper = optimize.brentq(f, est, hi, xtol=tol) if f(hi) < 0 else np.inf
            rows.append((g, label, est, lower, upper, kind))
        df = pd.DataFrame(rows, columns=["group", "param", "estimate", "lower", "upper", "kind"])
        is_var = (df.pop("kind") == "var").to_numpy()
        for c in ("estimate", "lower", "upper"):
            df["sd" if c == "estimate" else f"sd_{c}"] = np.where(
                is_var, np.sqrt(np.where(is_var, df[c], 0.0)), np.nan)
        return df
