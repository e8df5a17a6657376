"""Extra starts of a fit: where they begin, which of them run, and how.

:func:`alternative_starts` lists them: near the EM path and the optimum (the EM start
shrunk and inflated, each level and each variance of a multi-effect level at zero, a
spatial level's range at quantiles of the distances), next to a boundary optimum (off a
zero variance, off a custom level's edge, a correlation's opposite edge), and away from
the EM path (every variance at half its natural size, so again with each level at zero,
pseudo-random points). :func:`run_starts` runs a selection of them in the engine
(quasi-Newton rounds, with the known optimum to join).

With ``safeguard="auto"`` the starts away from the EM path run only where the fit is
exposed to another optimum (:func:`away_from_em`): it ends on the boundary of the parameter
space (:func:`on_boundary`: a variance at zero, a bounded parameter at its bound, a custom
level at the edge of its positive definite set), it did not converge, or a start near the
EM path found a lower deviance. Of the 232 optima higher than the main fit's that the
extra starts found in 10,000 random designs (``tools/fuzz.py``), 209 were reached from fits
ending on the boundary; of the other 23, all but two (deviances lower by 4e-5 and 9e-6) were
reached from starts near the EM path too. At an interior optimum that the engine certified
(a positive definite Hessian and a vanishing Newton decrement) the EM start inflated (x 3)
runs only where it does not lie downhill of the optimum along a straight line
(:func:`descends`, three deviances). Of the 1,941 fits of 4,000 random designs (batch
columns included) that ended at an interior optimum, 18 had a better one that an extra
start found, the inflated start among them in some, never without a level or a variance
at zero or the shrunk start. Those always run: a run from a level at zero explores the
slice of the parameter space where the level vanishes (its gradient there is zero), and
the shrunk start (x 0.1) the corner of small variances, where the deviance can rise and
fall again between sampled points: screened by the same line, it missed an optimum at
zero variances 2.9 higher in log-likelihood in one of 10,000 random designs. An
uncertified optimum may lie on a nearly flat ridge, where runs along it end at other
heights: there the inflated start runs too. ``safeguard=True`` runs every start.

A scalar level at zero starts with its variance on the scalar level nested in it
(:func:`_absorb`), near the optimum of its slice; the engine's exploring runs take the
one variance at zero off it by a secant step in the variance (``off_saddle`` in
:mod:`mlmeta._core._optimizer`). On schoolcal the three runs take 47 evaluations
instead of 70; 5 per study at 10,000 effect sizes 37 instead of 60.
"""

from __future__ import annotations

import functools

import numpy as np

from mlmeta.model import NestedModel
from mlmeta.refine import (custom_correlations, mirrored_correlations, noise, off_pd_boundary,
                           parameter_rms, rounds, run_engine)

__all__ = ["N_RANDOM_STARTS", "WIDE", "natural_start", "alternative_starts", "on_boundary",
           "away_from_em", "run_starts", "BOUNDARY_TOL", "SEGMENT_POINTS", "descends",
           "inflated_em", "INFLATED"]

#: labels of the starts away from the EM path
WIDE = ("natural scale", "random")
#: label of the EM start inflated
INFLATED = "EM start x 3"
#: a parameter this close to a bound (relative to its natural size; correlations: absolute)
#: or a custom level whose correlation matrix has an eigenvalue this small is on the boundary
BOUNDARY_TOL = 1e-4


#: pseudo-random extra starts (seeded by the model's size: the same starts every time)
N_RANDOM_STARTS = 2


def natural_start(model: NestedModel, scale) -> np.ndarray:
    """Every variance parameter at half its natural size (``scale``,
    :func:`mlmeta.refine.theta_scale`), the other parameters at 0."""
    return np.where(model.lower == 0.0, 0.5 * scale, 0.0)


@functools.lru_cache(maxsize=64)
def _random_draws(n_obs: int, k: int) -> tuple:
    """The uniform draws of the N_RANDOM_STARTS pseudo-random starts of a model with
    ``n_obs`` observations and ``k`` parameters (seeded by both: the same starts every
    time), per start (variance parameters in (0.05, 2), correlations in (-0.5, 0.5), others
    in (-1, 1)); read-only arrays, kept for the next fit of the same size."""
    rng = np.random.default_rng([n_obs, k, 17])
    out = []
    for _ in range(N_RANDOM_STARTS):
        draws = (rng.uniform(0.05, 2.0, k), rng.uniform(-0.5, 0.5, k), rng.uniform(-1.0, 1.0, k))
        for a in draws:
            a.flags.writeable = False
        out.append(draws)
    return tuple(out)


