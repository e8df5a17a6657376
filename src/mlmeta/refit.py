"""One fitted model, many outcome vectors: simulation from the model and refits.

Both work on a :class:`~mlmeta.model.NestedModel` whose design is already built, so
nothing is parsed or re-sorted per outcome:

* :func:`simulate_outcomes` draws ``y = mean + sum_l Z_l u_l + e`` with
  ``u_l ~ N(0, Sigma_l)`` per group and ``e ~ N(0, Lambda)`` (``N(0, sigma^2 I)`` for a
  profiled residual);
* :func:`fit_outcomes` fits every column with the engine (:meth:`Problem.fit
  <mlmeta._core._engine.Problem.fit>`), the columns shared out over threads; a design
  whitened by a full sampling covariance V cannot take a new outcome in its
  precomputed problem, so it is rebuilt per column (the same engine fits it), unless it
  can be rotated away (:mod:`mlmeta.rotation`: the rotated outcomes are fitted on the
  rotated model's problem). With an
  ``executor`` the columns are fitted in chunks on it (see :mod:`mlmeta._executor`).

Outcomes are in the model frame's row order (the rows used by the fit) and in the
design's metric (with fixed-effect constraints, ``y - X beta_0``).
"""

from __future__ import annotations

import numpy as np

from mlmeta import _executor
from mlmeta.design import build_design
from mlmeta.model import NestedModel
from mlmeta.accuracy import ROUNDING_C, ROUNDING_TOL, largest_group_traces
from mlmeta.optimize import (MAIN_ITER, conditioned_model, conditioning, extra_starts,
                             feasible_start, finish_outcome, fit_model, start_theta)
from mlmeta.rotation import rotated_twin
from mlmeta.refine import (_PROBES, EM_SWITCH, off_bound_gain, off_bound_probes, switch_dec,
                           theta_scale)

__all__ = ["simulate_outcomes", "fit_outcomes", "column_starts"]



def simulate_outcomes(model: NestedModel, mean, n, *, theta, seed=None) -> np.ndarray:
    """(n_obs, n) outcomes simulated at ``theta`` around ``mean`` (frame row order)."""
    rng = np.random.default_rng(seed)
    d = model.design
    theta = np.asarray(theta, dtype=float)
    sig2 = model.evaluate(theta).sigma2 if model.residual == "profiled" else 1.0
    Ys = np.repeat(np.asarray(mean, dtype=float)[d.perm][:, None], n, axis=1)
    for Z, g, G, T in zip(d.Z, d.groups, d.n_groups, model.T_list(theta)):
        L = np.sqrt(sig2) * T                  # any square root of Sigma_l works: T T' = Sigma_l
        u = np.einsum("ij,gjn->gin", L, rng.standard_normal((G, T.shape[0], n)))
        Ys += np.einsum("ri,rin->rn", Z, u[g])
    if model.residual == "profiled":
        Ys += np.sqrt(sig2) * rng.standard_normal(Ys.shape)
    elif d.Lambda is not None:
        e = rng.standard_normal(Ys.shape)
        starts = d.group_start[0]
        for j in range(d.n_clusters):
            a, b = int(starts[j]), int(starts[j + 1])
            C = np.linalg.cholesky(d.Lambda[a:b, a:b].toarray())
            Ys[a:b] += C @ e[a:b]
    else:
        Ys += np.sqrt(d.variance)[:, None] * rng.standard_normal(Ys.shape)
    out = np.empty_like(Ys)
    out[d.perm] = Ys
    return out


def _sigmas(model, theta, sigma2):
    """Per level, (m, q, q) covariance matrices of every fit, times sigma2 (NaN: a failed fit)."""
    out = []
    for s, sl in zip(model.structs, model.theta_slices):
        if s.kind == "custom":
            S = np.array([s.Sigma(t) for t in theta[:, sl]]).reshape(-1, s.q, s.q)
        else:      # T linear in theta: T = sum_k theta_k dT_k, for every fit at once
            T = np.einsum("mk,kij->mij", theta[:, sl], s.dT(np.zeros(s.n_theta)))
            S = T @ T.transpose(0, 2, 1)
        out.append(S * sigma2[:, None, None])
    return out


