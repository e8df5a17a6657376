"""Taking a fit to a certified stationary point.

The engine's projected Newton (:meth:`Problem.fit <mlmeta._core._engine.Problem.fit>`)
differences its Hessian with steps on the scale of the sampling SDs and stops where a
line search fails: at a variance stuck at zero whose escape needs a step of another
size, along badly scaled or flat parameters (slopes of uncentred covariates, a
correlation of effects with tiny SDs), at the edge of a custom level's positive
definite set. :func:`refine` checks and continues such runs with the same objective:

* steps off the bounds: each parameter at (or within 1e-8 of its natural size of) a
  bound is set to the bound plus 1e-8 .. 10 times its natural size
  (:func:`theta_scale`, the size at which the effects it scales have the variance of
  the outcome: scale-free); a custom level's correlations left free by a zero SD are
  tried at -0.9, 0 and 0.9 too (for an unstructured level, the later rows of its factor
  are turned towards the zero column), and a custom level at the edge of its positive
  definite set is shrunk into it or pushed to the rank-one corner; a parameter within
  0.1 of its natural size of a bound is tried on it (descent steps stop short of a bound
  where the deviance is badly conditioned or carries rounding noise);
* quasi-Newton steps: scipy's L-BFGS-B on the engine's deviance and gradient in
  scaled parameters (theta_i / natural size_i), so that no unit matters;
* Newton rounds (:func:`rounds`) of ROUND_ITER iterations from wherever those end.

A fit is converged when the engine's Newton says so and neither check lowers the
deviance by more than DECREMENT_TOL / 2 (deviance units): the reported
log-likelihood is then within about DECREMENT_TOL / 4 of the local optimum, at any
size of the log-likelihood. All of it serves the design's own outcome and, through
engine runs of no iterations, any whitened outcome ``Yw`` of a batch.
"""

from __future__ import annotations

import numpy as np

from mlmeta._threads import blas_threads, border_blas_threads
from mlmeta.model import NestedModel

__all__ = ["DECREMENT_TOL", "ROUND_ITER", "theta_scale", "parameter_rms", "run_engine", "noise", "rounds",
           "deviances", "custom_correlations", "off_pd_boundary", "off_bound_probes",
           "off_bound_gain",
           "quasi_newton", "Work", "refine"]


#: twice the largest decrease of the deviance that quasi-Newton steps may still find
#: at a converged fit (deviance units)
DECREMENT_TOL = 1e-5
#: iterations per engine call when a run is continued (its progress is checked between)
ROUND_ITER = 10
#: sizes of the steps off a bound, relative to the parameter's natural size
_PROBES = 10.0 ** np.arange(-8, 2)
#: a parameter this close to a bound (relative to its natural size) is also tried on it
_SNAP = 0.1


def theta_scale(model: NestedModel, theta=None) -> np.ndarray:
    """The natural size of each covariance parameter: the value at which the effects it
    scales add a variance equal to that of the outcome's fixed-effects residuals
    (``sd(r) / rms(z_e)`` for effect e; relative to the residual SD when it is profiled,
    the one at ``theta`` when given), the geometric mean over the effects a parameter
    touches; 1 for correlations. Steps off a bound are taken relative to it, so they do
    not depend on units. (The parts that depend on the design only are kept on the
    model.)"""
    sd_r, parts = _scale_parts(model)
    if model.residual == "profiled":
        s2 = 0.0
        if theta is not None:
            try:
                s2 = model.evaluate(theta).sigma2
            except FloatingPointError:
                pass
        sd_r = max(sd_r / np.sqrt(s2), 1.0) if s2 > 0 else 1.0
    if not sd_r > 0:
        sd_r = 1.0
    out = np.ones(model.n_theta)
    for i, rms in parts:
        out[i] = float(np.exp(np.mean(np.log(sd_r / rms))))
    return out


