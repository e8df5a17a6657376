"""The fitting driver: one compiled EM + Newton run (:meth:`Problem.fit
<mlmeta._core._engine.Problem.fit>`) from a moment start, then cheap safeguards
against local optima and saddle points on the boundary, run by the same engine.

Every fit leaves a :class:`FitRecord` (starts, final theta, evaluations,
messages, the candidate optima found) so a result can say how it was reached.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np

from mlmeta._threads import blas_threads
from mlmeta.model import NestedModel
from mlmeta.validate import safeguard as _safeguard

__all__ = ["FitRecord", "fit_nested", "start_theta", "alternative_starts", "conditioning"]


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


def start_theta(model: NestedModel) -> np.ndarray:
    """Moment start: split the residual heterogeneity of a fixed-effects fit evenly
    over the levels; slopes' variances scaled by the variance of their covariate."""
    d = model.design
    if d.n_fe:
        beta, *_ = np.linalg.lstsq(d.Xw, d.yw, rcond=None)
        r = d.y - d.X @ (d.B @ beta + d.b0)
    else:
        r = d.y.copy()
    v = d.variance if d.variance is not None else np.zeros(d.n_obs)
    total = float(np.var(r))
    tau2 = max(total - float(np.mean(v)), 0.25 * total, 1e-8)
    Sigmas = []
    for z in d.Z:
        scale = np.var(z, axis=0)
        const = scale < 1e-12 * np.maximum(np.mean(z * z, axis=0), 1e-300)
        scale = np.where(const, np.mean(z * z, axis=0), scale)
        scale = np.where(scale > 0, scale, 1.0)
        Sigmas.append(np.diag(tau2 / d.n_levels / scale))
    return model.theta_from_Sigmas(Sigmas)


def _run(model, thetas, *, lower, upper, em_iter=0, em_tol=0.0, em_only=False, maxiter=1000,
         tol=1e-6, quasi=False, known=None, threads=1, log=False):
    """Engine runs from each row of ``thetas``; the engine's dict of per-run arrays."""
    kt, kd = (None, np.inf) if known is None else (known[0], float(known[1]))
    with blas_threads(1):
        return model.problem.fit(np.atleast_2d(thetas), lower=lower, upper=upper,
                                 em_iter=int(em_iter), em_tol=float(em_tol), em_only=em_only,
                                 maxiter=int(maxiter),
                                 tol=float(tol), quasi=quasi, known_theta=kt, known_dev=kd,
                                 n_threads=int(threads), log=log)


