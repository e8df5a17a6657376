"""Dense-likelihood optima for the engine parity suite (tests/test_engine_parity.py).

For each case of tests/engine_cases.py the log-likelihood is computed by brute force
(V formed as an n x n matrix, DESIGN.md section 1) and maximised by scipy's L-BFGS-B
from several starts, with numerical gradients; the residual variance of the
profiled cases is a free parameter here (log sigma^2). The best optimum found is
written to dense_optima.json. No part of mlmeta's fitting engine is used; the
covariance structures' theta -> Sigma maps come from mlmeta.covstruct.

    python tests/reference/make_dense_optima.py      # about a minute
"""

import json
import sys
from pathlib import Path

import numpy as np
from scipy import optimize

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from dense import dense_loglik, dense_V  # noqa: E402
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


def main():
    out = {cid: dense_optimum(cid) for cid in case_ids()}
    (HERE / "dense_optima.json").write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(out)} cases")


if __name__ == "__main__":
    main()