def parameter_rms(model: NestedModel) -> dict:
    """{variance parameter index: rms(z_e) of the effects it scales} (the design's part
    of :func:`theta_scale`, kept on the model)."""
    return dict(_scale_parts(model)[1])


def _scale_parts(model: NestedModel):
    """(rms of the design's own fixed-effects residuals, [(parameter index, rms(z_e) of
    the effects it scales)] for the variance parameters), kept on the model."""
    got = model.__dict__.get("_theta_scale_parts")
    if got is not None:
        return got
    d = model.design
    if d.n_fe:
        beta = d.start_coefficients()
        r = d.yw - d.Xw @ beta
    else:
        r = d.yw
    sd_r = float(np.sqrt(np.mean(r * r))) if r.size else 1.0
    parts = []
    for s, sl, Z in zip(model.structs, model.theta_slices, d.Z):
        Zw = Z * d.weights[:, None] if model.residual != "profiled" else Z
        rms = np.sqrt(np.mean(Zw * Zw, axis=0))
        rms = np.where(rms > 0, rms, 1.0)
        if s.kind == "custom":
            parts += [(sl.start + k, rms[where]) for k, where in enumerate(s._sd_free)]
            continue
        touches = np.any(s.dT(np.zeros(s.n_theta)) != 0, axis=2).tolist()   # (n_theta, q)
        for k, row in enumerate(touches):
            rows = [e for e, t in enumerate(row) if t]
            if rows:
                parts.append((sl.start + k, rms[rows]))
    model.__dict__["_theta_scale_parts"] = (sd_r, parts)
    return sd_r, parts


#: a main run's EM may hand over to Newton from this EM iterate on ...
EM_SWITCH = 3
#: ... where EM's pace and then the Newton decrement put the optimum within this / 2
#: (deviance units; see the engine's ``fit_one``) ...
SWITCH_DEC = 30.0
#: ... per this many observations, from as many on (the deviance, and its decrement at a
#: given relative distance from the optimum, grow with the data; below, the hand-over
#: stays where the reference fits were checked: with 75 instead of 30 at 2,500 rows,
#: Newton took over the essay's 4-effect model early and ended 2e-4 (ML) and 2e-3 (REML)
#: below lme4's log-likelihood)
SWITCH_OBS = 10_000


def switch_dec(n_obs: int) -> float:
    """The hand-over's bound on the remaining deviance: SWITCH_DEC max(1, n / SWITCH_OBS)."""
    return SWITCH_DEC * max(1.0, n_obs / SWITCH_OBS)


def run_engine(model, thetas, *, lower, upper, em_iter=0, em_tol=0.0, em_only=False,
               maxiter=1000, tol=1e-6, quasi=False, known=None, threads=1, log=False, Yw=None,
               em_switch=0, hessian=False):
    """Engine runs from each row of ``thetas`` (for the design's own outcome, or for the
    whitened outcome ``Yw``); the engine's dict of per-run arrays. ``em_switch``: EM may
    hand over to Newton from that iterate on (:data:`EM_SWITCH`, :data:`SWITCH_DEC`).
    ``known``: (theta, deviance) of an optimum found already, optionally with its
    Hessian as a third item (the exploring runs' first model Hessian); ``hessian``:
    return each run's last Hessian (``hess``)."""
    kt, kd = (None, np.inf) if known is None else (known[0], float(known[1]))
    kh = None if known is None or len(known) < 3 else known[2]
    thetas = np.atleast_2d(thetas)
    Y = None if Yw is None else np.repeat(np.asarray(Yw, dtype=float)[None, :], len(thetas), axis=0)
    with blas_threads(border_blas_threads(model.problem.nb, threads)):
        return model.problem.fit(thetas, Y, lower=lower, upper=upper, em_iter=int(em_iter),
                                 em_tol=float(em_tol), em_only=em_only, maxiter=int(maxiter),
                                 tol=float(tol), quasi=quasi, known_theta=kt, known_dev=kd,
                                 known_hess=kh,
                                 em_switch=int(em_switch), switch_dec=switch_dec(model.n_obs),
                                 n_threads=int(threads), log=log, hessian=hessian)