def alternative_starts(model: NestedModel, theta_em, theta_best, scale=None):
    """Cheap extra starts: the EM start shrunk and inflated, the optimum with each
    level (and each variance of a multi-effect level) pushed to zero (and a spatial
    level's range at quantiles of the distances, ``Spatial.range_starts``), and starts away
    from the EM path: every variance parameter at half its natural size (``scale``,
    :func:`theta_scale`; the others at 0), so again with each level at zero, and
    N_RANDOM_STARTS pseudo-random ones (variance
    parameters at 0.05 .. 2 times their natural size, correlations in (-0.5, 0.5), other
    parameters in (-1, 1) times their natural size)."""
    starts = [("EM start x 0.1", theta_em * 0.1), (INFLATED, theta_em * 3.0)]
    if scale is not None:
        # off a zero variance by 1 and 10 % of its natural size (a narrow basin nearby that
        # the steps of _off_bounds, one parameter at a time, can step over)
        for i in np.flatnonzero((model.lower == 0.0) & (theta_best <= 0.0) & (model.upper > 0.0)):
            for c in (0.01, 0.1):
                t = theta_best.copy()
                t[i] = c * scale[i]
                starts.append((f"parameter {i} off zero x {c:g}", t))
        for j, t in enumerate(off_pd_boundary(model, theta_best)):
            starts.append((f"custom correlations off the edge {j + 1}", t))
        for j, t in enumerate(mirrored_correlations(model, theta_best)):
            starts.append((f"correlation at the opposite edge {j + 1}", t))
        k = model.n_theta
        sd_like = model.lower == 0.0
        corr_like = np.isfinite(model.lower) & (model.lower < 0.0)
        natural = natural_start(model, scale)
        starts.append(("natural scale", natural))
        if len(model.structs) > 1:      # which level carries a variance can be multimodal
            for lvl, sl in enumerate(model.theta_slices):
                t = natural.copy()
                t[sl] = 0.0
                starts.append((f"natural scale, level {lvl + 1} at zero", t))
        for r, (u_sd, u_corr, u_other) in enumerate(_random_draws(model.n_obs, k)):
            t = np.where(sd_like, u_sd, np.where(corr_like, u_corr, u_other))
            t = np.clip(t * np.where(corr_like, 1.0, scale), model.lower, model.upper)
            starts.append((f"random start {r + 1}", t))
    for lvl, (s, sl) in enumerate(zip(model.structs, model.theta_slices)):
        if s.kind == "spatial":      # the likelihood is often multimodal in the range
            for p, rho in s.range_starts():
                t = theta_best.copy()
                t[sl.start + 1] = rho
                starts.append((f"level {lvl + 1} range at the {p:.0%} quantile of distances", t))
        t = theta_best.copy()
        t[sl] = 0.0
        _absorb(model, t, theta_best, lvl)
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


def _absorb(model: NestedModel, t, theta, lvl) -> None:
    """The start ``t`` with the scalar level ``lvl`` at zero: its variance moved to the scalar
    level nested directly in it, if any (``t`` in place). The level's effects then still
    add, on average, what they add at the optimum ``theta``: the nested parameter becomes
    sqrt(theta_n^2 + theta_l^2 rms(z_l)^2 / rms(z_n)^2) (rms: the natural sizes' root mean
    squares of the effects' design columns, :func:`mlmeta.refine.theta_scale`). That is
    about where the slice of the level at zero has its optimum (with random intercepts,
    where the observations' variances stay as they were), and the run spends fewer
    iterations crossing the slice: schoolcal's run from its districts at zero reaches the
    slice's optimum in 4 iterations (6 evaluations) instead of 7 (9)."""
    structs, slices = model.structs, model.theta_slices

    def scalar(j):      # a level of the nested tree with one variance
        return (0 <= j < model.design.n_tree and structs[j].q == 1 and structs[j].n_theta == 1
                and structs[j].kind != "custom")

    if not (scalar(lvl) and scalar(lvl + 1)):
        return
    rms = parameter_rms(model)
    i, a = slices[lvl].start, slices[lvl + 1].start
    if i not in rms or a not in rms:
        return
    ratio = float(rms[i][0]) / float(rms[a][0])
    t[a] = np.sqrt(theta[a] ** 2 + (theta[i] * ratio) ** 2)


def on_boundary(model: NestedModel, theta, lower, upper, scale) -> bool:
    """Whether theta lies on the boundary of the parameter space: a parameter within
    BOUNDARY_TOL of its natural size (``scale``) of a finite bound (a variance at zero, a
    correlation at +-1), or a custom level whose correlation matrix has an eigenvalue at
    most BOUNDARY_TOL (the edge of its positive definite set). Fixed parameters (equal
    bounds) do not count."""
    free = lower < upper
    size = BOUNDARY_TOL * np.maximum(scale, 1e-300)
    near_lo = np.isfinite(lower) & (theta <= lower + size)
    near_up = np.isfinite(upper) & (theta >= upper - size)
    if np.any(free & (near_lo | near_up)):
        return True
    return any(w <= BOUNDARY_TOL for _, w in custom_correlations(model, theta))


