"""Fitting drivers: EM from a moment start, then a projected Newton method (finite-
difference Hessian of the analytic gradient, bounds handled by an active set), and
cheap safeguards against local optima and saddle points on the boundary.

Every fit leaves a :class:`FitRecord` (starts, final theta, evaluations,
messages, the candidate optima found) so a result can say how it was reached.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np

from mlmeta.model import NestedModel

__all__ = ["FitRecord", "fit_nested", "start_theta"]


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


class _Counter:
    """Wraps the model so every evaluation is counted and the last one cached."""

    def __init__(self, model: NestedModel):
        self.model = model
        self.n = 0
        self._last = None

    def fg(self, theta):
        theta = np.asarray(theta, dtype=float)
        if self._last is not None and np.array_equal(self._last[0], theta):
            return self._last[1], self._last[2]
        self.n += 1
        try:
            ev = self.model.evaluate(theta, gradient=True)
            out = (ev.deviance, ev.grad)
        except FloatingPointError:
            out = (np.inf, np.zeros_like(theta))
        if not np.isfinite(out[0]):
            out = (np.inf, np.zeros_like(theta))
        self._last = (theta.copy(), out[0], out[1])
        return out

    def f(self, theta):
        return self.fg(theta)[0]

    def g(self, theta):
        return self.fg(theta)[1]


def start_theta(model: NestedModel) -> np.ndarray:
    """Moment start: split the residual heterogeneity of a fixed-effects fit evenly
    over the levels; slopes' variances scaled by the variance of their covariate."""
    d = model.design
    if d.n_fe:
        beta, *_ = np.linalg.lstsq(d.Xw, d.yw, rcond=None)
        r = d.y - d.X @ beta
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


def _em(model, theta, n_iter, tol, log, fixed=None):
    dev_old = np.inf
    ev = None
    k = 0
    for k in range(1, n_iter + 1):
        theta_new, ev = model.em_step(theta)
        if fixed is not None:
            theta_new[fixed] = theta[fixed]
        if log:
            log(f"EM iteration {k - 1}:  {model._ll_label()} = {-0.5 * ev.deviance:.8g}")
        if abs(dev_old - ev.deviance) <= tol * (abs(ev.deviance) + tol):
            theta = theta_new
            break
        dev_old = ev.deviance
        theta = theta_new
    return theta, k


def _free_mask(theta, grad, lower, upper, eps=1e-12):
    """Parameters not held at a bound by a gradient pointing out of the box."""
    at_low = (theta <= lower + eps) & (grad >= 0)
    at_up = (theta >= upper - eps) & (grad <= 0)
    return ~(at_low | at_up)


def _fd_hessian(cnt, theta, g, free, scale):
    """Forward differences of the analytic gradient on the free parameters (symmetrised)."""
    idx = np.flatnonzero(free)
    H = np.empty((idx.size, idx.size))
    for a, i in enumerate(idx):
        h = 1e-6 * max(scale, abs(theta[i]))
        tp = theta.copy()
        tp[i] += h
        H[:, a] = (cnt.g(tp)[idx] - g[idx]) / h
    return 0.5 * (H + H.T)


def _kick_saddles(cnt, theta, f, g, lower, upper, scale):
    """A variance parameter at 0 has zero gradient by symmetry (the deviance depends on
    its square); if the deviance falls when it grows, 0 is a saddle: move off it."""
    moved = False
    for i in np.flatnonzero((lower == 0.0) & (upper > 0.0) & (theta <= 0.0)
                            & (np.abs(g) <= 1e-10 * max(1.0, abs(f)))):
        h = 1e-3 * scale
        tp = theta.copy()
        tp[i] = h
        fp, gp = cnt.fg(tp)
        if gp[i] < 0 and fp < f:
            theta, f, g = tp, fp, gp
            moved = True
    return theta, f, g, moved


