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
from mlmeta.api import _structures, constrained_design
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


def check_outcome(y, X, response):
    """The residual variance cannot be estimated when the fixed effects fit ``y`` exactly
    (a constant outcome, or an exact linear function of the moderators)."""
    r = y - X @ np.linalg.lstsq(X, y, rcond=None)[0] if X.shape[1] else y
    if np.linalg.norm(r) <= 1e-12 * np.linalg.norm(y):
        what = f"is constant ({y[0]:.8g})" if np.ptp(y) == 0 else "is fitted exactly by the fixed effects"
        raise ValueError(f"the outcome {response!r} {what}: the residual variance cannot be estimated")


class MixedResults(MeregressResults):
    """A fitted linear mixed model (statsmodels-style names, lme4-comparable values).

    ``re_cov`` holds absolute covariances (sigma^2 T T'); ``scale`` is the residual
    variance sigma^2; ``llf_lme4`` the log-likelihood in lme4's REML convention.

    Inference on the fixed effects follows ``test``: t tests on Satterthwaite df, or on
    Kenward-Roger df with the Kenward-Roger adjusted covariance of beta (then
    ``cov_params()``, ``bse`` and the intervals use it, as lmerTest's
    ``summary(ddf="Kenward-Roger")``), or z tests. :meth:`with_ddf` gives the same fit
    under another rule; ``summary``, ``conf_int``, ``t_test``, ``cov_params`` and
    ``anova`` take ``ddf=`` for that."""

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
        """The same fit with its tests, intervals and ``cov_params()`` under another df rule:
        ``"satterthwaite"``, ``"kenward-roger"`` (REML fits; the adjusted covariance of
        beta) or ``"z"``. Returns ``self`` when the rule is the fit's own."""
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
        """Var(beta): sigma^2 (X'V^-1X)^-1, or its Kenward-Roger adjustment (pbkrtest's
        ``vcovAdj``) with ``test="kenward-roger"`` or ``ddf="kenward-roger"``."""
        return MeregressResults.cov_params(self._view(ddf))

    def conf_int(self, level: float = 95.0, *, alpha=None, ddf=None) -> pd.DataFrame:
        return MeregressResults.conf_int(self._view(ddf), level, alpha=alpha)

    def t_test(self, hypotheses=None, level: float = 95.0, rhs=None, *, ddf=None) -> pd.DataFrame:
        return MeregressResults.t_test(self._view(ddf), hypotheses, level, rhs)

    def anova(self, type=3, ddf=None, *, data=None) -> pd.DataFrame:
        """Type III (or I) ANOVA table with Satterthwaite or Kenward-Roger F tests, as
        lmerTest's ``anova(fit, type=, ddf=)``; see :func:`mlmeta.anova.anova`."""
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
        """As :meth:`MeregressResults.wald_test`; with Kenward-Roger tests, ``test="t"`` is
        pbkrtest's F test (the adjusted covariance, F scaled, Kenward-Roger ddf)."""
        out = super().wald_test(hypotheses, rhs=rhs, test=test)
        if test == "t" and self._df_rule == "kenward-roger":
            kr = kenward_roger(self).f_test(out.L.to_numpy(), out.rhs)
            out = WaldTest(out.L, out.rhs, kr["F"], kr["df_num"], kr["pvalue"], "t", kr["df_den"])
        return out

    @property
    def scale(self) -> float:
        """Residual variance sigma^2 (profiled estimate: rss / (n - p) REML, rss / n ML)."""
        return float(self._eval.sigma2)

    @property
    def df_modelwc(self) -> int:
        return self.n_fe + self.n_theta + 1

    @property
    def llf_lme4(self) -> float:
        if self.method == "reml":
            return self.llf - 0.5 * self.model.design.logdet_XtX
        return self.llf

    @property
    def re_cov(self) -> dict:
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
        """Profile-likelihood confidence intervals of the random-effect SDs, their correlations
        and the residual SD (lme4's ``confint(fit, method="profile")``, which profiles the ML
        deviance of a REML fit; ``ml=False`` profiles the REML deviance); see
        :func:`mlmeta.mixed_profile.mixed_profile_ci`."""
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
        """The estimation table (see :meth:`MeregressResults.summary`); ``ddf=`` switches
        the df rule of its t tests ("satterthwaite", "kenward-roger", "z")."""
        kwargs.setdefault("homtest", False)
        return MeregressResults.summary(self._view(ddf), *args, **kwargs)


def build_mixed_model(formula, data, *, method="reml", covariance=None, constraints=None,
                      collinear=False):
    """Parse and build a profiled-residual nested model; return (model, frame, parsed)."""
    parsed = parse_formula(formula)
    if not parsed.random:
        raise ValueError("the formula has no random-effects term such as (1 | group); "
                         "use mlmeta.ols for a model without random effects")
    frame = build_model_frame(parsed, data, collinear_random=bool(collinear))
    check_levels(frame)
    structs = _structures(frame, covariance)
    y, X, fc = constrained_design(frame, constraints)
    if frame.y.shape[0] <= X.shape[1] + 1:
        raise ValueError(f"{frame.y.shape[0]} observations for {X.shape[1]} fixed effects and a "
                         f"residual variance: more observations are needed")
    check_outcome(y, X, parsed.response)
    design = build_design(y, X, frame.Z, frame.groups, None, n_tree=frame.n_tree)
    model = NestedModel(design, structs, method, residual="profiled", fe_constraints=fc,
                        cluster_labels=(frame.terms[0].group, frame.group_labels[0]))
    return model, frame, parsed


def mixed(formula, data, *, method="reml", covariance=None, constraints=None, collinear=False,
          test="satterthwaite", em_iter=20, em_tol=1e-10, em_only=False, maxiter=1000, tol=1e-6,
          safeguard="auto", verbose=False) -> MixedResults:
    """Linear mixed model on raw (individual-level) data, lme4's ``lmer`` model.

    ``mlmeta.mixed("DV ~ IV1 + IV2 + (IV1 + IV2 | Group)", df)`` — formula, covariance
    structures, nesting and options as :func:`mlmeta.meregress`, with the residual
    variance estimated (profiled out) instead of known sampling variances.

    ``test="satterthwaite"`` (default) gives t tests and intervals on Satterthwaite
    degrees of freedom, as lmerTest; ``test="kenward-roger"`` on Kenward-Roger df with
    the adjusted covariance of beta (pbkrtest; REML only); ``test="z"`` normal ones.
    """
    if test not in TESTS:
        raise ValueError(f"test must be one of {TESTS}, got {test!r}")
    if test == "kenward-roger" and str(method).lower() != "reml":
        raise ValueError("Kenward-Roger inference is only available for REML fits")
    model, frame, parsed = build_mixed_model(formula, data, method=method, covariance=covariance,
                                             constraints=constraints, collinear=collinear)
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
