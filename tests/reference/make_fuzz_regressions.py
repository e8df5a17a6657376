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
    # a custom level's optimum on the edge of its positive definite set: reported not
    # converged, stopped where rounding put the edge (the answer moved with the row order)
    "1:142": "not converged at the PD edge of a custom level (one free correlation); llf "
             "-71.79760 and -71.81254 for two row orders (the optimum on the edge: -71.73485)",
    "1:602": "not converged at the PD edge (fixed SD and correlations, one free); llf 65.79337 "
             "and 65.79364 for two row orders (the optimum on the edge: 65.79380)",
    "1:2234": "not converged at the PD edge (all correlations free, a fixed SD, rank-one R); "
              "llf -283.30830 and -283.30881 for two row orders (optimum -283.30798)",
    "1:4857": "not converged at the PD edge (a fixed SD and correlation); llf -124.23057 and "
              "-124.23312 for two row orders (the optimum on the edge: -124.19383)",
    "1:5849": "not converged at the PD edge (two fixed SDs); llf -47.91366 and -47.91270 for two "
              "row orders (the optimum on the edge: -47.83905)",
    "1:3251": "converged fits 2.8e-2 apart for two row orders (one stopped short at the PD edge "
              "of a custom level with a fixed correlation)",
    "1:1348": "fit_batch: column 0 at llf -12.55823, below optima on the PD edge (-12.54699) that "
              "the extra starts only reached by stalling next to the edge",
    "1:8124": "a shared-label custom pattern: llf -200.38351, the optimum on the PD edge "
              "-200.29190 (only a random start came near)",
    "1:8972": "crossed term, tau^2/v ~ 1e10: stopped at a variance 1e-2 of its natural size off "
              "zero (llf 109.84890), the optimum on zero at 109.84982",
    "1:9136": "fit_batch (uncentred years): column 1 at llf -98.86101, dense steps from there "
              "reached -98.86019 (the optimum on a custom level's PD edge: -98.65513)",
    "1:5751": "an exchangeable 2 x 2 level at correlation +1 (llf -697.85177) for one row order "
              "and at -1 (llf -697.85068, the optimum) for another",
    "1:789": "llf -67.75066 where the optimum is -64.05842: the starts at the natural scale, "
             "explored by BFGS updates, settled in another basin than full Newton steps reach",
    "1:4122": "an interior fit (llf 0.91 below the optimum) whose better optimum only a "
              "level at zero and the starts away from the EM path reach",
    "1:41": "an interior fit of a random intercept with a full V, 4.8 below the optimum that "
            "the EM start shrunk and inflated reach",
}
#: cases whose answer must not depend on the row order (the tests refit them reordered)
INVARIANT = ("1:142", "1:4857", "1:2234", "1:5849", "1:5751")
#: batch cases fitted with the extra starts (safeguard="auto", as the harness does)
SAFEGUARD = ("1:1348", "1:9136")


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

            safeguard = "auto" if cid in SAFEGUARD else False
            if cid in SAFEGUARD:
                spec["safeguard"] = safeguard
            b = mlmeta.fit_batch(fitted, case.Y, n_jobs=1, safeguard=safeguard)
            perm = fitted.model.design.perm
            spec["dense_llf"] = [_best(fitted.model, b.theta[j], rng, case.Y[perm, j])
                                 for j in range(case.Y.shape[1])]
        else:
            spec["dense_llf"] = _best(fitted.model, fitted.theta, rng)
        if cid in INVARIANT:
            spec["invariant"] = True
        out[stem] = spec
    (HERE / "fuzz_regressions.json").write_text(json.dumps(out, indent=1) + "\n")


def _best(model, theta, rng, y=None):
    o = fuzz.Oracle(model, y)
    starts = [theta] + o.starts(rng) + o.starts(rng)[1:]
    return max(o.maximise(t, maxiter=300)[0] for t in starts)


if __name__ == "__main__":
    main()
