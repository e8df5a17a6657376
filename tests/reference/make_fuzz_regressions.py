"""Cases of the random-design harness (tools/fuzz.py) that failed before the fixes of the
reliability work, stored as data so the tests do not depend on the harness's generator:
``tests/reference/data/fuzz/<case>.csv`` (and ``<case>_V.csv``, ``<case>_Y.csv``) and
``tests/reference/fuzz_regressions.json`` with the model, what went wrong, and the
dense likelihood's best optimum (tests/dense.py's factorisation, maximised by L-BFGS-B
from the fit's estimates and from three other starts, the best of them kept).

    python tests/reference/make_fuzz_regressions.py
"""

import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path[:0] = [str(ROOT / "tools"), str(ROOT / "tests")]

import fuzz  # noqa: E402
from fuzz_cases import make_case  # noqa: E402

#: case -> what the fit did before the fixes
CASES = {
    "1:0": "mixed(): summary() raised FloatingPointError from the Satterthwaite differences "
           "(a custom level's correlations at the edge of the positive definite set)",
    "1:975": "llf 9.8e-3 below the dense optimum from its estimates (a custom level at the edge "
             "of the positive definite set)",
    "1:1759": "a local optimum 0.40 below another (identity levels: which level carries the "
              "variance)",
    "1:1894": "fit_batch: llf 7.7e-3 below the dense optimum from its estimates (an exchangeable "
              "level over uncentred years)",
    "1:772": "fit_batch: llf below the dense optimum from its estimates and below another optimum",
    "1:1656": "llf 0.52 below the optimum reached from half the natural scale in the model's own "
              "basis (the fit was made in the well-scaled basis of uncentred years)",
    "1:9650": "llf 0.62 below the optimum reached from half the natural scale in the model's own "
              "basis (the fit was made in the well-scaled basis)",
    "1:368": "llf 1.2e-3 below the dense optimum from its estimates (a custom level at the edge of "
             "its positive definite set: the well-scaled basis's steps stalled there)",
    "1:205": "refused after a refinement in the model's own basis 'gained' 1.2e-5 of deviance by "
             "rounding where the random effects' precision is badly conditioned (kappa 2e15)",
}


def main():
    out = {}
    data_dir = HERE / "data" / "fuzz"
    data_dir.mkdir(parents=True, exist_ok=True)
    for cid, what in CASES.items():
        seed, idx = (int(v) for v in cid.split(":"))
        case = make_case(seed, idx)
        stem = f"case_{seed}_{idx}"
        case.data.to_csv(data_dir / f"{stem}.csv", index=False)
        spec = {"api": case.api, "formula": case.formula, "method": case.method,
                "covariance": case.covariance, "data": f"tests/reference/data/fuzz/{stem}.csv",
                "before": what}
        if "V" in case.sampling:
            np.savetxt(data_dir / f"{stem}_V.csv", case.sampling["V"], delimiter=",")
            spec["V"] = f"tests/reference/data/fuzz/{stem}_V.csv"
        else:
            spec["sampling"] = case.sampling
        fitted = fuzz._fit(case)
        rng = np.random.default_rng([seed, idx, 7])
        if case.api == "batch":
            np.savetxt(data_dir / f"{stem}_Y.csv", case.Y, delimiter=",")
            spec["Y"] = f"tests/reference/data/fuzz/{stem}_Y.csv"
            import mlmeta

            b = mlmeta.fit_batch(fitted, case.Y, n_jobs=1)
            perm = fitted.model.design.perm
            spec["dense_llf"] = [_best(fitted.model, b.theta[j], rng, case.Y[perm, j])
                                 for j in range(case.Y.shape[1])]
        else:
            spec["dense_llf"] = _best(fitted.model, fitted.theta, rng)
        out[stem] = spec
    (HERE / "fuzz_regressions.json").write_text(json.dumps(out, indent=1) + "\n")


def _best(model, theta, rng, y=None):
    o = fuzz.Oracle(model, y)
    starts = [theta] + o.starts(rng) + o.starts(rng)[1:]
    return max(o.maximise(t, maxiter=300)[0] for t in starts)


if __name__ == "__main__":
    main()
