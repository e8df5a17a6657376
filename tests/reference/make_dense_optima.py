"""Dense-likelihood optima for the engine parity suite (tests/test_engine_parity.py)
and for the structure tests (tests/test_structures.py).

The log-likelihood is computed by brute force (V formed as an n x n matrix,
DESIGN.md section 1) and maximised by scipy from several starts, with numerical
gradients. No part of mlmeta's fitting engine is used.

* ``dense_optima.json``: each case of tests/engine_cases.py, maximised by L-BFGS-B
  over the structures' theta (maps from mlmeta.covstruct); the residual variance
  of the profiled cases is a free parameter here (log sigma^2).
* ``dense_structures.json``: (a) the three-effect / two-effect model
  ``y ~ x1 + x2 + (1 + x1 + x2 | g) + (1 + x1 | g:h)`` on
  ``data/structures_synthetic.csv`` (written here from a seeded generator) under
  pairs of structures, maximised by BFGS over an unconstrained parameterisation of
  each Sigma written out below (independent of mlmeta.covstruct); (b) ``custom3-*``: a
  custom pattern whose fixed correlations conflict with the data
  (``data/custom3_synthetic.csv``), by Nelder-Mead over (SDs, correlation); (c)
  ``schoolcal-uncentred-*``: an independent random slope on the uncentred year.

    python tests/reference/make_dense_optima.py      # about two minutes
"""

import json
import sys
from pathlib import Path

import numpy as np
from scipy import optimize

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import pandas as pd  # noqa: E402

from dense import dense_loglik, dense_V, dense_Z  # noqa: E402
from engine_cases import case_data, case_ids  # noqa: E402
from mlmeta.covstruct import make_structure  # noqa: E402


def structures(spec, Z):
    return [make_structure(spec, ["x", "_cons"]), make_structure(None, ["_cons"])]


def dense_optimum(case_id):
    y, X, Z, groups, variance, V, spec, method, residual = case_data(case_id)
    structs = structures(spec, Z)
    sizes = [s.n_theta for s in structs]
    k = sum(sizes)
    profiled = residual == "profiled"
    Lam = np.diag(variance) if variance is not None else (V if V is not None else np.eye(y.size))
    lower = np.concatenate([s.lower for s in structs] + ([[-20.0]] if profiled else []))
    upper = np.concatenate([s.upper for s in structs] + ([[5.0]] if profiled else []))
    lower = np.where(np.isinf(lower), None, lower)
    upper = np.where(np.isinf(upper), None, upper)

    def negll(par):
        th = par[:k]
        Sig, o = [], 0
        for s, m in zip(structs, sizes):
            Sig.append(s.Sigma(th[o:o + m]))
            o += m
        s2 = float(np.exp(par[k])) if profiled else 1.0
        Vm = s2 * dense_V(Z, groups, Sig, Lam)
        try:
            return -dense_loglik(y, X, Vm, method)[0]
        except (np.linalg.LinAlgError, FloatingPointError):
            return 1e10

    best = None
    for scale in (0.05, 0.2, 0.5, 1.0):
        for corr in (0.0, 0.5, -0.5):
            start = []
            for s in structs:
                t = s.from_Sigma(scale * np.array([[1.0, corr], [corr, 1.0]])[:s.q, :s.q])
                start.append(t)
            start = np.concatenate(start + ([[np.log(0.25)]] if profiled else []))
            r = optimize.minimize(negll, start, method="L-BFGS-B",
                                  bounds=list(zip(lower, upper)),
                                  options={"ftol": 1e-15, "gtol": 1e-10, "maxiter": 5000})
            if best is None or r.fun < best.fun:
                best = r
    return {"llf": -float(best.fun), "theta": [float(t) for t in best.x[:k]],
            "sigma2": float(np.exp(best.x[k])) if profiled else None}


