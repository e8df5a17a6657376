"""Random-design harness: seeded random models fitted in subprocesses and checked
against a dense likelihood.

Cases come from :mod:`fuzz_cases` (1-5 nested levels, random slopes under every
structure, crossed terms, ``V=`` blocks up to singular, ``mixed``, ``Model.fit`` and
``fit_batch``, extreme-but-legal scales). Case ``IDX`` of a run with ``--seed SEED``
is drawn from ``numpy.random.default_rng([SEED, IDX])``; ``--case SEED:IDX`` fits it
again in this process and prints what happened.

Workers are subprocesses that print one JSON line per case; a worker that dies or
goes silent for ``--timeout`` seconds costs that case (``crash`` / ``hang``) and a
new worker carries on with the next one. Each case ends with the flags it earned:

* ``crash``    the worker process died on it
* ``hang``     no answer within ``--timeout`` s
* ``slow``     the fit took over ``--slow`` s (default 30) while n < 2,000
* ``error``    an exception other than ValueError (fit or postestimation)
* ``warn``     a warning that is not one of mlmeta's documented ones (RuntimeWarning, ...)
* ``nan``      a non-finite log-likelihood, estimate or SE without an error
* ``singular`` a sampling covariance with a block of correlation exactly 1 was accepted
* ``wrong``    the reported log-likelihood differs from the dense one at the estimates
* ``below``    dense quasi-Newton steps from the estimates raise the log-likelihood
* ``missed``   a dense optimisation from another start reaches a higher optimum
* ``nonstat``  converged=True although a local dense step raises llf by more than 1e-3
* ``threads``  fit_batch gives different numbers from 1 and 8 threads
* ``invariance`` reordering the rows and relabelling the groups changes the fit
* ``ok`` / ``refused`` none of these (``refused``: a ValueError)

"wrong", "below" and "missed" use the tolerance 1e-4 + 1e-9 |llf|. The dense
likelihood is :func:`dense.dense_deviance` (tests/dense.py): one QR factorisation of
the penalised least-squares problem, accurate at any variance ratio.

    python tools/fuzz.py --fits 10000 --out fuzz.jsonl        # the full run
    python tools/fuzz.py --fits 2000 --start 4000 --seed 1     # one chunk of it
    python tools/fuzz.py --case 1:4711                         # one case, in detail
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import queue
import subprocess
import sys
import threading
import time
import traceback
import warnings

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")       # small dense blocks: threaded BLAS only costs here

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(os.path.dirname(HERE), "tests")]

FAILURES = ("crash", "hang", "slow", "error", "warn", "nan", "singular", "wrong", "below",
            "missed", "nonstat", "threads", "invariance")


def _tol(ll):
    return 1e-4 + 1e-9 * abs(ll)


# --------------------------------------------------------------------------- #
# the dense oracle on a fitted model
# --------------------------------------------------------------------------- #

class Oracle:
    """The dense deviance of a fitted NestedModel as a function of its theta (and of
    another outcome vector, sorted as the design), with per-parameter scales for a
    dense optimiser: theta_i / s_i is of order one."""

    def __init__(self, model, y=None):
        from dense import DenseDeviance

        self.m = model
        d = model.design
        self.y = d.y if y is None else y
        self.profiled = model.residual == "profiled"
        self.Lam = None if self.profiled else (d.Lambda.toarray() if d.Lambda is not None
                                               else d.variance)
        self._dd = DenseDeviance(self.y, d.X, d.Z, d.groups, self.Lam, model.method,
                                 cluster=d.groups[0])
        self.lower, self.upper = model.lower, model.upper
        self.scale = self._scales()

    def dev(self, theta):
        try:
            Ts = self.m.T_list(np.asarray(theta, dtype=float))
            with np.errstate(all="ignore"):
                out = self._dd(Ts)[0]
        except (FloatingPointError, np.linalg.LinAlgError, ValueError):
            return np.inf
        return out if np.isfinite(out) else np.inf

    def _scales(self):
        """The size of a parameter that makes its effects' variance that of the outcome."""
        d = self.m.design
        X = d.X
        r = self.y - X @ np.linalg.lstsq(X, self.y, rcond=None)[0] if X.shape[1] else self.y
        sd_y = max(float(np.std(r)), 1e-300)
        if self.profiled:
            sd_y = max(sd_y / max(float(np.sqrt(np.mean(r * r))), 1e-300), 1e-3)
        out = np.ones(self.m.n_theta)
        for s, sl, Z in zip(self.m.structs, self.m.theta_slices, d.Z):
            rms = np.sqrt(np.mean(Z * Z, axis=0))
            eff = np.where(rms > 0, sd_y / np.where(rms > 0, rms, 1.0), sd_y)
            for k, i in enumerate(range(sl.start, sl.stop)):
                if s.kind == "custom":
                    if k < len(s._sd_free):
                        out[i] = float(np.exp(np.mean(np.log(eff[s._sd_free[k]]))))
                    continue
                rows = np.flatnonzero(np.any(s.dT(np.zeros(s.n_theta))[k] != 0, axis=1))
                out[i] = float(np.exp(np.mean(np.log(eff[rows])))) if rows.size else sd_y
        return out

    def maximise(self, theta0, maxiter=100):
        """(llf, theta) of L-BFGS-B on the dense deviance from theta0 (scaled variables);
        at least the value at theta0 itself."""
        from scipy import optimize

        at0 = -0.5 * self.dev(theta0)
        if self.m.n_theta == 0:
            return at0, np.asarray(theta0, dtype=float)
        s = self.scale
        lo, up = self.lower / s, self.upper / s
        bounds = list(zip(np.where(np.isinf(lo), None, lo), np.where(np.isinf(up), None, up)))
        z0 = np.clip(np.asarray(theta0, dtype=float) / s, lo, up)

        def f(z):
            v = self.dev(z * s)
            return v if np.isfinite(v) else 1e300

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = optimize.minimize(f, z0, method="L-BFGS-B", bounds=bounds,
                                  options={"maxiter": maxiter})
        if not -0.5 * float(r.fun) > at0:        # (theta0 / s) * s may round off an edge
            return at0, np.asarray(theta0, dtype=float)
        return -0.5 * float(r.fun), r.x * s

    def starts(self, rng):
        """A moment-like start and a random one (scaled units), for a global search."""
        k = self.m.n_theta
        sd_like = (self.lower == 0)
        corr_like = np.isfinite(self.lower) & (self.lower < 0)
        a = np.where(sd_like, 0.5, 0.0)
        b = np.where(sd_like, rng.uniform(0.05, 2.0, k),
                     np.where(corr_like, rng.uniform(-0.5, 0.5, k), rng.uniform(-1.0, 1.0, k)))
        return [a * self.scale, b * self.scale]


