"""Seeded random designs for the fuzz harness (tools/fuzz.py).

``make_case(seed, idx)`` draws one case from ``numpy.random.default_rng([seed, idx])``,
so ``python tools/fuzz.py --case SEED:IDX`` rebuilds it exactly. A case is

* a tree of 1-5 nested grouping levels (3-20 top-level groups, 1-3 subgroups per group,
  1-5 rows per deepest group), ids either repeated across parents (``a:b`` terms) or
  unique; sometimes a grouping variable crossed with the tree (its groups span several
  top-level groups), with or without a random slope;
* random slopes at any level, under identity, independent, exchangeable, unstructured
  or custom structures (fixed SDs and correlations, equality labels);
* extreme-but-legal scales: outcomes from 1e-4 to 1e4, covariates from 1e-3 to 1e3 and
  uncentred (years 1976-2002), between-study to sampling variance ratios from 1e-4 to
  1e14, true variances exactly zero, exchangeable correlations near -1/(q-1);
* one of five ways to fit it: ``meregress`` with sampling variances or SEs, ``meregress``
  with a full sampling covariance ``V=`` (blocks within the deepest groups or across a
  whole top-level cluster; correlations up to 1 - 1e-8, and exactly 1, which must be
  refused), ``mixed`` on raw data, ``Model(...).fit()`` and ``fit_batch`` over
  several outcome columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

STRUCTURES = ("identity", "independent", "exchangeable", "unstructured", "custom")
APIS = ("meregress", "V", "mixed", "model", "batch")
API_P = (0.32, 0.16, 0.24, 0.13, 0.15)


@dataclass
class Case:
    """One random design and how to fit it."""

    seed: int
    idx: int
    api: str                     # one of APIS
    data: pd.DataFrame
    formula: str
    method: str
    covariance: dict
    sampling: dict = field(default_factory=dict)   # variance=/se= column names, or V=
    Y: np.ndarray | None = None  # extra outcome columns (batch)
    singular_V: bool = False     # V has a block with correlation exactly 1: must be refused
    notes: list = field(default_factory=list)

    def describe(self) -> str:
        d = self.data
        lines = [f"case {self.seed}:{self.idx}  api={self.api}  method={self.method}  n={len(d)}",
                 f"  formula: {self.formula}",
                 f"  covariance: {self.covariance}",
                 f"  sampling: {sorted(self.sampling) if self.sampling else 'residual'}"]
        lines += [f"  {n}" for n in self.notes]
        return "\n".join(lines)


def _tree(rng, n_levels, max_rows):
    """Rows of nested ids (n x n_levels), each level's ids numbered within its parent."""
    n_top = int(rng.integers(3, max(4, 21 - 3 * n_levels)))
    rows = []

    def grow(prefix, lvl):
        if lvl == n_levels:
            rows.extend([prefix] * int(rng.integers(1, 6)))
            return
        k = int(rng.choice([1, 2, 3], p=[0.35, 0.45, 0.2])) if lvl else n_top
        for g in range(k):
            grow(prefix + (g,), lvl + 1)

    grow((), 0)
    ids = np.array(rows, dtype=int)
    if ids.shape[0] > max_rows:                       # keep the dense oracle cheap
        keep = np.sort(rng.choice(ids.shape[0], max_rows, replace=False))
        ids = ids[keep]
    return ids


def _custom(rng, q, sd_scale):
    """A random legal custom pattern over q effects (SDs on the diagonal, correlations off)."""
    P = [[None] * q for _ in range(q)]
    for i in range(q):
        u = rng.random()
        if u < 0.2:
            P[i][i] = float(sd_scale[i] * rng.uniform(0.1, 1.0))
        elif u < 0.35 and q >= 2:
            P[i][i] = "s"
    if sum(P[i][i] == "s" for i in range(q)) == 1:
        P[[i for i in range(q) if P[i][i] == "s"][0]][[i for i in range(q) if P[i][i] == "s"][0]] = None
    pairs = [(i, j) for i in range(q) for j in range(i + 1, q)]
    for i, j in pairs:
        u = rng.random()
        if u < 0.3:
            P[i][j] = P[j][i] = float(np.round(rng.uniform(-0.6, 0.6), 2))
        elif u < 0.5 and len(pairs) >= 2:
            P[i][j] = P[j][i] = "r"
    if sum(P[i][j] == "r" for i, j in pairs) == 1:
        i, j = [(i, j) for i, j in pairs if P[i][j] == "r"][0]
        P[i][j] = P[j][i] = None
    return P