def off_bound_gain(dev, f):
    """Whether a deviance ``dev`` one step off a bound improves on f: by more than
    10 noise(f) (elementwise for arrays)."""
    return dev < f - 10 * (1e-10 * np.maximum(1.0, np.abs(f)))


def noise(f) -> float:
    """A change of the deviance below rounding: 1e-10 max(1, |f|)."""
    return 1e-10 * max(1.0, abs(float(f)))


def rounds(model, thetas, *, lower, upper, tol, maxiter, budget, quasi=False, known=None,
           Yw=None, threads=1):
    """Engine runs from each row of ``thetas`` in rounds of ROUND_ITER iterations. A run
    stops when it converges, joins ``known``, fails, stalls (a round that lowers its
    deviance by no more than rounding) or has spent ``budget`` evaluations or ``maxiter``
    iterations (``cut``). Returns one dict per run: theta, dev, conv, joined, evals,
    iters, cut, stalled, cert (converged with the engine's Newton certificate)."""
    thetas = np.atleast_2d(np.asarray(thetas, dtype=float))
    out = [dict(theta=t.copy(), dev=np.inf, conv=False, joined=False, evals=0, iters=0,
                cut=False, stalled=False, cert=False) for t in thetas]
    active = list(range(len(out)))
    while active:
        left = min(maxiter - out[i]["iters"] for i in active)
        r = run_engine(model, np.array([out[i]["theta"] for i in active]), lower=lower,
                       upper=upper, maxiter=max(1, min(ROUND_ITER, left)), tol=tol, quasi=quasi,
                       known=known, Yw=Yw, threads=threads)
        nxt = []
        for j, i in enumerate(active):
            s = out[i]
            prev, dev = s["dev"], float(r["deviance"][j])
            s["evals"] += int(r["n_evals"][j])
            s["iters"] += int(r["n_iter"][j])
            if not np.isfinite(dev):
                s["dev"] = dev
                continue
            s.update(theta=r["theta"][j].copy(), dev=dev, conv=bool(r["converged"][j]),
                     joined=bool(r["joined"][j]), cert=bool(r["certified"][j]))
            if s["conv"] or s["joined"]:
                continue
            if not prev - dev > noise(dev):
                s["stalled"] = True
            elif s["evals"] >= budget or s["iters"] >= maxiter:
                s["cut"] = True
            else:
                nxt.append(i)
        active = nxt
    return out


def deviances(model, thetas, *, lower, upper, Yw=None):
    """The deviance at each row of ``thetas`` (engine runs of no iterations)."""
    return run_engine(model, thetas, lower=lower, upper=upper, maxiter=0, Yw=Yw)["deviance"]


def _off_bounds(model, theta, f, *, lower, upper, scale, Yw=None):
    """The best point one step off a bound (:func:`off_bound_probes`) that lowers the
    deviance below f by more than 10 noise(f), or None. Returns (theta, deviance,
    evaluations)."""
    probes = off_bound_probes(model, theta, lower=lower, upper=upper, scale=scale)
    if not probes:
        return None
    devs = deviances(model, np.array(probes), lower=lower, upper=upper, Yw=Yw)
    k = int(np.argmin(np.where(np.isfinite(devs), devs, np.inf)))
    if off_bound_gain(devs[k], f):
        return probes[k], float(devs[k]), len(probes)
    return None


