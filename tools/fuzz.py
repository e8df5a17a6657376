"""Random-design harness: many fits of seeded random nested models, each checked
against a dense NumPy likelihood.

Every batch of fits runs in its own subprocess (a crash or a hang costs one batch and is
counted, not the run). For each fit the harness records

* ``crash``   the worker process died (no result for the rest of its batch),
* ``hang``    the batch ran past ``--timeout`` seconds,
* ``error``   an exception other than a ValueError that names bad input,
* ``nan``     a fit that returned a non-finite log-likelihood, estimate or SE silently,
* ``wrong``   the reported log-likelihood differs from the dense one at the reported
              parameters by more than 1e-6 relative,
* ``below``   a few quasi-Newton steps of the dense likelihood, started at the
              reported parameters, raise it by more than 1e-4 (a missed optimum),
* ``ok``      none of these (``refused``: a ValueError, counted apart).

Designs: 1-3 nested levels, 0 or 1 random slope per level under a random structure,
ML or REML, known sampling variances, a full sampling covariance V (rows coupled
within the lowest groups), or raw data with the residual variance profiled out
(``mlmeta.mixed``).

    python tools/fuzz.py --fits 10000 --batch 250          # the full run
    python tools/fuzz.py --fits 200 --seed 1               # a quick look
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import time
import warnings

import numpy as np

STRUCTURES = ("identity", "independent", "exchangeable", "unstructured")


def _design(rng):
    """A random nested design: (frame as dict of arrays, formula, options)."""
    import pandas as pd

    n_levels = int(rng.integers(1, 4))
    n_top = int(rng.integers(4, 16))
    rows = []
    for a in range(n_top):
        for b in range(int(rng.integers(1, 4)) if n_levels >= 2 else 1):
            for c in range(int(rng.integers(1, 3)) if n_levels >= 3 else 1):
                rows += [(a, b, c)] * int(rng.integers(1, 4))
    ids = np.array(rows)
    n = ids.shape[0]
    x = rng.normal(size=n) * rng.choice([1.0, 10.0, 0.1])
    df = pd.DataFrame({"a": ids[:, 0], "b": ids[:, 1], "c": ids[:, 2], "x": x})
    names = ["a", "a:b", "a:b:c"][:n_levels]
    terms, cov = [], {}
    for lvl, g in enumerate(names):
        slope = lvl == 0 and rng.random() < 0.4
        if slope:
            s = str(rng.choice(STRUCTURES))
            terms.append(f"(1 + x | {g})")
            cov[g] = s
        else:
            terms.append(f"(1 | {g})")
    u = sum(rng.normal(scale=rng.uniform(0.05, 1.0), size=n)[pd.factorize(
        df[g.split(":")].astype(str).agg("-".join, axis=1))[0]] for g in names)
    kind = str(rng.choice(["variance", "V", "mixed"], p=[0.5, 0.2, 0.3]))
    v = rng.uniform(0.02, 0.5, n)
    y = 0.3 + 0.2 * x + u + rng.normal(size=n) * (np.sqrt(v) if kind != "mixed" else 0.5)
    df["y"], df["v"] = y, v
    method = str(rng.choice(["reml", "ml"]))
    formula = "y ~ x + " + " + ".join(terms)
    return df, formula, dict(kind=kind, method=method, covariance=cov)


def _V(df, rng):
    """Block-diagonal V: rows of one lowest group correlated (rho in 0.2..0.8)."""
    n = len(df)
    V = np.diag(df.v.to_numpy())
    key = df.a * 10000 + df.b * 100 + df.c
    for k in np.unique(key):
        r = np.flatnonzero(key == k)
        if r.size > 1:
            sd = np.sqrt(df.v.to_numpy()[r])
            rho = rng.uniform(0.2, 0.8)
            V[np.ix_(r, r)] = rho * np.outer(sd, sd) + np.diag((1 - rho) * sd ** 2)
    assert V.shape == (n, n)
    return V


def _check(res, method):
    """(status, detail) of one fitted result against the dense likelihood."""
    from scipy import optimize

    sys.path.insert(0, __file__.rsplit("/tools/", 1)[0] + "/tests")
    from dense import dense_loglik, dense_V

    m = res.model
    d = m.design
    vals = np.concatenate([np.atleast_1d(res.llf), res.params.values, res.bse.values])
    if not np.all(np.isfinite(vals)):
        return "nan", f"llf {res.llf}, params {res.params.values}, bse {res.bse.values}"
    profiled = m.residual == "profiled"
    Lam = (d.Lambda.toarray() if d.Lambda is not None
           else np.diag(d.variance) if d.variance is not None else np.eye(d.n_obs))

    def dense(theta, s2):
        return dense_loglik(d.y, d.X, s2 * dense_V(d.Z, d.groups, m.Sigma_list(theta), Lam),
                            method)[0]

    s2 = m.evaluate(res.theta).sigma2 if profiled else 1.0
    ll = dense(res.theta, s2)
    if abs(ll - res.llf) > 1e-6 * max(1.0, abs(ll)):
        return "wrong", f"llf {res.llf} vs dense {ll}"
    x0 = np.append(res.theta, np.log(s2)) if profiled else np.asarray(res.theta, dtype=float)
    k = m.n_theta
    bounds = list(zip(np.where(np.isinf(m.lower), None, m.lower),
                      np.where(np.isinf(m.upper), None, m.upper)))
    bounds += [(None, None)] if profiled else []

    def negll(p):
        try:
            return -dense(p[:k], float(np.exp(p[k])) if profiled else 1.0)
        except (np.linalg.LinAlgError, FloatingPointError, ValueError):
            return 1e10

    r = optimize.minimize(negll, x0, method="L-BFGS-B", bounds=bounds,
                          options={"maxiter": 30})
    if -r.fun > ll + 1e-4 * max(1.0, abs(ll)):
        return "below", f"llf {res.llf}, dense steps reach {-r.fun}"
    return "ok", ""


def worker(seed, count):
    """Fit ``count`` random designs from ``seed``; one JSON line per fit on stdout."""
    import mlmeta

    warnings.simplefilter("ignore")
    for i in range(count):
        rng = np.random.default_rng([seed, i])
        t0 = time.perf_counter()
        try:
            df, formula, opt = _design(rng)
            if opt["kind"] == "mixed":
                res = mlmeta.mixed(formula, df, method=opt["method"], covariance=opt["covariance"])
            elif opt["kind"] == "V":
                res = mlmeta.meregress(formula, df, V=_V(df, rng), method=opt["method"],
                                       covariance=opt["covariance"])
            else:
                res = mlmeta.meregress(formula, df, variance="v", method=opt["method"],
                                       covariance=opt["covariance"])
            status, detail = _check(res, opt["method"])
        except ValueError as exc:
            status, detail = "refused", str(exc)[:200]
        except Exception as exc:  # the harness counts these
            status, detail = "error", f"{type(exc).__name__}: {str(exc)[:200]}"
        print(json.dumps({"seed": seed, "i": i, "status": status, "detail": detail,
                          "seconds": round(time.perf_counter() - t0, 3)}), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fits", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per batch")
    ap.add_argument("--worker", nargs=2, type=int, metavar=("SEED", "COUNT"), help=argparse.SUPPRESS)
    ap.add_argument("--show", type=int, default=5, help="examples printed per failure class")
    args = ap.parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return 0
    counts = collections.Counter()
    examples = collections.defaultdict(list)
    t0 = time.perf_counter()
    n_batches = -(-args.fits // args.batch)
    for b in range(n_batches):
        count = min(args.batch, args.fits - b * args.batch)
        seed = args.seed * 100_000 + b
        try:
            proc = subprocess.run([sys.executable, __file__, "--worker", str(seed), str(count)],
                                  capture_output=True, text=True, timeout=args.timeout)
            lines = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode != 0:
                counts["crash"] += count - len(lines)
                examples["crash"].append(f"batch seed {seed}: exit {proc.returncode} "
                                         f"{proc.stderr[-200:]}")
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            lines = [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")]
            counts["hang"] += count - len(lines)
            examples["hang"].append(f"batch seed {seed}: fit {len(lines)} ran past the timeout")
        for r in lines:
            counts[r["status"]] += 1
            if r["status"] not in ("ok", "refused"):
                examples[r["status"]].append(f"seed {r['seed']} fit {r['i']}: {r['detail']}")
    print(f"{args.fits} fits in {time.perf_counter() - t0:.0f} s: "
          + ", ".join(f"{k} {counts[k]}" for k in
                      ("ok", "refused", "crash", "hang", "error", "nan", "wrong", "below")))
    for k, ex in examples.items():
        print(f"\n{k}:")
        for e in ex[:args.show]:
            print("  " + e)
    bad = sum(counts[k] for k in ("crash", "hang", "error", "nan", "wrong", "below"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