def fit_outcomes(model: NestedModel, Y, *, theta0=None, em_iter=20, maxiter=1000, tol=1e-6,
                 n_jobs=1, executor=None, safeguard=False) -> dict:
    """Fit every column of ``Y`` (n_obs x m). Returns a dict of per-fit arrays: beta and
    se (m x p, the design's coefficients), deviance, theta, converged, n_iter, n_evals,
    sigma2 (the residual variance of a profiled model, else 1) and Sigma (per level,
    m x q x q). A fit whose objective is undefined at its end, or whose deviance cannot
    be computed accurately there (:func:`mlmeta.accuracy.rounding_error`; the fit
    :func:`mlmeta.meregress` would refuse), has NaN estimates and ``converged=False``.

    The main runs of all columns are one engine call, each from the start of its single
    fit (:func:`column_starts`; ``theta0`` replaces them) and with EM handing over to
    Newton where it may (EM_SWITCH, switch_dec); each fit is then finished as a single
    fit is (:func:`mlmeta.optimize.finish_outcome`: the stationarity check and, with
    ``safeguard`` True, "auto" (n_obs <= 50,000) or False, the extra starts), except
    those the finishing would leave as they are (:func:`_settled`).

    ``executor``: a concurrent.futures executor or a Dask client fitting chunks of
    columns (``n_jobs`` threads within each); each column's fit is the one of a serial
    run, so the results do not depend on the executor."""
    d = model.design
    Y = np.asarray(Y, dtype=float)
    m = Y.shape[1]
    own_starts = theta0 is None
    twin = None if model.problem.new_outcomes else rotated_twin(model)
    if twin is not None:
        # V rotated away (mlmeta.rotation): the same likelihood for the rotated outcomes,
        # whose fits the engine makes on the rotated model's own problem
        return fit_outcomes(twin, twin.rotation.apply(Y[d.perm]), theta0=theta0, em_iter=em_iter,
                            maxiter=maxiter, tol=tol, n_jobs=n_jobs, executor=executor,
                            safeguard=safeguard)
    if own_starts and not model.problem.new_outcomes:
        theta0 = start_theta(model)     # a design rebuilt per column starts where the model does
    if theta0 is not None:
        theta0 = np.ascontiguousarray(np.broadcast_to(np.asarray(theta0, dtype=float),
                                                      (m, model.n_theta)))
    if executor is not None:
        parts = [(Y[:, a:b], None if own_starts else theta0[a:b])
                 for a, b in _executor.chunks(m, executor)]
        return concat_fits(_executor.run(executor, _fit_part, model, parts,
                                         (em_iter, maxiter, tol, n_jobs, safeguard)))
    safeguard = extra_starts(model, safeguard)
    if model.problem.new_outcomes:
        Yw = np.ascontiguousarray((Y[d.perm] * d.weights[:, None]).T)
        out = _fit_new_outcomes(model, Yw, None if own_starts else theta0, em_iter, maxiter, tol,
                                n_jobs, safeguard)
    else:
        out = _fit_rebuilt(model, Y, theta0, em_iter, maxiter, tol, safeguard)
    if model.problem.new_outcomes:     # the kernel's basis: beta = B beta~ (no shift: new y)
        B = d.B
        out["beta"] = out["beta"] @ B.T
        cov = np.einsum("ij,mjk,lk->mil", B, out["Hinv"], B)
        s2 = out["sigma2"] if model.residual == "profiled" else np.ones(m)
        var = np.einsum("mii->mi", cov) * s2[:, None]
        # a failed fit's H^-1 is undefined: NaN, not the square root of whatever it holds
        ok = np.isfinite(out["deviance"])[:, None] & (var >= 0)
        out["se"] = np.sqrt(np.where(ok, var, np.nan))
        _refit_unconverged(model, Y, out, em_iter, maxiter, tol, safeguard)
    failed = ~np.isfinite(out["deviance"])
    sigma2 = np.where(failed, np.nan, out["sigma2"] if model.residual == "profiled" else 1.0)
    out["sigma2"] = np.where(failed, np.nan, out["sigma2"])
    out["Sigma"] = _sigmas(model, out["theta"], sigma2)
    return out


