"""The fitting driver: one compiled EM + Newton run (:meth:`Problem.fit
<mlmeta._core._engine.Problem.fit>`) from a moment start, then a stationarity check
and cheap safeguards against local optima, run by the same engine.

Before a fit is called converged it is refined (:func:`mlmeta.refine.refine`): steps
off the bounds at 1e-8 .. 10 times each parameter's natural size (scale-free) and
quasi-Newton steps in scaled parameters must not lower the deviance by more than
DECREMENT_TOL / 2, and where they do Newton goes on from there. The main run gets
MAIN_ITER Newton iterations; a run still going by then is crawling, and the
refinement takes it on (charged to ``maxiter``).

Extra starts (:mod:`mlmeta.starts`) run in rounds of ROUND_ITER iterations (BFGS
updates of one differenced Hessian near the EM path, full Newton steps away from it, and
with ``safeguard="auto"`` those only where the fit is exposed to another optimum, and at
a certified interior optimum the inflated EM start only where it does not lie downhill of it,
:func:`mlmeta.starts.descends`); a
start stops when it converges, joins the known optimum, stalls (a round that does not
lower its deviance) or has spent its evaluation budget,
``max(EXTRA_EVALS_FACTOR x the main fit's evaluations, EXTRA_MIN_EVALS x (n_theta + 1))``,
and the record says which starts were cut short. A start that reaches a lower
deviance than the main fit, converged or not, is refined in its turn (same budget)
and wins if it stays lower.

A fit whose objective fails, or whose deviance the engine cannot compute to within
ROUNDING_TOL at the estimates (:func:`rounding_error`), is a ValueError that says why
(:func:`fit_model`, for the public entry points).

Every fit leaves a :class:`FitRecord` (starts, final theta, evaluations,
messages, the candidate optima found) so a result can say how it was reached.
The same finishing steps serve a batch of outcome vectors (:func:`finish_outcome`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from mlmeta._threads import blas_threads, start_threads
from mlmeta.accuracy import (ROUNDING_C, ROUNDING_TOL, across_groups, c_condition, column_stats,
                             known_R_of, model_rounding_error, rounding_error, second_opinion,
                             variance_ratio)
from mlmeta.model import NestedModel
from mlmeta.pdedge import finish_on_edge
from mlmeta.refine import (DECREMENT_TOL, EM_SWITCH, Work, custom_correlations, deviances,
                           differenced, quasi_newton, refine, run_engine, theta_scale)
from mlmeta.rotation import rotated_twin
from mlmeta.starts import (SEGMENT_POINTS, alternative_starts, away_from_em, descends,
                           natural_start, on_boundary, run_starts, inflated_em)
from mlmeta.validate import safeguard as _safeguard

__all__ = ["FitRecord", "fit_nested", "fit_model", "start_theta", "alternative_starts",
           "conditioning", "conditioned_model", "theta_scale", "finish_outcome", "rounding_error",
           "c_condition", "second_opinion", "extra_starts", "feasible_start",
           "DECREMENT_TOL", "ROUNDING_TOL", "MAIN_ITER"]

#: budget of one extra start: this many times the main fit's evaluations ...
EXTRA_EVALS_FACTOR = 3
#: ... and at least this many per covariance parameter (plus one)
EXTRA_MIN_EVALS = 25
#: Newton iterations of the main run before it is refined (a run still going by then is
#: crawling: quasi-Newton steps in scaled parameters take over, see :func:`refine`)
MAIN_ITER = 100


@dataclass
class FitRecord:
    """Bookkeeping of one fit."""

    theta_start: np.ndarray
    theta_em: np.ndarray | None = None
    theta: np.ndarray | None = None
    deviance: float = np.nan
    converged: bool = False
    n_iter: int = 0
    n_em: int = 0
    n_evals: int = 0
    grad_max: float = np.nan
    messages: list = field(default_factory=list)
    candidates: list = field(default_factory=list)   # (label, deviance, theta, converged)
    better_optimum: bool = False
    seconds: float = 0.0
    eval_budget: int = 0                              # evaluations allowed per extra start
    cut_short: list = field(default_factory=list)     # (label, evaluations) of starts stopped
    skipped_starts: list = field(default_factory=list)  # labels of the starts screened out


def fit_model(model: NestedModel, **options) -> FitRecord:
    """:func:`_fit_model` with BLAS at one thread throughout (see :mod:`mlmeta._threads`)."""
    with blas_threads(1):
        return _fit_model(model, **options)


def _fit_model(model: NestedModel, **options) -> FitRecord:
    """:func:`fit_nested` for the public entry points (``meregress``, ``mixed``,
    ``Model.fit``): a fit whose objective fails, or whose deviance the engine cannot
    compute to within :data:`ROUNDING_TOL` at the estimates (:func:`rounding_error`; where
    only the bound on the condition of C says so, the deviance computed again in another
    basis must agree to ROUNDING_TOL / 10, :func:`second_opinion`), is a ValueError that
    says why, instead of a FloatingPointError or a wrong log-likelihood."""
    ratio = variance_ratio(model)
    if not np.isfinite(ratio):
        raise ValueError("the outcome, in units of its sampling standard deviations, is too large: "
                         "its sum of squares overflows double precision; check the outcome and its "
                         "sampling variances (their units), or rescale them together (y by c, "
                         "variances by c^2)")
    scale = (f" The outcome varies about {ratio:.0e} times more around the fixed effects "
             f"than its sampling variances allow: variances that far apart are beyond double "
             f"precision in the engine; check the sampling variances (or rescale them)."
             if ratio >= 1e6 else "")
    try:
        rec = fit_nested(model, **options)
    except FloatingPointError as exc:
        raise ValueError(f"the model cannot be fitted: {exc}.{scale}") from None
    try:
        err = model_rounding_error(model, rec.theta, kappa=False)
        kappa = c_condition(model, rec.theta)
    except FloatingPointError as exc:
        raise ValueError(f"the model cannot be fitted: {exc} at the estimates.{scale}") from None
    if err > ROUNDING_TOL:
        raise ValueError(
            f"the log-likelihood cannot be computed accurately at the estimates (rounding error "
            f"about {err:.0e}): the random effects explain all but a tiny fraction of the "
            f"variation, and the engine's X'V^-1X and r'V^-1r are then differences of numbers "
            f"far larger than themselves.{scale or ' Rescale the outcome or simplify the model.'}")
    if ROUNDING_C * np.finfo(float).eps * kappa > ROUNDING_TOL:
        # the bound on C's condition says the factorisation may have lost the deviance: a
        # second computation in another basis says whether it has
        diff = second_opinion(model, rec.theta)
        if not diff <= 0.1 * ROUNDING_TOL:
            raise ValueError(
                f"the log-likelihood cannot be computed accurately at the estimates: the random "
                f"effects' precision matrix I + T'Z'V^-1ZT is too badly conditioned (up to "
                f"{kappa:.0e}), and the deviance computed in another basis differs by "
                f"{diff:.1g}; very large variances or effects perfectly correlated with "
                f"large ones lead there. Simplify the model or rescale its covariates.")
    return rec


def start_theta(model: NestedModel) -> np.ndarray:
    """Moment start: split the residual heterogeneity of a fixed-effects fit evenly
    over the levels; slopes' variances scaled by the variance of their covariate. With
    a profiled residual variance (theta relative to it) the residual takes an equal
    share, so each level starts at variance 1 relative to the residual. Computed once per
    model (kept on it, like the natural sizes); a copy is returned."""
    got = model.__dict__.get("_start_theta")
    if got is None:
        got = model.__dict__["_start_theta"] = _moment_start(model)
    return got.copy()


def _moment_start(model: NestedModel) -> np.ndarray:
    """:func:`start_theta`, computed."""
    d = model.design
    if d.n_fe:
        beta = d.start_coefficients()
        r = d.y - d.X @ (d.B @ beta + d.b0)
    else:
        r = d.y.copy()
    v = d.variance if d.variance is not None else np.zeros(d.n_obs)
    total = float(np.var(r))
    if model.residual == "profiled":
        total = float(d.n_levels)          # relative to the residual variance
    tau2 = max(total - float(np.mean(v)), 0.25 * total, 1e-8)
    Sigmas = []
    for z in d.Z:
        scale = np.var(z, axis=0)
        const = scale < 1e-12 * np.maximum(np.mean(z * z, axis=0), 1e-300)
        scale = np.where(const, np.mean(z * z, axis=0), scale)
        scale = np.where(scale > 0, scale, 1.0)
        Sigmas.append(np.diag(tau2 / d.n_levels / scale))
    return model.theta_from_Sigmas(Sigmas)


#: ``safeguard="auto"`` runs the extra starts up to this many observations
AUTO_SAFEGUARD_MAX_OBS = 50_000


def extra_starts(model: NestedModel, safeguard) -> bool | str:
    """Which extra starts a fit runs: all of them (True) for ``safeguard`` True; for "auto"
    and at most :data:`AUTO_SAFEGUARD_MAX_OBS` observations "auto": those away from the EM
    path only where the fit is exposed to another optimum (:mod:`mlmeta.starts`); else
    none (False)."""
    if safeguard is True:
        return True
    return "auto" if safeguard == "auto" and model.n_obs <= AUTO_SAFEGUARD_MAX_OBS else False


def feasible_start(model, theta, lower, upper, Yw=None):
    """The start itself, or shrunk by powers of 10 (then zero) until the objective is
    defined there (huge variances of badly scaled effects can defeat the factorisation),
    for the design's own outcome or the whitened outcome ``Yw``."""
    if np.isfinite(deviances(model, np.clip(theta, lower, upper), lower=lower, upper=upper,
                             Yw=Yw)[0]):
        return np.clip(theta, lower, upper)
    cand = [theta * 10.0 ** -k for k in range(2, 13, 2)] + [np.zeros_like(theta)]
    devs = deviances(model, np.clip(np.array(cand), lower, upper), lower=lower, upper=upper,
                     Yw=Yw)
    ok = np.flatnonzero(np.isfinite(devs))
    return np.clip(cand[ok[0]], lower, upper) if ok.size else theta