def _local(cnt: _Counter, theta0, lower, upper, maxiter, tol, scale=1.0, callback=None,
           known=None):
    """Projected Newton with a finite-difference Hessian of the analytic gradient.

    Parameters held at a bound by their gradient are fixed for the step; the rest
    take a Newton step (eigenvalues made positive) with backtracking along the
    projected path. Iteration stops when the Newton decrement ``g' H^-1 g`` (twice
    the predicted fall of the deviance) is below ``1e-14 max(1, |deviance|)`` and no
    variance at 0 is a saddle, or when a step below ``1e-10 max(1, |deviance|)`` of
    predicted decrease fails (rounding noise). The fit counts as converged when, at the end, the
    Hessian of the free parameters is positive definite and either the decrement is
    at most ``tol max(1, |deviance|)`` or the largest free gradient component is.
    ``known``: optima found already, as (theta, deviance) pairs; a run that enters
    the immediate neighbourhood of one of them (and is not below it) stops there,
    since it would only find that optimum again.
    Returns (theta, f, g, n_iter, converged, gmax, message).
    """
    theta = np.clip(np.asarray(theta0, dtype=float), lower, upper)
    f, g = cnt.fg(theta)
    if not np.isfinite(f):
        return theta, f, g, 0, False, np.inf, "objective not finite at the start"
    message = "maximum number of iterations reached"
    it = 0
    decrement, pd_hessian = np.inf, False
    for it in range(1, maxiter + 1):
        free = _free_mask(theta, g, lower, upper)
        gf = g[free]
        gmax = float(np.max(np.abs(gf))) if gf.size else 0.0
        fscale = max(1.0, abs(f))
        if gmax <= 1e-12 * fscale:
            decrement, pd_hessian = 0.0, True
        else:
            H = _fd_hessian(cnt, theta, g, free, scale)
            try:
                w, U = np.linalg.eigh(H)
            except np.linalg.LinAlgError:
                w, U = np.ones(gf.size), np.eye(gf.size)
            pd_hessian = bool(w.min() > 0)
            wmax = max(float(np.max(np.abs(w))), 1e-300)
            w_mod = np.maximum(np.abs(w), 1e-10 * wmax)
            step = -(U @ ((U.T @ gf) / w_mod))
            decrement = float(-gf @ step)
        if decrement <= 1e-14 * fscale and pd_hessian:
            theta, f, g, moved = _kick_saddles(cnt, theta, f, g, lower, upper, scale)
            if not moved:
                message = "Newton decrement below tolerance"
                break
            continue
        # never move a parameter more than a few scales at once
        big = np.max(np.abs(step)) / (10.0 * max(scale, np.max(np.abs(theta[free])), 1e-12))
        if big > 1.0:
            step /= big
        t = 1.0
        accepted = False
        # near the optimum a failed step is rounding noise: do not search long
        n_halvings = 5 if decrement <= 1e-10 * fscale else 40
        for _ in range(n_halvings):
            cand = theta.copy()
            cand[free] = np.clip(theta[free] + t * step, lower[free], upper[free])
            fc, gc = cnt.fg(cand)
            if np.isfinite(fc) and fc <= f + 1e-4 * float(g @ (cand - theta)) + 1e-14 * fscale:
                accepted = True
                break
            t *= 0.5
        if not accepted and decrement <= 1e-10 * fscale:
            message = "optimum reached to working precision"
            break
        if not accepted:
            # fall back to a projected gradient step
            t = 1.0
            sd = -gf * (scale ** 2 / max(gmax, 1e-300))
            for _ in range(60):
                cand = theta.copy()
                cand[free] = np.clip(theta[free] + t * sd, lower[free], upper[free])
                fc, gc = cnt.fg(cand)
                if np.isfinite(fc) and fc < f:
                    accepted = True
                    break
                t *= 0.5
        if not accepted:
            message = "no further decrease along the search directions"
            break
        small = np.max(np.abs(cand - theta)) <= 1e-14 * max(scale, np.max(np.abs(theta)))
        theta, f, g = cand, fc, gc
        if callback is not None:
            callback(theta)
        for th_k, f_k in known or ():
            near = np.max(np.abs(theta - th_k)) <= 0.05 * max(scale, float(np.max(np.abs(th_k))))
            if near and f >= f_k - 1e-9 * max(1.0, abs(f_k)):
                return th_k.copy(), f_k, cnt.g(th_k), it, True, 0.0, "joined a known optimum"
        if small:
            message = "step size below tolerance"
            break
    free = _free_mask(theta, g, lower, upper)
    gmax = float(np.max(np.abs(g[free]))) if free.any() else 0.0
    if message not in ("Newton decrement below tolerance",) and free.any():
        H = _fd_hessian(cnt, theta, g, free, scale)
        try:
            pd_hessian = bool(np.linalg.eigvalsh(H).min() > 0)
            decrement = float(g[free] @ np.linalg.solve(H, g[free])) if pd_hessian else np.inf
        except np.linalg.LinAlgError:
            pd_hessian, decrement = False, np.inf
    elif not free.any():
        pd_hessian, decrement = True, 0.0
    fscale = max(1.0, abs(f))
    converged = bool(np.isfinite(f)) and pd_hessian and (
        decrement <= tol * fscale or gmax <= tol * fscale)
    return theta, f, g, it, converged, gmax, message