def _refit_unconverged(model, Y, out, em_iter, maxiter, tol, safeguard):
    """Batch fits made again as single fits of their outcomes (a design built for each:
    the engine's analytic gradient in the refinement where the batch differences the
    deviance, and the outcome whitened and centred on the moderators before the
    cross-products): those whose deviance the batch computation cannot give to within
    ROUNDING_TOL (``out["inaccurate"]``) and those that did not converge: the single
    fit's answer is kept where it is better, and its refusal (a ValueError: the objective
    fails, or cannot be computed accurately, at its optimum) always, so that a batch
    column says what ``Model.fit`` of its outcome says."""
    inaccurate = out.pop("inaccurate")
    redo = np.flatnonzero(inaccurate | (np.isfinite(out["deviance"]) & ~out["converged"]))
    if not redo.size:
        return
    alt = _fit_rebuilt(model, Y[:, redo], None, em_iter, maxiter, tol, safeguard)
    out["n_evals"][redo] += alt["n_evals"]
    f = out["deviance"][redo]
    take = (inaccurate[redo] | ~np.isfinite(alt["deviance"])
            | (alt["deviance"] < f - 1e-9 * np.maximum(1.0, np.abs(f))))
    rows = redo[take]
    for key in ("theta", "deviance", "beta", "se", "converged", "n_iter", "sigma2"):
        out[key][rows] = alt[key][take]


def _fit_new_outcomes(model, Yw, theta0, em_iter, maxiter, tol, n_jobs, safeguard):
    """The engine's fits of the whitened outcomes Yw (rows), finished one by one. As a
    single fit, they are made in the well-scaled basis of :func:`conditioning` when the
    model needs one, and mapped back; a fit whose deviance then differs by more than
    1e-8 (relative) is finished on the model itself. ``out["inaccurate"]`` marks the fits
    whose deviance the batch computation cannot give accurately (:func:`_inaccurate`)."""
    A = conditioning(model)
    if A is None:
        own = theta0 is None
        if own:
            theta0 = column_starts(model, model, Yw)
        out, _ = _main_runs(model, Yw, theta0, em_iter, maxiter, tol, n_jobs, shrink=own,
                            hessian=bool(safeguard))
        _finish(model, Yw, out, maxiter, tol, safeguard)
        out.pop("hess", None)
        out["inaccurate"] = _inaccurate(model, Yw, out)
        return out
    work, back = conditioned_model(model, A)
    own = theta0 is None
    if own:      # each column's start as its single fit makes it: in the work basis
        theta_w = column_starts(model, work, Yw)
    else:
        inv = [np.linalg.inv(Al) for Al in A]
        starts, which = np.unique(theta0, axis=0, return_inverse=True)     # one, typically
        theta_w = np.array([work.theta_from_Sigmas([Ai @ S @ Ai.T for Ai, S in
                                                    zip(inv, model.Sigma_list(t))])
                            for t in starts])[np.ravel(which)]
    theta_w = np.ascontiguousarray(theta_w)
    out, theta_w = _main_runs(work, Yw, theta_w, em_iter, maxiter, tol, n_jobs, shrink=own,
                              hessian=bool(safeguard))
    _finish(work, Yw, out, maxiter, tol, safeguard)
    out.pop("hess", None)
    ok = np.flatnonzero(np.isfinite(out["deviance"]))
    theta = out["theta"].copy()
    for j in range(theta.shape[0]):
        # a failed fit reports its start
        theta[j] = back(theta[j] if np.isfinite(out["deviance"][j]) else theta_w[j])
    out["theta"] = theta
    confirmed = np.zeros(theta.shape[0], dtype=bool)
    if ok.size:
        at = model.problem.fit(theta[ok], Yw[ok], em_iter=0, maxiter=0)
        diff = np.abs(at["deviance"] - out["deviance"][ok])
        off = ~(diff <= 1e-8 * np.maximum(1.0, np.abs(out["deviance"][ok])))
        # the deviance computed in two bases: where they agree to ROUNDING_TOL / 10, the
        # factorisation has not lost it (as a single fit's second opinion says)
        confirmed[ok] = ~off & (diff <= 0.1 * ROUNDING_TOL)
        for key in ("deviance", "beta", "se", "Hinv", "sigma2"):
            out[key][ok] = at[key]
        redo = ok[off]
        if redo.size:      # the map back lost precision (a singular Sigma): finish on the model
            out["converged"][redo] = False
            out["certified"][redo] = False
            _finish(model, Yw, out, maxiter, tol, False, rows=redo)
    out["inaccurate"] = _inaccurate(model, Yw, out, confirmed)
    return out


