"""A custom level's correlations over their positive definite set.

A custom level's free correlations ``rho`` (:class:`mlmeta.covstruct.Custom`) are
boxed in [-1, 1], but its correlation matrix ``R(rho)`` must also be positive
definite, and that set is not a box: where the optimum lies on its edge (R singular),
the engine's projected Newton, which knows the box only, stops wherever rounding
makes the deviance infinite first. Here the correlations are optimised in
coordinates ``psi`` in which the closed positive semi-definite set IS a box:

* **angles** (three or more effects with two or more free correlation parameters):
  with the effects ordered so that every fixed or shared correlation involves the
  first (the pivot), ``R = L L'`` with ``L`` lower triangular and unit rows in
  spherical coordinates,

      L_ik = cos(phi_ik) prod_{m<k} sin(phi_im)  (k < i),   L_ii = prod_{m<i} sin(phi_im),

  phi in [0, pi]. The pivot's correlations are ``R_i0 = cos(phi_i0)`` (a fixed one is a
  fixed angle, a shared label one shared angle), every other free correlation has its
  own angle; every positive semi-definite R with the pattern has such angles, and R is
  singular exactly where a sine vanishes (an angle at 0 or pi): the edge is a bound.
  A row's last angle enters R through its cosine only, so the deviance is even about
  its bounds: there the edge's KKT multiplier shows as curvature (as a variance's at 0),
  elsewhere as a gradient pointing out of the box.
* **interval** (one free correlation parameter, shared by any pairs, as an
  exchangeable pattern): the set is an interval of rho, found by bisection.

Evaluations map psi back to ``rho~ = rho_c + (1 - eps) (rho(psi) - rho_c)`` with rho_c
an interior point and ``eps = EDGE_SHRINK / (1 - max |rho_c|)`` (so that a correlation
at +-1 stays within the box's 1 - 1e-9): R is affine in rho, so
``lambda_min(R(rho~)) >= eps lambda_min(R(rho_c))`` > 0 and every point of the closed
set, edge included, can be evaluated (the correlations move by about 1e-9).
:func:`edge_polish` runs quasi-Newton and then projected Newton steps in psi; at an
optimum on the edge the certificate is the box's KKT conditions in psi (the deviance's
gradient in rho a non-negative multiple of the edge's outward normal). Patterns the
angles cannot hold (fixed or shared correlations on no common effect, lags other than
1) keep the engine's box.
"""

from __future__ import annotations

import numpy as np

from mlmeta.refine import DECREMENT_TOL, deviances, noise, scaled_objective, theta_scale

__all__ = ["EDGE_SHRINK", "EDGE_NEAR", "EDGE_STARTS", "CorrelationMap", "correlation_maps",
           "edge_polish", "finish_on_edge", "on_edge"]

#: evaluations take the correlations about this far from the edge towards rho_c
EDGE_SHRINK = 2e-9
#: a level counts as near the edge where lambda_min(R) is below this
EDGE_NEAR = 1e-6
#: the search's starts that stopped near the edge polished (the lowest ones)
EDGE_STARTS = 3