def dense_checks(model, theta, llf, converged, rng, y=None, global_search=True):
    """The oracle's flags for one fitted parameter vector, and a detail string."""
    o = Oracle(model, y)
    flags, detail = [], []
    ll_at = -0.5 * o.dev(theta)
    if not abs(ll_at - llf) <= _tol(llf):
        flags.append("wrong")
        detail.append(f"llf {llf:.10g} vs dense {ll_at:.10g} at the estimates")
    info = {"llf": llf, "dense_at": ll_at, "converged": bool(converged)}
    if not np.isfinite(ll_at):
        return flags, "; ".join(detail), info
    ll_loc, _ = o.maximise(theta)
    info["dense_local"] = ll_loc
    if ll_loc - llf > _tol(llf):
        flags.append("below")
        detail.append(f"dense steps from the estimates reach {ll_loc:.10g} (llf {llf:.10g})")
    if converged and ll_loc - llf > 1e-3:
        flags.append("nonstat")
    if global_search:
        best = max(ll_loc, *[o.maximise(t0, maxiter=200)[0] for t0 in o.starts(rng)])
        if best - max(llf, ll_loc) > _tol(llf):
            flags.append("missed")
            detail.append(f"dense optimum from another start {best:.10g} (llf {llf:.10g})")
        info["dense_best"] = best
    return flags, "; ".join(detail), info


# --------------------------------------------------------------------------- #
# one case
# --------------------------------------------------------------------------- #

def _fit(case, data=None, V=None):
    import mlmeta

    data = case.data if data is None else data
    kw = dict(method=case.method, covariance=case.covariance)
    sampling = dict(case.sampling)
    if V is not None:
        sampling["V"] = V
    if case.api in ("meregress", "V"):
        return mlmeta.meregress(case.formula, data, **sampling, **kw)
    if case.api == "mixed":
        return mlmeta.mixed(case.formula, data, **kw)
    m = mlmeta.Model(case.formula, data, **sampling, **kw)
    if case.api == "model":
        return m.fit()
    return m


def _finite_result(res):
    vals = [np.atleast_1d(res.llf), res.params.values, res.bse.values,
            res.re_params()["estimate"].to_numpy(dtype=float)]
    return all(np.all(np.isfinite(v)) for v in vals)