def _main_runs(model, Yw, theta0, em_iter, maxiter, tol, n_jobs, shrink, hessian=False) -> tuple:
    """The engine's main runs of the whitened outcomes Yw (rows) from ``theta0``; with
    ``shrink`` (the starts are the columns' own moment starts), a run that fails from its
    start is made again from the start shrunk until the objective is defined there
    (:func:`mlmeta.optimize.feasible_start`), as a single fit does; with ``hessian`` each
    run's last Hessian too (``hess``, the extra starts' seed). Returns (the engine's dict
    of per-run arrays, the start each run took)."""
    opts = dict(em_iter=int(em_iter), maxiter=min(int(maxiter), MAIN_ITER), tol=float(tol),
                em_switch=EM_SWITCH, switch_dec=switch_dec(model.n_obs), n_threads=int(n_jobs),
                hessian=hessian)
    out = model.problem.fit(theta0, Yw, **opts)
    starts = np.array(theta0, dtype=float)
    redo = []
    for j in np.flatnonzero(~np.isfinite(out["deviance"])) if shrink else []:
        t = feasible_start(model, starts[j], model.lower, model.upper, Yw=Yw[j])
        if not np.array_equal(t, starts[j]):
            starts[j] = t
            redo.append(j)
    if redo:
        again = model.problem.fit(starts[redo], Yw[redo], **opts)
        for key, value in again.items():
            out[key][redo] = value
    return out, starts


#: structures whose theta at a diagonal Sigma scales with the square root of Sigma
_SQRT_SCALING = ("identity", "independent", "exchangeable", "unstructured")