class CorrelationMap:
    """psi <-> rho for one custom level (module docstring). ``idx``: the level's
    correlation parameters in the model's theta; ``kind``: "angles" or "interval"."""

    def __init__(self, struct, idx, order=None):
        self.s, self.idx = struct, np.asarray(idx)
        self.q = struct.q
        n = len(struct._corr_free)
        self.kind = "interval" if n == 1 else "angles"
        self.center = struct._feasible(np.concatenate([np.zeros(len(struct._sd_free)),
                                                       np.zeros(n)]))[len(struct._sd_free):]
        self.eps = EDGE_SHRINK / max(1.0 - float(np.abs(self.center).max()), 1e-3)
        if self.kind == "interval":
            self.order = None
            t = np.concatenate([np.zeros(len(struct._sd_free)), self.center])
            self.lo, self.hi = _closed_range(struct, t, len(struct._sd_free))
            return
        q = self.q
        self.order = np.asarray(order)
        pos = np.empty(q, dtype=int)
        pos[self.order] = np.arange(q)
        # angle slot (i, k), i > k, in the pivot-first order: a parameter index b or -1
        self.slot = np.full((q, q), -1, dtype=int)
        self.fixed = np.zeros((q, q))
        self.entry = []          # one (i, k) slot per parameter, in the same order
        where = {}
        for b, pairs in enumerate(struct._corr_free):
            for a, c in pairs:
                i, k = max(pos[a], pos[c]), min(pos[a], pos[c])
                where[(i, k)] = b
            a, c = pairs[0]
            self.entry.append((max(pos[a], pos[c]), min(pos[a], pos[c])))
        for i in range(q):
            for k in range(i):
                b = where.get((i, k), -1)
                self.slot[i, k] = b
                if b < 0:
                    v = struct._fixed_corr[self.order[i], self.order[k]]
                    self.fixed[i, k] = np.arccos(np.clip(v, -1.0, 1.0))

    # -- the maps ----------------------------------------------------------------
    def bounds(self):
        n = len(self.idx)
        if self.kind == "interval":
            return np.array([self.lo]), np.array([self.hi])
        return np.zeros(n), np.full(n, np.pi)

    def inert(self, psi):
        """Which of the level's parameters do not move R at psi (d rho / d psi_c = 0 to
        rounding): an angle whose sines are multiplied by one at 0 or pi (the
        correlations it would set are fixed by the others), as a correlation of effects
        with a zero SD is not identified."""
        if self.kind == "interval":
            return np.zeros(len(self.idx), dtype=bool)
        return np.abs(self.rho(psi)[1]).max(axis=0) <= 1e-10

    def _angles(self, psi):
        A = self.fixed.copy()
        m = self.slot >= 0
        A[m] = np.asarray(psi)[self.slot[m]]
        return A

    def _L(self, A, jac=True):
        """L and dL/dphi_ia (q x q x q: [i, a] -> d row i / d phi_ia; None without
        ``jac``) of the angles A."""
        q = self.q
        L = np.zeros((q, q))
        dL = np.zeros((q, q, q)) if jac else None
        L[0, 0] = 1.0
        c, s = np.cos(A), np.sin(A)
        for i in range(1, q):
            for k in range(i + 1):
                prod = np.prod(s[i, :k])
                L[i, k] = prod * (c[i, k] if k < i else 1.0)
                for a in range(min(k + 1, i) if jac else 0):
                    if a == k:
                        dL[i, a, k] = -prod * s[i, k]
                    else:
                        dp = c[i, a] * np.prod(np.delete(s[i, :k], a))
                        dL[i, a, k] = dp * (c[i, k] if k < i else 1.0)
        return L, dL

    def rho(self, psi, jac=True):
        """(rho(psi) on the closed set, d rho / d psi; None without ``jac``)."""
        psi = np.asarray(psi, dtype=float)
        if self.kind == "interval":
            return psi.copy(), np.eye(1)
        L, dL = self._L(self._angles(psi), jac)
        n = len(self.idx)
        r, J = np.zeros(n), (np.zeros((n, n)) if jac else None)
        for b, (i, k) in enumerate(self.entry):
            r[b] = L[i] @ L[k]
            if not jac:
                continue
            for (ii, kk), c in np.ndenumerate(self.slot):
                if c < 0:
                    continue
                # d R_ik / d phi_(ii, kk): only rows i and k depend on their own angles
                if ii == i:
                    J[b, c] += dL[i, kk] @ L[k]
                if ii == k:
                    J[b, c] += L[i] @ dL[k, kk]
        return r, J

    def psi(self, rho):
        """The coordinates of correlations ``rho`` (R positive semi-definite)."""
        rho = np.asarray(rho, dtype=float)
        if self.kind == "interval":
            return np.clip(rho, self.lo, self.hi)
        t = np.concatenate([np.zeros(len(self.s._sd_free)), rho])
        R = self.s._sd_R(t)[1][np.ix_(self.order, self.order)]
        try:
            L = np.linalg.cholesky(R)
        except np.linalg.LinAlgError:
            L = _psd_cholesky(R)
        out = np.zeros(len(self.idx))
        for i in range(1, self.q):
            rest = 1.0
            for k in range(i):
                c = L[i, k] / rest if rest > 0 else 1.0
                a = float(np.arccos(np.clip(c, -1.0, 1.0)))
                if self.slot[i, k] >= 0:
                    out[self.slot[i, k]] = a
                rest = rest * np.sin(a)
        return out

    def shrink(self, rho):
        """rho~ = rho_c + (1 - eps) (rho - rho_c): strictly inside the set."""
        return self.center + (1.0 - self.eps) * (np.asarray(rho) - self.center)