def structures_data(seed=11):
    """16 groups g, 3 subgroups h each, 2-3 rows per subgroup; moderators x1, x2."""
    rng = np.random.default_rng(seed)
    rows = []
    for g in range(16):
        u = rng.multivariate_normal([0, 0, 0], [[.3, .1, .05], [.1, .2, .05], [.05, .05, .25]])
        for h in range(3):
            uh = rng.normal(0, 0.3, 2)
            for _ in range(rng.integers(2, 4)):
                x1, x2 = rng.normal(size=2)
                v = rng.uniform(0.05, 0.2)
                y = (0.2 + 0.3 * x1 - 0.1 * x2 + u[0] * x1 + u[1] * x2 + u[2] + uh[0] * x1 + uh[1]
                     + rng.normal(0, np.sqrt(v)))
                rows.append((g, h, x1, x2, v, y))
    return pd.DataFrame(rows, columns=["g", "h", "x1", "x2", "v", "y"])


def dense_sigma(kind, q, p):
    """Sigma of a structure from unconstrained parameters p; (Sigma, parameters used)."""
    if kind == "identity":
        return np.eye(q) * p[0] ** 2, 1
    if kind == "independent":
        return np.diag(p[:q] ** 2), q
    if kind == "exchangeable":
        s, r = p[0], np.tanh(p[1])
        return s ** 2 * ((1 - r) * np.eye(q) + r * np.ones((q, q))), 2
    if kind == "unstructured":
        L = np.zeros((q, q))
        L[np.tril_indices(q)] = p[: q * (q + 1) // 2]
        return L @ L.T, q * (q + 1) // 2
    if kind == "custom":     # sds equal ("a"), correlations free
        R = np.eye(q)
        k = 1
        for i in range(q):
            for j in range(i + 1, q):
                R[i, j] = R[j, i] = np.tanh(p[k])
                k += 1
        return p[0] ** 2 * R, k
    raise ValueError(kind)


STRUCTURE_PAIRS = [("independent", "identity"), ("exchangeable", "independent"),
                   ("identity", "unstructured"), ("unstructured", "exchangeable"),
                   ("custom", "identity")]


def dense_structures(df, k3, k2, method):
    n = len(df)
    y = df.y.to_numpy()
    X = np.column_stack([df.x1, df.x2, np.ones(n)])
    Z = [np.column_stack([df.x1, df.x2, np.ones(n)]), np.column_stack([df.x1, np.ones(n)])]
    groups = [df.g.to_numpy(), (df.g * 10 + df.h).to_numpy()]
    Bs = [B.reshape(n, G, -1) for B, G in dense_Z(Z, groups)]

    def sigmas(p):
        S3, n3 = dense_sigma(k3, 3, p)
        S2, _ = dense_sigma(k2, 2, p[n3:])
        return S3, S2

    def negll(p):
        V = np.diag(df.v.to_numpy()) + sum(np.einsum("ngq,qr,mgr->nm", B, S, B, optimize=True)
                                           for B, S in zip(Bs, sigmas(p)))
        try:
            return -dense_loglik(y, X, V, method)[0]
        except np.linalg.LinAlgError:
            return np.inf

    n_par = dense_sigma(k3, 3, np.ones(10))[1] + dense_sigma(k2, 2, np.ones(10))[1]
    best = None
    for start in (np.full(n_par, 0.3), np.full(n_par, 0.1)):
        r = optimize.minimize(negll, start, method="BFGS", options={"gtol": 1e-8})
        if best is None or r.fun < best.fun:
            best = r
    S3, S2 = sigmas(best.x)
    V = dense_V(Z, groups, [S3, S2], df.v.to_numpy())
    beta = dense_loglik(y, X, V, method)[1]
    return {"llf": -float(best.fun), "Sigma_g": S3.tolist(), "Sigma_gh": S2.tolist(),
            "beta": [float(b) for b in beta]}


CUSTOM3 = [[None, .9, .9], [.9, None, None], [.9, None, None]]


def custom3_data(seed=0):
    """40 groups x 5 rows, effects (x1, x2, _cons) with corr(x2, _cons) = -0.9 in the
    generating Sigma, which the fixed correlations of CUSTOM3 (0.9, 0.9) rule out."""
    rng = np.random.default_rng(seed)
    S = np.array([[1, -0.5, 0.5], [-0.5, 1, -0.9], [0.5, -0.9, 1.0]]) * 0.3 + 0.05 * np.eye(3)
    rows = []
    for g in range(40):
        u = rng.multivariate_normal(np.zeros(3), S)
        for _ in range(5):
            x = rng.normal(size=2)
            v = rng.uniform(0.05, 0.2)
            y = 0.1 + x @ (np.array([0.2, -0.1]) + u[:2]) + u[2] + rng.normal(0, np.sqrt(v))
            rows.append((g, *x, v, y))
    return pd.DataFrame(rows, columns=["g", "x1", "x2", "v", "y"])


def dense_custom3(df, method):
    """Free SDs (>= 0) and the free correlation; Nelder-Mead from several starts."""
    s = make_structure(CUSTOM3, ["x1", "x2", "_cons"])
    n = len(df)
    X = np.column_stack([df.x1, df.x2, np.ones(n)])

    def negll(th):
        if np.any(th[:3] < 0) or abs(th[3]) >= 1:
            return 1e10
        sd, R = s._sd_R(th)
        if np.linalg.eigvalsh(R).min() <= 0:
            return 1e10
        V = dense_V([X], [df.g.to_numpy()], [s.Sigma(th)], df.v.to_numpy())
        return -dense_loglik(df.y.to_numpy(), X, V, method)[0]

    best = None
    for start in ([1, 1, 1, 0.7], [0.5, 0.5, 0.5, 0.8], [1, 0.1, 1, 0.9], [2, 1, 1, 0.75]):
        r = optimize.minimize(negll, start, method="Nelder-Mead",
                              options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 20000,
                                       "maxfev": 40000})
        if best is None or r.fun < best.fun:
            best = r
    return {"llf": -float(best.fun), "theta": [float(t) for t in best.x]}