def column_starts(model, work, Yw) -> np.ndarray:
    """Per row of the whitened outcomes Yw, the moment start :func:`mlmeta.optimize.start_theta`
    of a single fit of that outcome, in the parameters of ``work`` (the model, or its
    well-scaled twin of :func:`mlmeta.optimize.conditioned_model`). The start is
    ``theta(Sigma_l = tau^2 S_l)`` with the heterogeneity ``tau^2 = max(var(r) - mean(v),
    var(r) / 4, 1e-8)`` of the outcome's residuals r from its weighted least-squares fit
    (sampling variances v) and S_l fixed by the design; where theta scales with tau (the
    structures of ``_SQRT_SCALING``) it is ``start_theta(work) tau / tau_0`` (tau_0 that of
    the design's own outcome). A profiled residual's start does not depend on the outcome;
    other structures keep ``start_theta(work)`` for every row."""
    base = start_theta(work)
    m = Yw.shape[0]
    if model.residual == "profiled" or any(s.kind not in _SQRT_SCALING for s in work.structs):
        return np.ascontiguousarray(np.broadcast_to(base, (m, work.n_theta)))
    d = model.design

    def tau2(R):        # rows: outcomes (each reduced on its own: the same in any chunk)
        v = d.variance if d.variance is not None else np.zeros(d.n_obs)
        total = np.var(R, axis=1)
        return np.maximum(np.maximum(total - float(np.mean(v)), 0.25 * total), 1e-8)

    def residuals(Yb):      # a block of whitened outcomes -> residuals, outcome scale
        R = Yb / d.weights[None, :]
        if d.n_fe:
            # row by row (einsum's loops, not a BLAS product whose sums depend on the block's
            # shape): a chunk of columns gets the starts of the whole batch, bit for bit
            if d.orthonormal:      # Xw's least squares is Xw'y
                beta = np.einsum("mn,np->mp", Yb, d.Xw)
            else:
                beta = np.array([d.least_squares(yw) for yw in Yb])
            R -= np.einsum("mq,pq,np->mn", beta, d.B, d.X, optimize=False)
        return R

    r_own = d.y
    if d.n_fe:
        r_own = d.y - d.X @ (d.B @ d.start_coefficients() + d.b0)
    t2 = np.concatenate([tau2(residuals(Yw[a:a + 256])) for a in range(0, m, 256)])
    ratio = np.sqrt(t2 / tau2(r_own[None, :])[0])
    return np.ascontiguousarray(ratio[:, None] * base[None, :])


def _finish(model, Yw, out, maxiter, tol, safeguard, rows=None):
    """Finish each fit of a batch as a single fit (:func:`mlmeta.optimize.finish_outcome`)
    and take the engine's values at the theta it ends at (in place). The fits the
    finishing would leave as they are (:func:`_settled`) are not visited."""
    rows = np.arange(Yw.shape[0]) if rows is None else np.asarray(rows, dtype=np.intp)
    rows = rows[np.isfinite(out["deviance"][rows])]
    rows = rows[~_settled(model, out, safeguard, rows)]
    rows = rows[~_settled_off_bounds(model, Yw, out, safeguard, rows)]
    moved = []
    hess = out.get("hess")        # the main runs' Hessians (seeds of the extra starts)
    for j in rows:
        th, _, conv, n, n_iter = finish_outcome(
            model, Yw[j], out["theta"][j], out["deviance"][j], out["converged"][j],
            out["theta_em"][j], maxiter=maxiter, tol=tol, safeguard=safeguard,
            n_iter=out["n_iter"][j], certified=out["certified"][j],
            hess=None if hess is None else hess[j])
        out["n_evals"][j] += n
        out["n_iter"][j] = n_iter
        out["converged"][j] = conv
        if not np.array_equal(th, out["theta"][j]):
            out["theta"][j] = th
            moved.append(j)
    if moved:
        at = model.problem.fit(out["theta"][moved], Yw[moved], em_iter=0, maxiter=0)
        for key in ("deviance", "beta", "se", "Hinv", "sigma2"):
            out[key][moved] = at[key]


def _settled(model, out, safeguard, rows) -> np.ndarray:
    """Which of the fits ``rows`` the finishing steps (:func:`mlmeta.optimize.finish_outcome`)
    would leave as they are, decided for all of them at once: without extra starts and
    without custom levels (whose T(theta) can fail, whose correlations have probes of
    their own), a fit the engine certified (a positive definite Hessian with a vanishing
    Newton decrement, or a vanishing projected gradient) none of whose parameters is
    within 1e-8 of its natural size (:func:`mlmeta.refine.theta_scale`) of a free bound.
    For such a fit :func:`mlmeta.refine.refine` checks only the steps off the bounds, and
    there is no parameter to step off."""
    if safeguard or any(s.kind == "custom" for s in model.structs):
        return np.zeros(len(rows), dtype=bool)
    lower, upper = model.lower, model.upper
    near = _PROBES[0] * theta_scale(model)
    theta = out["theta"][rows]
    free = lower < upper
    at_lo = np.isfinite(lower) & (theta <= lower + near)
    at_up = np.isfinite(upper) & (theta >= upper - near)
    at_bound = ((at_lo | at_up) & free).any(axis=1)
    return out["certified"][rows] & out["converged"][rows] & ~at_bound