def _psd_cholesky(R):
    """A lower-triangular L with L L' = R for a positive semi-definite R (zero pivots
    where R is singular)."""
    q = R.shape[0]
    L = np.zeros_like(R)
    for j in range(q):
        d = R[j, j] - L[j, :j] @ L[j, :j]
        L[j, j] = np.sqrt(d) if d > 1e-14 else 0.0
        for i in range(j + 1, q):
            v = R[i, j] - L[i, :j] @ L[j, :j]
            L[i, j] = v / L[j, j] if L[j, j] > 0 else 0.0
    # rows to unit length (rounding)
    return L / np.maximum(np.linalg.norm(L, axis=1), 1e-300)[:, None]


def _min_eig(struct, theta_level):
    return float(np.linalg.eigvalsh(struct._sd_R(theta_level)[1])[0])


def _closed_range(struct, theta, index):
    """The closed interval of correlation parameter ``theta[index]`` (within its bounds)
    where R is positive semi-definite: a bound where lambda_min(R) >= 0 there, else the
    edge by bisection from the interior point theta (60 halvings)."""
    th = np.array(theta, dtype=float)
    x0 = th[index]
    out = []
    for lim in (-1.0 if struct._rho_lower < 0 else struct._rho_lower, 1.0):
        th[index] = lim
        a, b = x0, lim
        if _min_eig(struct, th) >= 0:
            a = lim
        else:
            for _ in range(60):
                th[index] = 0.5 * (a + b)
                a, b = (th[index], b) if _min_eig(struct, th) >= 0 else (a, th[index])
        out.append(float(a))
    return out[0], out[1]


def _pivot_order(struct):
    """An effect order that puts every fixed or shared correlation in the first column
    (pivot first), or None when the pattern has none."""
    q = struct.q
    fixed = [(i, j) for i in range(q) for j in range(i + 1, q)
             if not np.isnan(struct._fixed_corr[i, j])]
    shared = [p for pairs in struct._corr_free if len(pairs) > 1 for p in pairs]
    for e in range(q):
        if all(e in p for p in fixed + shared):
            return [e] + [i for i in range(q) if i != e]
    return None


def correlation_maps(model, lower=None, upper=None) -> list:
    """A :class:`CorrelationMap` per custom level whose positive definite set is not its
    box (three or more effects, free correlations of lag 1, none held by ``lower ==
    upper``) and whose pattern the coordinates can represent."""
    out = []
    for s, sl in zip(model.structs, model.theta_slices):
        if s.kind != "custom" or s.q < 3 or not s._corr_free or (s._lags != 1.0).any():
            continue
        idx = np.arange(sl.start + len(s._sd_free), sl.stop)
        if lower is not None and (lower[idx] == upper[idx]).any():
            continue
        if len(s._corr_free) == 1:
            out.append(CorrelationMap(s, idx))
            continue
        order = _pivot_order(s)
        if order is not None:
            out.append(CorrelationMap(s, idx, order))
    return out


def on_edge(model, theta, maps=None) -> list:
    """The maps of the levels whose correlation matrix at theta is within EDGE_NEAR of
    singular (lambda_min)."""
    maps = correlation_maps(model) if maps is None else maps
    out = []
    for m in maps:
        sl = next(sl for s, sl in zip(model.structs, model.theta_slices) if s is m.s)
        if _min_eig(m.s, theta[sl]) < EDGE_NEAR:
            out.append(m)
    return out


class _Coordinates:
    """theta <-> psi for a model (the mapped levels' correlations replaced by psi)."""

    def __init__(self, maps, lower, upper):
        self.maps = maps
        self.box = (lower, upper)
        self.lower, self.upper = lower.copy(), upper.copy()
        for m in maps:
            self.lower[m.idx], self.upper[m.idx] = m.bounds()

    def psi(self, theta):
        out = np.array(theta, dtype=float)
        for m in self.maps:
            out[m.idx] = m.psi(theta[m.idx])
        return out

    def theta(self, psi, jac=True):
        """(theta, d theta / d psi; None without ``jac``)."""
        out = np.array(psi, dtype=float)
        J = np.eye(out.size) if jac else None
        for m in self.maps:
            r, Jm = m.rho(psi[m.idx], jac)
            out[m.idx] = m.shrink(r)
            if jac:
                J[np.ix_(m.idx, m.idx)] = (1.0 - m.eps) * Jm
        return np.clip(out, *self.box), J