def _compiled(model) -> bool:
    """The compiled optimiser covers the model, and one evaluation would not use threads
    (the compiled runs evaluate serially; big models evaluate faster on the kernel's threads)."""
    from mlmeta.batch import compiled_ok

    K = model.design.kernel
    serial = K.n_threads == 1 or K.n_nodes < K.parallel_min_nodes
    return serial and compiled_ok(model, own_outcome=True) is None


def _run_compiled(model, thetas, *, em_iter=0, em_tol=0.0, maxiter=1000, tol=1e-6, quasi=False,
                  known=None, threads=1):
    """Compiled EM + projected Newton runs from each row of ``thetas`` (shared out over
    ``threads``).

    Returns a list of (theta, deviance, converged, n_em, n_iter, n_evals, joined, theta_em)
    per run (theta_em: theta after the EM iterations).
    ``quasi``/``known``: exploratory runs (BFGS-updated Hessian) that stop when they
    join the known (theta, deviance) optimum.
    """
    from mlmeta._core._batch import fit_many
    from mlmeta.batch import compiled_inputs

    d = model.design
    theta0 = np.ascontiguousarray(np.clip(np.atleast_2d(thetas), model.lower, model.upper))
    # the design's own outcome: its pieces are already in the kernel (refresh=False)
    Yw = np.ascontiguousarray(np.broadcast_to(d.yw, (theta0.shape[0], d.yw.shape[0])))
    kt, kd = (None, np.inf) if known is None else (known[0], float(known[1]))
    out = fit_many(d.kernel, Yw, theta0, *compiled_inputs(model), int(em_iter), int(maxiter),
                   float(tol), int(threads), quasi=quasi, known_theta=kt, known_dev=kd,
                   em_tol=float(em_tol), refresh=False)
    return [(out["theta"][i], float(out["deviance"][i]), bool(out["converged"][i]),
             int(out["n_em"][i]), int(out["n_iter"][i]), int(out["n_evals"][i]),
             bool(out["joined"][i]), out["theta_em"][i]) for i in range(theta0.shape[0])]


def _alternative_starts(model: NestedModel, theta_em, theta_best):
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