def _settled_off_bounds(model, Yw, out, safeguard, rows) -> np.ndarray:
    """Which of the fits ``rows`` (not :func:`_settled`: a parameter at a bound) the finishing
    steps would leave as they are, their steps off the bounds evaluated together in one
    engine call: for a certified, converged fit without extra starts and custom levels
    the finishing is :func:`mlmeta.refine.refine`'s look off the bounds alone, which moves
    the fit only where a point off a bound (:func:`mlmeta.refine.off_bound_probes`) lowers
    the deviance (:func:`mlmeta.refine.off_bound_gain`); the others need
    :func:`finish_outcome`."""
    quiet = np.zeros(len(rows), dtype=bool)
    if safeguard or any(s.kind == "custom" for s in model.structs) or not len(rows):
        return quiet
    lower, upper = model.lower, model.upper
    scale = theta_scale(model)
    cand = np.flatnonzero(out["certified"][rows] & out["converged"][rows])
    probes = [off_bound_probes(model, out["theta"][rows[i]], lower=lower, upper=upper, scale=scale)
              for i in cand]
    owner = np.repeat(cand, [len(p) for p in probes])
    if owner.size:
        dev = model.problem.fit(np.array([t for p in probes for t in p]), Yw[rows[owner]],
                                lower=lower, upper=upper, em_iter=0, maxiter=0)["deviance"]
        low = np.zeros(len(rows), dtype=bool)
        f = out["deviance"][rows[owner]]
        np.logical_or.at(low, owner, off_bound_gain(dev, f))
        quiet[cand] = ~low[cand]
    else:
        quiet[cand] = True
    return quiet


def _inaccurate(model, Yw, out, confirmed=None) -> np.ndarray:
    """Which fits' deviances the batch computation cannot give to within ROUNDING_TOL at
    their end (:func:`mlmeta.accuracy.rounding_error` of that computation: the outcome
    whitened but not centred on the moderators, the working basis's coefficients), for
    all fits at once: with ``yy = y'Lambda^-1 y``, b the coefficients, H^-1 their
    (X'V^-1X)^-1 and kappa the bound on the condition of C (:func:`_c_conditions`),

        err = C eps [ (sqrt(yy) + |b|)^2 / sigma^2 + |tr H^-1| (REML) + kappa ].

    As for a single fit (:func:`mlmeta.optimize.fit_model`), the kappa term alone does not
    condemn a fit whose deviance a computation in another basis ``confirmed`` (a mask)
    to ROUNDING_TOL / 10: the bound on C's condition is only a bound."""
    ok = np.isfinite(out["deviance"])
    bad = np.zeros(Yw.shape[0], dtype=bool)
    if not ok.any():
        return bad
    yy = np.maximum(np.einsum("ij,ij->i", Yw, Yw)[ok], 0.0)      # row by row: no copies of Yw
    beta = out["beta"][ok]
    b = np.sqrt(np.einsum("ij,ij->i", beta, beta)) if beta.shape[1] else 0.0
    s2 = out["sigma2"][ok] if model.residual == "profiled" else 1.0
    q = (np.sqrt(yy) + b) ** 2 / s2
    Hinv = out["Hinv"][ok]
    if model.method == "reml" and Hinv.shape[1]:
        q = q + np.abs(np.einsum("mii->m", Hinv))
    unit = ROUNDING_C * np.finfo(float).eps
    bad[ok] = unit * (q + _c_conditions(model, out["theta"][ok])) > ROUNDING_TOL
    if confirmed is not None:
        bad[ok] &= ~(confirmed[ok] & (unit * q <= ROUNDING_TOL))
    return bad