def _objective(model, coords, scale, Yw, f_ref, central=True):
    """(deviance, gradient) in scaled psi (z = psi / scale):
    :func:`mlmeta.refine.scaled_objective` through the map psi -> theta."""
    return scaled_objective(model, f_ref, lower=coords.lower, upper=coords.upper, scale=scale,
                            Yw=Yw, to_theta=coords.theta, central=central, analytic=Yw is None)


def _value(model, coords, scale, z, Yw, count):
    """The deviance of outcome ``Yw`` at scaled psi z (one evaluation, counted)."""
    count[0] += 1
    th = coords.theta(np.clip(z * scale, coords.lower, coords.upper))[0]
    return float(deviances(model, th, lower=model.lower, upper=model.upper, Yw=Yw)[0])


def _spent(*counts):
    """Evaluations counted by distinct objectives."""
    return sum(c[0] for c in {id(c): c for c in counts}.values())


def _free(z, g, lo, up):
    """The coordinates not held at a bound by their gradient (box KKT)."""
    with np.errstate(invalid="ignore"):
        at_lo = np.isfinite(lo) & (z <= lo + 1e-12 * np.maximum(1.0, np.abs(lo))) & (g >= 0)
        at_up = np.isfinite(up) & (z >= up - 1e-12 * np.maximum(1.0, np.abs(up))) & (g <= 0)
    return ~(at_lo | at_up)


def _newton(fun, z, f, g, lo, up, inert, big, *, iters=30, reuse=5):
    """Projected Newton steps in z with a Hessian differenced from the gradient over the
    free coordinates that move the deviance (``inert(z)``: those that do not), differenced
    again when the free set changes, a step fails or after ``reuse`` steps. Returns
    (z, f, g, certified, evaluations): certified when the Newton decrement
    g_F' H_F^-1 g_F of the free set F falls below 1e-12 max(1, |f|) with H_F positive
    definite (after Jacobi scaling; or F empty), or, where no step lowers f with a fresh
    Hessian, below 1e-9 max(1, |f|). ``big``: what ``fun`` returns where the deviance
    fails."""
    evals = 0
    H, F_H, age = None, None, 0
    for _ in range(iters):
        F = np.flatnonzero(_free(z, g, lo, up) & ~inert(z))
        if F.size == 0:
            return z, f, g, True, evals
        if H is None or age >= reuse or not np.array_equal(F, F_H):
            H, F_H, age = _hessian(fun, z, g, F, lo, up, big), F, 0
            evals += F.size
        age += 1
        # Jacobi scaling (unit diagonal) before the eigenvalues are judged: the free
        # coordinates' curvatures can lie many orders of magnitude apart
        d = np.sqrt(np.maximum(np.abs(np.diag(H)), 1e-300))
        w, U = np.linalg.eigh(H / np.outer(d, d))
        pd = (np.diag(H) > 0).all() and w.min() > 1e-8
        w = np.maximum(np.abs(w), 1e-8)
        step = -(U @ ((U.T @ (g[F] / d)) / w)) / d
        dec = float(-g[F] @ step)
        if pd and dec < 1e-12 * max(1.0, abs(f)):
            return z, f, g, True, evals
        t, moved = 1.0, False
        for _ in range(30):
            zn = z.copy()
            zn[F] = np.clip(z[F] + t * step, lo[F], up[F])
            fn, gn = fun(zn)
            evals += 1
            if np.isfinite(fn) and fn <= f - 1e-4 * t * dec:
                z, f, g, moved = zn, fn, gn, True
                break
            t *= 0.5
        if not moved:
            if age > 1:          # a stale Hessian: difference it again
                H = None
                continue
            # no step lowers f: as the engine's Newton, a looser bound
            return z, f, g, pd and dec < 1e-9 * max(1.0, abs(f)), evals
    return z, f, g, False, evals


def _hessian(fun, z, g, F, lo, up, big):
    """The Hessian over the coordinates F, differenced from the gradient (forward steps
    of 1e-5 max(1, |z_i|), backward where they leave the box or the domain; symmetrised)."""
    H = np.zeros((F.size, F.size))
    for a, i in enumerate(F):
        h = 1e-5 * max(1.0, abs(z[i]))
        if z[i] + h > up[i]:
            h = -h
        zh = z.copy()
        zh[i] += h
        fh, gh = fun(zh)
        if not fh < big and z[i] - h >= lo[i]:
            zh[i] = z[i] - h
            fh, gh = fun(zh)
            h = -h
        H[:, a] = (gh[F] - g[F]) / h if fh < big else 0.0
    return 0.5 * (H + H.T)