def fit_nested(model: NestedModel, *, theta0=None, em_iter=20, em_tol=1e-10, em_only=False,
               maxiter=1000, tol=1e-6, safeguard="auto", verbose=False, fixed=None) -> FitRecord:
    """Fit a nested model: EM, then projected Newton, then safeguards.

    ``tol`` bounds the largest free gradient component relative to max(1, |deviance|).
    ``safeguard``: True, False or "auto" (extra starts when the model is small
    enough that they cost little: n_obs <= 50,000).
    ``fixed``: boolean mask (or indices) of theta elements held at their ``theta0``
    values (profiling, sensitivity analyses).
    """
    t0 = time.perf_counter()
    log = print if verbose else None
    theta = start_theta(model) if theta0 is None else np.asarray(theta0, dtype=float)
    lower, upper = model.lower.copy(), model.upper.copy()
    if fixed is not None:
        mask = np.zeros(model.n_theta, dtype=bool)
        mask[np.asarray(fixed)] = True
        if theta0 is None:
            raise ValueError("fixed= needs theta0 with the values to hold")
        fixed = mask
        lower[fixed] = upper[fixed] = theta[fixed]
    theta = np.clip(theta, lower, upper)
    rec = FitRecord(theta_start=theta.copy())
    cnt = _Counter(model)
    v = model.design.variance
    scale = float(np.sqrt(np.median(v))) if v is not None else 1.0
    if model.n_theta == 0:
        f, g = cnt.fg(theta)
        rec.theta, rec.deviance, rec.converged = theta, f, True
        rec.seconds = time.perf_counter() - t0
        return rec
    compiled = fixed is None and not log and not em_only and _compiled(model)
    if compiled:     # EM and Newton in one compiled run
        (th_c, f_c, conv_c, rec.n_em, nit, n_ev, _, theta), = _run_compiled(
            model, theta, em_iter=em_iter, em_tol=em_tol, maxiter=maxiter, tol=tol)
        cnt.n += n_ev
    elif em_iter > 0 or em_only:
        if log:
            log("Performing EM optimization ...")
        n_em = (10 * maxiter if em_only else em_iter)
        theta, rec.n_em = _em(model, theta, n_em, em_tol, log, fixed)
        cnt.n += rec.n_em
    rec.theta_em = theta.copy()
    if em_only:
        f, g = cnt.fg(theta)
        free = _free_mask(theta, g, lower, upper)
        rec.grad_max = float(np.max(np.abs(g[free]))) if free.any() else 0.0
        rec.theta, rec.deviance = theta, f
        rec.converged = rec.n_em < n_em
        if not rec.converged:
            rec.messages.append(f"EM did not converge in {n_em} iterations")
        rec.n_iter = rec.n_em
        rec.n_evals = cnt.n
        rec.seconds = time.perf_counter() - t0
        return rec

    it = [0]
    callback = None
    if log:
        log("Performing gradient-based optimization:")

        def callback(xk):
            log(f"Iteration {it[0]}:  {model._ll_label()} = {-0.5 * cnt.f(xk):.8g}")
            it[0] += 1

    conv = False
    if compiled:
        f, conv = f_c, conv_c
        if np.all(np.isfinite(th_c)) and np.isfinite(f):
            theta = th_c    # never worse than the EM point: a fallback continues from here
        if conv:
            f, g = cnt.fg(theta)
            free = _free_mask(theta, g, lower, upper)
            gmax = float(np.max(np.abs(g[free]))) if free.any() else 0.0
    if not conv:
        theta, f, g, nit, conv, gmax, msg = _local(cnt, theta, lower, upper,
                                                   maxiter, tol, scale, callback)
    rec.n_iter = nit
    rec.candidates.append(("EM start", f, theta.copy(), conv))
    if not conv:
        rec.messages.append(f"gradient-based optimisation did not converge ({msg}; "
                            f"largest gradient component {gmax:.3g})")
    use_safeguard = (safeguard is True) or (safeguard == "auto" and model.n_obs <= 50_000)
    best = (f, theta, g, conv, gmax)
    if use_safeguard and compiled:
        starts = _alternative_starts(model, rec.theta_em, theta)
        # threads only pay for large models
        threads = (os.cpu_count() or 1) if model.n_obs >= 20_000 else 1
        runs = _run_compiled(model, [t for _, t in starts], maxiter=maxiter, tol=tol, quasi=True,
                             known=(theta, f), threads=threads)
        for (label, _), (th, fa, conva, _, _, n_ev, joined, _) in zip(starts, runs):
            cnt.n += n_ev
            if not joined and fa < best[0] - 1e-7 * max(1.0, abs(best[0])):
                # an exploratory run found a lower deviance: confirm it with full Newton
                (th, fa, conva, _, _, n_ev, _, _), = _run_compiled(model, th, maxiter=maxiter, tol=tol)
                cnt.n += n_ev
            rec.candidates.append((label, fa, th.copy(), conva))
            if conva and fa < best[0] - 1e-7 * max(1.0, abs(best[0])):
                ga = cnt.g(th)
                free = _free_mask(th, ga, lower, upper)
                best = (fa, th, ga, conva, float(np.max(np.abs(ga[free]))) if free.any() else 0.0)
                rec.better_optimum = True
    elif use_safeguard:
        known = [(theta.copy(), f)]
        for label, t in _alternative_starts(model, rec.theta_em, theta):
            t = np.clip(t, lower, upper)
            th, fa, ga, nita, conva, gmaxa, how = _local(cnt, t, lower, upper,
                                                         maxiter, tol, scale, known=known)
            if how != "joined a known optimum" and conva:
                known.append((th.copy(), fa))
            rec.candidates.append((label, fa, th.copy(), conva))
            if conva and fa < best[0] - 1e-7 * max(1.0, abs(best[0])):
                best = (fa, th, ga, conva, gmaxa)
                rec.better_optimum = True
    f, theta, g, conv, gmax = best
    if rec.better_optimum:
        dev_first = rec.candidates[0][1]
        rec.messages.append(
            f"the optimisation from the default start stopped at a local optimum "
            f"({model._ll_label().lower()} {-0.5 * dev_first:.8g}); a higher optimum "
            f"({-0.5 * f:.8g}) was found from another start and is reported")
    rec.theta, rec.deviance, rec.converged, rec.grad_max = theta, f, conv, gmax
    rec.n_evals = cnt.n
    rec.seconds = time.perf_counter() - t0
    if log:
        log(f"Iteration {it[0]}:  {model._ll_label()} = {-0.5 * f:.8g}")
    return rec