def _c_conditions(model, theta) -> np.ndarray:
    """:func:`mlmeta.accuracy.c_condition` at every row of ``theta``: 1 + the largest over
    levels of ||T_l||_2^2 times the largest trace of a group's Z_g'Lambda^-1 Z_g (T linear
    in theta, ``T = sum_k theta_k dT_k``, except for a custom level)."""
    traces = model.__dict__.get("_group_traces")
    if traces is None:
        traces = model.__dict__["_group_traces"] = largest_group_traces(model)
    worst = np.zeros(theta.shape[0])
    for s, sl, tr in zip(model.structs, model.theta_slices, traces):
        if s.kind == "custom":
            T = np.array([s.T(t) for t in theta[:, sl]]).reshape(-1, s.q, s.q)
        else:
            T = np.einsum("mk,kij->mij", theta[:, sl], s.dT(np.zeros(s.n_theta)))
        t2 = T[:, 0, 0] ** 2 if s.q == 1 else np.linalg.norm(T, 2, axis=(1, 2)) ** 2
        worst = np.maximum(worst, t2 * tr)
    return 1.0 + worst


def _fit_part(model, part, options):
    """One executor task: :func:`fit_outcomes` of a chunk of columns."""
    Y, theta0 = part
    em_iter, maxiter, tol, n_jobs, safeguard = options
    return fit_outcomes(model, Y, theta0=theta0, em_iter=em_iter, maxiter=maxiter, tol=tol,
                        n_jobs=n_jobs, safeguard=safeguard)


def concat_fits(parts) -> dict:
    """The dicts of :func:`fit_outcomes` for consecutive chunks of columns, joined: arrays
    along their first axis, lists of arrays (Sigma per level) element by element."""
    out = {}
    for key, first in parts[0].items():
        if isinstance(first, list):
            out[key] = [np.concatenate([p[key][i] for p in parts]) for i in range(len(first))]
        else:
            out[key] = np.concatenate([np.asarray(p[key]) for p in parts])
    return out


def _fit_rebuilt(model, Y, theta0, em_iter, maxiter, tol, safeguard):
    """Each column of Y fitted on a design built for it (``theta0`` None: from the default
    start, in the well-scaled basis when the model needs one)."""
    d = model.design
    rows = []
    variance = d.variance if d.Lambda is None else None
    for j in range(Y.shape[1]):
        design = build_design(Y[d.perm, j], d.X, d.Z, d.groups, variance, V=d.Lambda,
                              n_tree=d.n_tree)
        mj = NestedModel(design, model.structs, model.method, residual=model.residual)
        try:
            rec = fit_model(mj, theta0=None if theta0 is None else theta0[j], em_iter=em_iter,
                            maxiter=maxiter, tol=tol, safeguard=safeguard)
            ev = mj.evaluate(rec.theta)
            rows.append((rec.theta, rec.deviance, ev.beta, np.sqrt(np.diag(ev.cov_beta)),
                         rec.converged, rec.n_iter, rec.n_evals, ev.sigma2))
        except ValueError:          # the objective fails, or is inaccurate, at the optimum
            p = d.n_fe
            start = np.full(model.n_theta, np.nan) if theta0 is None else theta0[j]
            rows.append((start, np.inf, np.full(p, np.nan), np.full(p, np.nan), False, 0, 0,
                         np.nan))
    cols = list(zip(*rows))
    return dict(theta=np.array(cols[0]), deviance=np.array(cols[1], dtype=float),
                beta=np.array(cols[2]), se=np.array(cols[3]),
                converged=np.array(cols[4], dtype=bool), n_iter=np.array(cols[5]),
                n_evals=np.array(cols[6]), sigma2=np.array(cols[7], dtype=float))