def edge_polish(model, theta, f, conv, *, lower, upper, Yw=None, maps=None, max_evals=None,
                newton=True):
    """Optimise from theta in the coordinates psi of the custom levels that are near the
    edge of their positive definite set (:func:`on_edge`): L-BFGS-B (scipy) in scaled psi,
    then (``newton``) projected Newton (:func:`_newton`), within about ``max_evals``
    evaluations (``maps``: :func:`correlation_maps`, when known). Returns (theta, f, conv,
    evaluations, maps of the levels that end on the edge, or None when nothing was
    tried): the result is
    kept where it is certified and no worse than f + rounding, or lower by more than
    DECREMENT_TOL / 2 (then ``conv`` is its certificate); otherwise theta, f and conv come
    back as given."""
    from scipy import optimize

    maps = on_edge(model, theta, correlation_maps(model, lower, upper) if maps is None else maps)
    if not maps:
        return theta, f, conv, 0, None
    coords = _Coordinates(maps, lower, upper)
    scale = np.where(np.isfinite(coords.lower) & np.isfinite(coords.upper) &
                     (coords.upper - coords.lower <= 2 * np.pi), 1.0,
                     theta_scale(model, theta if Yw is None else None))
    for m in maps:
        scale[m.idx] = 1.0
    fun, count = _objective(model, coords, scale, Yw, f)
    # quasi-Newton steps on forward differences for another outcome (then Newton on central)
    diff = Yw is not None      # differences for another outcome (their path along the edge)
    fun_q, count_q = (fun, count) if not diff else _objective(model, coords, scale, Yw, f,
                                                                  central=False)
    big = f + 1e6 * max(1.0, abs(f))
    lo, up = coords.lower / scale, coords.upper / scale
    z0 = np.clip(coords.psi(theta) / scale, lo, up)
    f0 = fun_q(z0)[0] if Yw is None else _value(model, coords, scale, z0, Yw, count_q)
    bounds = list(zip(np.where(np.isfinite(lo), lo, None), np.where(np.isfinite(up), up, None)))
    opts = {"maxiter": 500, "ftol": 1e-15, "gtol": 1e-12}
    if max_evals is not None:
        opts["maxfun"] = max(1, int(max_evals) // (z0.size + 1 if diff else 1))
    r = optimize.minimize(fun_q, z0, jac=True, method="L-BFGS-B", bounds=bounds, options=opts)
    z = np.clip(r.x, lo, up)
    fz = fun_q(z)[0] if Yw is None else _value(model, coords, scale, z, Yw, count_q)
    if not fz <= f0:
        z, fz = z0, f0
    if not (np.isfinite(fz) and fz < big):
        return theta, f, conv, _spent(count, count_q), None

    def inert(z):
        out = np.zeros(z.size, dtype=bool)
        psi = z * scale
        for m in maps:
            out[m.idx] = m.inert(psi[m.idx])
        return out

    cert = False
    if newton:
        fz, gz = fun(z)
        # a Hessian costs n_theta gradients: (2 n_theta + 1) evaluations each for another
        # outcome, where it is kept for up to 5 steps
        z, fz, gz, cert, _ = _newton(fun, z, fz, gz, lo, up, inert, big,
                                     reuse=5 if diff else 1)
    th = coords.theta(np.clip(z * scale, coords.lower, coords.upper))[0]
    fz = float(deviances(model, th, lower=model.lower, upper=model.upper, Yw=Yw)[0])
    better = fz < f - 0.5 * DECREMENT_TOL
    if not (np.isfinite(fz) and ((cert and fz <= f + 10 * noise(f)) or better)):
        return theta, f, conv, _spent(count, count_q), None
    ended = on_edge(model, th, maps)
    return th, fz, cert, _spent(count, count_q), ended


def finish_on_edge(model, rec, theta, f, conv, *, lower, upper, Yw=None):
    """:func:`edge_polish` at the end of a fit (:func:`mlmeta.optimize._finish`): from the
    fit, and from the EDGE_STARTS lowest starts of the search (``rec.candidates``) that
    stopped unconverged near the edge of a custom level's positive definite set (the
    engine's Newton stalls there, so their deviances say little about the optima they
    lead to), within ``rec.eval_budget`` evaluations each and as many as the search
    spent in all. The lowest wins where it is lower than the fit by more than
    1e-7 max(1, |f|). ``rec`` (a :class:`~mlmeta.optimize.FitRecord`) is charged the
    evaluations and told when the optimum lies on the edge. Returns (theta, f, conv)."""
    maps = correlation_maps(model, lower, upper)
    if not maps:
        return theta, f, conv
    th, fe, ce, n, ended = edge_polish(model, theta, f, conv, lower=lower, upper=upper, Yw=Yw,
                                       maps=maps)
    rec.n_evals += n
    best = (th, fe, ce, ended) if ended is not None else (theta, f, conv, None)
    # the fit came from another start than the default one when the search said so
    other = rec.better_optimum
    done = [theta]
    budget = rec.eval_budget or None
    total = rec.n_evals        # the polish of the starts may cost what the search did
    spent, tried = 0, 0
    for label, fc, tc, cc in sorted(rec.candidates, key=lambda c: c[1]):
        if spent >= total or tried >= EDGE_STARTS:
            break
        if cc or not np.isfinite(fc) or any(np.allclose(tc, t, rtol=1e-8, atol=1e-10)
                                            for t in done):
            continue
        done.append(tc)
        got = edge_polish(model, tc, fc, cc, lower=lower, upper=upper, Yw=Yw, maps=maps,
                          max_evals=budget, newton=False)
        rec.n_evals += got[3]
        spent += got[3]
        tried += got[3] > 0
        higher = got[1] < best[1] - 1e-7 * max(1.0, abs(best[1]))
        # where the fit is not certified, a point on the edge as low (to rounding) may be:
        # Newton steps from there say (the same optimum, reached from another side)
        closer = not best[2] and got[1] <= best[1] + 10 * noise(best[1])
        if got[4] is None or not (higher or closer):
            continue
        # a lower optimum: certified by Newton steps from there (kept uncertified where
        # they do not apply: it ended inside the set)
        cert = edge_polish(model, got[0], got[1], False, lower=lower, upper=upper, Yw=Yw,
                           maps=maps, max_evals=budget)
        rec.n_evals += cert[3]
        got = cert if cert[4] is not None else got
        rec.candidates.append((f"{label} (on the edge)", got[1], got[0].copy(), got[2]))
        if got[1] < best[1] - 1e-7 * max(1.0, abs(best[1])):
            best = (got[0], got[1], got[2], got[4])
            other = label != "EM start"
        elif closer and got[2] and got[1] <= best[1] + 10 * noise(best[1]):
            best = (got[0], got[1], got[2], got[4])
    theta, f, conv, ended = best
    _higher_optimum(model, rec, f, other)
    if ended:
        levels = [next(k + 1 for k, s in enumerate(model.structs) if s is m.s) for m in ended]
        rec.messages.append(
            f"the correlations of level(s) {', '.join(map(str, levels))} lie on the edge of "
            f"their positive definite set (a singular correlation matrix); the optimum there "
            f"was taken in coordinates in which that edge is a bound" +
            (" and is certified by the bound's Karush-Kuhn-Tucker conditions" if conv else ""))
    return theta, f, conv


def _higher_optimum(model, rec, f, other):
    """The record's note on a higher optimum than the default start's (the search's
    "EM start" candidate), with the deviance ``f`` finally reported: written where it came
    from ``other`` start and is higher, removed otherwise."""
    head = "the optimisation from the default start"
    at = next((k for k, m in enumerate(rec.messages) if m.startswith(head)), len(rec.messages))
    rec.messages = [m for m in rec.messages if not m.startswith(head)]
    f_em = next((fc for label, fc, *_ in rec.candidates if label == "EM start"), None)
    rec.better_optimum = bool(other and f_em is not None and f < f_em - 1e-7 * max(1.0, abs(f)))
    if rec.better_optimum:
        rec.messages.insert(at, f"{head} stopped at a local optimum ({model.ll_label.lower()} "
                               f"{-0.5 * f_em:.8g}); a higher optimum ({-0.5 * f:.8g}) was "
                               f"found from another start and is reported")
