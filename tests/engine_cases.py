"""Seeded designs for the engine parity suite: every structure x ML/REML x known
sampling variances, a full sampling covariance V, or a profiled residual variance.

Each case is two nested levels, ``(1 + x | g)`` under the structure named and
``(1 | g:h)``; :func:`case_data` builds it deterministically (the generating script
``reference/make_dense_optima.py`` and the tests share it).
"""

import numpy as np

STRUCTURES = {
    "identity": "identity",
    "independent": "independent",
    "exchangeable": "exchangeable",
    "unstructured": "unstructured",
    "custom_equal_sd": [["a", None], [None, "a"]],
    "custom_fixed_corr": [[None, 0.3], [0.3, None]],
}
RESIDUALS = ("variance", "V", "profiled")
METHODS = ("reml", "ml")


def case_ids():
    out = []
    for s in STRUCTURES:
        for r in RESIDUALS:
            if s == "custom_fixed_corr" and r == "profiled":
                continue
            for m in METHODS:
                out.append(f"{s}-{r}-{m}")
    return out


def case_data(case_id):
    """(y, X, Z, groups, variance, V, structure spec, method, residual) of one case."""
    s, r, m = case_id.split("-")
    seed = sorted(STRUCTURES).index(s) * 10 + RESIDUALS.index(r) * 2 + METHODS.index(m)
    rng = np.random.default_rng(1000 + seed)
    g, h = [], []
    for a in range(14):
        for b in range(int(rng.integers(1, 4))):
            k = int(rng.integers(1, 4))
            g += [a] * k
            h += [a * 10 + b] * k
    g, h = np.array(g), np.array(h)
    n = g.size
    x = rng.normal(size=n)
    X = np.column_stack([x, np.ones(n)])
    Z = [np.column_stack([x, np.ones(n)]), np.ones((n, 1))]
    u0 = rng.normal(scale=0.4, size=14)[g]
    u1 = rng.normal(scale=0.25, size=14)[g]
    w = rng.normal(scale=0.3, size=h.max() + 1)[h]
    v = rng.uniform(0.05, 0.3, n)
    V = None
    if r == "V":
        V = np.diag(v)
        for key in np.unique(h):
            rows = np.flatnonzero(h == key)
            sd = np.sqrt(v[rows])
            V[np.ix_(rows, rows)] = 0.5 * np.outer(sd, sd) + np.diag(0.5 * v[rows])
    e = rng.multivariate_normal(np.zeros(n), V) if V is not None else rng.normal(size=n) * np.sqrt(v)
    if r == "profiled":
        e = rng.normal(scale=0.5, size=n)
    y = 0.3 + 0.2 * x + u0 + u1 * x + w + e
    variance = v if r == "variance" else None
    return y, X, Z, [g, h], variance, V, STRUCTURES[s], m, r