def _print_log(model, run, theta_em):
    label = model.ll_label
    print("Performing EM optimization ...")
    log_em = run["log_em"][0]
    for k, f in enumerate(log_em[np.isfinite(log_em)]):
        print(f"EM iteration {k}:  {label} = {-0.5 * f:.8g}")
    print("Performing gradient-based optimization:")
    try:
        print(f"Iteration 0:  {label} = {-0.5 * model.evaluate(theta_em).deviance:.8g}")
    except FloatingPointError:
        print(f"Iteration 0:  {label} = -inf")
    for k, f in enumerate(run["log_newton"][0][:int(run["n_iter"][0])]):
        if np.isfinite(f):
            print(f"Iteration {k + 1}:  {label} = {-0.5 * f:.8g}")


def _gmax(model, theta, lower, upper):
    """Largest gradient component of the parameters not held at a bound."""
    try:
        g = model.evaluate(theta, gradient=True).grad
    except FloatingPointError:
        return np.inf
    at_low = (theta <= lower + 1e-12) & (g >= 0)
    at_up = (theta >= upper - 1e-12) & (g <= 0)
    free = ~(at_low | at_up)
    return float(np.max(np.abs(g[free]))) if free.any() else 0.0


def fit_nested(model: NestedModel, *, theta0=None, em_iter=20, em_tol=1e-10, em_only=False,
               maxiter=1000, tol=1e-6, safeguard="auto", verbose=False, fixed=None) -> FitRecord:
    """Fit a nested model: EM, then projected Newton, then the stationarity check and
    the safeguards, all in the engine.

    ``tol`` bounds the Newton decrement relative to max(1, |deviance|) (and it must also
    be at most :data:`DECREMENT_TOL`).
    ``safeguard``: True, False or "auto" (extra starts when the model is small
    enough that they cost little: n_obs <= 50,000).
    ``fixed``: boolean mask (or indices) of theta elements held at their ``theta0``
    values (profiling, sensitivity analyses): their bounds are set to that value.
    ``em_only``: EM iterations only (up to 10 maxiter), converged when the deviance
    changes by at most em_tol. ``verbose``: print the engine's iteration log.
    """
    t0 = time.perf_counter()
    safeguard = _safeguard(safeguard)
    options = dict(em_iter=em_iter, em_tol=em_tol, maxiter=maxiter, tol=tol,
                   safeguard=safeguard, verbose=verbose)
    if theta0 is None and fixed is None and not em_only:
        A = conditioning(model)
        if A is not None:
            return _fit_conditioned(model, A, t0=t0, **options)
        twin = rotated_twin(model)
        if twin is not None:
            return _fit_working(model, twin, lambda theta: theta, t0=t0, **options)
    return _fit(model, theta0=theta0, em_only=em_only, fixed=fixed, t0=t0, **options)


