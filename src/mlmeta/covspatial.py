"""metafor's spatial correlation structures across a term's groups (``dist=``).

A random intercept ``(1 | site)`` with ``covariance={"site": "SPEXP"}`` and
``dist={"site": D}`` has ``Sigma = sigma^2 R(rho)`` over ALL the term's groups (metafor's
``random = ~ x + y | const`` or ``~ site | const`` with ``dist=``), with d the distance
between two groups, rho > 0 the range and x = d / rho:

* ``SPEXP``  exponential          R = exp(-x)
* ``SPGAU``  Gaussian             R = exp(-x^2)
* ``SPLIN``  linear               R = 1 - x               for x < 1, else 0
* ``SPRAT``  rational quadratic   R = 1 - x^2 / (1 + x^2)
* ``SPSPH``  spherical            R = 1 - 3x/2 + x^3/2     for x < 1, else 0

(metafor's definitions, ``.process.G.afterrmna``). theta = (sigma, rho / unit), ``unit``
the median distance between two groups at different places, so that both entries are of
order one for the optimiser; the range is bounded to [1e-4 d_min, 1e3 d_max] (d_min,
d_max the smallest positive and the largest distance): R is the identity to within 1e-8
at the lower bound for every structure and constant to within 1e-6 at the upper (the
data cannot tell longer ranges apart), so an estimate at a bound is reported as a
boundary estimate. The start is metafor's: the first quartile of the distances.

Groups at one place (distance 0, e.g. duplicated coordinates under two labels) are
perfectly correlated, as in metafor; R(rho) is then singular, which the engine's
factorisation allows (:mod:`mlmeta._core._structures`). SPLIN is a valid correlation in
one dimension only: where R(rho) is not positive semi-definite the objective is not
defined there, and the fit moves away from such ranges.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from mlmeta.covstruct import CovStruct

__all__ = ["SPATIAL_STRUCTURES", "Spatial", "spatial_correlation", "distance_matrix", "spatial_terms",
           "spatial_levels"]

#: metafor's names of the spatial structures
SPATIAL_STRUCTURES = ("SPEXP", "SPGAU", "SPLIN", "SPRAT", "SPSPH")

TITLES = {"SPEXP": "Spatial exponential (SPEXP)", "SPGAU": "Spatial Gaussian (SPGAU)",
          "SPLIN": "Spatial linear (SPLIN)", "SPRAT": "Spatial rational quadratic (SPRAT)",
          "SPSPH": "Spatial spherical (SPSPH)"}

RHO_LOWER, RHO_UPPER = 1e-4, 1e3


def spatial_correlation(form: str, D, rho: float):
    """(R, dR/drho) of structure ``form`` at distances ``D`` and range ``rho`` (module
    docstring): the NumPy twin of the engine's ``spatial_corr``."""
    x = np.asarray(D, dtype=float) / rho
    inside = x < 1.0
    if form == "SPEXP":
        R = np.exp(-x)
        dR = R * x / rho
    elif form == "SPGAU":
        R = np.exp(-x * x)
        dR = 2.0 * R * x * x / rho
    elif form == "SPLIN":
        R = np.where(inside, 1.0 - x, 0.0)
        dR = np.where(inside, x / rho, 0.0)
    elif form == "SPRAT":
        R = 1.0 - x * x / (1.0 + x * x)
        dR = 2.0 * x * x / (rho * (1.0 + x * x) ** 2)
    elif form == "SPSPH":
        R = np.where(inside, 1.0 - 1.5 * x + 0.5 * x ** 3, 0.0)
        dR = np.where(inside, 1.5 * x * (1.0 - x * x) / rho, 0.0)
    else:
        raise ValueError(f"unknown spatial structure {form!r}; use one of {SPATIAL_STRUCTURES}")
    return R, dR


def _labelled_square(M) -> bool:
    return (isinstance(M, pd.DataFrame) and M.shape[0] == M.shape[1]
            and set(map(str, M.index)) == set(map(str, M.columns)))


