"""Seeded synthetic three-level meta-analytic data for the benchmarks.

Effect sizes (``b``-groups, ~10 effects each) are nested in ``b``-groups nested
in ``a``-groups (~10 ``b``-groups each), like schools in districts::

    y = beta0 + beta1 x + u_a (+ w_a x) + u_ab + e,
    u_a ~ N(0, tau_a^2), w_a ~ N(0, tau_slope^2), u_ab ~ N(0, tau_b^2), e ~ N(0, v),
    v ~ Uniform(0.01, 0.1), x ~ N(0, 1).

The ``b`` ids restart at 1 inside every ``a``-group, so the model must be written
with the nested term ``(1 | a:b)``; :func:`formula` gives the matching formula.

>>> from synthetic import make_three_level, formula
>>> df = make_three_level(1000, seed=1)
>>> list(df.columns)
['y', 'x', 'v', 'a', 'b']
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["make_three_level", "formula", "load_schoolcal", "TRUE"]

#: true parameter values used by :func:`make_three_level`
TRUE = {"beta0": 0.2, "beta1": 0.1, "tau_a": 0.3, "tau_b": 0.2, "tau_slope": 0.1}


def _group_sizes(rng, total: int, mean: int) -> np.ndarray:
    """Sizes 1 + Poisson(mean - 1) (so mean ~ ``mean``) summing exactly to ``total``."""
    total = int(total)
    est = max(1, int(1.2 * total / mean) + 10)
    sizes = 1 + rng.poisson(mean - 1, size=est)
    while sizes.sum() < total:
        sizes = np.concatenate([sizes, 1 + rng.poisson(mean - 1, size=est)])
    csum = np.cumsum(sizes)
    k = int(np.searchsorted(csum, total)) + 1       # first k groups reach the total
    sizes = sizes[:k].copy()
    sizes[-1] -= int(csum[k - 1] - total)
    return sizes


def make_three_level(n: int, seed: int = 0, slope: bool = False, *,
                     per_b: int = 10, per_a: int = 10, shuffle: bool = False) -> pd.DataFrame:
    """``n`` effect sizes in ~n/per_b ``b``-groups nested in ~n/(per_a per_b) ``a``-groups.

    Columns: ``y`` (effect size), ``x`` (moderator), ``v`` (known sampling variance),
    ``a`` (top-level id), ``b`` (second-level id, restarting within each ``a``).
    ``slope=True`` adds a random slope on ``x`` at the top level (SD ``tau_slope``).
    ``shuffle=True`` returns the rows in random order (the fit must sort them).
    """
    n = int(n)
    if n < 1:
        raise ValueError("n must be positive")
    rng = np.random.default_rng(seed)
    b_sizes = _group_sizes(rng, n, per_b)                  # effects per b-group
    a_sizes = _group_sizes(rng, len(b_sizes), per_a)       # b-groups per a-group
    n_a, n_b = len(a_sizes), len(b_sizes)

    a_of_b = np.repeat(np.arange(n_a), a_sizes)            # a-group of each b-group
    first_b = np.concatenate([[0], np.cumsum(a_sizes)[:-1]])
    b_within = np.arange(n_b) - np.repeat(first_b, a_sizes)  # 0.. inside each a-group
    b_of_i = np.repeat(np.arange(n_b), b_sizes)
    a_of_i = a_of_b[b_of_i]

    x = rng.standard_normal(n)
    v = rng.uniform(0.01, 0.1, size=n)
    u_a = rng.normal(0.0, TRUE["tau_a"], size=n_a)
    u_b = rng.normal(0.0, TRUE["tau_b"], size=n_b)
    y = TRUE["beta0"] + TRUE["beta1"] * x + u_a[a_of_i] + u_b[b_of_i]
    if slope:
        w_a = rng.normal(0.0, TRUE["tau_slope"], size=n_a)
        y = y + w_a[a_of_i] * x
    y = y + rng.standard_normal(n) * np.sqrt(v)

    df = pd.DataFrame({"y": y, "x": x, "v": v, "a": a_of_i + 1, "b": b_within[b_of_i] + 1})
    if shuffle:
        df = df.iloc[rng.permutation(n)].reset_index(drop=True)
    return df


def make_many_levels(n_levels: int = 200, extra: int = 24, seed: int = 0,
                     per_study: int = 4) -> pd.DataFrame:
    """A categorical moderator ``f`` with ``n_levels`` levels (each level once, then
    ``extra`` rows at random levels), effects ``y`` with sampling variances ``v`` in
    studies ``s`` of ``per_study`` rows: the model ``y ~ C(f) + (1 | s)`` has
    ``n_levels`` fixed effects."""
    rng = np.random.default_rng(seed)
    level = np.r_[np.arange(n_levels), rng.integers(0, n_levels, extra)]
    n = level.shape[0]
    v = rng.uniform(0.01, 0.1, n)
    s = np.arange(n) // per_study
    y = (0.1 * rng.standard_normal(n_levels))[level] + rng.normal(0.0, 0.2, s.max() + 1)[s] \
        + rng.standard_normal(n) * np.sqrt(v)
    return pd.DataFrame({"y": y, "v": v, "f": [f"L{i:03d}" for i in level], "s": s + 1})


MANY_LEVELS = "y ~ C(f) + (1 | s)"


def formula(slope: bool = False, moderator: bool = True) -> str:
    """The model that generated :func:`make_three_level` data."""
    fixed = "y ~ x" if moderator else "y ~ 1"
    top = "(1 + x || a)" if slope else "(1 | a)"
    return f"{fixed} + {top} + (1 | a:b)"


def load_schoolcal() -> pd.DataFrame:
    """The schoolcal data (56 effects, schools in districts) bundled with mlmeta."""
    try:
        from mlmeta import datasets

        load = getattr(datasets, "load", None)
    except ImportError:
        load = None
    if load is not None:
        return load("schoolcal")
    from pathlib import Path

    import mlmeta

    return pd.read_csv(Path(mlmeta.__file__).resolve().parent / "datasets" / "schoolcal.csv")


if __name__ == "__main__":  # pragma: no cover
    import sys

    n = int(float(sys.argv[1])) if len(sys.argv) > 1 else 1000
    df = make_three_level(n, seed=1)
    print(df.head())
    print(f"n={len(df)}, a-groups={df.a.nunique()}, "
          f"b-groups={df.groupby(['a', 'b']).ngroups}")