def _fit(model, *, theta0, em_iter, em_tol, em_only, maxiter, tol, safeguard, verbose, fixed,
         t0, more_starts=None) -> FitRecord:
    """The fit of :func:`fit_nested` in the model's own basis (arguments checked);
    ``more_starts``: a function returning (label, theta) extra starts besides
    :func:`alternative_starts` (called only where the extra starts run)."""
    theta = start_theta(model) if theta0 is None else np.asarray(theta0, dtype=float)
    lower, upper = model.lower.copy(), model.upper.copy()
    if fixed is not None:
        mask = np.zeros(model.n_theta, dtype=bool)
        mask[np.asarray(fixed)] = True
        if theta0 is None:
            raise ValueError("fixed= needs theta0 with the values to hold")
        lower[mask] = upper[mask] = theta[mask]
    theta = np.clip(theta, lower, upper)
    if model.n_theta == 0:
        rec = FitRecord(theta_start=theta.copy())
        ev = model.evaluate(theta)
        rec.theta, rec.theta_em, rec.deviance, rec.converged = theta, theta, ev.deviance, True
        rec.grad_max, rec.n_evals = 0.0, 1
        rec.seconds = time.perf_counter() - t0
        return rec
    n_em = 10 * maxiter if em_only else em_iter

    # a single run's threads split its evaluations (a large two-level fold); a crossed
    # border's dense algebra takes the cores through BLAS instead (border_blas_threads)
    main_threads = model.eval_threads()
    use_safeguard = extra_starts(model, safeguard)

    def main_run(theta):
        # the Hessian the run ends with seeds extra starts (run_starts): kept only for them
        return run_engine(model, theta, lower=lower, upper=upper, em_iter=n_em, em_tol=em_tol,
                          em_only=em_only, maxiter=min(maxiter, MAIN_ITER), tol=tol, log=verbose,
                          em_switch=EM_SWITCH, threads=main_threads,
                          hessian=bool(use_safeguard))

    run = main_run(theta)
    if theta0 is None and not np.isfinite(run["deviance"][0]):
        # the objective may be undefined at the moment start itself: shrink it, run again
        start = feasible_start(model, theta, lower, upper)
        if not np.array_equal(start, theta):
            theta = start
            run = main_run(theta)
    rec = FitRecord(theta_start=theta.copy())
    rec.n_em = int(run["n_em"][0])
    rec.theta_em = run["theta_em"][0].copy()
    rec.n_evals = int(run["n_evals"][0])
    theta, f, conv = run["theta"][0].copy(), float(run["deviance"][0]), bool(run["converged"][0])
    certified = bool(run["certified"][0])
    if verbose:
        _print_log(model, run, rec.theta_em)
    if not np.isfinite(f):
        raise FloatingPointError(model.failure_message(run["status"][0]))
    if em_only:
        rec.theta, rec.deviance, rec.converged = theta, f, conv
        rec.grad_max = _gmax(model, theta, lower, upper)
        if not conv:
            rec.messages.append(f"EM did not converge in {n_em} iterations")
        rec.n_iter = rec.n_em
        rec.seconds = time.perf_counter() - t0
        return rec
    rec.n_iter = int(run["n_iter"][0])
    theta, f, conv = _finish(model, rec, theta, f, conv, lower=lower, upper=upper, maxiter=maxiter,
                             tol=tol, safeguard=use_safeguard, certified=certified,
                             more_starts=more_starts,
                             hess=run["hess"][0] if "hess" in run else None)
    rec.grad_max = _gmax(model, theta, lower, upper)
    if not conv:
        rec.messages.append(f"gradient-based optimisation did not converge (largest gradient "
                            f"component {rec.grad_max:.3g})")
    rec.theta, rec.deviance, rec.converged = theta, f, conv
    rec.seconds = time.perf_counter() - t0
    if verbose and rec.better_optimum:
        print(f"A higher optimum from another start:  {model.ll_label} = {-0.5 * f:.8g}")
    return rec