def dense_schoolcal_uncentred(method):
    """schoolcal with an independent random slope on the uncentred year:
    ``stdmdiff ~ year + (1 + year || district) + (1 | district:school)``; the SDs by
    Nelder-Mead from several starts (sign-free: the SD is |p|)."""
    sys.path.insert(0, str(HERE.parent.parent / "src"))
    df = pd.read_csv(HERE.parent.parent / "src" / "mlmeta" / "datasets" / "schoolcal.csv")
    n = len(df)
    X = np.column_stack([df.year, np.ones(n)])
    Z = [X.copy(), np.ones((n, 1))]
    groups = [df.district.to_numpy(), (df.district * 100 + df.school).to_numpy()]

    def negll(p):
        S = [np.diag([p[0] ** 2, p[1] ** 2]), np.array([[p[2] ** 2]])]
        V = dense_V(Z, groups, S, df["var"].to_numpy())
        return -dense_loglik(df.stdmdiff.to_numpy(), X, V, method)[0]

    best = None
    for start in ([0.01, 0.3, 0.2], [0.001, 1, 0.1], [0.05, 5, 0.2], [0.0, 0.25, 0.18],
                  [0.02, 40, 0.2]):
        r = optimize.minimize(negll, start, method="Nelder-Mead",
                              options={"xatol": 1e-12, "fatol": 1e-13, "maxiter": 40000,
                                       "maxfev": 80000})
        if best is None or r.fun < best.fun:
            best = r
    return {"llf": -float(best.fun), "sd": [float(abs(t)) for t in best.x]}


def main():
    out = {cid: dense_optimum(cid) for cid in case_ids()}
    (HERE / "dense_optima.json").write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(out)} engine cases")
    df = structures_data()
    df.to_csv(HERE / "data" / "structures_synthetic.csv", index=False, float_format="%.17g")
    df = pd.read_csv(HERE / "data" / "structures_synthetic.csv")
    out = {f"{k3}-{k2}-{m}": dense_structures(df, k3, k2, m)
           for k3, k2 in STRUCTURE_PAIRS for m in ("reml", "ml")}
    df3 = custom3_data()
    df3.to_csv(HERE / "data" / "custom3_synthetic.csv", index=False, float_format="%.17g")
    df3 = pd.read_csv(HERE / "data" / "custom3_synthetic.csv")
    for m in ("reml", "ml"):
        out[f"custom3-fixedcorr-{m}"] = dense_custom3(df3, m)
        out[f"schoolcal-uncentred-{m}"] = dense_schoolcal_uncentred(m)
    (HERE / "dense_structures.json").write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(out)} structure cases")


if __name__ == "__main__":
    main()
