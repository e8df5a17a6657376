"""Tall matrices through their Gram matrix M'M: one pass over the rows instead of the
several of a QR factorisation, where the columns are so well conditioned that the Gram
matrix loses nothing that matters. It squares the condition number: from a condition
number kappa of the unit-norm columns, its Cholesky factor (R'R = M'M) carries a relative
error of about kappa^2 eps, at most ~1e-10 below :data:`GRAM_COND`."""

from __future__ import annotations

import numpy as np

__all__ = ["TALL_ROWS", "GRAM_COND", "is_tall", "well_conditioned_gram"]

#: log|X'X| of the fixed part comes from the Gram matrix from this many rows, and 8 per
#: column, on (below, its QR factorisation gives the number it always gave; the number
#: enters the REML constant). A yes/no test of full rank takes the Gram matrix at any
#: height (``min_rows=0``): the test costs less than a pivoted QR from 56 rows on.
TALL_ROWS = 4096
#: the largest condition number of the unit-norm columns taken through the Gram matrix
GRAM_COND = 1e3


def is_tall(M, min_rows: int = TALL_ROWS) -> bool:
    """At least ``min_rows`` rows and 8 per column, and two columns or more."""
    n, p = M.shape
    return p > 1 and n >= max(min_rows, 8 * p)


def well_conditioned_gram(M) -> np.ndarray | None:
    """M'M where the unit-norm columns of M have a condition number of at most
    :data:`GRAM_COND`: the Gram matrix of the unit columns has eigenvalues of at least
    GRAM_COND^-2 times its largest and beyond its rounding (10 p n eps; every R_kk of a QR
    factorisation of the unit columns is then above sigma_min); else None (also for a
    column of zeros, underflow or overflow)."""
    n, p = M.shape
    G = M.T @ M
    d = np.sqrt(np.diag(G))
    if not (np.all(np.isfinite(G)) and np.all(d > 0)):
        return None
    w = np.linalg.eigvalsh(G / np.outer(d, d))
    if not (w[0] >= w[-1] / GRAM_COND ** 2 and w[0] > 10.0 * p * n * np.finfo(float).eps):
        return None
    return G