def off_bound_probes(model, theta, *, lower, upper, scale) -> list:
    """The points one step off a bound: each parameter at or near a (free) bound (within
    1e-8 of its natural size: a variance parameter's gradient vanishes at zero, so nothing
    else moves it away) set to the bound plus _PROBES times its natural size (for a
    bounded parameter, at most half its range); each within _SNAP of its natural size of
    a bound set to that bound; a custom level's points off the edge of its positive
    definite set."""
    probes = []
    for i in range(theta.shape[0]):
        if lower[i] == upper[i]:
            continue
        near = _PROBES[0] * scale[i]
        at_lo = np.isfinite(lower[i]) and theta[i] <= lower[i] + near
        at_up = np.isfinite(upper[i]) and theta[i] >= upper[i] - near
        for bound in (lower[i], upper[i]) if not (at_lo or at_up) else ():
            # close to a bound but not on it: the bound itself (where the deviance is
            # badly conditioned, or carries rounding noise, descent steps stop short of it)
            if np.isfinite(bound) and abs(theta[i] - bound) <= _SNAP * scale[i]:
                t = theta.copy()
                t[i] = bound
                probes.append(t)
        if not (at_lo or at_up):
            continue
        steps = scale[i] * _PROBES
        if np.isfinite(lower[i]) and np.isfinite(upper[i]):
            steps = np.unique(np.minimum(steps, 0.5 * (upper[i] - lower[i])))
        partners = _unidentified_correlations(model, i) if at_lo else []
        rotate = _rotations(model, i) if at_lo else None
        for h in steps:
            t = theta.copy()
            t[i] = np.clip(lower[i] + h if at_lo else upper[i] - h, lower[i], upper[i])
            probes.append(t)
            for r in (-0.9, 0.0, 0.9) if partners else ():
                tc = t.copy()
                tc[partners] = r
                probes.append(tc)
            for c in (-0.9, 0.9) if rotate is not None else ():
                probes.append(rotate(t, c))
    return probes + off_pd_boundary(model, theta)


def custom_correlations(model, theta):
    """Per custom level with free correlations: (their theta indices, the smallest
    eigenvalue of the level's correlation matrix at theta)."""
    out = []
    for s, sl in zip(model.structs, model.theta_slices):
        if s.kind == "custom" and len(s._corr_free):
            idx = np.arange(sl.start + len(s._sd_free), sl.stop)
            R = s._sd_R(theta[sl])[1]
            out.append((idx, float(np.linalg.eigvalsh(R)[0])))
    return out


def off_pd_boundary(model, theta) -> list:
    """Points off the edge of the positive definite set of a custom level whose
    correlation matrix is (nearly) singular there (the engine's Newton stops at that edge
    when the optimum lies along or beyond it): the free correlations shrunk towards 0 by
    1e-3 .. 0.5 (inside the set: R -> (1 - c) R + c I where they are all free), and pushed
    out to the rank-one corner their signs point to (feasible where it is one)."""
    probes = []
    for idx, w in custom_correlations(model, theta):
        if w > 1e-6:
            continue
        for c in (1e-3, 1e-2, 0.1, 0.5):
            t = theta.copy()
            t[idx] = (1.0 - c) * theta[idx]
            probes.append(t)
        t = theta.copy()
        t[idx] = np.sign(theta[idx]) * np.minimum(model.upper[idx], -model.lower[idx])
        probes.append(t)
    return probes


#: a correlation this close to +-1 counts as at the edge for :func:`mirrored_correlations`
EDGE_CORR = 1.0 - 1e-4


def mirrored_correlations(model, theta) -> list:
    """Starts across from a correlation at +-1 of an exchangeable or unstructured level:
    the level's SDs kept and that correlation set to 0.9 of the opposite extreme (-0.9,
    or -0.9 / (q - 1) for an exchangeable level, whose correlations are one), the other
    correlations kept (projected onto the structure by ``theta_from_report``). The
    likelihood can hold optima at both ends; Newton from one end does not cross."""
    starts = []
    for s, sl in zip(model.structs, model.theta_slices):
        if s.kind not in ("exchangeable", "unstructured") or s.q < 2:
            continue
        values = s.report_values(theta[sl])
        for k, (kind, _) in enumerate(s.report_params()):
            floor = 1.0 / (s.q - 1) if s.kind == "exchangeable" else 1.0
            if kind != "corr" or -floor * EDGE_CORR < values[k] < EDGE_CORR:
                continue
            v = values.copy()
            v[k] = -0.9 * floor if values[k] > 0 else 0.9
            t = theta.copy()
            t[sl] = s.theta_from_report(v)
            starts.append(t)
    return starts