def alternative_starts(model: NestedModel, theta_em, theta_best):
    """Cheap extra starts: the EM start shrunk and inflated, and the optimum with each
    level (and each variance of a multi-effect level) pushed to zero."""
    starts = [("EM start x 0.1", theta_em * 0.1), ("EM start x 3", theta_em * 3.0)]
    for lvl, (s, sl) in enumerate(zip(model.structs, model.theta_slices)):
        t = theta_best.copy()
        t[sl] = 0.0
        starts.append((f"level {lvl + 1} at zero", t))
        if s.n_theta > 1:
            for i in range(sl.start, sl.stop):
                if model.lower[i] == 0.0:
                    t = theta_best.copy()
                    t[i] = 0.0
                    # restart the other parameters of the level from the EM start
                    others = [j for j in range(sl.start, sl.stop) if j != i]
                    t[others] = theta_em[others]
                    starts.append((f"parameter {i} at zero", t))
    return starts


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
    """Fit a nested model: EM, then projected Newton, then safeguards, all in the engine.

    ``tol`` bounds the Newton decrement relative to max(1, |deviance|).
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
    return _fit(model, theta0=theta0, em_only=em_only, fixed=fixed, t0=t0, **options)


def _fit(model, *, theta0, em_iter, em_tol, em_only, maxiter, tol, safeguard, verbose, fixed,
         t0) -> FitRecord:
    """The fit of :func:`fit_nested` in the model's own basis (arguments checked)."""
    theta = start_theta(model) if theta0 is None else np.asarray(theta0, dtype=float)
    lower, upper = model.lower.copy(), model.upper.copy()
    if fixed is not None:
        mask = np.zeros(model.n_theta, dtype=bool)
        mask[np.asarray(fixed)] = True
        if theta0 is None:
            raise ValueError("fixed= needs theta0 with the values to hold")
        lower[mask] = upper[mask] = theta[mask]
    theta = np.clip(theta, lower, upper)
    rec = FitRecord(theta_start=theta.copy())
    if model.n_theta == 0:
        ev = model.evaluate(theta)
        rec.theta, rec.theta_em, rec.deviance, rec.converged = theta, theta, ev.deviance, True
        rec.grad_max, rec.n_evals = 0.0, 1
        rec.seconds = time.perf_counter() - t0
        return rec
    n_em = 10 * maxiter if em_only else em_iter
    run = _run(model, theta, lower=lower, upper=upper, em_iter=n_em, em_tol=em_tol,
               em_only=em_only, maxiter=maxiter, tol=tol, log=verbose)
    rec.n_em = int(run["n_em"][0])
    rec.theta_em = run["theta_em"][0].copy()
    rec.n_evals = int(run["n_evals"][0])
    theta, f, conv = run["theta"][0].copy(), float(run["deviance"][0]), bool(run["converged"][0])
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
    if not conv:
        # continue from where the run stopped (a fresh Hessian, no EM)
        more = _run(model, theta, lower=lower, upper=upper, maxiter=maxiter, tol=tol)
        rec.n_evals += int(more["n_evals"][0])
        rec.n_iter += int(more["n_iter"][0])
        if np.isfinite(more["deviance"][0]) and more["deviance"][0] <= f:
            theta, f = more["theta"][0].copy(), float(more["deviance"][0])
            conv = bool(more["converged"][0])
    gmax = _gmax(model, theta, lower, upper)
    rec.candidates.append(("EM start", f, theta.copy(), conv))
    if not conv:
        rec.messages.append(f"gradient-based optimisation did not converge (largest gradient "
                            f"component {gmax:.3g})")
    use_safeguard = (safeguard is True) or (safeguard == "auto" and model.n_obs <= 50_000)
    best = (f, theta, conv, gmax)
    if use_safeguard:
        starts = alternative_starts(model, rec.theta_em, theta)
        # threads only pay for large models
        threads = (os.cpu_count() or 1) if model.n_obs >= 20_000 else 1
        runs = _run(model, [t for _, t in starts], lower=lower, upper=upper, maxiter=maxiter,
                    tol=tol, quasi=True, known=(theta, f), threads=threads)
        for i, (label, _) in enumerate(starts):
            th, fa, conva = runs["theta"][i], float(runs["deviance"][i]), bool(runs["converged"][i])
            rec.n_evals += int(runs["n_evals"][i])
            if not runs["joined"][i] and fa < best[0] - 1e-7 * max(1.0, abs(best[0])):
                # an exploratory run found a lower deviance: confirm it with full Newton
                full = _run(model, th, lower=lower, upper=upper, maxiter=maxiter, tol=tol)
                th, fa, conva = full["theta"][0], float(full["deviance"][0]), bool(full["converged"][0])
                rec.n_evals += int(full["n_evals"][0])
            rec.candidates.append((label, fa, th.copy(), conva))
            if conva and fa < best[0] - 1e-7 * max(1.0, abs(best[0])):
                best = (fa, th.copy(), conva, _gmax(model, th, lower, upper))
                rec.better_optimum = True
    f, theta, conv, gmax = best
    if rec.better_optimum:
        dev_first = rec.candidates[0][1]
        rec.messages.append(
            f"the optimisation from the default start stopped at a local optimum "
            f"({model.ll_label.lower()} {-0.5 * dev_first:.8g}); a higher optimum "
            f"({-0.5 * f:.8g}) was found from another start and is reported")
    rec.theta, rec.deviance, rec.converged, rec.grad_max = theta, f, conv, gmax
    rec.seconds = time.perf_counter() - t0
    if verbose and rec.better_optimum:
        print(f"A higher optimum from another start:  {model.ll_label} = {-0.5 * f:.8g}")
    return rec


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
            mean, sd = Z.mean(axis=0), Z.std(axis=0)
            rms = np.sqrt(np.mean(Z * Z, axis=0))
            const = sd <= 1e-12 * np.maximum(rms, 1e-300)
            icol = next((j for j in range(q) if const[j] and abs(mean[j]) > 0), None)
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


def _fit_conditioned(model, A, *, t0, **options):
    """Fit the model with each level's design Z_l A_l (:func:`conditioning`) and map the
    optimum back (Sigma_l = A_l Sigma~_l A_l'). The likelihood is the same, so the working
    fit's convergence check holds (it is made where the Hessian is well scaled); the
    deviance is recomputed on the model as given and must agree to 1e-8."""
    from mlmeta.design import build_design

    d = model.design
    work_design = build_design(d.y, d.X, [Z @ Al for Z, Al in zip(d.Z, A)], d.groups,
                               d.variance, V=d.Lambda, n_tree=d.n_tree)
    work = NestedModel(work_design, model.structs, model.method, residual=model.residual,
                       fe_constraints=model.fe_constraints, cluster_labels=model.cluster_labels)
    rec_w = _fit(work, theta0=None, em_only=False, fixed=None, t0=t0, **options)

    def back(theta):
        S = [Al @ Sl @ Al.T for Al, Sl in zip(A, work.Sigma_list(theta))]
        return model.theta_from_Sigmas([0.5 * (Sl + Sl.T) for Sl in S])

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
        rec.messages = rec_w.messages + rec.messages
        return rec
    # the same likelihood in another basis: the working fit's record, in the model's theta
    rec.theta, rec.deviance = theta, dev
    rec.theta_start = back(rec_w.theta_start)
    rec.theta_em = back(rec_w.theta_em) if rec_w.theta_em is not None else None
    rec.candidates = [(label, f, back(th), c) for label, f, th, c in rec_w.candidates]
    rec.seconds = time.perf_counter() - t0
    return rec
