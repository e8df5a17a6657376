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


import numpy as np

from mlmeta._errors import BoundaryWarning, ConvergenceWarning, warn
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
    """A fitted linear mixed model (statsmodels-style names, lme4-comparable values).

    ``re_cov`` holds absolute covariances (sigma^2 T T'); ``scale`` is the residual
    variance sigma^2; ``llf_lme4`` the log-likelihood in lme4's REML convention."""

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

    def _title(self) -> str:
        return f"Mixed-effects {'REML' if self.method == 'reml' else 'ML'} regression"

    def summary(self, *args, **kwargs):
        kwargs.setdefault("homtest", False)
        return super().summary(*args, **kwargs)


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
    degrees of freedom, as lmerTest; ``test="z"`` normal ones.
    """
    if test not in ("satterthwaite", "z"):
        raise ValueError(f"test must be 'satterthwaite' or 'z', got {test!r}")
    model, frame, parsed = build_mixed_model(formula, data, method=method, covariance=covariance,
                                             constraints=constraints, collinear=collinear)
    for note in frame.notes:
        warn(note, UserWarning)
    record = fit_nested(model, em_iter=em_iter, em_tol=em_tol, em_only=em_only, maxiter=maxiter,
                        tol=tol, safeguard=safeguard, verbose=verbose)
    res = MixedResults(model, frame, record, depvar=parsed.response, sampling="residual",
                       options={"formula": formula, "em_iter": em_iter, "tol": tol, "test": test})
    if not res.converged:
        warn("the optimiser did not converge; see res.fit_record.messages", ConvergenceWarning)
    if res.boundary:
        warn("singular fit: estimates on the boundary of the parameter space: "
             + "; ".join(res.boundary), BoundaryWarning)
    return res
