"""Linear constraints on the fixed effects: ``R beta = r`` fitted exactly.

Every beta satisfying the constraints is ``beta = beta_0 + N gamma`` with ``N`` an
orthonormal basis of the null space of ``R`` and ``beta_0 = R^+ r`` the
least-norm solution. The model is fitted on the constrained design

    y* = y - X beta_0,    X* = X N,

(GLS for gamma, REML with ``X*``), and mapped back:
``beta = beta_0 + N gamma``, ``Var(beta) = N Var(gamma) N'``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from scipy import linalg

__all__ = ["FixedConstraints", "parse_constraints", "linear_hypotheses"]


def linear_hypotheses(spec, names, rhs=None, *, what="hypotheses"):
    """``(L, r)`` of the linear hypotheses (or constraints) ``L beta = r`` over the
    coefficients ``names``: the one parser of the package.

    ``spec`` is text in formulaic's constraint syntax (``"x1 = 0, x2 = x3"``,
    ``"_cons + 5*x = 0.1"``; a bare name means ``name = 0``), a list of such strings,
    an ``(L, r)`` pair, or a matrix L (one row per hypothesis, columns in ``names``
    order) with ``rhs`` (default 0). Names that are not Python identifiers
    (``outcome[AL]``, ``x1:x2``) may be written as they are. ``what`` names the input
    in error messages. Rank is not checked here (callers say what dependence means).
    """
    names = list(names)
    if isinstance(spec, str) or (isinstance(spec, (list, tuple)) and len(spec) > 0
                                 and all(isinstance(x, str) for x in spec)):
        from formulaic.utils.constraints import LinearConstraints

        if rhs is not None:
            raise ValueError(f"give the values inside the {what} ('x1 = 0.5'), not as rhs=")
        odd = sorted((nm for nm in names if not nm.isidentifier()), key=len, reverse=True)
        pat = re.compile("|".join(map(re.escape, odd))) if odd else None
        parts = [spec] if isinstance(spec, str) else list(spec)
        parts = [pat.sub(lambda m: f"`{m.group()}`", x) if pat else x for x in parts]
        try:
            lc = LinearConstraints.from_spec(parts, variable_names=names)
        except KeyError as exc:
            raise ValueError(f"unknown coefficient {exc.args[0]!r} in {spec!r}: not a fixed "
                             f"effect; coefficients are {names}") from None
        except Exception as exc:  # formulaic's parse errors
            raise ValueError(f"cannot parse {what} {spec!r}: {exc}") from None
        L = np.asarray(lc.constraint_matrix, dtype=float)
        r = np.asarray(lc.constraint_values, dtype=float)
    elif (isinstance(spec, tuple) and len(spec) == 2 and rhs is None
          and np.ndim(spec[0]) == 2 and np.ndim(spec[1]) <= 1):
        L = np.atleast_2d(np.asarray(spec[0], dtype=float))
        r = np.atleast_1d(np.asarray(spec[1], dtype=float))
    else:
        L = np.atleast_2d(np.asarray(spec, dtype=float))
        r = np.broadcast_to(np.asarray(0.0 if rhs is None else rhs, dtype=float),
                            (L.shape[0],)).copy()
    if L.ndim != 2 or L.shape[1] != len(names):
        raise ValueError(f"the {what} matrix needs {len(names)} columns (one per coefficient: "
                         f"{names}), got shape {L.shape}")
    if L.shape[0] != r.shape[0]:
        raise ValueError(f"the {what} matrix and values have different numbers of rows")
    if not (np.all(np.isfinite(L)) and np.all(np.isfinite(r))):
        raise ValueError(f"the {what} must be finite")
    return L, r


@dataclass
class FixedConstraints:
    R: np.ndarray          # (r, p)
    r: np.ndarray          # (r,)
    names: list            # fixed-effect names (columns of R)
    N: np.ndarray          # (p, p - r) null-space basis
    beta0: np.ndarray      # (p,) particular solution

    def describe(self) -> list[str]:
        """Stata-like listing: ``x1 - x2 = 0``."""
        out = []
        for row, val in zip(self.R, self.r):
            terms = []
            for c, nm in zip(row, self.names):
                if c == 0:
                    continue
                mag = "" if abs(c) == 1 else f"{abs(c):g}*"
                sign = "-" if c < 0 else "+"
                terms.append((sign, f"{mag}{nm}"))
            text = ("-" if terms[0][0] == "-" else "") + terms[0][1]
            for sign, t in terms[1:]:
                text += f" {sign} {t}"
            out.append(f"{text} = {val:g}")
        return out

    def expand(self, gamma, cov_gamma):
        beta = self.beta0 + self.N @ gamma
        return beta, self.N @ cov_gamma @ self.N.T

    def constrained_mask(self):
        """Coefficients fully determined by the constraints (no free direction)."""
        return np.all(np.abs(self.N) < 1e-12, axis=1)


def parse_constraints(spec, names) -> FixedConstraints:
    """Constraints from strings (``["x1 = x2", "x3 = 0.5"]`` or ``"x1 = x2, x3 = 0.5"``)
    or an ``(R, r)`` pair over the fixed effects ``names``."""
    names = list(names)
    R, r = linear_hypotheses(spec, names, what="constraints")
    rank = np.linalg.matrix_rank(R)
    if rank < R.shape[0]:
        raise ValueError("constraints are redundant or contradictory (the constraint matrix is "
                         "rank deficient)")
    if rank >= len(names):
        raise ValueError("constraints leave no fixed effect free to estimate")
    beta0 = np.linalg.pinv(R) @ r
    N = linalg.null_space(R)
    N[np.abs(N) < 1e-14] = 0.0
    return FixedConstraints(R=R, r=r, names=names, N=N, beta0=beta0)
