"""Linear mixed models on raw data: ``Lambda = sigma^2 I`` with sigma^2 profiled out.

The same nested kernel as :func:`mlmeta.meregress`, with unit weights and theta
relative to the residual SD (lme4's parameterisation): ``Sigma_l = sigma^2 T_l T_l'``.

Log-likelihood convention: mlmeta reports one convention for every model, the
one of Stata and metafor (DESIGN.md section 1). For REML this is lme4's REML
criterion plus ``1/2 log|X'X|``:

    ll_REML(mlmeta) = ll_REML(lme4) + 1/2 log|X'X|      (``res.llf_lme4`` gives lme4's)

ML log-likelihoods are identical to lme4's.
"""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd

from mlmeta._errors import BoundaryWarning, ConvergenceWarning, warn
from mlmeta._threads import one_blas_thread
from mlmeta.api import _structures, constrained_design, known_correlations
from mlmeta.covspatial import spatial_levels, spatial_terms
from mlmeta.design import build_design
from mlmeta.formula import build_model_frame, parse_formula
from mlmeta.kenward_roger import kenward_roger
from mlmeta.model import NestedModel
from mlmeta.optimize import fit_model
from mlmeta.postestimation import WaldTest
from mlmeta.results import MeregressResults

__all__ = ["mixed", "MixedResults", "build_mixed_model", "TESTS"]

#: t tests on Satterthwaite df (lmerTest), on Kenward-Roger df with the adjusted
#: covariance of beta (pbkrtest), or z tests
TESTS = ("satterthwaite", "kenward-roger", "z")
# cached results that depend on the covariance of beta or on the df rule
_INFERENCE_CACHE = ("params", "_cov", "bse", "zvalues", "df", "tvalues", "pvalues", "_wald", "e")


def _test_name(ddf) -> str:
    name = str(ddf).lower().replace("_", "-")
    name = {"kr": "kenward-roger", "satterth": "satterthwaite"}.get(name, name)
    if name not in TESTS:
        raise ValueError(f"ddf must be one of {TESTS}, got {ddf!r}")
    return name


def check_levels(frame):
    """A level with one row per group (as many groups as used rows) cannot be separated from
    the residual variance: refuse it, as lme4 does ("number of levels of each grouping factor
    must be < number of observations")."""
    n = frame.y.shape[0]
    for term, labels in zip(frame.terms, frame.group_labels):
        if len(labels) >= n:
            raise ValueError(
                f"random term ({term.rhs} | {term.group}) has one observation per group ({len(labels)} "
                f"groups, {n} observations): its variance cannot be separated from the residual "
                f"variance. Remove the term; lme4 refuses such a model too.")


#: outcomes of a mixed model must lie within these magnitudes (max |y|): their sums of
#: squares and cross-products then stay far from overflow and underflow
OUTCOME_RANGE = (1e-140, 1e140)


def check_outcome(y, X, response):
    """The residual variance cannot be estimated when the fixed effects fit ``y`` exactly
    (a constant outcome, or an exact linear function of the moderators: the residual
    norm at most 1e-12 of the outcome's, both computed after scaling y by max |y|; the
    residual is that of the projection on X's columns, from their QR factorisation), and
    cannot be computed when max |y| is outside :data:`OUTCOME_RANGE` (its squares would
    overflow or underflow double precision)."""
    top = float(np.max(np.abs(y))) if y.size else 0.0
    if top > 0 and not OUTCOME_RANGE[0] <= top <= OUTCOME_RANGE[1]:
        raise ValueError(f"the outcome {response!r} reaches magnitude {top:.1e}: sums of its squares "
                         f"would {'overflow' if top > 1 else 'underflow'} double precision; rescale it "
                         f"(multiply by a power of ten: the estimates scale with it)")
    ys = y / top if top > 0 else y
    if X.shape[1]:      # X has full column rank here: the residual of ys's projection on it
        Q = np.linalg.qr(X)[0]
        r = ys - Q @ (Q.T @ ys)
    else:
        r = ys
    if np.linalg.norm(r) <= 1e-12 * np.linalg.norm(ys):
        what = f"is constant ({y[0]:.8g})" if np.ptp(y) == 0 else "is fitted exactly by the fixed effects"
        raise ValueError(f"the outcome {response!r} {what}: the residual variance cannot be estimated")


