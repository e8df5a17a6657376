"""Fitting drivers: EM from a moment start, then L-BFGS-B with the analytic gradient,
a Newton polish on the free parameters, and cheap safeguards against local optima.

Every fit leaves a :class:`FitRecord` (starts, final theta, evaluations,
messages, the candidate optima found) so a result can say how it was reached.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from scipy import optimize as sopt

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
    w = d.weights
    Xw = d.X * w[:, None]
    yw = d.y * w
    if d.n_fe:
        beta, *_ = np.linalg.lstsq(Xw, yw, rcond=None)
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


def _em(model, theta, n_iter, tol, log):
    dev_old = np.inf
    ev = None
    k = 0
    for k in range(1, n_iter + 1):
        theta_new, ev = model.em_step(theta)
        if log:
            log(f"EM iteration {k - 1}:  {model._ll_label()} = {-0.5 * ev.deviance:.8g}")
        if abs(dev_old - ev.deviance) <= tol * (abs(ev.deviance) + tol):
            theta = theta_new
            break
        dev_old = ev.deviance
        theta = theta_new
    return theta, k


def _free_mask(theta, grad, lower, upper, eps=1e-10):
    at_low = (theta <= lower + eps) & (grad >= 0)
    at_up = (theta >= upper - eps) & (grad <= 0)
    return ~(at_low | at_up)


def _fd_hessian(fn_grad, theta, free, h_rel=1e-5):
    idx = np.flatnonzero(free)
    k = idx.size
    H = np.zeros((k, k))
    for a, i in enumerate(idx):
        h = h_rel * max(1.0, abs(theta[i]))
        tp = theta.copy(); tp[i] += h
        tm = theta.copy(); tm[i] -= h
        H[:, a] = (fn_grad(tp)[idx] - fn_grad(tm)[idx]) / (2 * h)
    return 0.5 * (H + H.T)


def _newton_polish(cnt: _Counter, theta, lower, upper, max_iter=20):
    """Newton steps on the parameters not held at a bound (FD Hessian of the analytic gradient)."""
    f, g = cnt.fg(theta)
    for _ in range(max_iter):
        free = _free_mask(theta, g, lower, upper)
        if not free.any():
            break
        gf = g[free]
        if np.max(np.abs(gf)) < 1e-11 * max(1.0, abs(f)):
            break
        H = _fd_hessian(cnt.g, theta, free)
        try:
            w, U = np.linalg.eigh(H)
        except np.linalg.LinAlgError:
            break
        if w.min() <= 0:
            break
        step = -(U @ ((U.T @ gf) / w))
        t = 1.0
        improved = False
        for _ls in range(30):
            cand = theta.copy()
            cand[free] = np.clip(theta[free] + t * step, lower[free], upper[free])
            fc, gc = cnt.fg(cand)
            if fc <= f + 1e-12 * max(1.0, abs(f)):
                improved = True
                break
            t *= 0.5
        if not improved:
            break
        done = np.max(np.abs(cand - theta)) < 1e-12 * max(1.0, np.max(np.abs(theta)))
        theta, f, g = cand, fc, gc
        if done:
            break
    return theta, f, g


def _local(cnt: _Counter, theta0, lower, upper, maxiter, tol, callback=None):
    bounds = list(zip(lower, np.where(np.isfinite(upper), upper, None)))
    lb = [(lo, None if hi is None else hi) for lo, hi in bounds]
    res = sopt.minimize(cnt.fg, theta0, jac=True, method="L-BFGS-B", bounds=lb,
                        callback=callback,
                        options={"maxiter": maxiter, "ftol": 1e-15, "gtol": tol * 1e-3,
                                 "maxcor": 20})
    theta = np.clip(np.asarray(res.x, dtype=float), lower, upper)
    theta, f, g = _newton_polish(cnt, theta, lower, upper)
    free = _free_mask(theta, g, lower, upper)
    gmax = float(np.max(np.abs(g[free]))) if free.any() else 0.0
    converged = bool(np.isfinite(f)) and gmax <= tol * max(1.0, abs(f))
    return theta, f, g, int(res.nit), converged, gmax, str(res.message)


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
               maxiter=1000, tol=1e-6, safeguard="auto", verbose=False) -> FitRecord:
    """Fit a nested model: EM, then L-BFGS-B + Newton polish, then safeguards.

    ``tol`` bounds the largest free gradient component relative to max(1, |deviance|).
    ``safeguard``: True, False or "auto" (extra starts when the model is small
    enough that they cost little: n_obs <= 50,000).
    """
    t0 = time.perf_counter()
    log = print if verbose else None
    theta = start_theta(model) if theta0 is None else np.asarray(theta0, dtype=float)
    theta = np.clip(theta, model.lower, model.upper)
    rec = FitRecord(theta_start=theta.copy())
    cnt = _Counter(model)
    if model.n_theta == 0:
        f, g = cnt.fg(theta)
        rec.theta, rec.deviance, rec.converged = theta, f, True
        rec.seconds = time.perf_counter() - t0
        return rec
    if em_iter > 0 or em_only:
        if log:
            log("Performing EM optimization ...")
        n_em = (10 * maxiter if em_only else em_iter)
        theta, rec.n_em = _em(model, theta, n_em, em_tol, log)
        cnt.n += rec.n_em
    rec.theta_em = theta.copy()
    if em_only:
        f, g = cnt.fg(theta)
        free = _free_mask(theta, g, model.lower, model.upper)
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

    theta, f, g, nit, conv, gmax, msg = _local(cnt, theta, model.lower, model.upper,
                                               maxiter, tol, callback)
    rec.n_iter = nit
    rec.candidates.append(("EM start", f, theta.copy(), conv))
    if not conv:
        rec.messages.append(f"gradient-based optimisation did not converge ({msg}; "
                            f"largest gradient component {gmax:.3g})")
    use_safeguard = (safeguard is True) or (safeguard == "auto" and model.n_obs <= 50_000)
    best = (f, theta, g, conv, gmax)
    if use_safeguard:
        for label, t in _alternative_starts(model, rec.theta_em, theta):
            t = np.clip(t, model.lower, model.upper)
            th, fa, ga, nita, conva, gmaxa, _ = _local(cnt, t, model.lower, model.upper,
                                                       maxiter, tol)
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