def inflated_em(starts) -> np.ndarray:
    """Which of the (label, theta) starts is the EM start inflated (:data:`INFLATED`):
    under ``safeguard="auto"``, at a certified interior optimum, it runs only where it does
    not lie downhill of it (:func:`descends`)."""
    return np.array([label == INFLATED for label, _ in starts], dtype=bool)


def away_from_em(starts) -> np.ndarray:
    """Which of the (label, theta) starts lie away from the EM path (labels in
    :data:`WIDE`): under ``safeguard="auto"`` they run only where the fit is exposed."""
    return np.array([label.startswith(WIDE) for label, _ in starts], dtype=bool)


#: the deviance is sampled at t = 0, 1/m, ..., (m - 1)/m of the segment from a start to the
#: optimum (:func:`descends`)
SEGMENT_POINTS = 3


def descends(model, starts, which, theta, f, *, lower, upper, Yw=None, threads=1) -> np.ndarray:
    """Which of the starts ``which`` (indices into ``starts``, (label, theta) pairs) lie
    downhill of the optimum (theta, f) along the straight segment between them: the
    deviance at t = 0, 1/m, ..., (m - 1)/m of the way (m = :data:`SEGMENT_POINTS`; one
    engine call, no gradients) falls from point to point, and to f, by more than
    rounding (1e-10 max(1, |f|)). A start that fails (a rise, a flat stretch, a point below
    f, an undefined deviance) may lie in another basin. Boolean mask over ``which``."""
    which = np.asarray(which, dtype=np.intp)
    if which.size == 0:
        return np.zeros(0, dtype=bool)
    t = np.arange(SEGMENT_POINTS) / SEGMENT_POINTS
    points = np.concatenate([starts[i][1][None, :] + t[:, None] * (theta - starts[i][1])[None, :]
                             for i in which])
    dev = run_engine(model, points, lower=lower, upper=upper, maxiter=0, Yw=Yw,
                     threads=threads)["deviance"].reshape(which.size, SEGMENT_POINTS)
    dev = np.concatenate([dev, np.full((which.size, 1), f)], axis=1)
    with np.errstate(invalid="ignore"):
        drop = dev[:, :-1] - dev[:, 1:]
    return np.all(np.isfinite(dev), axis=1) & np.all(drop > noise(f), axis=1)


def run_starts(model, starts, which, theta, f, *, lower, upper, tol, maxiter, budget, Yw=None,
               threads=1, hess=None) -> dict:
    """Engine runs from the starts ``which`` (indices into ``starts``, (label, theta)
    pairs) in rounds of at most ``budget`` evaluations each; {index: run}
    (:func:`mlmeta.refine.rounds`). Starts near the EM path explore by quasi-Newton steps
    (BFGS updates of one differenced Hessian) and join the known optimum (theta, f); starts
    right next to it (off a zero, off a custom level's edge) do not join it: the engine's
    "near" is measured on the sampling scale, wider than the basins they look for. Starts
    away from the EM path take full Newton steps and join it: from there, BFGS-updated
    steps can lead into another basin than the start's own.

    ``hess``: the Hessian of a certified optimum (theta, f) (``None``: not known; an
    uncertified fit's last Hessian may describe a point on a ridge, and seeded runs from
    it missed a better optimum that the differenced ones found). The runs from a
    variance parameter of the optimum at zero (``parameter i at zero``: the other levels
    where the optimum has them) take it as their first model Hessian instead of
    differencing one. The other starts difference their own: the shrunk start lies where
    the curvature is far from the optimum's, and from a level at zero, seeded with the
    known Hessian, one of the stored hard designs (1:4122 in
    tests/test_fuzz_regressions.py) no longer reached the better optimum that its run
    finds."""
    which = np.asarray(which, dtype=np.intp)
    local = np.array([" off " in starts[i][0] for i in which], dtype=bool)
    wide = away_from_em([starts[i] for i in which])
    runs = {}
    seeded = np.array([hess is not None and label.startswith("parameter ")
                       and label.endswith(" at zero") for label, _ in (starts[i] for i in which)],
                      dtype=bool)
    for sel, known, quasi in ((~local & ~wide & ~seeded, (theta, f), True),
                              (seeded, (theta, f, hess), True), (local, None, True),
                              (wide, (theta, f), False)):
        idx = which[sel]
        if idx.size:
            got = rounds(model, [starts[i][1] for i in idx], lower=lower, upper=upper, tol=tol,
                         maxiter=maxiter, budget=budget, quasi=quasi, known=known, Yw=Yw,
                         threads=threads)
            runs.update(zip(idx.tolist(), got))
    return runs