def distance_matrix(term: str, dist, labels) -> np.ndarray:
    """The G x G distances between the groups ``labels`` (the term's, in its code order)
    from ``dist``: a square DataFrame labelled by group on both axes (extra groups are
    dropped), a square array over the groups in sorted label order, or a DataFrame of
    numeric coordinate columns indexed by group (Euclidean distances, metafor's default
    for coordinates). Raises ValueError naming the term for missing groups, non-finite,
    negative or asymmetric distances and a non-zero diagonal."""
    labels = list(labels)
    G = len(labels)
    what = f"dist[{term!r}]"

    def missing_error(have):
        missing = [g for g in labels if g not in have]
        if missing:
            raise ValueError(f"{what} has no entry for {len(missing)} group(s) of {term}: "
                             f"{', '.join(map(repr, missing[:5]))}{' ...' if len(missing) > 5 else ''}")

    if _labelled_square(dist):
        idx = {str(k): k for k in dist.index}
        cols = {str(k): k for k in dist.columns}
        if len(idx) != dist.shape[0] or len(cols) != dist.shape[1]:
            raise ValueError(f"{what} has duplicated labels")
        have = {g for g in labels if g in dist.index or str(g) in idx}
        missing_error(have)
        rows = [g if g in dist.index else idx[str(g)] for g in labels]
        cs = [g if g in dist.columns else cols[str(g)] for g in labels]
        try:
            D = dist.loc[rows, cs].to_numpy(dtype=float)
        except (TypeError, ValueError):
            raise ValueError(f"{what} has non-numeric distances") from None
    elif isinstance(dist, pd.DataFrame):
        if dist.index.has_duplicates:
            dup = dist.index[dist.index.duplicated()][0]
            raise ValueError(f"{what}: the coordinates list group {dup!r} more than once")
        num = dist.select_dtypes(include="number")
        if num.shape[1] != dist.shape[1] or num.shape[1] == 0:
            raise ValueError(f"{what}: a DataFrame of coordinates needs numeric columns only (one row "
                             f"per group, indexed by group); a distance matrix needs the same group "
                             f"labels as index and columns")
        missing_error(set(dist.index) | {g for g in labels if str(g) in set(map(str, dist.index))})
        pos = {str(k): k for k in dist.index}
        C = num.loc[[g if g in dist.index else pos[str(g)] for g in labels]].to_numpy(dtype=float)
        if not np.isfinite(C).all():
            raise ValueError(f"{what} has non-finite coordinates")
        diff = C[:, None, :] - C[None, :, :]
        D = np.sqrt(np.sum(diff * diff, axis=2))
    else:
        try:
            D = np.asarray(dist, dtype=float)
        except (TypeError, ValueError):
            raise ValueError(f"{what} must be a labelled DataFrame (distances or coordinates) or a "
                             f"square array of distances") from None
        if D.shape != (G, G):
            raise ValueError(f"{what} must be {G} x {G} (one row and column per group of {term}, in "
                             f"sorted label order); got shape {D.shape}. A labelled DataFrame may hold "
                             f"more groups, or give coordinates as a DataFrame indexed by group.")
    if not np.isfinite(D).all():
        raise ValueError(f"{what} has non-finite distances")
    if (D < 0).any():
        raise ValueError(f"{what} has negative distances")
    if np.abs(D - D.T).max() > 1e-8 * max(1.0, D.max()):
        raise ValueError(f"{what} is not symmetric")
    if np.abs(np.diag(D)).max() > 0:
        raise ValueError(f"{what} has a non-zero diagonal (the distance of a group to itself "
                         f"must be 0)")
    return 0.5 * (D + D.T)


