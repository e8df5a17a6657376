"""Results of a multilevel meta-regression, with statsmodels-style names.

Fixed effects (GLS at the estimated covariance):

    beta = (sum_j X_j' V_j^-1 X_j)^-1 sum_j X_j' V_j^-1 y_j,   Var(beta) = (sum_j X_j' V_j^-1 X_j)^-1

Multilevel residual homogeneity test (Stata's Q_M): with the fixed-effects
estimator ``beta_f`` (weights Lambda^-1), ``Q_M = sum_j r_j' Lambda_j^-1 r_j``
on ``n - p`` degrees of freedom. The model Wald test covers every coefficient
but the constant: ``chi2 = b' Var(b)^-1 b`` on their number of degrees of freedom.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import pandas as pd
from scipy import special

from mlmeta import _dist
from mlmeta import summary as _summary
from mlmeta._errors import warn
from mlmeta.inference_methods import InferenceMethodsMixin
from mlmeta.postestimation import PostestimationMixin
from mlmeta.profile_likelihood import ProfileMixin
from mlmeta.summary import confidence_level
from mlmeta.vcomp import component_table, variance_components

__all__ = ["MeregressResults"]


class MeregressResults(PostestimationMixin, ProfileMixin, InferenceMethodsMixin):
    """A fitted multilevel meta-regression (returned by :func:`meregress`).

    Attributes
    ----------
    params, bse, zvalues, tvalues, pvalues : pandas.Series
        Fixed effects (GLS at the estimated covariance), standard errors
        ``sqrt(diag((X'V^-1 X)^-1))``, z (or t) statistics ``b / se`` (``tvalues`` is
        statsmodels' name of the same numbers) and p-values, over the coefficients
        (``_cons`` last, Stata's order).
    fittedvalues, resid : pandas.Series
        Fitted values ``X beta + Z u`` (BLUPs included) and residuals ``y - fitted``
        over the used rows, indexed as the data (statsmodels' MixedLM names).
    df : pandas.Series
        Per-coefficient degrees of freedom of the tests and intervals (inf for z
        tests).
    llf, aic, bic : float
        (Restricted) log-likelihood in Stata's and metafor's convention,
        ``AIC = -2 llf + 2k`` and ``BIC = -2 llf + k log n`` with k =
        :attr:`df_modelwc`.
    nobs, n_dropped : int
        Rows used; rows dropped for missing values.
    method : str
        "reml" or "ml".
    converged : bool
        Whether the optimiser met its convergence criterion.
    n_iter : int
        Newton iterations.
    sample : numpy.ndarray of bool
        Mask over the data rows used.
    group_names : list of str
        Grouping terms, outermost first.
    re_cov : dict
        Grouping term -> covariance DataFrame of its random effects.
    theta : numpy.ndarray
        Covariance parameters in the estimation metric.
    Q_M, Q_M_df, Q_M_pvalue : float, int, float
        Multilevel residual homogeneity test: ``Q_M = sum_j r_j' Lambda_j^-1 r_j`` at
        the fixed-effects estimate, on n - p df.
    wald_chi2, wald_df, wald_pvalue : float, int, float
        Joint Wald test of the moderators, ``chi2 = b' Var(b)^-1 b`` (None without
        moderators).
    groups : pandas.DataFrame
        Group counts and min/avg/max observations per group, per level, and how the
        level relates to the others (``nesting``: "top", "in <outer term>" or
        "crossed").
    boundary : list of str
        Estimates on the boundary of the parameter space.
    notes : list of str
        Notes of the summary (convergence, boundary, dropped rows).
    fit_record : FitRecord
        How the optimum was reached (starts, evaluations, messages).
    model, frame
        The model object and the model frame (the fit's inputs).
    data : pandas.DataFrame or None
        The data the model was fitted to (for :meth:`anova` and marginal means by
        data column); results pickle with it.

    Examples
    --------
    >>> import mlmeta
    >>> df = mlmeta.datasets.load("schoolcal")
    >>> res = mlmeta.meregress("stdmdiff ~ 1 + (1 | district) + (1 | district:school)",
    ...                        df, variance="var")
    >>> res
    <MeregressResults REML n=56 llf=-7.958724 levels=['district', 'district:school']>
    >>> res.conf_int().round(4)
           lower   upper
    _cons  0.019  0.3504
    >>> print(f"Q_M = {res.Q_M:.2f} on {res.Q_M_df} df")
    Q_M = 578.86 on 55 df
    >>> res.groups
                     n_groups  min       avg  max      nesting
    group
    district               11    3  5.090909   11          top
    district:school        56    1  1.000000    1  in district
    """

    def __init__(self, model, frame, record, *, depvar, sampling="variance", options=None, data=None):
        self.model = model
        self.data = data            # the data the model was fitted to (ANOVA, marginal means)
        self.frame = frame
        self.fit_record = record
        self.depvar = depvar
        self.sampling = sampling
        self.options = dict(options or {})
        self.method = model.method
        self.theta = np.asarray(record.theta, dtype=float).copy()
        ev = model.evaluate(self.theta)
        self._eval = ev
        names = list(frame.fe_names)
        self.fe_names = names
        beta, cov = ev.beta, ev.cov_beta
        fc = getattr(model, "fe_constraints", None)
        self.constraints = fc
        if fc is not None:
            beta, cov = fc.expand(beta, cov)
        se = np.sqrt(np.clip(np.diag(cov), 0.0, None))
        se[se < 1e-12 * np.maximum(np.abs(beta), 1.0)] = 0.0
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.where(se > 0, beta / np.where(se > 0, se, 1.0), np.nan)
        # own copies: params, _cov, bse and zvalues are built from them on first use
        self._fe_values = (np.array(beta, dtype=float), np.array(cov, dtype=float), se, z)
        self.omitted = list(frame.omitted)
        self.test = str(self.options.get("test", "z"))
        self.dfs = str(self.options.get("dfs", "contain"))
        self.llf = -0.5 * ev.deviance
        self.nobs = int(model.n_obs)
        self.converged = bool(record.converged)
        self.n_iter = int(record.n_iter)
        self.sample = np.asarray(frame.sample, dtype=bool)
        self.n_dropped = int(frame.n_dropped)
        self.group_names = [t.group for t in frame.terms]

    # -- fixed effects ------------------------------------------------------
    @cached_property
    def _fe_index(self) -> pd.Index:
        """One index shared by every fixed-effects table."""
        return pd.Index(self.fe_names)

    @cached_property
    def params(self) -> pd.Series:
        return pd.Series(self._fe_values[0], index=self._fe_index, name="coef")

    @cached_property
    def _cov(self) -> pd.DataFrame:
        return pd.DataFrame(self._fe_values[1], index=self._fe_index, columns=self._fe_index)

    @cached_property
    def bse(self) -> pd.Series:
        return pd.Series(self._fe_values[2], index=self._fe_index, name="std err")

    @cached_property
    def zvalues(self) -> pd.Series:
        return pd.Series(self._fe_values[3], index=self._fe_index, name="z")

    @cached_property
    def df(self) -> pd.Series:
        """Per-coefficient degrees of freedom of the tests and intervals, as every mlmeta
        result has them: with ``test="t"`` metafor's containment df (``dfs="contain"``)
        or k - p (``dfs="residual"``), Satterthwaite df (``test="satterthwaite"``,
        lmerTest) or Kenward-Roger df (``test="kenward-roger"``, pbkrtest), inf for z tests.
        Computed on first use."""
        if not self._z_tests:
            df = self._coef_df()
        else:
            df = pd.Series(np.inf, index=self._fe_index)
        return df.astype(float).rename("df")

    @property
    def df_resid(self) -> pd.Series | None:
        """Deprecated spelling of :attr:`df` (None for z tests)."""
        warn("df_resid is deprecated; use df (per-coefficient df, inf for z tests)", FutureWarning)
        return None if self._z_tests else self.df

    @property
    def _z_tests(self) -> bool:
        return self.test == "z"

    @cached_property
    def tvalues(self) -> pd.Series:
        """The test statistics b / se under statsmodels' name (as its MixedLM and GLM
        results): t statistics (named "t") when the tests are t tests, z statistics
        (named "z", the values of :attr:`zvalues`) otherwise."""
        return self.zvalues.rename("z" if self._z_tests else "t")

    @cached_property
    def fittedvalues(self) -> pd.Series:
        """Fitted values over the used rows, indexed as the data (statsmodels' MixedLM,
        Stata's ``predict, fitted``): ``x'b + sum_l z_l' u_l`` with the BLUPs of every
        level. ``predict("xb")`` gives the marginal ``x'b``."""
        return self.predict("fitted").iloc[np.flatnonzero(self.sample)]

    @cached_property
    def resid(self) -> pd.Series:
        """Residuals over the used rows: ``y - fittedvalues`` (conditional on the BLUPs, as
        statsmodels' MixedLM); ``predict("residuals_marginal")`` gives ``y - x'b``."""
        return self.predict("residuals").iloc[np.flatnonzero(self.sample)].rename("resid")

    @cached_property
    def pvalues(self) -> pd.Series:
        z = np.abs(self._fe_values[3])
        if not self._z_tests:
            return pd.Series(2 * _dist.t_sf(z, self.df.values), index=self._fe_index,
                             name="P>|t|")
        # 2 * _dist.norm_sf(|z|), which scipy evaluates as ndtr(-|z|)
        return pd.Series(2 * special.ndtr(-z), index=self._fe_index, name="P>|z|")

    def cov_params(self) -> pd.DataFrame:
        """Covariance matrix of the fixed effects, ``Var(beta) = (X' V^-1 X)^-1``.

        Returns
        -------
        pandas.DataFrame
            p x p, labelled by the coefficient names.

        Examples
        --------
        >>> import mlmeta
        >>> df = mlmeta.datasets.load("schoolcal")
        >>> res = mlmeta.meregress("stdmdiff ~ 1 + (1 | district) + (1 | district:school)",
        ...                        df, variance="var")
        >>> res.cov_params().round(5)
                 _cons
        _cons  0.00715
        """
        return self._cov.copy()

    def _crit(self, level):
        q = 0.5 + confidence_level(level) / 200.0
        if not self._z_tests:
            return _dist.t_ppf(q, self.df.values)
        return _dist.norm_ppf(q)

    def conf_int(self, level: float = 95.0, *, alpha=None) -> pd.DataFrame:
        """Wald confidence intervals ``beta -+ z se`` at ``level`` percent.

        With ``test="t"`` (or the Satterthwaite and Kenward-Roger tests of mixed
        models) the quantiles are those of t on each coefficient's :attr:`df`.

        Parameters
        ----------
        level : float
            Confidence level in percent (Stata's ``level()``).
        alpha : float, optional
            ``1 - level / 100``, as statsmodels spells it.

        Returns
        -------
        pandas.DataFrame
            Columns ``lower`` and ``upper``, one row per coefficient.

        Examples
        --------
        >>> import mlmeta
        >>> df = mlmeta.datasets.load("schoolcal")
        >>> res = mlmeta.meregress("stdmdiff ~ 1 + (1 | district) + (1 | district:school)",
        ...                        df, variance="var")
        >>> res.conf_int(level=90).round(4)
                lower   upper
        _cons  0.0456  0.3238
        """
        z = self._crit(confidence_level(level, alpha))
        return pd.DataFrame({"lower": self.params - z * self.bse, "upper": self.params + z * self.bse})

    @property
    def n_fe(self) -> int:
        return len(self.fe_names)

    @property
    def n_theta(self) -> int:
        return int(self.model.n_theta)

    @property
    def df_modelwc(self) -> int:
        """Number of estimated parameters: fixed effects plus covariance parameters."""
        return self.n_fe + self.n_theta

    @property
    def aic(self) -> float:
        return -2 * self.llf + 2 * self.df_modelwc

    @property
    def bic(self) -> float:
        return -2 * self.llf + np.log(self.nobs) * self.df_modelwc

    @cached_property
    def _wald(self):
        """chi2 = b' V^+ b over the moderators (pseudo-inverse and rank under constraints)."""
        idx = [i for i, nm in enumerate(self.fe_names) if nm != "_cons"]
        if not idx:
            return None, 0, None
        b = self.params.values[idx]
        V = self._cov.values[np.ix_(idx, idx)]
        w, U = np.linalg.eigh(0.5 * (V + V.T))
        keep = w > 1e-12 * max(float(w.max()), 1e-300)
        df = int(keep.sum())
        if df == 0:
            return None, 0, None
        proj = U[:, keep].T @ b
        chi2 = float(proj @ (proj / w[keep]))
        return chi2, df, float(_dist.chi2_sf(chi2, df))

    @property
    def wald_chi2(self):
        return self._wald[0]

    @property
    def wald_df(self) -> int:
        return self._wald[1]

    @property
    def wald_pvalue(self):
        return self._wald[2]

    @cached_property
    def _qm(self):
        d = self.model.design
        Xw, yw = d.Xw, d.yw
        if d.n_fe:
            beta_f, *_ = np.linalg.lstsq(Xw, yw, rcond=None)
            r = yw - Xw @ beta_f
        else:
            r = yw
        Q = float(r @ r)
        df = d.n_obs - d.n_fe
        return Q, df, float(_dist.chi2_sf(Q, df)) if df > 0 else np.nan

    @property
    def Q_M(self) -> float:
        return self._qm[0]

    @property
    def Q_M_df(self) -> int:
        return self._qm[1]

    @property
    def Q_M_pvalue(self) -> float:
        return self._qm[2]

    # -- random effects ---------------------------------------------------------
    @property
    def re_cov(self) -> dict:
        """Grouping term -> estimated covariance matrix Sigma of its random effects."""
        out = {}
        for name, s, S in zip(self.group_names, self.model.structs, self.model.Sigma_list(self.theta)):
            out[name] = pd.DataFrame(S, index=s.effect_names, columns=s.effect_names)
        return out

    @cached_property
    def _sd_scale(self) -> float:
        """Typical sampling SD (the median one; 1 without sampling variances)."""
        return self.model.scale

    @cached_property
    def _vc_values(self):
        """Reported values and boundary flags, without the information matrix."""
        return variance_components(self.model, self.theta, self.group_names, sd_scale=self._sd_scale,
                                   with_cov=False)

    @cached_property
    def _vc(self):
        return variance_components(self.model, self.theta, self.group_names, sd_scale=self._sd_scale)

    def recovariance(self, level=None, correlation: bool = False):
        """Random-effects covariance (or correlation) matrix of a level (Stata's
        ``estat recovariance``).

        Parameters
        ----------
        level : str, optional
            A grouping term; None gives a dict over all levels.
        correlation : bool
            Correlations instead of covariances.

        Returns
        -------
        pandas.DataFrame or dict
            Each matrix carries ``.attrs["fixed"]``: the parameters held fixed,
            e.g. ``["corr(year_c,_cons) = .5"]``.

        Raises
        ------
        ValueError
            For an unknown level.

        Examples
        --------
        >>> import mlmeta
        >>> df = mlmeta.datasets.load("schoolcal")
        >>> res = mlmeta.meregress(
        ...     "stdmdiff ~ year_c + (1 + year_c | district) + (1 | district:school)",
        ...     df, variance="var", covariance={"district": [[None, 0.5], [0.5, None]]})
        >>> res.recovariance("district", correlation=True)
                year_c  _cons
        year_c     1.0    0.5
        _cons      0.5    1.0
        >>> res.recovariance("district").attrs["fixed"]
        ['corr(year_c,_cons) = 0.5']
        """
        levels = self.group_names if level is None else [level]
        out = {}
        for name in levels:
            if name not in self.group_names:
                raise ValueError(f"unknown level {name!r}; levels are {self.group_names}")
            lvl = self.group_names.index(name)
            s = self.model.structs[lvl]
            S = self.model.Sigma_list(self.theta)[lvl]
            if correlation:
                sd = np.sqrt(np.clip(np.diag(S), 0.0, None))
                with np.errstate(divide="ignore", invalid="ignore"):
                    S = np.where(np.outer(sd, sd) > 0, S / np.outer(sd, sd), 0.0)
                np.fill_diagonal(S, 1.0)
            df = pd.DataFrame(S, index=s.effect_names, columns=s.effect_names)
            fixed = []
            vals = s.report_values(self.theta[self.model.theta_slices[lvl]])
            for i, (lab, v) in enumerate(zip(s.labels(), vals)):
                if getattr(s, "is_fixed", lambda k: False)(i):
                    fixed.append(f"{lab} = {v:g}")
            df.attrs["fixed"] = fixed
            out[name] = df
        return out if level is None else out[level]

    def re_params(self, variance: bool = False, level: float = 95.0) -> pd.DataFrame:
        """Random-effects parameters with standard errors and confidence intervals.

        SDs and correlations (or variances and covariances) in Stata's metric:
        standard errors by the delta method from the inverse observed information of
        eta = (log SD, atanh correlation); intervals are Wald intervals on the eta
        scale mapped back (so they stay inside the parameter space).

        Parameters
        ----------
        variance : bool
            Variances and covariances instead of SDs and correlations.
        level : float
            Confidence level in percent.

        Returns
        -------
        pandas.DataFrame
            group, param, estimate, std_err, lower, upper, boundary, fixed.

        Examples
        --------
        >>> import mlmeta
        >>> df = mlmeta.datasets.load("schoolcal")
        >>> res = mlmeta.meregress("stdmdiff ~ 1 + (1 | district) + (1 | district:school)",
        ...                        df, variance="var")
        >>> res.re_params()[["group", "param", "estimate", "std_err"]].round(4)
                     group      param  estimate  std_err
        0         district  sd(_cons)    0.2551   0.0696
        1  district:school  sd(_cons)    0.1809   0.0307
        """
        comps, cov_eta, free_pos = self._vc
        rows = component_table(comps, cov_eta, free_pos, self.model, self.theta, level, variance)
        df = pd.DataFrame(rows, columns=["param", "estimate", "std_err", "lower", "upper"])
        df.insert(0, "group", [c.group for c in comps])
        df["boundary"] = [c.boundary for c in comps]
        df["fixed"] = [c.fixed for c in comps]
        return df

    @property
    def boundary(self) -> list:
        """Descriptions of estimates on the boundary of the parameter space."""
        comps = self._vc_values[0]
        out = []
        flagged = set()
        for c in comps:
            if c.boundary and not c.fixed:
                if c.kind == "sd":
                    what = "is zero"
                elif c.kind == "range":     # a spatial range: at a bound, or its SD zero
                    side = self.model.structs[c.level].at_bound(c.value)
                    what = ({"lower": "is at its lower bound (no spatial correlation)",
                             "upper": "is at its upper bound (a constant spatial effect)"}
                            .get(side, "is not identified because the spatial SD is zero"))
                else:
                    # flagged because an SD it involves is zero (vcomp): not identified
                    zero = [d.label_sd for d in comps
                            if d.level == c.level and d.kind == "sd" and d.boundary
                            and set(d.effects) & {a for pair in c.effects for a in pair}]
                    if zero:
                        what = (f"is not identified because {' and '.join(zero)} "
                                f"{'is' if len(zero) == 1 else 'are'} zero")
                    elif c.lower > -1.0 and c.value < 0:
                        what = (f"is at its lower bound {c.lower:.4g} = -1/(q-1): the covariance "
                                f"matrix is singular")
                    else:
                        what = f"is {c.value:+.0f}"
                out.append(f"{c.label_sd} at level {c.group} {what}")
                flagged.add(c.group)
        # a singular covariance matrix without a zero SD or a +-1 correlation (lme4's
        # isSingular: a singular value of the relative factor below 1e-4)
        scale = self._sd_scale
        for name, T in zip(self.group_names, self.model.T_list(self.theta)):
            if name in flagged or T.shape[0] < 2:
                continue
            sv = np.linalg.svd(T, compute_uv=False)
            rank = int(np.sum(sv > 1e-4 * scale))
            if rank < T.shape[0]:
                out.append(f"the covariance matrix at level {name} is singular "
                           f"(rank {rank} of {T.shape[0]})")
        return out

    @cached_property
    def groups(self) -> pd.DataFrame:
        """Per level: number of groups, min/avg/max observations per group, and how the
        level relates to the others (``nesting``: "top", "in <outer group>" or "crossed")."""
        d = self.model.design
        rows = []
        nesting = self.frame.nesting or [None] * len(self.group_names)
        for lvl, (name, how) in enumerate(zip(self.group_names, nesting)):
            sizes = d.group_sizes(lvl)
            rel = "crossed" if how == "crossed" else ("top" if how is None else f"in {how}")
            rows.append((name, len(sizes), int(sizes.min()), float(sizes.mean()), int(sizes.max()), rel))
        return pd.DataFrame(rows, columns=["group", "n_groups", "min", "avg", "max",
                                           "nesting"]).set_index("group")

    # -- reporting ----------------------------------------------------------------
    @property
    def notes(self) -> list:
        notes = []
        if not self.converged:
            notes.append("convergence not achieved: " + "; ".join(self.fit_record.messages or
                                                                   ["gradient criterion not met"]))
        elif self.fit_record.better_optimum:
            notes.extend(m for m in self.fit_record.messages if "local optimum" in m)
        for b in self.boundary:
            if " is not identified because " in b:
                notes.append(f"{b}.")
            else:
                notes.append(f"{b}: the estimate is on the boundary of the parameter space.")
        notes.extend(self.frame.notes)
        notes.extend(getattr(self.frame, "crossing", []))
        if self.n_dropped:
            notes.append(f"{self.n_dropped} observation{'s' if self.n_dropped != 1 else ''} "
                         f"dropped because of missing values.")
        return notes

    def summary(self, variance: bool = False, level: float = 95.0, header: bool = True,
                group: bool = True, fixed: bool = True, random: bool = True,
                homtest: bool = True) -> _summary.Summary:
        """Stata-like estimation table (``print(res.summary())``; HTML in notebooks).

        Parameters
        ----------
        variance : bool
            Variances/covariances instead of SDs/correlations (Stata's
            ``variance``).
        level : float
            Confidence level in percent.
        header, group, fixed, random, homtest : bool
            Show the header, the group table, the fixed-effects table, the
            random-effects table, the homogeneity test (Stata's ``noheader``,
            ``nogroup``, ``nofetable``, ``noretable``, ``nohomtest`` when False).

        Returns
        -------
        Summary
            Prints as text (also at the REPL), shows as HTML in notebooks, and
            exports ``as_text()``, ``as_html()``, ``as_markdown()`` (pipe tables) and
            ``as_latex()`` (booktabs ``tabular`` environments), labels in full.

        Examples
        --------
        >>> import mlmeta
        >>> df = mlmeta.datasets.load("schoolcal")
        >>> res = mlmeta.meregress("stdmdiff ~ 1 + (1 | district) + (1 | district:school)",
        ...                        df, variance="var")
        >>> print(res.summary(header=False, group=False, random=False))
        ------------------------------------------------------------------------------
            stdmdiff | Coefficient  Std. err.      z    P>|z|     [95% conf. interval]
        -------------+----------------------------------------------------------------
               _cons |   .1847132   .0845559     2.18   0.029     .0189866    .3504397
        ------------------------------------------------------------------------------
        Test of homogeneity: Q_M = chi2(55) = 578.86               Prob > Q_M = 0.0000
        >>> tex = res.summary(header=False, group=False, random=False).as_latex()
        >>> print("\\n".join(tex.splitlines()[:6]))
        \\begin{tabular}{lrrrrrr}
        \\multicolumn{7}{l}{\\textbf{Fixed effects}} \\\\
        \\toprule
        stdmdiff & Coefficient & Std. err. & z & ... & {[}95\\% conf. & interval{]} \\\\
        \\midrule
        \\_cons & .1847132 & .0845559 & 2.18 & 0.029 & .0189866 & .3504397 \\\\
        """
        crit = pd.Series(np.broadcast_to(self._crit(level), (len(self.fe_names),)),
                         index=self.fe_names)
        fixed_rows = []
        for nm in self.fe_names:
            b, se = float(self.params[nm]), float(self.bse[nm])
            if se > 0:
                c = float(crit[nm])
                fixed_rows.append(_summary.FixedRow(nm, b, se, b / se, float(self.pvalues[nm]),
                                                    b - c * se, b + c * se))
            else:
                fixed_rows.append(_summary.FixedRow(nm, b, np.nan, np.nan, np.nan, np.nan, np.nan,
                                                    status="constrained"))
        for nm in self.omitted:
            fixed_rows.append(_summary.FixedRow(nm, 0.0, np.nan, np.nan, np.nan, np.nan, np.nan,
                                                status="omitted"))
        comps = self._vc[0]
        table = self.re_params(variance=variance, level=level)
        blocks = []
        levels = list(zip(self.group_names, [s.title for s in self.model.structs]))
        if any(c.group == "Residual" and c.level == len(levels) for c in comps):
            levels.append(("Residual", ""))
        for lvl, (name, title) in enumerate(levels):
            rows = []
            for c, (_, r) in zip(comps, table.iterrows()):
                if c.level != lvl:
                    continue
                se = None if pd.isna(r.std_err) else float(r.std_err)
                rows.append(_summary.RandomRow(
                    r.param, float(r.estimate), se,
                    None if se is None else float(r.lower), None if se is None else float(r.upper),
                    fixed=bool(c.fixed), boundary=bool(c.boundary and not c.fixed)))
            blocks.append(_summary.RandomBlock(name, title, rows))
        g = self.groups
        group_rows = [_summary.GroupRow(nm, int(r.n_groups), int(r["min"]), float(r.avg), int(r["max"]),
                                        crossed=r.nesting == "crossed")
                      for nm, r in g.iterrows()]
        title = self._title()
        return _summary.Summary(
            title=title, depvar=self.depvar, nobs=self.nobs, groups=group_rows,
            wald_chi2=self.wald_chi2, wald_df=self.wald_df, wald_p=self.wald_pvalue,
            ll_label=self.model.ll_label, llf=self.llf, fixed=fixed_rows,
            Q_M=self.Q_M, Q_M_df=self.Q_M_df, Q_M_p=self.Q_M_pvalue, random=blocks,
            level=level, notes=self.notes, show_header=header, show_groups=group,
            constraints=self.constraints.describe() if self.constraints is not None else [],
            stat="z" if self._z_tests else "t",
            show_fixed=fixed, show_random=random, show_homtest=homtest)

    def _title(self) -> str:
        kind = "meta-regression" if any(nm != "_cons" for nm in self.fe_names) else "meta-analysis"
        return f"Multilevel {'REML' if self.method == 'reml' else 'ML'} {kind}"

    def to_dict(self) -> dict:
        """Plain-Python view of the main results (for JSON output).

        Returns
        -------
        dict
            method, nobs, llf, aic, bic, converged, params, bse, conf_int, re_cov,
            re_params, Q_M, the Wald test, groups and notes; floats, lists and dicts
            only (non-finite values as None).

        Examples
        --------
        >>> import mlmeta
        >>> df = mlmeta.datasets.load("schoolcal")
        >>> res = mlmeta.meregress("stdmdiff ~ 1 + (1 | district) + (1 | district:school)",
        ...                        df, variance="var")
        >>> import json
        >>> round(json.loads(json.dumps(res.to_dict()))["llf"], 4)
        -7.9587
        """
        ci = self.conf_int()
        re = self.re_params()
        return {
            "method": self.method, "nobs": self.nobs, "llf": self.llf, "aic": self.aic,
            "bic": self.bic, "converged": self.converged, "n_iter": self.n_iter,
            "params": self.params.to_dict(), "bse": self.bse.to_dict(),
            "zvalues": self.zvalues.to_dict(), "pvalues": self.pvalues.to_dict(),
            "conf_int": {k: [float(ci.loc[k, "lower"]), float(ci.loc[k, "upper"])] for k in ci.index},
            "re_cov": {k: v.values.tolist() for k, v in self.re_cov.items()},
            "re_names": {k: list(v.index) for k, v in self.re_cov.items()},
            "re_params": [
                {k: (None if (isinstance(v, float) and not np.isfinite(v)) else v)
                 for k, v in row.items()} for row in re.to_dict(orient="records")],
            "Q_M": self.Q_M, "Q_M_df": self.Q_M_df, "Q_M_pvalue": self.Q_M_pvalue,
            "wald_chi2": self.wald_chi2, "wald_df": self.wald_df, "wald_pvalue": self.wald_pvalue,
            "groups": self.groups.reset_index().to_dict(orient="records"),
            "notes": self.notes,
        }

    def __repr__(self):
        return (f"<MeregressResults {self.method.upper()} n={self.nobs} llf={self.llf:.8g} "
                f"levels={self.group_names}>")