def _unidentified_correlations(model, i) -> list:
    """The theta indices of a custom level's correlations that involve the effects of its
    SD parameter ``i`` (left anywhere while that SD is zero: a step off zero tries them at
    -0.9, 0 and 0.9 too); [] for other parameters."""
    for s, sl in zip(model.structs, model.theta_slices):
        if sl.start <= i < sl.stop and s.kind == "custom":
            k = i - sl.start
            if k >= len(s._sd_free):
                return []
            eff = set(s._sd_free[k])
            n_sd = len(s._sd_free)
            return [sl.start + n_sd + c for c, pairs in enumerate(s._corr_free)
                    if any(a in eff or b in eff for a, b in pairs)]
    return []


def _rotations(model, i):
    """For the diagonal entry T_jj of an unstructured level (theta index ``i``), a map
    (theta, c) -> theta with every later row of T turned so that its component along
    column j is c times its length: while T_jj is zero those rows are free to turn (the
    likelihood sees only their length), so a step off zero alone cannot find the
    correlations the effect j needs. None for other parameters."""
    for s, sl in zip(model.structs, model.theta_slices):
        if not (sl.start <= i < sl.stop and s.kind == "unstructured"):
            continue
        rows, cols = s._rows, s._cols
        k = i - sl.start
        j = rows[k]
        if cols[k] != j or j == s.q - 1:
            return None

        def turn(theta, c, s=s, sl=sl, j=j, rows=rows, cols=cols):
            t = theta.copy()
            T = s.T(t[sl])
            for r in range(j + 1, s.q):
                length = np.linalg.norm(T[r, :r + 1])
                rest = [m for m in range(r + 1) if m != j]
                norm_rest = np.linalg.norm(T[r, rest])
                T[r, rest] = (T[r, rest] / norm_rest if norm_rest > 0
                              else np.eye(len(rest))[-1]) * np.sqrt(1 - c * c) * length
                T[r, j] = c * length
            t[sl] = T[rows, cols]
            return t

        return turn
    return None


def differenced(model, Yw) -> bool:
    """Whether :func:`scaled_objective` differences the deviance for the outcome ``Yw``
    (another outcome of a model whose problem fits only its own) instead of taking the
    engine's analytic gradient."""
    return Yw is not None and not model.problem.new_outcomes