class Spatial(CovStruct):
    """A spatial correlation across a random intercept's G groups: ``Sigma = sigma^2
    R(rho)`` (module docstring), theta = (sigma, rho / unit). ``D`` holds the distances
    between the groups in the level's code order; ``T`` and ``Sigma`` are those of one
    group's effect (sigma, sigma^2); :meth:`correlation` gives R across the groups.

    Fitting: the EM iterations update sigma^2 at the current range (the exact M-step in
    the level's whitened effects ``v``, u = sigma F v); the Newton phase moves sigma and
    rho together with the analytic gradient. Extra starts put rho at the 10, 50 and 90 %
    quantiles of the distances (:meth:`range_starts`)."""

    kind = "spatial"
    n_theta = 2

    def __init__(self, effect_names, form, D, term=None):
        super().__init__(effect_names)
        form = str(form).upper()
        what = f"covariance {form!r} of {term!r}" if term is not None else f"covariance {form!r}"
        if form not in SPATIAL_STRUCTURES:
            raise ValueError(f"unknown spatial structure {form!r}; use one of {SPATIAL_STRUCTURES}")
        if self.q != 1:
            raise ValueError(f"{what} applies to a random intercept; the term has effects "
                             f"{self.effect_names}")
        self.form, self.title, self.term = form, TITLES[form], term
        self.D = np.asarray(D, dtype=float)
        G = self.D.shape[0]
        pos = self.D[~np.eye(G, dtype=bool)]
        pos = pos[pos > 0]
        if pos.size == 0:
            raise ValueError(f"{what} needs two or more groups at different places; the term "
                             f"has {G} group(s){' all at one place' if G > 1 else ''}")
        self.unit = float(np.median(pos))
        self.rho_bounds = (RHO_LOWER * float(pos.min()), RHO_UPPER * float(self.D.max()))
        start = float(np.quantile(self.D[np.tril_indices(G, -1)], 0.25))
        self.rho_start = start if start > 0 else self.unit

    @property
    def lower(self):
        return np.array([0.0, self.rho_bounds[0] / self.unit])

    @property
    def upper(self):
        return np.array([np.inf, self.rho_bounds[1] / self.unit])

    def T(self, theta):
        return np.array([[float(theta[0])]])

    def rho(self, theta) -> float:
        """The range rho in the units of the distances."""
        return float(theta[1]) * self.unit

    def correlation(self, theta) -> np.ndarray:
        """R(rho) across the groups (level code order)."""
        return spatial_correlation(self.form, self.D, self.rho(theta))[0]

    def from_Sigma(self, Sigma):
        """(sigma, the start's rho): Sigma gives the variance only."""
        return np.array([np.sqrt(max(float(np.asarray(Sigma).reshape(-1)[0]), 0.0)),
                         self.rho_start / self.unit])

    def engine_spec(self) -> dict:
        spec = super().engine_spec()
        spec["spatial"] = (self.form, self.D / self.unit)
        return spec

    def report_params(self):
        """("sd", (0,)) then ("range", ()): rho, reported as itself in both metrics."""
        return [("sd", (0,)), ("range", ())]

    def report_values(self, theta):
        return np.array([float(theta[0]), self.rho(theta)])

    def theta_from_report(self, values):
        return np.array([float(values[0]), float(values[1]) / self.unit])

    def Sigma_from_report(self, values):
        return np.array([[float(values[0]) ** 2]])

    def range_starts(self, quantiles=(0.1, 0.5, 0.9)):
        """[(p, theta's rho at the p-quantile of the distances between groups)]: extra
        starts of the optimiser (the likelihood is often multimodal in the range)."""
        d = self.D[np.tril_indices(self.D.shape[0], -1)]
        lo, hi = self.lower[1], self.upper[1]
        return [(p, float(np.clip(np.quantile(d, p) / self.unit, lo, hi))) for p in quantiles]

    def at_bound(self, rho) -> str | None:
        """"lower" or "upper" when rho is at (within 1e-6 of) a bound of its range."""
        lo, hi = self.rho_bounds
        if rho <= lo * (1 + 1e-6):
            return "lower"
        if rho >= hi * (1 - 1e-6):
            return "upper"
        return None

    def is_fixed(self, index):
        return False

    def labels(self, variance=False):
        return [f"{'var' if variance else 'sd'}({self.effect_names[0]})", "rho"]

    def __repr__(self):
        return f"Spatial({self.form!r}, {self.D.shape[0]} groups)"


def spatial_terms(names, covariance, dist, R=None) -> dict:
    """{term: structure} of the terms with a spatial structure, from ``covariance=`` (a
    dict, or one name for a single term) and ``dist=`` ({term: distances}); ValueError for
    a spatial name without ``dist``, ``dist`` without a spatial structure, a term also given
    ``R=`` and ``dist`` not a dict."""
    if isinstance(covariance, str) and len(names) == 1:
        covariance = {names[0]: covariance}
    cov = covariance if isinstance(covariance, dict) else {}
    spatial = {t: str(v).upper() for t, v in cov.items()
               if isinstance(v, str) and v.strip().upper() in SPATIAL_STRUCTURES}
    if dist is not None and not isinstance(dist, dict):
        raise ValueError(f"dist= must map grouping terms to distances, e.g. {{{names[0]!r}: D}}; "
                         f"got {type(dist).__name__}")
    dist = dist or {}
    for t, form in spatial.items():
        if t not in dist:
            raise ValueError(f"covariance {form!r} of {t!r} needs the distances between its groups: "
                             f"dist={{{t!r}: D}} (a labelled distance matrix or coordinates)")
    for t in dist:
        if t not in spatial:
            if t not in names:
                raise ValueError(f"dist= names grouping term {t!r}, which is not in the formula; "
                                 f"grouping terms are {list(names)}")
            raise ValueError(f"dist= gives distances for {t!r}, but its covariance is not a spatial "
                             f"structure: add covariance={{{t!r}: 'SPEXP'}} (or one of "
                             f"{', '.join(SPATIAL_STRUCTURES)})")
    both = sorted(set(spatial) & set(R or ()))
    if both:
        raise ValueError(f"term {both[0]!r} has both a known correlation matrix R and a spatial "
                         f"structure; give one")
    return spatial


def spatial_levels(frame, spatial: dict, dist: dict) -> dict:
    """{level: (structure, D)} over the frame's levels for :func:`spatial_terms`' terms,
    D the distances between the level's groups in code order (:func:`distance_matrix`);
    ValueError for a term that is not a random intercept."""
    out = {}
    for term, form in spatial.items():
        lvl = next(i for i, t in enumerate(frame.terms) if t.group == term)
        if frame.Z[lvl].shape[1] != 1 or list(frame.re_names[lvl]) != ["_cons"]:
            raise ValueError(f"covariance {form!r} of {term!r}: a spatial correlation applies to a "
                             f"random intercept (1 | {term}), not to ({frame.terms[lvl].rhs} | {term})")
        out[lvl] = (form, distance_matrix(term, dist[term], frame.group_labels[lvl]))
    return out
