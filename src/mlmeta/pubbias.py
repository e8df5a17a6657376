"""Small-study effects: the multilevel Egger-type regression test of funnel-plot asymmetry.

The fitted model is refitted with the sampling standard error ``s_i = sqrt(v_i)``
(``predictor="sei"``, Egger's test) or the sampling variance ``v_i`` (``predictor="vi"``)
as one more moderator, with the same random effects, sampling covariance and method:

    y = X beta + alpha s_i + sum_l Z_l u_l + e,    H0: alpha = 0

metafor's ``rma.mv(yi, V, mods = ~ <moderators> + sqrt(vi), random = ...)``, the
multilevel extension of ``regtest`` (Egger et al. 1997, BMJ 315:629; Sterne & Egger
2005), in which ``v_i`` is the diagonal of the sampling covariance. The test of alpha:

* ``test="z"``: ``z = alpha / se(alpha)`` against N(0, 1) (the default of a z-test fit);
* ``test="t"``: t on the model's df rule (metafor's ``dfs=``: containment or k - p);
* ``robust="CR2"``: the cluster-robust CR2 standard error with Satterthwaite df
  (clubSandwich's ``coef_test(fit, vcov = "CR2", test = "Satterthwaite")``), clustered
  by ``cluster`` (default: the top-level grouping); robust to a misspecified
  within-cluster covariance (e.g. an unknown correlation of the sampling errors).

With an intercept, the intercept of the refit is the "limit estimate": the effect
predicted for a study of infinite precision (s_i -> 0, PET; v_i -> 0, PEESE).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import special

from mlmeta import _dist
from mlmeta.design import build_design
from mlmeta.model import NestedModel
from mlmeta.optimize import fit_nested
from mlmeta.summary import confidence_level

__all__ = ["EggerTest", "egger_test", "PREDICTORS"]

PREDICTORS = {"sei": "standard error sqrt(v_i)", "vi": "sampling variance v_i"}


@dataclasses.dataclass
class EggerTest:
    """Result of the multilevel Egger-type test (:meth:`MeregressResults.egger_test`).

    Prints as metafor's ``regtest``: the predictor, the inference, the coefficient
    alpha of the predictor with its standard error, the test of ``alpha = 0`` and the
    limit estimate.

    Attributes
    ----------
    statistic : float
        z (``test="z"``) or t (``test="t"`` or ``robust="CR2"``) of alpha.
    pvalue : float
        Two-sided p-value.
    coef, se : float
        alpha, the coefficient of the predictor, and its (robust) standard error.
    df : float or None
        df of the t reference (None for a z test).
    test : str
        "z" or "t".
    predictor : str
        "sei" (sqrt(v_i)) or "vi" (v_i).
    robust : str or None
        None or "CR2".
    cluster : str or None
        Name of the robust clusters.
    limit, limit_ci : float, tuple
        The intercept of the refit (the limit estimate) and its confidence interval at
        ``level`` (None without an intercept).
    level : float
        Confidence level of ``limit_ci``, in percent.
    fit : MeregressResults
        The refitted model, with the predictor as a moderator.

    Examples
    --------
    >>> import mlmeta
    >>> df = mlmeta.datasets.load("schoolcal")
    >>> res = mlmeta.meregress("stdmdiff ~ 1 + (1 | district) + (1 | district:school)",
    ...                        df, variance="var")
    >>> egger = res.egger_test()
    >>> print(f"z = {egger.statistic:.4f}, p = {egger.pvalue:.4f}, limit = {egger.limit:.4f}")
    z = -1.1784, p = 0.2386, limit = 0.3201
    >>> egger.fit.params.round(4)
    sei     -0.9846
    _cons    0.3201
    Name: coef, dtype: float64
    """

    statistic: float
    pvalue: float
    coef: float
    se: float
    df: float | None
    test: str
    predictor: str
    robust: str | None = None
    cluster: str | None = None
    limit: float | None = None
    limit_ci: tuple | None = None
    level: float = 95.0
    fit: object = dataclasses.field(default=None, repr=False)

    def __str__(self):
        how = "cluster-robust CR2, Satterthwaite df" if self.robust else "model-based"
        lines = ["Regression test for funnel plot asymmetry (multilevel)", "",
                 f"predictor: {PREDICTORS[self.predictor]}",
                 f"inference: {how}" + (f", clusters: {self.cluster}" if self.cluster else ""),
                 f"coefficient: {self.coef:.4f} (se {self.se:.4f})", ""]
        stat = "z" if self.df is None else f"t({self.df:.4g})"
        lines.append(f"test for funnel plot asymmetry: {stat} = {self.statistic:.4f}, "
                     f"p = {self.pvalue:.4f}")
        if self.limit is not None:
            lo, hi = self.limit_ci
            lines.append(f"limit estimate (as {self.predictor} -> 0): {self.limit:.4f} "
                         f"({self.level:g}% CI {lo:.4f}, {hi:.4f})")
        return "\n".join(lines)

    def __repr__(self):
        return self.__str__()


def _refit(res, predictor, test):
    """The fit of ``res`` with the predictor added before the intercept (Stata's order)."""
    model, frame = res.model, res.frame
    d = model.design
    inv = np.argsort(d.perm)
    v = d.variance[inv]                                  # diag of the sampling covariance
    s = np.sqrt(v) if predictor == "sei" else v
    names = list(frame.fe_names)
    if predictor in names:
        raise ValueError(f"the model already has a moderator named {predictor!r}; rename it "
                         f"to run egger_test")
    if np.ptp(s) <= 1e-10 * np.max(np.abs(s)):
        raise ValueError("every row has the same sampling variance: the test has no "
                         "information (the predictor is constant)")
    pos = names.index("_cons") if "_cons" in names else len(names)
    X = np.asfortranarray(np.insert(np.asarray(frame.X, dtype=float), pos, s, axis=1))
    if np.linalg.matrix_rank(X) < X.shape[1]:
        raise ValueError(f"the predictor {predictor!r} is collinear with the moderators")
    V = d.Lambda[inv][:, inv] if d.Lambda is not None else None
    design = build_design(frame.y, X, frame.Z, frame.groups, None if V is not None else v, V=V)
    refit = NestedModel(design, model.structs, model.method, residual="known",
                        cluster_labels=model.cluster_labels)
    opts = res.options
    record = fit_nested(refit, em_iter=int(opts.get("em_iter", 20)), tol=float(opts.get("tol", 1e-6)))
    new_frame = dataclasses.replace(frame, X=X, fe_names=names[:pos] + [predictor] + names[pos:],
                                    omitted=[], notes=[])
    options = {**opts, "test": test, "dfs": res.dfs,
               "formula": f"{opts.get('formula', '')}, {predictor} as a moderator"}
    return type(res)(refit, new_frame, record, depvar=res.depvar, sampling=res.sampling,
                     options=options)


def egger_test(res, robust=None, *, cluster=None, predictor="sei", test=None, level=95.0,
               data=None) -> EggerTest:
    """Multilevel Egger-type regression test (module docstring).

    Parameters
    ----------
    res : a :func:`mlmeta.meregress` result (known sampling variances or covariance).
    robust : None (model-based inference) or "CR2" (cluster-robust, Satterthwaite df).
    cluster : the robust clusters (a grouping term, a column of ``data`` or values per
        row; default the top-level grouping); only with ``robust="CR2"``.
    predictor : "sei" (sqrt(v_i), Egger's test, default) or "vi" (v_i).
    test : "z" or "t" for model-based inference (default: the fit's own ``test``).
    level : confidence level of the limit estimate's interval, in percent.
    data : the data the model was fitted to (only for ``cluster`` given as a column).
    """
    if res.model.residual == "profiled" or res.model.design.variance is None:
        raise ValueError("egger_test needs known sampling variances (a meregress fit); a mixed "
                         "model on raw data has none")
    if res.model.fe_constraints is not None:
        raise ValueError("egger_test does not support fixed-effect constraints: refit without "
                         "constraints= first")
    if predictor not in PREDICTORS:
        raise ValueError(f"predictor must be one of {list(PREDICTORS)}, got {predictor!r}")
    if robust not in (None, "CR2"):
        raise ValueError(f"robust must be None or 'CR2', got {robust!r}")
    test = getattr(res, "test", "z") if test is None else test
    if test not in ("z", "t"):
        raise ValueError(f"test must be 'z' or 't', got {test!r}")
    if robust is None and cluster is not None:
        raise ValueError("cluster= is only used with robust='CR2'")
    level = confidence_level(level)
    fit = _refit(res, predictor, test)
    if robust == "CR2":
        rob = fit.robust(cluster=cluster, type="CR2", data=data)
        coef, se = float(rob.params[predictor]), float(rob.bse[predictor])
        stat, df = float(rob.tvalues[predictor]), float(rob.df[predictor])
        pvalue = float(rob.pvalues[predictor])
        ci = rob.conf_int(level) if "_cons" in fit.fe_names else None
        name = rob.cluster_name
    else:
        coef, se = float(fit.params[predictor]), float(fit.bse[predictor])
        stat = coef / se
        if test == "t":
            df = float(fit.df[predictor])
            pvalue = float(2 * _dist.t_sf(abs(stat), df))
        else:
            df, pvalue = None, float(2 * special.ndtr(-abs(stat)))
        ci = fit.conf_int(level) if "_cons" in fit.fe_names else None
        name = None
    limit = limit_ci = None
    if ci is not None:
        limit = float(fit.params["_cons"])
        limit_ci = (float(ci.loc["_cons", "lower"]), float(ci.loc["_cons", "upper"]))
    return EggerTest(statistic=stat, pvalue=pvalue, coef=coef, se=se, df=df, test="z" if df is None else "t",
                     predictor=predictor, robust=robust, cluster=name, limit=limit,
                     limit_ci=limit_ci, level=level, fit=fit)