def _relabelled(case, rng):
    """The case's data with rows shuffled and every grouping variable relabelled."""
    df = case.data
    perm = rng.permutation(len(df))
    out = df.iloc[perm].reset_index(drop=True)
    for c in [c for c in out.columns if c.startswith("g") or c == "k"]:
        u = np.unique(out[c])
        out[c] = out[c].map(dict(zip(u, rng.permutation(u) + 7)))
    V = case.sampling.get("V")
    return out, (None if V is None else V[np.ix_(perm, perm)])


def _documented(w):
    from mlmeta._errors import BoundaryWarning, ConvergenceWarning, MissingDataWarning

    return issubclass(w.category, (BoundaryWarning, ConvergenceWarning, MissingDataWarning)) or \
        w.category is UserWarning


def run_case(seed, idx, verbose=False):
    """Fit case (seed, idx) and check it; returns a dict (flags, detail, seconds, ...)."""
    from fuzz_cases import make_case

    case = make_case(seed, idx)
    rng = np.random.default_rng([seed, idx, 1])
    out = {"case": f"{seed}:{idx}", "api": case.api, "n": len(case.data), "flags": [],
           "detail": "", "warnings": []}
    if verbose:
        print(case.describe())
    flags, detail = [], []
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            res = _fit(case)
            if case.api == "batch":
                import mlmeta

                res = (res, mlmeta.fit_batch(res, case.Y, n_jobs=1))
            out["seconds"] = round(time.perf_counter() - t0, 3)
            if case.singular_V:
                flags.append("singular")
                detail.append("a V block with correlation 1 was accepted")
            if case.api == "batch":
                f, dt = _check_batch(res, case, rng, out)
            else:
                f, dt = _check_result(res, case, rng, out)
            flags += f
            detail += dt
        except ValueError as exc:
            out["seconds"] = round(time.perf_counter() - t0, 3)
            out["refused"] = str(exc)[:300]
            if verbose:
                traceback.print_exc()
        except Exception as exc:  # the harness counts these
            out["seconds"] = round(time.perf_counter() - t0, 3)
            flags.append("error")
            detail.append(f"{type(exc).__name__}: {str(exc)[:300]}")
            if verbose:
                traceback.print_exc()
    for w in caught:
        out["warnings"].append(f"{w.category.__name__}: {str(w.message)[:120]}")
        if not _documented(w) and "warn" not in flags:
            flags.append("warn")
            detail.append(f"{w.category.__name__}: {str(w.message)[:200]} ({w.filename}:{w.lineno})")
    if out.get("seconds", 0) > SLOW and len(case.data) < 2000:
        flags.append("slow")
        detail.append(f"{out['seconds']} s")
    out["flags"] = sorted(set(flags), key=FAILURES.index)
    out["detail"] = "; ".join(detail)
    out["status"] = out["flags"][0] if out["flags"] else ("refused" if "refused" in out else "ok")
    return out


SLOW = 30.0


def _check_result(res, case, rng, out):
    flags, detail = [], []
    str(res.summary())                # postestimation must not raise either
    if rng.random() < 0.2:
        res.random_effects()
    if not _finite_result(res):
        flags.append("nan")
        detail.append(f"llf {res.llf}, params {res.params.values}, bse {res.bse.values}")
        return flags, detail
    f, dt, out["oracle"] = dense_checks(res.model, res.theta, res.llf, res.converged, rng)
    out["messages"] = list(res.fit_record.messages)
    out["n_evals"] = int(res.fit_record.n_evals)
    flags += f
    detail += [dt] if dt else []
    if case.api != "model" and rng.random() < 0.125:
        data, V = _relabelled(case, rng)
        try:
            res2 = _fit(case, data, V)
            if abs(res2.llf - res.llf) > _tol(res.llf):
                flags.append("invariance")
                detail.append(f"llf {res.llf:.10g}, reordered {res2.llf:.10g}")
        except ValueError as exc:
            flags.append("invariance")
            detail.append(f"reordered data refused: {exc}")
    return flags, detail


