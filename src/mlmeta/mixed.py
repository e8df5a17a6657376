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

import warnings

import numpy as np

from mlmeta._errors import BoundaryWarning, ConvergenceWarning
from mlmeta.api import _structures, constrained_design
from mlmeta.design import build_design
from mlmeta.formula import build_model_frame, parse_formula
from mlmeta.model import NestedModel
from mlmeta.optimize import fit_nested
from mlmeta.results import MeregressResults

__all__ = ["mixed", "MixedResults", "build_mixed_model"]


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


def check_outcome(y, X, response):
    """The residual variance cannot be estimated when the fixed effects fit ``y`` exactly
    (a constant outcome, or an exact linear function of the moderators)."""
    r = y - X @ np.linalg.lstsq(X, y, rcond=None)[0] if X.shape[1] else y
    if np.linalg.norm(r) <= 1e-12 * np.linalg.norm(y):
        what = f"is constant ({y[0]:.8g})" if np.ptp(y) == 0 else "is fitted exactly by the fixed effects"
        raise ValueError(f"the outcome {response!r} {what}: the residual variance cannot be estimated")


class MixedResults(MeregressResults):
    r"""A fitted linear mixed model (statsmodels-style names, lme4-comparable values).

    Everything :class:`MeregressResults` has, with the residual variance estimated:
    ``re_cov`` holds absolute covariances :math:`\sigma^2 T T'`, ``scale`` is the
    residual variance :math:`\sigma^2` and ``llf_lme4`` the log-likelihood in lme4's
    REML convention. Tests and intervals use Satterthwaite df (lmerTest) unless the
    model was fitted with ``test="z"``; there is no homogeneity test (``Q_M`` is None).

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
    """

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

    def _title(self) -> str:
        return f"Mixed-effects {'REML' if self.method == 'reml' else 'ML'} regression"

    def summary(self, *args, **kwargs):
        """Stata-like estimation table with the residual SD (no homogeneity test); the
        options of :meth:`MeregressResults.summary`."""
        kwargs.setdefault("homtest", False)
        return super().summary(*args, **kwargs)


def build_mixed_model(formula, data, *, method="reml", covariance=None, constraints=None,
                      collinear=False):
    """Parse and build a profiled-residual nested model; return (model, frame, parsed)."""
    parsed = parse_formula(formula)
    if not parsed.random:
        raise ValueError("the formula has no random-effects term such as (1 | group); "
                         "use mlmeta.ols for a model without random effects")
    frame = build_model_frame(parsed, data, collinear_random=bool(collinear), residual=True)
    check_levels(frame)
    structs = _structures(frame, covariance)
    y, X, fc = constrained_design(frame, constraints)
    if frame.y.shape[0] <= X.shape[1] + 1:
        raise ValueError(f"{frame.y.shape[0]} observations for {X.shape[1]} fixed effects and a "
                         f"residual variance: more observations are needed")
    check_outcome(y, X, parsed.response)
    design = build_design(y, X, frame.Z, frame.groups, None)
    model = NestedModel(design, structs, method, residual="profiled", fe_constraints=fc,
                        cluster_labels=(frame.terms[0].group, frame.group_labels[0]))
    return model, frame, parsed


def mixed(formula, data, *, method="reml", covariance=None, constraints=None, collinear=False,
          test="satterthwaite", em_iter=20, em_tol=1e-10, em_only=False, maxiter=1000, tol=1e-6,
          safeguard="auto", verbose=False) -> MixedResults:
    r"""Linear mixed model on raw (individual-level) data, lme4's ``lmer`` model.

    .. math::

        y = X\beta + \sum_l Z^{(l)} u^{(l)} + e, \qquad
        u^{(l)}_g \sim N(0, \sigma^2 T_l T_l'), \qquad e \sim N(0, \sigma^2 I)

    with :math:`\sigma^2` profiled out of the likelihood, as lme4 does. Formula,
    covariance structures, nesting and options are those of :func:`meregress`.
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
    test : {"satterthwaite", "z"}
        t tests and intervals on Satterthwaite df (default, as lmerTest) or normal
        ones.
    em_iter, em_tol, em_only, maxiter, tol, safeguard, verbose
        Optimiser settings, as in :func:`meregress`.

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
    if test not in ("satterthwaite", "z"):
        raise ValueError(f"test must be 'satterthwaite' or 'z', got {test!r}")
    model, frame, parsed = build_mixed_model(formula, data, method=method, covariance=covariance,
                                             constraints=constraints, collinear=collinear)
    for note in frame.notes:
        warnings.warn(note, UserWarning, stacklevel=2)
    record = fit_nested(model, em_iter=em_iter, em_tol=em_tol, em_only=em_only, maxiter=maxiter,
                        tol=tol, safeguard=safeguard, verbose=verbose)
    res = MixedResults(model, frame, record, depvar=parsed.response, sampling="residual",
                       options={"formula": formula, "em_iter": em_iter, "tol": tol, "test": test})
    if not res.converged:
        warnings.warn("the optimiser did not converge; see res.fit_record.messages",
                      ConvergenceWarning, stacklevel=2)
    if res.boundary:
        warnings.warn("singular fit: estimates on the boundary of the parameter space: "
                      + "; ".join(res.boundary), BoundaryWarning, stacklevel=2)
    return res