def scaled_objective(model, f_ref, *, lower, upper, scale, Yw=None, to_theta=None,
                     central=True, analytic=None):
    """(deviance, gradient) in scaled coordinates z = x / scale, finite everywhere
    (outside the parameter space: a value far above ``f_ref``, so line searches back off),
    and a counter of evaluations. ``x`` lies in the box [lower, upper]; it is theta itself,
    or ``to_theta(x, jac=True) = (theta, d theta / d x or None)`` maps it (theta then within the model's
    bounds). The gradient is the engine's analytic one (by the chain rule through
    ``to_theta``) for the design's own outcome or another one ``Yw`` of a model built for
    new outcomes; else differences (one engine call): central ones where both sides are
    in the box (one-sided ones are too coarse to see a shallow descent), else forward or
    backward ones; with ``central`` False,
    forward ones (backward at the upper bound): half the evaluations, enough to find a
    basin. ``analytic`` False asks for the differences whatever the model."""
    big = f_ref + 1e6 * max(1.0, abs(f_ref))
    count = [0]
    if to_theta is None:
        t_lower, t_upper = lower, upper

        def thetas(rows):
            return np.clip(rows * scale, lower, upper)
    else:
        t_lower, t_upper = model.lower, model.upper

        def thetas(rows):
            return np.array([to_theta(np.clip(r * scale, lower, upper), jac=False)[0]
                             for r in rows])

    analytic = not differenced(model, Yw) if analytic is None else bool(analytic)

    def fun(z):
        x = np.clip(z * scale, lower, upper)
        if analytic:
            theta, J = (x, None) if to_theta is None else to_theta(x)
            count[0] += 1
            try:
                ev = model.evaluate(theta, gradient=True, y=Yw)
            except FloatingPointError:
                return big, np.zeros_like(z)
            g = ev.grad if J is None else J.T @ ev.grad
            return float(ev.deviance), g * scale
        k = z.size
        h = 1e-6 * np.maximum(np.abs(z), 1.0)
        if not central:
            h = np.where(z + h <= upper / scale, h, -h)
            zz = np.repeat(z[None, :], k + 1, axis=0)
            zz[1:][np.diag_indices(k)] = z + h
            devs = deviances(model, thetas(zz), lower=t_lower, upper=t_upper, Yw=Yw)
            count[0] += k + 1
            if not np.isfinite(devs[0]):
                return big, np.zeros_like(z)
            ok = np.isfinite(devs[1:])
            return float(devs[0]), np.where(ok, (np.where(ok, devs[1:], 0.0) - devs[0]) / h, 0.0)
        hi = np.minimum(z + h, upper / scale)
        lo_ = np.maximum(z - h, lower / scale)
        zz = np.repeat(z[None, :], 2 * k + 1, axis=0)
        zz[1:k + 1][np.diag_indices(k)] = hi
        zz[k + 1:][np.diag_indices(k)] = lo_
        devs = deviances(model, thetas(zz), lower=t_lower, upper=t_upper, Yw=Yw)
        count[0] += 2 * k + 1
        if not np.isfinite(devs[0]):
            return big, np.zeros_like(z)
        fp = np.where(np.isfinite(devs[1:k + 1]), devs[1:k + 1], devs[0])
        fm = np.where(np.isfinite(devs[k + 1:]), devs[k + 1:], devs[0])
        hp = np.where(np.isfinite(devs[1:k + 1]), hi - z, 0.0)
        hm = np.where(np.isfinite(devs[k + 1:]), z - lo_, 0.0)
        span = hp + hm
        g = np.where(span > 0, (fp - fm) / np.where(span > 0, span, 1.0), 0.0)
        return float(devs[0]), g

    return fun, count