def _check_batch(fitted, case, rng, out):
    import mlmeta

    flags, detail = [], []
    Y = case.Y
    m, b1 = fitted
    out["n_evals"] = int(np.sum(b1.n_evals))
    b8 = mlmeta.fit_batch(m, Y, n_jobs=8)
    same = all(np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True) for a, b in
               ((b1.llf, b8.llf), (b1.theta, b8.theta), (b1.params, b8.params), (b1.bse, b8.bse)))
    if not same:
        flags.append("threads")
        detail.append("fit_batch with 1 and 8 threads differ")
    perm = m.model.design.perm
    for j in range(Y.shape[1]):
        vals = [b1.llf[j], b1.params.values[j], b1.bse.values[j], b1.theta[j]]
        if not all(np.all(np.isfinite(v)) for v in vals):
            try:
                m.fit(y=Y[:, j])
            except ValueError:
                continue               # refused alike by the single fit
            flags.append("nan")
            detail.append(f"column {j}: llf {b1.llf[j]}, converged {b1.converged[j]}")
            continue
        f, dt, info = dense_checks(m.model, b1.theta[j], float(b1.llf[j]), bool(b1.converged[j]),
                                   rng, y=Y[perm, j], global_search=(j == 0))
        out.setdefault("oracle", []).append(info)
        flags += f
        detail += [f"column {j}: {dt}"] if dt else []
    return flags, detail


# --------------------------------------------------------------------------- #
# workers and the run
# --------------------------------------------------------------------------- #

def worker(seed, start, stop):
    """Run cases start..stop-1 of ``seed``; one JSON line per case on stdout."""
    for idx in range(start, stop):
        print(json.dumps(run_case(seed, idx)), flush=True)


def _spawn(seed, start, stop):
    proc = subprocess.Popen([sys.executable, __file__, "--worker", str(seed), str(start), str(stop)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"})
    lines = queue.Queue()

    def pump():
        for ln in proc.stdout:
            lines.put(ln)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return proc, lines


def run_range(seed, start, stop, timeout, sink):
    """Cases start..stop-1 in worker subprocesses, restarting after a crash or hang."""
    idx = start
    while idx < stop:
        proc, lines = _spawn(seed, idx, stop)
        while idx < stop:
            try:
                ln = lines.get(timeout=timeout)
            except queue.Empty:
                proc.kill()
                sink({"case": f"{seed}:{idx}", "status": "hang", "flags": ["hang"],
                      "detail": f"no answer in {timeout:.0f} s"})
                idx += 1
                break
            if ln is None:              # the worker died
                proc.wait()
                err = proc.stderr.read()[-300:] if proc.stderr else ""
                sink({"case": f"{seed}:{idx}", "status": "crash", "flags": ["crash"],
                      "detail": f"exit {proc.returncode}: {err}"})
                idx += 1
                break
            if ln.startswith("{"):
                sink(json.loads(ln))
                idx += 1
        else:
            proc.wait()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fits", type=int, default=1000, help="number of cases")
    ap.add_argument("--start", type=int, default=0, help="first case index")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=1, help="worker processes side by side")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds without an answer = hang")
    ap.add_argument("--slow", type=float, default=30.0, help="seconds per fit counted as slow")
    ap.add_argument("--out", help="append one JSON line per case to this file")
    ap.add_argument("--show", type=int, default=5, help="examples printed per failure class")
    ap.add_argument("--case", help="SEED:IDX: fit one case here and print the details")
    ap.add_argument("--worker", nargs=3, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    global SLOW
    SLOW = args.slow
    if args.worker:
        worker(*args.worker)
        return 0
    if args.case:
        seed, idx = (int(v) for v in args.case.split(":"))
        r = run_case(seed, idx, verbose=True)
        print(json.dumps(r, indent=1))
        return 1 if r["flags"] else 0
    counts = collections.Counter()
    examples = collections.defaultdict(list)
    lock = threading.Lock()
    fh = open(args.out, "a") if args.out else None

    def sink(r):
        with lock:
            counts[r["status"]] += 1
            for f in r["flags"]:
                counts["flag:" + f] += 1
                examples[f].append(f"case {r['case']}: {r.get('detail', '')[:300]}")
            if fh:
                fh.write(json.dumps(r) + "\n")
                fh.flush()

    t0 = time.perf_counter()
    stop = args.start + args.fits
    cuts = np.linspace(args.start, stop, max(1, args.jobs) + 1).astype(int)
    threads = [threading.Thread(target=run_range, args=(args.seed, int(a), int(b), args.timeout, sink))
               for a, b in zip(cuts[:-1], cuts[1:]) if b > a]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if fh:
        fh.close()
    n_fail = sum(counts["flag:" + k] for k in FAILURES)
    print(f"{args.fits} fits in {time.perf_counter() - t0:.0f} s: ok {counts['ok']}, refused "
          f"{counts['refused']}, " + ", ".join(f"{k} {counts['flag:' + k]}" for k in FAILURES))
    for k in FAILURES:
        if examples[k]:
            print(f"\n{k}:")
            for e in examples[k][:args.show]:
                print("  " + e)
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
