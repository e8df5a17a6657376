"""How accurately the engine computes a deviance, and a second computation to check it.

The engine forms ``A'V^-1A`` by Woodbury (a difference of larger terms) and factors the
random effects' precision ``C = I + T'Z'Lambda^-1 Z T``: where the random effects
explain nearly all of the variation, or C is badly conditioned, the deviance carries
rounding error far above machine precision. :func:`rounding_error` estimates it,
:func:`c_condition` bounds C's condition number, and :func:`second_opinion` computes the
deviance again in a rescaled basis. A fit whose deviance is not accurate to
:data:`ROUNDING_TOL` is refused (:func:`mlmeta.optimize.fit_model`).
"""

from __future__ import annotations

import numpy as np

from mlmeta.model import NestedModel

__all__ = ["ROUNDING_TOL", "ROUNDING_C", "rounding_error", "c_condition", "largest_group_traces",
           "model_rounding_error", "variance_ratio", "second_opinion", "known_R_of",
           "across_groups", "column_stats"]

#: the largest rounding error of the deviance (:func:`rounding_error`) a fit may have
ROUNDING_TOL = 1e-4
#: the safety factor of :func:`rounding_error` (its estimate was within a factor 7 of
#: the error measured against an orthogonal-factorisation likelihood on random designs)
ROUNDING_C = 10.0


def rounding_error(yy, beta_work, Hinv_work, *, reml, sigma2=1.0, kappa=1.0) -> float:
    """An estimate of the rounding error of the deviance the engine computes.

    The engine forms ``A'V^-1A = A'Lambda^-1A - K'K`` (Woodbury, A = [X, y] whitened, in
    the working basis where ``X'Lambda^-1X = I``). Where the random effects explain
    nearly all of the whitened variation, the difference is far smaller than its terms
    and carries their rounding error: with ``yy = y'Lambda^-1y`` (y less its least-squares
    fit on X), ``b`` the working-basis coefficients and ``H^-1`` their (X'V^-1X)^-1,

        err = C eps [ (sqrt(yy) + |b|)^2 / sigma^2 + tr(H^-1) (REML) ]

    (sigma^2 the profiled residual variance, 1 for known sampling variances; C = 10),
    plus ``C eps kappa`` for the factorisation of the random effects' precision, kappa
    the bound of its condition number (:func:`c_condition`). Variances some 1e10 times
    the sampling variances, or factors T so large that kappa passes 1e10, make it exceed
    :data:`ROUNDING_TOL`."""
    eps = np.finfo(float).eps
    b = float(np.linalg.norm(beta_work)) if np.size(beta_work) else 0.0
    q = (np.sqrt(max(float(yy), 0.0)) + b) ** 2 / float(sigma2)
    if reml and np.size(Hinv_work):
        q += abs(float(np.trace(Hinv_work)))
    return ROUNDING_C * eps * (q + float(kappa))


def c_condition(model: NestedModel, theta) -> float:
    """A bound on the condition number of C = I + T'Z'Lambda^-1 Z T (the random effects'
    precision relative to their prior): 1 + max over levels of ||T_l||_2^2 times the
    largest trace of a group's whitened cross-product
    Z_g'Lambda^-1 Z_g (the kernel's own blocks; a crossed level's are on the border's
    diagonal; kept on the model). The engine's Cholesky factor of C, log|C| and its
    solves lose about eps times this of their accuracy."""
    traces = model.__dict__.get("_group_traces")
    if traces is None:
        traces = model.__dict__["_group_traces"] = largest_group_traces(model)
    worst = 0.0
    for T, tr in zip(model.T_list(theta), traces):
        t2 = float(T[0, 0] * T[0, 0]) if T.shape == (1, 1) else float(np.linalg.norm(T, 2)) ** 2
        worst = max(worst, t2 * tr)
    return 1.0 + worst


def largest_group_traces(model: NestedModel) -> list:
    """Per level, the largest trace of a group's Z_g'Lambda^-1 Z_g."""
    d = model.design
    out = []
    for lvl, s in enumerate(model.structs):
        q = s.q
        r = np.arange(q)
        if lvl < d.n_tree and d.Lambda is None:
            # diagonal whitening: a group's trace is the sum of its rows' |Z~_r|^2
            Zw = d.Zw[lvl]
            rows = np.einsum("ij,ij->i", Zw, Zw)
            starts = d.group_start[lvl]
            tr = np.add.reduceat(rows, starts[:-1]) if starts.size > 1 else rows[:0]
        elif lvl >= d.n_tree:
            S0 = d.border["S0"]
            o = d.border["b_off"][lvl] + np.arange(d.n_groups[lvl]) * q
            tr = np.diag(S0)[o[:, None] + r[None, :]].sum(axis=1)
        else:
            K = d.kernel
            nodes = d.node_of_group[lvl]
            o = d.offset_of_group[lvl]
            na = K.nq[nodes]
            base = K.zz_ptr[nodes] + K.diag_offset(nodes)
            tr = np.asarray(K.ZZ)[base[:, None] + (o[:, None] + r) * (1 + na[:, None])].sum(axis=1)
        out.append(float(tr.max()) if tr.size else 0.0)
    return out