def _level_sigma(rng, effects, scale_y, scale_x, struct):
    """A true covariance matrix over a level's effects (intercept and slopes)."""
    q = len(effects)
    sd = np.array([scale_y * (rng.uniform(0.05, 1.0) if e == "_cons" else
                              rng.uniform(0.0, 0.5) / scale_x[e]) for e in effects])
    if rng.random() < 0.1:
        sd[int(rng.integers(q))] = 0.0                # a true variance of zero
    R = np.eye(q)
    if q > 1:
        if struct == "exchangeable":
            r = (-1.0 / (q - 1) + 1e-6) if rng.random() < 0.25 else rng.uniform(-0.4, 0.8)
            R = np.full((q, q), r)
            np.fill_diagonal(R, 1.0)
        elif struct in ("unstructured", "custom"):
            A = rng.normal(size=(q, q))
            S = A @ A.T + 0.3 * np.eye(q)
            R = S / np.sqrt(np.outer(np.diag(S), np.diag(S)))
    return sd[:, None] * R * sd[None, :]


def _root(S):
    """A square root R of a PSD matrix (S = R R'), singular ones included."""
    w, U = np.linalg.eigh(S)
    return U * np.sqrt(np.clip(w, 0, None))


def _draw_outcome(rng, X_beta, Zs, codes, Sigmas, noise):
    """y = X beta + sum_l Z_l u_l + e; ``noise`` is the SD of e (scalar or per row) or a
    square root of its covariance (n x n)."""
    y = X_beta.copy()
    for Z, g, S in zip(Zs, codes, Sigmas):
        G = int(g.max()) + 1
        u = rng.normal(size=(G, S.shape[0])) @ _root(S).T
        y += np.einsum("iq,iq->i", Z, u[g])
    e = rng.normal(size=y.shape[0])
    return y + (noise @ e if np.ndim(noise) == 2 else noise * e)


def _sampling_V(rng, df, leaf_key, top_key, notes):
    """A block-diagonal sampling covariance over the rows (data order)."""
    n = len(df)
    v = df["v"].to_numpy()
    V = np.diag(v)
    across = rng.random() < 0.25                      # blocks spanning a whole top-level cluster
    key = top_key if across else leaf_key
    blocks = [np.flatnonzero(key == k) for k in np.unique(key)]
    blocks = [r for r in blocks if r.size >= 2]
    # one case in ten has a block of correlation exactly 1 (a singular V, to be refused)
    singular_block = int(rng.integers(len(blocks))) if blocks and rng.random() < 0.1 else -1
    singular = singular_block >= 0
    kinds = ["rho=1"] if singular else []
    for b, r in enumerate(blocks):
        if b != singular_block and rng.random() < 0.3:
            continue
        u = rng.random()
        if b == singular_block:
            rho = 1.0
        elif u < 0.75:
            rho = rng.uniform(0.2, 0.8)
        elif u < 0.9:
            rho = 1.0 - 10.0 ** -rng.uniform(4, 8)
            kinds.append(f"near-singular 1-rho={1 - rho:.1e}")
        else:
            rho = -0.5 / (r.size - 1)
        sd = np.sqrt(v[r])
        V[np.ix_(r, r)] = rho * np.outer(sd, sd) + np.diag((1 - rho) * sd ** 2)
    notes.append(f"V blocks {'per top-level cluster' if across else 'per deepest group'}"
                 + (f": {', '.join(sorted(set(kinds)))}" if kinds else ""))
    assert V.shape == (n, n)
    return V, singular