class MixedResults(MeregressResults):
    r"""A fitted linear mixed model (statsmodels-style names, lme4-comparable values).

    Everything :class:`MeregressResults` has, with the residual variance estimated:
    ``re_cov`` holds absolute covariances :math:`\sigma^2 T T'`, ``scale`` is the
    residual variance :math:`\sigma^2` and ``llf_lme4`` the log-likelihood in lme4's
    REML convention; there is no homogeneity test (``Q_M`` is None).

    Inference on the fixed effects follows the fit's ``test``: t tests on Satterthwaite
    df (default, lmerTest), t tests on Kenward-Roger df with the Kenward-Roger adjusted
    covariance of beta (``cov_params()``, ``bse`` and the intervals then use it, as
    lmerTest's ``summary(fit, ddf="Kenward-Roger")``), or z tests. :meth:`with_ddf`
    gives the same fit under another rule, and ``summary``, ``conf_int``, ``t_test``,
    ``cov_params`` and ``anova`` take ``ddf=`` for one call.

    Examples
    --------
    >>> import mlmeta
    >>> data, _, _ = mlmeta.simulate.lmm(20, 1, 15, group_sd=0.5, seed=1)
    >>> res = mlmeta.mixed("DV ~ IV1 + (IV1 | Group)", data)
    >>> print(f"sigma^2 = {res.scale:.3f}, lme4 REML criterion = {-2 * res.llf_lme4:.2f}")
    sigma^2 = 1.013, lme4 REML criterion = 899.50
    >>> res.re_cov["Group"].round(3)
             IV1  _cons
    IV1    0.088  0.021
    _cons  0.021  0.304
    >>> res.with_ddf("kenward-roger").df.round(1)      # pbkrtest's df
    IV1      13.4
    _cons    14.0
    Name: df, dtype: float64
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._fe_gls = self._fe_values
        if self.test == "kenward-roger":
            self._fe_values = self._fe_values_kr()

    def _fe_values_kr(self):
        beta = self._fe_gls[0]
        cov = kenward_roger(self).cov_params.to_numpy()
        se = np.sqrt(np.clip(np.diag(cov), 0.0, None))
        se[self._fe_gls[2] == 0] = 0.0
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.where(se > 0, beta / np.where(se > 0, se, 1.0), np.nan)
        return beta, cov, se, z

    def with_ddf(self, ddf) -> MixedResults:
        """The same fit with its tests, intervals and ``cov_params()`` under another df rule.

        Nothing is refitted: the view shares the estimates and changes only the
        inference on the fixed effects. With Kenward-Roger (pbkrtest; REML fits) the
        covariance of beta is the adjusted ``Phi_A = Phi + 2 Lambda`` (Kenward and Roger,
        1997, with ``Phi = (X'V^-1X)^-1``), the df of each contrast and the F scaling
        those of ``KRmodcomp``; they are computed once and shared by the fit's views.
        Per-cluster computations: not available for crossed designs yet (ValueError).

        Parameters
        ----------
        ddf : {"satterthwaite", "kenward-roger", "z"}
            The df rule (``"kr"`` is also accepted).

        Returns
        -------
        MixedResults
            ``self`` when the rule is the fit's own, else a view of the same fit.

        Raises
        ------
        ValueError
            For an unknown rule, Kenward-Roger on an ML fit, or Kenward-Roger on a
            crossed design.

        Examples
        --------
        >>> import mlmeta
        >>> data, _, _ = mlmeta.simulate.lmm(20, 1, 15, group_sd=0.5, seed=1)
        >>> res = mlmeta.mixed("DV ~ IV1 + (IV1 | Group)", data)
        >>> kr = res.with_ddf("kenward-roger")
        >>> kr.df.round(2)
        IV1      13.43
        _cons    13.99
        Name: df, dtype: float64
        >>> print(f"{res.bse['IV1']:.4f} -> {kr.bse['IV1']:.4f}")   # the adjusted covariance
        0.1023 -> 0.1031
        """
        rule = _test_name(ddf)
        if rule == self.test:
            return self
        if rule == "kenward-roger":
            kenward_roger(self)          # computed once, on the fit, and shared by its views
        view = copy.copy(self)
        for name in _INFERENCE_CACHE:
            view.__dict__.pop(name, None)
        view.test = rule
        view.options = dict(self.options, test=rule)
        view._fe_values = view._fe_values_kr() if rule == "kenward-roger" else self._fe_gls
        return view

    def _view(self, ddf):
        return self if ddf is None else self.with_ddf(ddf)

    def cov_params(self, ddf=None) -> pd.DataFrame:
        """Covariance of the fixed effects, ``sigma^2 (X'V^-1X)^-1``.

        With Kenward-Roger tests (``test="kenward-roger"`` or ``ddf="kenward-roger"``)
        its adjustment, pbkrtest's ``vcovAdj``.

        Parameters
        ----------
        ddf : {None, "satterthwaite", "kenward-roger", "z"}
            df rule for this call (default the fit's ``test``).

        Returns
        -------
        pandas.DataFrame
            Labelled by the coefficients.

        Examples
        --------
        >>> import mlmeta
        >>> data, _, _ = mlmeta.simulate.lmm(20, 1, 15, group_sd=0.5, seed=1)
        >>> res = mlmeta.mixed("DV ~ IV1 + (IV1 | Group)", data)
        >>> res.cov_params(ddf="kenward-roger").round(5)
                   IV1    _cons
        IV1    0.01062  0.00201
        _cons  0.00201  0.02381
        """
        return MeregressResults.cov_params(self._view(ddf))

    def conf_int(self, level: float = 95.0, *, alpha=None, ddf=None) -> pd.DataFrame:
        """Confidence intervals ``beta -+ t_{df, 1 - alpha/2} se`` of the fixed effects.

        df and se follow the df rule (Satterthwaite; Kenward-Roger with its adjusted
        covariance; normal quantiles for ``"z"``).

        Parameters
        ----------
        level : float
            Confidence level in percent.
        alpha : float, optional
            ``1 - level / 100``, as statsmodels spells it.
        ddf : {None, "satterthwaite", "kenward-roger", "z"}
            df rule for this call (default the fit's ``test``).

        Returns
        -------
        pandas.DataFrame
            Columns ``lower`` and ``upper``.

        Examples
        --------
        >>> import mlmeta
        >>> data, _, _ = mlmeta.simulate.lmm(20, 1, 15, group_sd=0.5, seed=1)
        >>> res = mlmeta.mixed("DV ~ IV1 + (IV1 | Group)", data)
        >>> res.conf_int(ddf="kenward-roger").round(3)
               lower  upper
        IV1    0.740  1.184
        _cons  0.267  0.929
        """
        return MeregressResults.conf_int(self._view(ddf), level, alpha=alpha)

    def t_test(self, hypotheses=None, level: float = 95.0, rhs=None, *, ddf=None) -> pd.DataFrame:
        """t tests of the coefficients or of linear hypotheses ``L beta = r``.

        As :meth:`MeregressResults.t_test`, on the df of each contrast under the df
        rule: Satterthwaite (lmerTest's ``contest1D``) or Kenward-Roger (with the
        adjusted covariance).

        Parameters
        ----------
        hypotheses : str, list of str or array-like, optional
            Linear hypotheses; default the coefficients.
        level : float
            Confidence level in percent.
        rhs : array-like, optional
            Right-hand sides r when ``hypotheses`` is a matrix L.
        ddf : {None, "satterthwaite", "kenward-roger", "z"}
            df rule for this call (default the fit's ``test``).

        Returns
        -------
        TTestTable
            coef, std_err, t, df, pvalue, lower, upper; one row per hypothesis.

        Examples
        --------
        >>> import mlmeta
        >>> data, _, _ = mlmeta.simulate.lmm(20, 1, 15, group_sd=0.5, seed=1)
        >>> res = mlmeta.mixed("DV ~ IV1 + (IV1 | Group)", data)
        >>> res.t_test("IV1 = 1", ddf="kenward-roger").round(3)
                  coef  std_err      t      df  pvalue  lower  upper
        IV1 = 1  0.962    0.103 -0.368  13.427   0.718   0.74  1.184
        """
        return MeregressResults.t_test(self._view(ddf), hypotheses, level, rhs)

    def anova(self, type=3, ddf=None, *, data=None) -> pd.DataFrame:
        """ANOVA table with Satterthwaite or Kenward-Roger F tests, as lmerTest's
        ``anova(fit, type=, ddf=)``.

        One row per formula term, its hypothesis ``L beta = 0`` built as lmerTest
        builds it (Type III or Type I; see :meth:`MeregressResults.anova`). With
        Satterthwaite df the F statistic is ``F = sum_m (c_m' b)^2 / d_m / q`` over the
        q eigen-rotated contrasts of ``L Var(b) L' = P D P'`` (lmerTest's
        ``contestMD``), its df ``2E / (E - q)`` with ``E = sum_m nu_m / (nu_m - 2)``;
        with Kenward-Roger df, pbkrtest's scaled F (``KRmodcomp``).

        Parameters
        ----------
        type : {3, 1, "III", "I"}
            Type III (default) or Type I (sequential) hypotheses.
        ddf : {None, "satterthwaite", "kenward-roger"}
            df rule (default the fit's ``test``: Kenward-Roger when the fit uses it,
            else Satterthwaite).
        data : pandas.DataFrame, optional
            The data of the fit, when the results do not hold it (Type III).

        Returns
        -------
        pandas.DataFrame
            Indexed by term: F, df_num, df_den, pvalue.

        Raises
        ------
        ValueError
            For an unknown ``type`` or ``ddf``.

        Examples
        --------
        >>> import mlmeta
        >>> data, _, _ = mlmeta.simulate.lmm(20, 1, 15, group_sd=0.5, seed=1)
        >>> data["dose"] = data["Group"].map(lambda g: ["low", "mid", "high"][g % 3])
        >>> fit = mlmeta.mixed("DV ~ IV1 + dose + (IV1 | Group)", data)
        >>> fit.anova().round(3)
                   F  df_num  df_den  pvalue
        term
        IV1   87.187       1  11.609   0.000
        dose   0.888       2  11.856   0.437
        >>> fit.anova(ddf="kenward-roger").round(3)
                   F  df_num  df_den  pvalue
        term
        IV1   85.841       1  13.436    0.00
        dose   0.756       2  11.997    0.49
        """
        return MeregressResults.anova(self, type=type, ddf=ddf, data=data)

    def _coef_df(self) -> pd.Series:
        if self._df_rule == "kenward-roger":
            return kenward_roger(self).coef_df()
        return super()._coef_df()

    def _row_df(self, L) -> np.ndarray:
        if self._df_rule == "kenward-roger":
            return kenward_roger(self).df(L)
        return super()._row_df(L)

    def wald_test(self, hypotheses, rhs=None, test: str = "z") -> WaldTest:
        """Wald test of linear hypotheses ``L beta = r`` on the fixed effects.

        As :meth:`MeregressResults.wald_test`: ``chi2 = (L b - r)' (L V L')^-1 (L b - r)``
        on q df (``test="z"``), or ``F = chi2 / q`` (``test="t"``) on the df of the fit's
        rule; with Kenward-Roger tests ``test="t"`` is pbkrtest's F test (the adjusted
        covariance, F scaled, Kenward-Roger ddf).

        Parameters
        ----------
        hypotheses : str, list of str or array-like
            ``"x1 = 0, x2 = 0"``, a list of such strings, or a matrix L.
        rhs : array-like, optional
            r when ``hypotheses`` is a matrix.
        test : {"z", "t"}
            chi2 or F.

        Returns
        -------
        WaldTest

        Examples
        --------
        >>> import mlmeta
        >>> data, _, _ = mlmeta.simulate.lmm(20, 1, 15, group_sd=0.5, seed=1)
        >>> res = mlmeta.mixed("DV ~ IV1 + (IV1 | Group)", data)
        >>> print(res.with_ddf("kenward-roger").wald_test("IV1 = 0", test="t"))
         ( 1)  IV1 = 0
        <BLANKLINE>
               F(1, 13.4273) =    87.14
                    Prob > F =   0.0000
        """
        out = super().wald_test(hypotheses, rhs=rhs, test=test)
        if test == "t" and self._df_rule == "kenward-roger":
            kr = kenward_roger(self).f_test(out.L.to_numpy(), out.rhs)
            out = WaldTest(out.L, out.rhs, kr["F"], kr["df_num"], kr["pvalue"], "t", kr["df_den"])
        return out

    @property
    def scale(self) -> float:
        """Residual variance sigma^2 (profiled out of the likelihood: at the optimum
        theta, rss(theta) / (n - p) for REML and rss(theta) / n for ML, with rss the
        penalised residual sum of squares of lme4's formulation)."""
        return float(self._eval.sigma2)

    @property
    def df_modelwc(self) -> int:
        return self.n_fe + self.n_theta + 1

    @property
    def llf_lme4(self) -> float:
        """Log-likelihood in lme4's convention: ``llf - 1/2 log|X'X|`` for REML
        (lme4's REML criterion is ``-2 * llf_lme4``), ``llf`` for ML."""
        if self.method == "reml":
            return self.llf - 0.5 * self.model.design.logdet_XtX
        return self.llf

    @property
    def re_cov(self) -> dict:
        """Grouping term -> covariance matrix sigma^2 T T' of its random effects
        (absolute, as lme4's ``VarCorr``)."""
        return {k: v * self.scale for k, v in super().re_cov.items()}

    @property
    def Q_M(self):
        return None

    @property
    def Q_M_df(self):
        return 0

    @property
    def Q_M_pvalue(self):
        return None

    def recovariance(self, level=None, correlation=False):
        """Random-effects covariance (absolute) or correlation matrix of a level, or a
        dict over all levels; see :meth:`MeregressResults.recovariance`."""
        out = super().recovariance(level=level, correlation=correlation)
        if correlation:
            return out
        if level is not None:
            scaled = out * self.scale
            scaled.attrs = out.attrs
            return scaled
        for k, v in out.items():
            attrs = v.attrs
            out[k] = v * self.scale
            out[k].attrs = attrs
        return out

    def profile_ci(self, level: float = 95.0, ml: bool = True) -> pd.DataFrame:
        """Profile-likelihood confidence intervals of the random-effect SDs, their
        correlations and the residual SD, as lme4's ``confint(fit, method="profile")``.

        For each parameter psi the interval is ``{psi : D(psi) - D(psi_hat) <=
        chi2_1(level)}``, D the deviance minimised over the other parameters. As lme4,
        the ML deviance is profiled even for a REML fit (``ml=False`` profiles the
        REML deviance); see :mod:`mlmeta.mixed_profile`.

        Parameters
        ----------
        level : float
            Confidence level in percent.
        ml : bool
            Profile the ML deviance (lme4's choice) or the fit's REML deviance.

        Returns
        -------
        pandas.DataFrame
            group, param, estimate, lower, upper; one row per parameter, the
            residual SD last.

        Examples
        --------
        >>> import mlmeta
        >>> data, _, _ = mlmeta.simulate.lmm(20, 1, 15, group_sd=0.5, seed=1)
        >>> res = mlmeta.mixed("DV ~ IV1 + (IV1 | Group)", data)
        >>> res.profile_ci().round(3)
              group            param  estimate  lower  upper
        0     Group          sd(IV1)     0.274  0.017  0.520
        1     Group        sd(_cons)     0.529  0.347  0.837
        2     Group  corr(IV1,_cons)     0.121 -0.663  0.747
        3  Residual     sd(Residual)     1.007  0.927  1.098
        """
        from mlmeta.mixed_profile import mixed_profile_ci

        return mixed_profile_ci(self, level, ml=ml)

    @property
    def notes(self) -> list:
        what = {"satterthwaite": "t tests and intervals on Satterthwaite degrees of freedom.",
                "kenward-roger": "t tests and intervals on Kenward-Roger degrees of freedom, with "
                                 "the Kenward-Roger adjusted covariance of the coefficients."}
        return super().notes + ([what[self.test]] if self.test in what else [])

    def _title(self) -> str:
        return f"Mixed-effects {'REML' if self.method == 'reml' else 'ML'} regression"

    def summary(self, *args, ddf=None, **kwargs):
        """Stata-like estimation table with the residual SD (no homogeneity test).

        Parameters
        ----------
        *args, **kwargs
            The options of :meth:`MeregressResults.summary` (``variance``, ``level``,
            ``header``, ``group``, ``fixed``, ``random``).
        ddf : {None, "satterthwaite", "kenward-roger", "z"}
            df rule of the t tests for this table (default the fit's ``test``).

        Returns
        -------
        Summary
            Prints as text; ``as_html()``, ``as_markdown()``, ``as_latex()``.

        Examples
        --------
        >>> import mlmeta
        >>> data, _, _ = mlmeta.simulate.lmm(20, 1, 15, group_sd=0.5, seed=1)
        >>> res = mlmeta.mixed("DV ~ IV1 + (IV1 | Group)", data)
        >>> print(res.summary(ddf="kenward-roger", header=False, group=False, random=False))
        ------------------------------------------------------------------------------
                  DV | Coefficient  Std. err.      t    P>|t|     [95% conf. interval]
        -------------+----------------------------------------------------------------
                 IV1 |   .9620587   .1030584     9.34   0.000     .7401327    1.183985
               _cons |   .5976626   .1543137     3.87   0.002     .2666772     .928648
        ------------------------------------------------------------------------------
        <BLANKLINE>
        Note: t tests and intervals on Kenward-Roger degrees of freedom, with the
              Kenward-Roger adjusted covariance of the coefficients.
        """
        kwargs.setdefault("homtest", False)
        return MeregressResults.summary(self._view(ddf), *args, **kwargs)


@one_blas_thread
def build_mixed_model(formula, data, *, method="reml", covariance=None, constraints=None,
                      collinear=False, R=None, dist=None):
    """Parse and build a profiled-residual nested model; return (model, frame, parsed)."""
    parsed = parse_formula(formula)
    if not parsed.random:
        raise ValueError("the formula has no random-effects term such as (1 | group); "
                         "use mlmeta.ols for a model without random effects")
    spatial = spatial_terms([t.group for t in parsed.random], covariance, dist, R)
    frame = build_model_frame(parsed, data, collinear_random=bool(collinear),
                              crossed=tuple(R or ()) + tuple(spatial))
    check_levels(frame)
    known = known_correlations(frame, R)
    structs = _structures(frame, covariance, known, spatial_levels(frame, spatial, dist))
    y, X, fc = constrained_design(frame, constraints)
    if frame.y.shape[0] <= X.shape[1] + 1:
        raise ValueError(f"{frame.y.shape[0]} observations for {X.shape[1]} fixed effects and a "
                         f"residual variance: more observations are needed")
    check_outcome(y, X, parsed.response)
    design = build_design(y, X, frame.Z, frame.groups, None, n_tree=frame.n_tree, known_R=known)
    model = NestedModel(design, structs, method, residual="profiled", fe_constraints=fc,
                        cluster_labels=(frame.terms[0].group, frame.group_labels[0]))
    return model, frame, parsed


@one_blas_thread
def mixed(formula, data, *, method="reml", covariance=None, constraints=None, collinear=False,
          test="satterthwaite", em_iter=20, em_tol=1e-10, em_only=False, maxiter=1000, tol=1e-6,
          safeguard="auto", verbose=False, R=None, dist=None) -> MixedResults:
    r"""Linear mixed model on raw (individual-level) data, lme4's ``lmer`` model.

    .. math::

        y = X\beta + \sum_l Z^{(l)} u^{(l)} + e, \qquad
        u^{(l)}_g \sim N(0, \sigma^2 T_l T_l'), \qquad e \sim N(0, \sigma^2 I)

    with :math:`\sigma^2` profiled out of the likelihood, as lme4 does. Formula,
    covariance structures, nesting and options are those of :func:`meregress`:
    grouping terms are nested when their ids say so and crossed otherwise, so
    ``(1 | subj) + (1 | item)`` fits crossed subject and item effects as ``lmer``.
    Log-likelihoods follow Stata's and metafor's convention,
    ``llf = llf_lme4 + 1/2 log|X'X|`` for REML (identical for ML).

    Parameters
    ----------
    formula : str
        ``"DV ~ IV1 + IV2 + (IV1 + IV2 | Group)"``: fixed part and lme4 bars.
    data : pandas.DataFrame
        One row per observation.
    method : {"reml", "ml"}
        Restricted (default) or full maximum likelihood.
    covariance, constraints, collinear
        As in :func:`meregress`.
    test : {"satterthwaite", "kenward-roger", "z"}
        t tests and intervals on Satterthwaite df (default, as lmerTest), on
        Kenward-Roger df with the Kenward-Roger adjusted covariance of beta (pbkrtest;
        REML fits; not yet for crossed designs), or normal ones.
        :meth:`MixedResults.with_ddf` switches the rule after the fit.
    em_iter, em_tol, em_only, maxiter, tol, safeguard, verbose
        Optimiser settings, as in :func:`meregress`.
    R : dict, optional
        Known correlation matrices across the groups of random-intercept terms, as in
        :func:`meregress`.
    dist : dict, optional
        Distances between the groups of a random intercept with a spatial structure
        (``covariance={"site": "SPEXP"}``; SPEXP, SPGAU, SPLIN, SPRAT, SPSPH), as in
        :func:`meregress`.

    Returns
    -------
    MixedResults

    Raises
    ------
    ValueError
        For a formula without random-effects terms, a level with one observation per
        group (its variance cannot be told from the residual's), an outcome the
        fixed effects fit exactly, too few observations, and the input problems
        :func:`meregress` rejects.

    Warns
    -----
    BoundaryWarning
        A singular fit: a variance at zero or a correlation at +-1.

    See Also
    --------
    meregress : known sampling variances instead of an estimated residual variance.
    ols, two_stage : the other strategies for repeated-measures data.

    Examples
    --------
    >>> import mlmeta
    >>> data, group_coefs, beta = mlmeta.simulate.lmm(20, 1, 15, group_sd=0.5, seed=1)
    >>> res = mlmeta.mixed("DV ~ IV1 + (IV1 | Group)", data)
    >>> res.params.round(3)
    IV1      0.962
    _cons    0.598
    Name: coef, dtype: float64
    >>> res.df.round(1)               # Satterthwaite, as lmerTest
    IV1      11.5
    _cons    13.7
    Name: df, dtype: float64
    """
    if test not in TESTS:
        raise ValueError(f"test must be one of {TESTS}, got {test!r}")
    if test == "kenward-roger" and str(method).lower() != "reml":
        raise ValueError("Kenward-Roger inference is only available for REML fits")
    model, frame, parsed = build_mixed_model(formula, data, method=method, covariance=covariance,
                                             constraints=constraints, collinear=collinear, R=R,
                                             dist=dist)
    for note in frame.notes:
        warn(note, UserWarning)
    record = fit_model(model, em_iter=em_iter, em_tol=em_tol, em_only=em_only, maxiter=maxiter,
                        tol=tol, safeguard=safeguard, verbose=verbose)
    res = MixedResults(model, frame, record, depvar=parsed.response, sampling="residual",
                       options={"formula": formula, "em_iter": em_iter, "tol": tol, "test": test},
                       data=data)
    if not res.converged:
        warn("the optimiser did not converge; see res.fit_record.messages", ConvergenceWarning)
    if res.boundary:
        warn("singular fit: estimates on the boundary of the parameter space: "
             + "; ".join(res.boundary), BoundaryWarning)
    return res