def quasi_newton(model, theta, f, *, lower, upper, scale, Yw=None, maxiter=30, max_evals=None):
    """L-BFGS-B (scipy) on the engine's deviance from theta, in scaled parameters
    (theta_i / theta_scale_i, so its steps do not depend on units): an independent check
    that theta is stationary. At most ``maxiter`` iterations and (about) ``max_evals``
    evaluations. Returns (theta, deviance, evaluations, iterations)."""
    from scipy import optimize

    fun, count = scaled_objective(model, f, lower=lower, upper=upper, scale=scale, Yw=Yw)
    lo, up = lower / scale, upper / scale
    bounds = list(zip(np.where(np.isfinite(lo), lo, None), np.where(np.isfinite(up), up, None)))
    # tight tolerances: along flat directions (a correlation of effects with tiny SDs) the
    # gradient is small long before the deviance stops falling
    opts = {"maxiter": maxiter, "ftol": 1e-13, "gtol": 1e-10}
    if max_evals is not None:
        per = 2 * theta.shape[0] + 1 if differenced(model, Yw) else 1
        opts["maxfun"] = max(1, int(max_evals) // per)
    r = optimize.minimize(fun, theta / scale, jac=True, method="L-BFGS-B", bounds=bounds,
                          options=opts)
    th = np.clip(r.x * scale, lower, upper)
    # the deviance at the point returned (after a failed line search scipy's fun and x
    # can belong to different iterates)
    fq = float(fun(th / scale)[0])
    return th, fq, count[0], int(r.nit)


class Work:
    """What a refinement spent: iterations (Newton and quasi-Newton) and evaluations."""

    def __init__(self, iters=0, evals=0):
        self.iters, self.evals = iters, evals


def refine(model, theta, f, conv, work, *, lower, upper, tol, maxiter, max_evals, scale,
           Yw=None, certified=False):
    """Take a fit to a certified stationary point, within ``maxiter`` iterations and
    ``max_evals`` evaluations in all (``work`` counts them). A converged fit is checked
    (module docstring: steps off the bounds, quasi-Newton steps in scaled parameters);
    a fit that is not converged, or that a check moved, goes on by quasi-Newton steps
    (which get past the engine's Newton where it crawls or stalls: badly scaled or flat
    parameters) and Newton rounds, until Newton converges and the checks hold, or the
    budget is spent, or nothing moves any more. A fit ``certified`` by the engine's Newton
    (a differenced Hessian positive definite and a decrement below 1e-14 max(1, |f|) in
    its last iteration) needs only the steps off the bounds. Returns (theta, f, conv,
    note or None)."""
    note = None

    def enough(v):
        return 0.5 * DECREMENT_TOL + 10 * noise(v)

    def spent():
        return work.iters >= maxiter or work.evals >= max_evals

    for _ in range(20):
        if conv:       # the checks, not charged to the iteration limit
            step = _off_bounds(model, theta, f, lower=lower, upper=upper, scale=scale, Yw=Yw)
            if step is not None:
                work.evals += step[2]
                theta, f, conv = step[0], step[1], False
                note = ("a step off the boundary of the parameter space lowered the deviance; "
                        "the fit went on from there")
            elif certified:
                return theta, f, True, note
            else:
                th, fq, n, _ = quasi_newton(model, theta, f, lower=lower, upper=upper,
                                            scale=scale, Yw=Yw, maxiter=200)
                work.evals += n
                if not fq < f - enough(f):
                    return theta, f, True, note
                theta, f, conv = th, fq, False
                note = note or ("the Newton iterations had stopped short of a stationary point; "
                                "quasi-Newton steps in scaled parameters took the fit on")
        if spent():
            break
        f_before = f
        r = rounds(model, theta, lower=lower, upper=upper, tol=tol,
                   maxiter=min(3 * ROUND_ITER, maxiter - work.iters), budget=max_evals - work.evals,
                   Yw=Yw)[0]
        work.iters += r["iters"]
        work.evals += r["evals"]
        if r["dev"] <= f:
            theta, f, conv, certified = r["theta"], r["dev"], r["conv"], r["cert"]
        if conv or spent():
            continue
        # a quasi-Newton step costs about 1/(n_theta + 1) of a Newton one (no Hessian): it is
        # charged so against the iteration limit
        per = model.n_theta + 1
        th, fq, n, nit = quasi_newton(model, theta, f, lower=lower, upper=upper, scale=scale,
                                      Yw=Yw, maxiter=max(1, min(200, (maxiter - work.iters) * per)))
        work.iters += -(-nit // per)
        work.evals += n
        if fq < f - enough(f):
            theta, f = th, fq
            note = note or ("the Newton iterations had stopped short of a stationary point; "
                            "quasi-Newton steps in scaled parameters took the fit on")
        if not f < f_before - enough(f_before):
            # neither Newton nor quasi-Newton steps move it: a last look off the bounds
            step = _off_bounds(model, theta, f, lower=lower, upper=upper, scale=scale, Yw=Yw)
            if step is None:
                break      # not converged
            work.evals += step[2]
            theta, f = step[0], step[1]
            note = ("a step off the boundary of the parameter space lowered the deviance; "
                    "the fit went on from there")
    return theta, f, False, note
