"""Linear constraints on the fixed effects: ``R beta = r`` fitted exactly.

Every beta satisfying the constraints is ``beta = beta_0 + N gamma`` with ``N`` an
orthonormal basis of the null space of ``R`` and ``beta_0 = R^+ r`` the
least-norm solution. The model is fitted on the constrained design

    y* = y - X beta_0,    X* = X N,

(GLS for gamma, REML with ``X*``), and mapped back:
``beta = beta_0 + N gamma``, ``Var(beta) = N Var(gamma) N'``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import linalg

__all__ = ["FixedConstraints", "parse_constraints"]


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
    if isinstance(spec, tuple) and len(spec) == 2 and not isinstance(spec[0], str):
        R = np.atleast_2d(np.asarray(spec[0], dtype=float))
        r = np.atleast_1d(np.asarray(spec[1], dtype=float))
    else:
        from formulaic.utils.constraints import LinearConstraints

        try:
            lc = LinearConstraints.from_spec(spec, variable_names=names)
        except KeyError as exc:
            raise ValueError(f"constraint names {exc.args[0]!r}, which is not a fixed effect; "
                             f"fixed effects are {names}") from None
        except Exception as exc:  # formulaic's parse errors
            raise ValueError(f"cannot parse constraints {spec!r}: {exc}") from None
        R = np.asarray(lc.constraint_matrix, dtype=float)
        r = np.asarray(lc.constraint_values, dtype=float)
    if R.shape[1] != len(names):
        raise ValueError(f"constraint matrix has {R.shape[1]} columns for {len(names)} fixed effects")
    if R.shape[0] != r.shape[0]:
        raise ValueError("constraint matrix and values have different numbers of rows")
    if not (np.all(np.isfinite(R)) and np.all(np.isfinite(r))):
        raise ValueError("constraints must be finite")
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