def make_case(seed: int, idx: int) -> Case:
    """The random case (seed, idx); see the module docstring."""
    rng = np.random.default_rng([seed, idx])
    api = str(rng.choice(APIS, p=API_P))
    n_levels = int(rng.choice([1, 2, 3, 4, 5], p=[0.25, 0.3, 0.2, 0.15, 0.1]))
    ids = _tree(rng, n_levels, max_rows=int(rng.choice([60, 150, 250], p=[0.4, 0.4, 0.2])))
    n = ids.shape[0]
    notes = []
    # grouping variables: ids numbered within their parent (a:b terms) or unique
    unique_ids = rng.random() < 0.3
    names = [f"g{lvl}" for lvl in range(n_levels)]
    df = pd.DataFrame(index=pd.RangeIndex(n))
    for lvl, nm in enumerate(names):
        if unique_ids:
            df[nm] = pd.factorize(pd.Series(map(tuple, ids[:, :lvl + 1])))[0] + 100
        else:
            df[nm] = ids[:, lvl]
    terms_g = names if unique_ids else [":".join(names[:lvl + 1]) for lvl in range(n_levels)]
    # covariates at extreme but legal scales, sometimes uncentred
    scale_y = float(10.0 ** rng.choice([-4, -2, 0, 0, 0, 2, 4]))
    sx = float(10.0 ** rng.choice([-3, -1, 0, 0, 0, 1, 3]))
    if rng.random() < 0.15:
        df["x"] = rng.integers(1976, 2003, n).astype(float)
        scale_x = {"x": 7.8}
        notes.append("x uncentred (years)")
    else:
        df["x"] = sx * rng.normal(size=n) + (1e3 * sx if rng.random() < 0.1 else 0.0)
        scale_x = {"x": sx}
    has_x2 = rng.random() < 0.35
    if has_x2:
        s2 = float(10.0 ** rng.choice([-2, 0, 2]))
        df["x2"] = s2 * rng.normal(size=n)
        scale_x["x2"] = s2
    fixed = ["x"] + (["x2"] if has_x2 and rng.random() < 0.7 else [])
    if rng.random() < 0.1:
        df["f"] = rng.choice(["a", "b", "c"], n)
        fixed.append("C(f)")
    # random terms: slopes at any level under any structure
    terms, cov, Sigmas, Zs, codes = [], {}, [], [], []
    struct_of = {}
    for lvl, g in enumerate(terms_g):
        effects = ["_cons"]
        if rng.random() < 0.35:
            slopes = ["x"] + (["x2"] if has_x2 and rng.random() < 0.4 else [])
            effects = slopes + (["_cons"] if rng.random() < 0.85 else [])
        q = len(effects)
        struct = str(rng.choice(STRUCTURES)) if q >= 2 else "identity"
        struct_of[g] = struct
        lhs = ("1" if "_cons" in effects else "0") + "".join(f" + {e}" for e in effects if e != "_cons")
        bar = "||" if (struct == "independent" and rng.random() < 0.5) else "|"
        terms.append(f"({lhs} {bar} {g})")
        if q >= 2 and not (struct == "independent" and bar == "||"):
            if struct == "custom":
                # fixed SDs in outcome units per unit of the effect (made absolute below
                # with sampling variances; a profiled residual takes them relative to it)
                sdsc = [0.5 if e == "_cons" else 0.25 / scale_x[e] for e in effects]
                cov[g] = _custom(rng, q, sdsc)
            else:
                cov[g] = struct
        S = _level_sigma(rng, effects, scale_y, scale_x, struct)
        Sigmas.append(S)
        Zs.append(np.column_stack([np.ones(n) if e == "_cons" else df[e].to_numpy() for e in effects]))
        codes.append(pd.factorize(pd.Series(map(tuple, ids[:, :lvl + 1])))[0])
    if rng.random() < 0.15:                         # a term crossed with the tree
        K = int(rng.integers(2, 10))
        df["k"] = rng.integers(0, K, n)
        slope = rng.random() < 0.3
        terms.append("(1 + x | k)" if slope else "(1 | k)")
        eff = ["x", "_cons"] if slope else ["_cons"]
        Sigmas.append(_level_sigma(rng, eff, scale_y, scale_x, "unstructured"))
        Zs.append(np.column_stack([df["x"].to_numpy(), np.ones(n)]) if slope else np.ones((n, 1)))
        codes.append(pd.factorize(df["k"])[0])
        notes.append("crossed term k")
    # outcome: tau^2 / v from 1e-4 to 1e14
    ratio = float(10.0 ** rng.choice([-4, -2, 0, 0, 0, 1, 2, 6, 10, 14],
                                     p=[0.05, 0.1, 0.2, 0.15, 0.1, 0.15, 0.1, 0.07, 0.05, 0.03]))
    v = (scale_y ** 2 / ratio) * rng.uniform(0.3, 3.0, n)
    Xf = np.column_stack([np.ones(n)] + [df[c].to_numpy() for c in fixed if c != "C(f)"])
    beta = np.r_[0.3 * scale_y, [0.2 * scale_y / scale_x[c] for c in fixed if c != "C(f)"]]
    Xb = Xf @ beta
    df["v"] = v
    df["se"] = np.sqrt(v)
    if ratio >= 1e6:
        notes.append(f"tau^2/v about {ratio:.0e}")
    formula = "y ~ " + " + ".join(fixed) + " + " + " + ".join(terms)
    if rng.random() < 0.05:
        formula = formula.replace("y ~ ", "y ~ 0 + ", 1)
    method = str(rng.choice(["reml", "ml"]))
    case = Case(seed, idx, api, df, formula, method, cov, notes=notes)
    if api == "mixed" or (api in ("model", "batch") and rng.random() < 0.4):
        case.sampling, noise = {}, scale_y * rng.uniform(0.2, 1.5)
    elif api == "V":
        leaf = np.asarray(codes[n_levels - 1])
        V, case.singular_V = _sampling_V(rng, df, leaf, np.asarray(codes[0]), notes)
        case.sampling, noise = {"V": V}, _root(V)        # sampling errors drawn from V
    else:
        case.sampling = {"se": "se"} if (api == "meregress" and rng.random() < 0.3) else {"variance": "v"}
        noise = np.sqrt(v)
    df["y"] = _draw_outcome(rng, Xb, Zs, codes, Sigmas, noise)
    if case.sampling:
        for g, P in cov.items():
            if not isinstance(P, str):
                cov[g] = [[v * scale_y if (i == j and isinstance(v, float)) else v
                           for j, v in enumerate(row)] for i, row in enumerate(P)]
    if api == "batch":
        Y = [df["y"].to_numpy()]
        for _ in range(int(rng.integers(1, 4))):
            Y.append(_draw_outcome(rng, Xb, Zs, codes, Sigmas, noise))
        case.Y = np.column_stack(Y)
    return case
