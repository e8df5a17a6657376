"""metafor's covariance structures over the levels of a factor: patterns and lags.

metafor's ``random = ~ time | study`` with ``struct = "AR"``, ``"HAR"``, ``"CAR"`` or
``"HCS"`` gives each study one random effect per level of ``time``; in mlmeta that is
the term ``(0 + C(time) | study)``, whose effects formulaic names ``C(time)[1]``,
``C(time)[2]``, ... This module reads the factor and its levels from those names and
builds each structure as a custom pattern (:class:`mlmeta.covstruct.Custom`:
``Sigma = D R D``, ``D = diag(sd)``, ``R_ij = rho^(d_ij)``):

* ``AR``:  one SD for all levels,  ``d_ij = |i - j|`` over the levels in order,  rho in (-1, 1)
* ``HAR``: one SD per level,       ``d_ij = |i - j|``,                            rho in (-1, 1)
* ``CAR``: one SD for all levels,  ``d_ij = |t_i - t_j|``, t the numeric levels,  rho in [0, 1)
* ``HCS``: one SD per effect,      ``R_ij = rho`` (d = 1), any effects,           rho in (-1, 1)

so that ``Sigma_ij = tau^2 rho^|i-j|`` (AR), ``tau_i tau_j rho^|i-j|`` (HAR),
``tau^2 rho^|t_i-t_j|`` (CAR) and ``tau_i tau_j rho`` (HCS, i != j), as metafor's.
"""

from __future__ import annotations

import re

import numpy as np

__all__ = ["FACTOR_STRUCTURES", "factor_levels", "level_structure"]

#: metafor's names of the structures built here
FACTOR_STRUCTURES = ("AR", "HAR", "CAR", "HCS")

_LEVEL = re.compile(r"^(?P<factor>.+)\[(?P<level>[^\[\]]*)\]$")


def factor_levels(effect_names):
    """(factor, levels) when the effects are the levels of one factor, one effect per
    level (formulaic's full-rank coding: ``C(time)[1]``, ``C(time)[2]``, ...); None
    otherwise (an intercept, a numeric slope, contrasts ``C(time)[T.2]``, two factors)."""
    matches = [_LEVEL.match(str(n)) for n in effect_names]
    if not matches or any(m is None for m in matches):
        return None
    factors = {m["factor"] for m in matches}
    levels = [m["level"] for m in matches]
    if len(factors) != 1 or any(lv.startswith("T.") for lv in levels):
        return None
    return factors.pop(), levels


def _what(name, term):
    return f"covariance {name!r} of {term!r}" if term is not None else f"covariance {name!r}"


def level_structure(name, effect_names, term=None) -> dict:
    """The custom pattern of metafor's structure ``name`` (AR, HAR, CAR, HCS) over a
    term's effects: a dict with ``pattern`` (diagonal: None for a free SD or a label
    shared by all, off-diagonal: the correlation's label), ``lags`` (d, or None for
    d = 1), ``nonnegative`` (rho >= 0) and ``factor`` (the factor's name, or the
    effects joined by commas for HCS on other terms).

    Raises ValueError naming the term: AR, HAR and CAR need the levels of one factor,
    CAR numeric levels; every structure needs two or more effects."""
    name = name.upper()
    if name not in FACTOR_STRUCTURES:
        raise ValueError(f"unknown factor structure {name!r}; use one of {FACTOR_STRUCTURES}")
    names = list(effect_names)
    q = len(names)
    what = _what(name, term)
    fl = factor_levels(names)
    if fl is None and name != "HCS":
        raise ValueError(f"{what} needs a term whose effects are the levels of one factor, such "
                         f"as (0 + C(time) | study) (no intercept, no numeric slope); the term's "
                         f"effects are {names}")
    if q < 2:
        raise ValueError(f"{what} needs two or more levels; the term has {q} effect ({names})")
    factor = fl[0] if fl is not None else ",".join(names)
    lags = None
    if name in ("AR", "HAR"):
        idx = np.arange(q, dtype=float)
        lags = np.abs(idx[:, None] - idx[None, :])
    elif name == "CAR":
        try:
            t = np.array([float(lv) for lv in fl[1]])
        except ValueError:
            raise ValueError(f"{what} needs numeric levels (the times), as metafor's ~ time | "
                             f"study with a numeric time; {factor!r} has levels {fl[1]}") from None
        if not np.isfinite(t).all() or np.unique(t).size < q:
            raise ValueError(f"{what} needs distinct finite times; {factor!r} has levels {fl[1]}")
        lags = np.abs(t[:, None] - t[None, :])
    sd = "sd" if name in ("AR", "CAR") else None
    rho = "rho" if q > 2 else None          # a label marks two or more equal elements
    pattern = [[sd if i == j else rho for j in range(q)] for i in range(q)]
    return {"pattern": pattern, "lags": lags, "nonnegative": name == "CAR", "factor": factor}
