"""Variance components in the reporting metric, with delta-method standard errors.

Each structure's parameters are reported as standard deviations and correlations
(Stata's default). Standard errors come from the observed information of the
(restricted) log-likelihood in the estimation metric ``eta = (log sd, atanh corr)``:

    Cov(eta) = [ d^2 (-ll) / d eta d eta' ]^-1

computed by central differences of the analytic gradient
``d ll / d eta = (d theta / d eta)' d ll / d theta``. Then, as Stata reports them,

    sd:   se = sd * se(eta),            CI = exp(eta -+ z se(eta))
    corr: se = (1 - r^2) * se(eta),     CI = tanh(eta -+ z se(eta))
    var:  se = 2 sd^2 se(eta),          CI = exp(2 (eta -+ z se(eta)))
    cov:  delta method from Cov(eta),   CI = cov -+ z se
    rho (a spatial range, eta = log rho): se = rho * se(eta), CI = exp(eta -+ z se(eta))

A correlation ranges over (lo, 1): lo = -1, except for the common correlation of an
exchangeable level of q >= 3 effects, where lo = -1/(q-1) (below it Sigma is not
positive semi-definite). Its eta is the Fisher transform of r mapped linearly onto
(-1, 1), ``eta = atanh(u)``, ``u = (2 r - 1 - lo) / (1 - lo)`` (``atanh(r)`` when lo = -1),
so its interval ``lo + (1 - lo) (1 + tanh(eta -+ z se)) / 2`` stays in (lo, 1) and its
se is ``(1 - lo) / 2 (1 - u^2) se(eta)``.

Parameters on the boundary (sd = 0, a correlation at lo or 1: Sigma singular) have no
finite eta (as a spatial range at a bound of its range): they are held at their value,
flagged, and get no standard error. Where
the likelihood cannot be differenced at the estimates (a step leaves the parameter
space), the standard errors are missing too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mlmeta import _dist
from mlmeta.model import NestedModel

__all__ = ["VarComp", "variance_components", "component_table", "corr_lower", "corr_to_eta",
           "eta_to_corr", "dcorr_deta"]

BOUNDARY_SD = 1e-8
BOUNDARY_CORR = 1.0 - 1e-6


@dataclass
class VarComp:
    """One reported random-effects parameter."""

    level: int           # index of the level (0 = top)
    group: str           # grouping term
    kind: str            # "sd", "corr", "rho" (a structure's correlation parameter) or
    #                      "range" (a spatial structure's rho > 0, eta = log rho)
    effects: tuple       # effect indices (sd) or index pairs (corr)
    label_sd: str        # e.g. "sd(year_c)" / "corr(year_c,_cons)"
    label_var: str       # e.g. "var(year_c)" / "cov(year_c,_cons)"
    value: float         # sd or correlation
    boundary: bool
    fixed: bool = False
    lower: float = -1.0  # a correlation's lower bound (-1/(q-1) for an exchangeable level)


def corr_lower(struct) -> float:
    """The lower bound of a structure's correlations: -1/(q-1) for the common correlation
    of an exchangeable level of q >= 3 effects, else -1."""
    return -1.0 / (struct.q - 1) if struct.kind == "exchangeable" and struct.q >= 3 else -1.0


def corr_to_eta(r, lo=-1.0):
    """eta = atanh((2 r - 1 - lo) / (1 - lo)), the Fisher transform on (lo, 1)."""
    return np.arctanh((2.0 * r - 1.0 - lo) / (1.0 - lo))


def eta_to_corr(eta, lo=-1.0):
    """r = lo + (1 - lo) (1 + tanh(eta)) / 2, the inverse of :func:`corr_to_eta`."""
    return lo + 0.5 * (1.0 - lo) * (1.0 + np.tanh(eta))


def dcorr_deta(r, lo=-1.0):
    """dr/deta = (1 - lo) / 2 (1 - u^2), u = (2 r - 1 - lo) / (1 - lo)."""
    u = (2.0 * r - 1.0 - lo) / (1.0 - lo)
    return 0.5 * (1.0 - lo) * (1.0 - u * u)


def _theta_of_eta(model: NestedModel, base_values, free_idx, eta, sigma=1.0):
    """theta for a full vector of report values where the free ones are given as eta.

    With a profiled residual variance, SDs are absolute and theta is relative to
    ``sigma``."""
    vals = [v.copy() for v in base_values]
    pos = 0
    for lvl, i in free_idx:
        s = model.structs[lvl]
        kind = s.report_params()[i][0]
        vals[lvl][i] = (np.exp(eta[pos]) if kind in ("sd", "range")
                        else eta_to_corr(eta[pos], corr_lower(s)))
        pos += 1
    out = []
    for s, v in zip(model.structs, vals):
        v = v.copy()
        for i, (kind, _) in enumerate(s.report_params()):
            if kind == "sd":
                v[i] /= sigma
        out.append(s.theta_from_report(v))
    return np.concatenate(out)


def _full_deviance(model, theta, sigma2):
    """-2 ll of a profiled-residual model at (theta, sigma^2), sigma^2 not profiled
    (the engine's objective with sigma^2 given; everything relative to sigma)."""
    return model.evaluate(theta, sigma2=sigma2).deviance


def _eta(model, base_values, lvl, i):
    """The estimation metric of report value i of level lvl: log sd or the Fisher transform."""
    s = model.structs[lvl]
    v = base_values[lvl][i]
    return np.log(v) if s.report_params()[i][0] in ("sd", "range") else corr_to_eta(v, corr_lower(s))


def _hessian_fv(fn, x0, h=1e-4):
    """Central-difference Hessian from function values."""
    k = x0.size
    H = np.empty((k, k))
    f0 = fn(x0)
    steps = h * np.maximum(1.0, np.abs(x0))
    for i in range(k):
        ei = np.zeros(k)
        ei[i] = steps[i]
        H[i, i] = (fn(x0 + ei) - 2 * f0 + fn(x0 - ei)) / steps[i] ** 2
        for j in range(i):
            ej = np.zeros(k)
            ej[j] = steps[j]
            H[i, j] = H[j, i] = (fn(x0 + ei + ej) - fn(x0 + ei - ej) - fn(x0 - ei + ej)
                                 + fn(x0 - ei - ej)) / (4 * steps[i] * steps[j])
    return H


def variance_components(model: NestedModel, theta, groups, sd_scale=1.0, with_cov=True):
    """Report values, boundary flags and the covariance of eta for the free ones.

    Returns (components, cov_eta, free_positions) where ``free_positions[i]`` is
    the row of ``cov_eta`` for component i (or None). ``sd_scale`` is the size of a
    typical sampling SD: an SD below 1e-8 * sd_scale counts as on the boundary. With
    ``with_cov=False`` the (costly) information matrix is skipped and cov_eta is None."""
    comps = []
    base_values = []
    free_idx = []
    free_pos = []
    profiled = getattr(model, "residual", "known") == "profiled"
    sigma = float(np.sqrt(model.evaluate(theta).sigma2)) if profiled else 1.0
    for lvl, (s, sl) in enumerate(zip(model.structs, model.theta_slices)):
        vals = s.report_values(theta[sl])
        vals = np.array([v * sigma if kind == "sd" else v
                         for (kind, _), v in zip(s.report_params(), vals)])
        base_values.append(vals)
        labels_sd = s.labels(variance=False)
        labels_var = s.labels(variance=True)
        lo = corr_lower(s)
        for i, ((kind, eff), v) in enumerate(zip(s.report_params(), vals)):
            if kind == "sd":
                boundary = v <= BOUNDARY_SD * sd_scale
            elif kind == "range":        # at a bound, or its SD zero (not identified)
                boundary = s.at_bound(v) is not None or vals[0] <= BOUNDARY_SD * sd_scale
            else:      # |u| >= 1 - 1e-6 with u the correlation mapped onto (-1, 1)
                boundary = abs((2.0 * v - 1.0 - lo) / (1.0 - lo)) >= BOUNDARY_CORR
            fixed = bool(getattr(s, "is_fixed", lambda i: False)(i))
            comps.append(VarComp(lvl, groups[lvl], kind, eff, labels_sd[i], labels_var[i],
                                 float(v), bool(boundary), fixed, lo))
            # a correlation is not identified when one of its SDs is zero
            if kind not in ("sd", "range"):
                sds = np.sqrt(np.clip(np.diag(s.Sigma(theta[sl])), 0, None))
                if any(sds[a] <= BOUNDARY_SD * sd_scale for pair in eff for a in pair):
                    comps[-1].boundary = True
            if not comps[-1].boundary and not fixed:
                free_pos.append(len(free_idx))
                free_idx.append((lvl, i))
            else:
                free_pos.append(None)
    if profiled:
        L = len(model.structs)
        comps.append(VarComp(L, "Residual", "sd", (0,), "sd(Residual)", "var(Residual)",
                             sigma, False, False))
        free_pos.append(len(free_idx))
    k = len(free_idx)
    if not with_cov:
        return comps, None, free_pos
    if profiled:
        eta0 = np.empty(k + 1)
        for j, (lvl, i) in enumerate(free_idx):
            eta0[j] = _eta(model, base_values, lvl, i)
        eta0[k] = np.log(sigma)

        def dev(eta):
            s_ = np.exp(eta[-1])
            try:
                return _full_deviance(model, _theta_of_eta(model, base_values, free_idx, eta[:-1],
                                                           s_), s_ * s_)
            except FloatingPointError:       # a step left the parameter space
                return np.nan

        H = 0.5 * _hessian_fv(dev, eta0)
        return comps, _inverse_pd(H), free_pos
    cov_eta = np.full((k, k), np.nan)
    if k:
        eta0 = np.empty(k)
        for j, (lvl, i) in enumerate(free_idx):
            eta0[j] = _eta(model, base_values, lvl, i)

        def theta_of(eta):
            return _theta_of_eta(model, base_values, free_idx, eta)

        def grad_eta(eta):
            th = theta_of(eta)
            g = model.evaluate(th, gradient=True).grad
            J = np.empty((model.n_theta, k))
            for j in range(k):
                h = 1e-7 * max(1.0, abs(eta[j]))
                e = np.zeros(k)
                e[j] = h
                J[:, j] = (theta_of(eta + e) - theta_of(eta - e)) / (2 * h)
            return J.T @ g

        H = np.empty((k, k))
        try:
            for j in range(k):
                h = 1e-4 * max(1.0, abs(eta0[j]))
                e = np.zeros(k)
                e[j] = h
                H[:, j] = (grad_eta(eta0 + e) - grad_eta(eta0 - e)) / (2 * h)
        except FloatingPointError:     # a step left the parameter space: no standard errors
            return comps, cov_eta, free_pos
        H = 0.25 * (H + H.T)           # deviance -> -ll Hessian, symmetrised
        cov_eta = _inverse_pd(H)
    return comps, cov_eta, free_pos


def _inverse_pd(H):
    """H^-1 when H is finite and positive definite, else NaN (no standard errors)."""
    out = np.full(H.shape, np.nan)
    if np.all(np.isfinite(H)):
        try:
            if np.linalg.eigvalsh(H).min() > 0:
                out = np.linalg.inv(H)
        except np.linalg.LinAlgError:
            pass
    return out


def component_table(comps, cov_eta, free_pos, model, theta, level=95.0, variance=False):
    """Rows (label, estimate, se, lo, hi) in the requested metric."""
    z = _dist.norm_ppf(0.5 + level / 200.0)
    rows = []
    sds = {}
    for c in comps:
        if c.kind == "sd":
            for e in c.effects:
                sds[(c.level, e)] = (c.value, free_pos[comps.index(c)])
    for idx, c in enumerate(comps):
        fp = free_pos[idx]
        # a variance that the (nearly singular) information gives as <= 0: no standard error
        se_eta = np.sqrt(cov_eta[fp, fp]) if fp is not None and cov_eta[fp, fp] > 0 else None
        if c.kind == "sd":
            est = c.value ** 2 if variance else c.value
            if se_eta is None:
                rows.append((c.label_var if variance else c.label_sd, est, None, None, None))
                continue
            eta = np.log(c.value)
            mult = 2.0 if variance else 1.0
            se = mult * est * se_eta
            with np.errstate(over="ignore"):       # an upper limit beyond 1e308 is inf
                rows.append((c.label_var if variance else c.label_sd, est, se,
                             np.exp(mult * (eta - z * se_eta)), np.exp(mult * (eta + z * se_eta))))
        elif c.kind == "range":      # a spatial range, as itself: log scale
            if se_eta is None:
                rows.append((c.label_sd, c.value, None, None, None))
                continue
            eta = np.log(c.value)
            rows.append((c.label_sd, c.value, c.value * se_eta, np.exp(eta - z * se_eta),
                         np.exp(eta + z * se_eta)))
        else:
            if not variance or c.kind == "rho":      # rho: a structure's parameter, as itself
                if se_eta is None:
                    rows.append((c.label_sd, c.value, None, None, None))
                    continue
                eta = corr_to_eta(c.value, c.lower)
                rows.append((c.label_sd, c.value, dcorr_deta(c.value, c.lower) * se_eta,
                             eta_to_corr(eta - z * se_eta, c.lower),
                             eta_to_corr(eta + z * se_eta, c.lower)))
            else:
                i, j = c.effects[0]
                sdi, pi = sds[(c.level, i)]
                sdj, pj = sds[(c.level, j)]
                cov = c.value * sdi * sdj
                if se_eta is None or pi is None or pj is None:
                    rows.append((c.label_var, cov, None, None, None))
                    continue
                grad = np.zeros(cov_eta.shape[0])
                grad[pi] += cov
                grad[pj] += cov
                grad[fp] += dcorr_deta(c.value, c.lower) * sdi * sdj
                v = float(grad @ cov_eta @ grad)
                if not v > 0:
                    rows.append((c.label_var, cov, None, None, None))
                    continue
                se = np.sqrt(v)
                rows.append((c.label_var, cov, se, cov - z * se, cov + z * se))
    return rows