def _finish(model, rec, theta, f, conv, *, lower, upper, maxiter, tol, safeguard, Yw=None,
            certified=False, more_starts=None, hess=None):
    """After the main engine run: refine it to a certified stationary point (:func:`refine`),
    run the extra starts (``safeguard``) and continue the promising ones, and end where
    the covariance structures can be written out (:func:`_representable`). Updates
    ``rec`` (iterations, evaluations, candidates, messages); returns (theta, f, conv)."""
    theta, f, conv = _search(model, rec, theta, f, conv, lower=lower, upper=upper, maxiter=maxiter,
                             tol=tol, safeguard=safeguard, Yw=Yw, certified=certified,
                             more_starts=more_starts, hess=hess)
    theta, f, conv = finish_on_edge(model, rec, theta, f, conv, lower=lower, upper=upper, Yw=Yw)
    return _representable(model, theta, f, conv, lower=lower, upper=upper, Yw=Yw)


def _representable(model, theta, f, conv, *, lower, upper, Yw=None):
    """(theta, f, conv), with a custom level's free correlations shrunk towards 0 by 1e-12 ..
    1e-6 (relative) where its correlation matrix is so near the edge of the positive
    definite set that the engine's factorisation takes it but NumPy's (results,
    postestimation) does not; the deviance moves by rounding only."""
    try:
        model.T_list(theta)
        return theta, f, conv
    except FloatingPointError:
        pass
    idx = np.concatenate([i for i, _ in custom_correlations(model, theta)] or [np.zeros(0, int)])
    for c in (1e-12, 1e-10, 1e-8, 1e-6):
        t = theta.copy()
        t[idx] *= 1.0 - c
        try:
            model.T_list(t)
        except FloatingPointError:
            continue
        fc = float(deviances(model, t, lower=lower, upper=upper, Yw=Yw)[0])
        if np.isfinite(fc):
            return t, fc, conv and fc <= f + 1e-9 * max(1.0, abs(f))
    return theta, f, conv