def model_rounding_error(model, theta, kappa=True) -> float:
    ev = model.evaluate(theta)
    d = model.design
    return rounding_error(float(d.yw @ d.yw), ev.beta_work, ev.Hinv_work, reml=model.method == "reml",
                          sigma2=ev.sigma2 if model.residual == "profiled" else 1.0,
                          kappa=c_condition(model, theta) if kappa else 0.0)


def variance_ratio(model) -> float:
    """The outcome's variation around its least-squares fit relative to the sampling
    variances (whitened: their mean square); 0 for a profiled residual."""
    d = model.design
    if model.residual == "profiled" or d.n_obs == 0:
        return 0.0
    return float(d.yw @ d.yw) / d.n_obs


def second_opinion(model: NestedModel, theta) -> float:
    """|deviance at theta - the same deviance computed in another basis|: every level's
    design Z_l A_l with its slopes centred on the intercept column and scaled to unit SD
    (the intercept to unit root mean square), written as an unstructured level with
    ``Sigma~_l = A_l^-1 Sigma_l A_l^-T``. The likelihood is the same, the rounding is not:
    the difference measures the error of the engine's factorisation there (inf where
    either computation fails)."""
    from mlmeta.covstruct import Unstructured
    from mlmeta.design import with_Z

    d = model.design
    A = []
    # levels correlated across their groups (known R, spatial) keep their structure: A = 1
    keep = across_groups(model)
    for lvl, Z in enumerate(d.Z):
        q = Z.shape[1]
        a = np.eye(q)
        if lvl in keep:
            A.append(a)
            continue
        mean, sd, rms, const, icol = column_stats(Z)
        for j in range(q):
            if const[j]:
                a[j, j] = 1.0 / rms[j] if rms[j] > 0 else 1.0
            elif sd[j] > 0:
                a[j, j] = 1.0 / sd[j]
                if icol is not None:
                    a[icol, j] = -(mean[j] / mean[icol]) / sd[j]
        A.append(a)
    try:
        work = NestedModel(with_Z(d, [Z @ a for Z, a in zip(d.Z, A)], known_R=known_R_of(d)),
                           [s if lvl in keep else Unstructured(s.effect_names)
                            for lvl, s in enumerate(model.structs)], model.method,
                           residual=model.residual)
        S = [np.linalg.solve(a, np.linalg.solve(a, Sl).T) for a, Sl in zip(A, model.Sigma_list(theta))]
        th = work.theta_from_Sigmas([0.5 * (Sl + Sl.T) for Sl in S])
        for lvl in keep:
            th[work.theta_slices[lvl]] = theta[model.theta_slices[lvl]]
        return abs(work.evaluate(th).deviance - model.evaluate(theta).deviance)
    except (FloatingPointError, np.linalg.LinAlgError):
        return np.inf


def known_R_of(d):
    """The design's known correlation matrices {level: R} (to build it again), or None."""
    known = (d.border or {}).get("known_R") if d.crossed else None
    return {lvl: L @ L.T for lvl, L in known.items()} if known else None


def across_groups(model) -> set:
    """The levels whose groups are correlated (a known R, a spatial structure)."""
    d = model.design
    known = set((d.border or {}).get("known_R") or {}) if d.crossed else set()
    return known | {lvl for lvl, s in enumerate(model.structs) if s.kind == "spatial"}


def column_stats(Z):
    """(mean, sd, rms, constant?, the first constant non-zero column or None) of the
    columns of a level's design Z: what a well-scaled basis for the level is made of."""
    mean, sd = Z.mean(axis=0), Z.std(axis=0)
    rms = np.sqrt(np.mean(Z * Z, axis=0))
    const = sd <= 1e-12 * np.maximum(rms, 1e-300)
    icol = next((j for j in range(Z.shape[1]) if const[j] and abs(mean[j]) > 0), None)
    return mean, sd, rms, const, icol