def _search(model, rec, theta, f, conv, *, lower, upper, maxiter, tol, safeguard, Yw=None,
            certified=False, more_starts=None, hess=None):
    """:func:`_finish` but the last step."""
    scale = theta_scale(model, theta if Yw is None else None)
    work = Work(rec.n_iter, rec.n_evals)
    theta_main = np.array(theta, dtype=float)
    theta, f, conv, note = refine(model, theta, f, conv, work, lower=lower, upper=upper, tol=tol,
                                  maxiter=maxiter, max_evals=np.inf, scale=scale, Yw=Yw,
                                  certified=certified)
    # the engine's certificate (a positive definite Hessian, condition below 1e8, and a
    # vanishing decrement) still describes the fit
    certified = certified and np.array_equal(theta, theta_main)
    rec.n_iter, rec.n_evals = work.iters, work.evals
    if note:
        rec.messages.append(note)
    rec.candidates.append(("EM start", f, theta.copy(), conv))
    if not safeguard:
        return theta, f, conv
    starts = alternative_starts(model, rec.theta_em, theta, scale)
    starts += more_starts() if more_starts is not None else []
    rec.eval_budget = budget = int(max(EXTRA_EVALS_FACTOR * rec.n_evals,
                                       EXTRA_MIN_EVALS * (model.n_theta + 1)))
    opts = dict(lower=lower, upper=upper, tol=tol, maxiter=maxiter, budget=budget, Yw=Yw,
                threads=start_threads(model.n_obs), hess=hess if certified else None)
    first = ~away_from_em(starts) if safeguard == "auto" else np.ones(len(starts), dtype=bool)
    exposed = not conv or on_boundary(model, theta, lower, upper, scale)
    run_now = first.copy()
    if safeguard == "auto" and not exposed and certified:
        # a certified interior optimum: the EM start inflated is left out where it lies
        # downhill of it along a straight line (not where the optimum is uncertified: it may
        # lie on a flat ridge, where runs along it end at other heights)
        which = np.flatnonzero(first & inflated_em(starts))
        run_now[which[descends(model, starts, which, theta, f, lower=lower, upper=upper, Yw=Yw,
                               threads=opts["threads"])]] = False
        rec.n_evals += SEGMENT_POINTS * which.size
    got = run_starts(model, starts, np.flatnonzero(run_now), theta, f, **opts)
    margin = 1e-7 * max(1.0, abs(f))
    if not first.all() and (exposed or any(r["dev"] < f - margin for r in got.values())):
        got.update(run_starts(model, starts, np.flatnonzero(~first), theta, f, **opts))
    rec.skipped_starts = [starts[i][0] for i in range(len(starts)) if i not in got]
    starts, runs = [starts[i] for i in sorted(got)], [got[i] for i in sorted(got)]
    # with a custom level's free correlations, whose feasible set is not a box, the engine's
    # Newton stops at the edge of the positive definite set: from the starts away from the
    # EM path, scipy's quasi-Newton steps in scaled parameters too (they get along it)
    per = model.n_theta + 1 if differenced(model, Yw) else 1
    away = [st for st in starts if st[0] == "natural scale" or st[0].startswith("random")]
    for label, t0 in away if custom_correlations(model, theta) else []:
        th, fq, n, _ = quasi_newton(model, t0, f, lower=lower, upper=upper, scale=scale, Yw=Yw,
                                    maxiter=max(1, min(200, budget // per)))
        starts.append((f"{label}, quasi-Newton", t0))
        runs.append(dict(theta=th, dev=fq, conv=False, joined=False, evals=n, iters=0, cut=False,
                         stalled=False))
    f_main = f
    for (label, _), r in zip(starts, runs):
        rec.n_evals += r["evals"]
        if r["cut"]:
            rec.cut_short.append((label, r["evals"]))
        rec.candidates.append((label, r["dev"], r["theta"].copy(), r["conv"]))
    for k in np.argsort([r["dev"] for r in runs]):
        r, label = runs[k], starts[k][0]
        margin = 1e-7 * max(1.0, abs(f))
        if r["joined"] or not r["dev"] < f - margin:
            break
        # a lower deviance than the best so far, converged or not: take it on (its own budget)
        w = Work()
        th, fc, cc, _ = refine(model, r["theta"], r["dev"], False, w, lower=lower, upper=upper,
                               tol=tol, maxiter=maxiter, max_evals=budget, scale=scale, Yw=Yw)
        rec.n_evals += w.evals
        if not cc and w.evals >= budget:
            rec.cut_short.append((f"{label} (continued)", w.evals))
        if not (np.isfinite(fc) and fc < f - margin):
            continue
        rec.candidates.append((f"{label} (continued)", fc, th.copy(), cc))
        theta, f, conv = th, fc, cc
        rec.better_optimum = True
    if rec.cut_short:
        rec.messages.append(
            f"{len(rec.cut_short)} extra start(s) stopped at their limit of {budget} evaluations "
            f"before converging: " + ", ".join(lab for lab, _ in rec.cut_short))
    if rec.better_optimum:
        rec.messages.append(
            f"the optimisation from the default start stopped at a local optimum "
            f"({model.ll_label.lower()} {-0.5 * f_main:.8g}); a higher optimum "
            f"({-0.5 * f:.8g}) was found from another start and is reported")
    return theta, f, conv


def finish_outcome(model: NestedModel, Yw, theta, f, conv, theta_em, *, maxiter, tol,
                   safeguard, n_iter=0, certified=False, hess=None) -> tuple:
    """The finishing steps of a fit (:func:`_finish`: continuation, stationarity check,
    extra starts) for the whitened outcome row ``Yw`` of a batch whose main engine run
    ended at (theta, f, conv) after ``n_iter`` iterations (``hess``: the Hessian it ended
    with, :func:`mlmeta.starts.run_starts`). Returns (theta, deviance, converged,
    evaluations spent here, iterations in all)."""
    rec = FitRecord(theta_start=np.asarray(theta_em, dtype=float).copy(),
                    theta_em=np.asarray(theta_em, dtype=float).copy(), n_iter=int(n_iter))
    theta, f, conv = _finish(model, rec, np.asarray(theta, dtype=float).copy(), float(f), bool(conv),
                             lower=model.lower, upper=model.upper, maxiter=maxiter, tol=tol,
                             safeguard=safeguard, Yw=Yw, certified=bool(certified), hess=hess)
    return theta, f, conv, rec.n_evals, rec.n_iter


def conditioning(model: NestedModel):
    """Per level, a matrix A_l that makes the random-effects design Z_l A_l well
    conditioned, or None when every level is already fine.

    The likelihood depends on Z_l and Sigma_l only through Z_l Sigma_l Z_l', so a level
    may be fitted as Z~_l = Z_l A_l with Sigma~_l = A_l^-1 Sigma_l A_l^-T whenever the
    structure is closed under that map: an unstructured level under any invertible A
    (each slope centred on the intercept column and scaled to unit SD), an independent
    level under a diagonal A (each column scaled to unit root mean square). Uncentred
    or badly scaled slopes (year = 1976..2002; scales 100 times apart) otherwise make
    the optimiser stop at a worse optimum."""
    out, any_ = [], False
    for s, Z in zip(model.structs, model.design.Z):
        q = Z.shape[1]
        A = np.eye(q)
        if q >= 2 and s.kind in ("unstructured", "independent"):
            mean, sd, rms, const, icol = column_stats(Z)
            for j in range(q):
                if const[j]:
                    continue
                if s.kind == "unstructured" and icol is not None:
                    A[j, j] = 1.0 / sd[j]
                    A[icol, j] = -(mean[j] / mean[icol]) / sd[j]
                elif rms[j] > 0:
                    A[j, j] = 1.0 / rms[j]
            off = np.abs(A - np.diag(np.diag(A))).max()
            d = np.abs(np.diag(A))
            if off > 1.0 or d.max() > 100.0 or d.min() < 0.01:
                any_ = True
            else:
                A = np.eye(q)
        out.append(A)
    return out if any_ else None


def conditioned_model(model: NestedModel, A):
    """(work, back): the model with each level's design Z_l A_l (:func:`conditioning`),
    the same likelihood in a better-scaled basis, and the map of its theta to the model's,
    ``Sigma_l = A_l Sigma~_l A_l'``."""
    from mlmeta.design import with_Z

    d = model.design
    work_design = with_Z(d, [Z @ Al for Z, Al in zip(d.Z, A)], known_R=known_R_of(d))
    work = NestedModel(work_design, model.structs, model.method, residual=model.residual,
                       fe_constraints=model.fe_constraints, cluster_labels=model.cluster_labels)

    def back(theta):
        S = [Al @ Sl @ Al.T for Al, Sl in zip(A, work.Sigma_list(theta))]
        out = model.theta_from_Sigmas([0.5 * (Sl + Sl.T) for Sl in S])
        for lvl in across_groups(model):      # q = 1, A_l = 1: theta also holds rho
            out[model.theta_slices[lvl]] = theta[work.theta_slices[lvl]]
        return out

    return work, back


def _fit_conditioned(model, A, *, t0, **options):
    """Fit the model with each level's design Z_l A_l (:func:`conditioning`) and map the
    optimum back (Sigma_l = A_l Sigma~_l A_l'): :func:`_fit_working`, with the natural
    start of the model's own basis among the extra starts."""
    work, back = conditioned_model(model, A)
    return _fit_working(model, work, back, t0=t0, **options,
                        more_starts=lambda: [("natural scale in the model's basis",
                                              _own_natural_start(model, work, A))])


def _fit_working(model, work, back, *, t0, more_starts=None, **options):
    """Fit ``work``, a model with the same likelihood as ``model`` (in a better-scaled
    basis, :func:`conditioned_model`, or with V rotated away, :func:`rotated_twin`), and map
    the optimum to the model's theta by ``back``. The likelihood is the same, so the
    working fit's convergence check holds; the deviance is recomputed on the model as
    given and must agree to 1e-8, else the fit is finished on the model itself."""
    rec_w = _fit(work, theta0=None, em_only=False, fixed=None, t0=t0, **options,
                 more_starts=more_starts)
    theta = back(rec_w.theta)
    rec = rec_w
    try:
        dev = model.evaluate(theta).deviance
    except FloatingPointError:
        dev = np.inf
    if not abs(dev - rec_w.deviance) <= 1e-8 * max(1.0, abs(rec_w.deviance)):
        # the map back lost precision (a singular Sigma): finish on the model itself
        rec = _fit(model, theta0=theta, em_only=False, fixed=None, t0=t0,
                   **{**options, "em_iter": 0, "safeguard": False})
        rec.n_evals += rec_w.n_evals
        # the working fit's notes, but its verdict on convergence: that is this fit's
        rec.messages = [m for m in rec_w.messages if "did not converge" not in m] + \
            [m for m in rec.messages if m not in rec_w.messages]
    else:
        # the same likelihood in another basis: the working fit's record, in the model's theta
        rec.theta, rec.deviance = theta, dev
        rec.theta_start = back(rec_w.theta_start)
        rec.theta_em = back(rec_w.theta_em) if rec_w.theta_em is not None else None
        rec.candidates = [(label, f, back(th), c) for label, f, th, c in rec_w.candidates]
        if not rec.converged:
            _own_basis_refine(model, rec, tol=options["tol"], maxiter=options["maxiter"],
                              budget=max(rec_w.eval_budget, EXTRA_MIN_EVALS * (model.n_theta + 1)))
    rec.seconds = time.perf_counter() - t0
    return rec


def _own_basis_refine(model, rec, *, budget, tol, maxiter):
    """A fit made in the well-scaled basis (:func:`_fit_conditioned`) that did not converge
    there, refined in the model's own basis (:func:`refine`, within ``budget``
    evaluations): its scaled quasi-Newton steps are other steps there, and get along
    where the working basis's stall (a custom level at the edge of its positive definite
    set). Kept where it ends lower; where the bound on C's condition says the deviance may
    be inaccurate (:func:`fit_model`), only by more than ROUNDING_TOL: a smaller gain there
    may be rounding alone (``rec`` updated in place)."""
    f = rec.deviance
    w = Work()
    th, fc, cc, _ = refine(model, rec.theta, f, False, w, lower=model.lower, upper=model.upper,
                           tol=tol, maxiter=maxiter, max_evals=budget, scale=theta_scale(model))
    rec.n_evals += w.evals
    th, fc, cc = _representable(model, th, fc, cc, lower=model.lower, upper=model.upper)
    if not (np.isfinite(fc) and (fc < f - 1e-9 * max(1.0, abs(f)) or (cc and fc <= f))):
        return
    try:
        kappa = c_condition(model, th)
    except FloatingPointError:
        return
    if ROUNDING_C * np.finfo(float).eps * kappa > ROUNDING_TOL and not fc < f - ROUNDING_TOL:
        return
    rec.theta, rec.deviance, rec.converged = th, fc, cc
    rec.grad_max = _gmax(model, th, model.lower, model.upper)
    rec.messages = [m for m in rec.messages if "did not converge" not in m]
    if not cc:
        rec.messages.append(f"gradient-based optimisation did not converge (largest gradient "
                            f"component {rec.grad_max:.3g})")


def _own_natural_start(model, work, A):
    """The extra start at the natural scale (:func:`alternative_starts`: every variance
    parameter at half its natural size) of the model's own basis, as a theta of the
    well-scaled working model (:func:`conditioned_model`, Sigma~_l = A_l^-1 Sigma_l
    A_l^-T): another point than the working basis's own natural start, and a basin the
    working fit's other starts all miss can lie below it."""
    scale = theta_scale(model)
    start = np.clip(natural_start(model, scale), model.lower, model.upper)
    out = np.empty(work.n_theta)
    for s, sl, sl_w, Al, S in zip(model.structs, model.theta_slices, work.theta_slices, A,
                                  model.Sigma_list(start)):
        if np.array_equal(Al, np.eye(Al.shape[0])):
            out[sl_w] = start[sl]
        else:
            Ai = np.linalg.inv(Al)
            St = Ai @ S @ Ai.T
            out[sl_w] = s.from_Sigma(0.5 * (St + St.T))
    return np.clip(out, work.lower, work.upper)
