"""How fit time and memory grow with the number of effect sizes.

Prints one table, all measured in this run:

* the schoolcal three-level model (56 effect sizes), and
* synthetic three-level random-intercept data (``synthetic.make_three_level``)
  with 10^3, 10^4, ... up to ``--max-n`` effect sizes,

with, per row: the end-to-end ``mlmeta.meregress`` time (median of ``--repeat``
runs; a single run from 10^6 on), its ratio to the previous row (10x the data),
the number of objective evaluations the fit used, the time to build the model
(formula, frame, sorted design, precomputed blocks), the time of one objective
evaluation and of one evaluation with the gradient at the optimum, and memory:
the peak of traced allocations during one fit (tracemalloc, in a separate
untimed run) and the process's resident high-water mark (ru_maxrss) so far.

    python benchmarks/scaling.py                 # up to 10^6
    python benchmarks/scaling.py --max-n 1e5 --repeat 3 --slope
"""

from __future__ import annotations

import argparse
import gc
import platform
import resource
import statistics
import sys
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlmeta  # noqa: E402
from mlmeta.api import build_model  # noqa: E402
from synthetic import formula as synthetic_formula  # noqa: E402
from synthetic import load_schoolcal, make_three_level  # noqa: E402

SCHOOLCAL = "stdmdiff ~ 1 + (1 | district) + (1 | district:school)"
SCHOOLCAL_SLOPE = "stdmdiff ~ year_c + (1 + year_c || district) + (1 | district:school)"


def _maxrss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024.0 ** 2 if sys.platform == "darwin" else r / 1024.0   # bytes on macOS


def _median_time(fn, repeat: int, min_total: float = 0.0, max_reps: int = 1000):
    """Median wall time of ``fn()`` over at least ``repeat`` calls (more, up to
    ``max_reps``, until ``min_total`` seconds have been spent)."""
    times = []
    spent = 0.0
    while len(times) < repeat or (spent < min_total and len(times) < max_reps):
        gc.collect()
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        times.append(dt)
        spent += dt
    return statistics.median(times), out


def _traced_peak_mb(fn) -> float:
    gc.collect()
    tracemalloc.start()
    try:
        fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak / 1024.0 ** 2


def measure(label, n, data, formula, variance, repeat, memory=True):
    def fit():
        return mlmeta.meregress(formula, data, variance=variance)

    fit_t, res = _median_time(fit, repeat)
    build_t, (model, _, _) = _median_time(
        lambda: build_model(formula, data, variance=variance), max(1, min(repeat, 3)))
    theta = res.theta
    eval_t, _ = _median_time(lambda: model.evaluate(theta), 5, min_total=0.3)
    grad_t, _ = _median_time(lambda: model.evaluate(theta, gradient=True), 5, min_total=0.3)
    peak = _traced_peak_mb(fit) if memory else float("nan")
    del model
    gc.collect()
    return {
        "label": label, "n": n, "fit": fit_t, "evals": res.fit_record.n_evals,
        "converged": res.converged, "llf": res.llf, "build": build_t, "eval": eval_t,
        "grad": grad_t, "peak": peak, "rss": _maxrss_mb(), "data_mb": data.memory_usage(deep=True).sum() / 1024 ** 2,
    }


def _fmt_time(t: float) -> str:
    if t < 1e-3:
        return f"{t * 1e6:7.1f} us"
    if t < 1.0:
        return f"{t * 1e3:7.2f} ms"
    return f"{t:7.2f} s "


def print_table(rows):
    head = (f"{'data':<22}{'n':>9}  {'fit':>10} {'x10n':>6} {'evals':>6}  {'build':>10}  "
            f"{'objective':>10} {'x10n':>6}  {'obj+grad':>10} {'x10n':>6}  "
            f"{'peak MB':>8} {'data MB':>8} {'maxrss MB':>9}")
    print(head)
    print("-" * len(head))
    prev = None
    for r in rows:
        synth = r["label"].startswith("synthetic")
        if synth and prev is not None and r["n"] == 10 * prev["n"]:
            rf = f"{r['fit'] / prev['fit']:6.1f}"
            re_ = f"{r['eval'] / prev['eval']:6.1f}"
            rg = f"{r['grad'] / prev['grad']:6.1f}"
        else:
            rf = re_ = rg = f"{'':>6}"
        flag = "" if r["converged"] else " (not converged)"
        print(f"{r['label']:<22}{r['n']:>9,}  {_fmt_time(r['fit'])} {rf} {r['evals']:>6}  "
              f"{_fmt_time(r['build'])}  {_fmt_time(r['eval'])} {re_}  {_fmt_time(r['grad'])} {rg}  "
              f"{r['peak']:8.1f} {r['data_mb']:8.1f} {r['rss']:9.0f}{flag}")
        prev = r if synth else None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-n", type=float, default=1e6, help="largest synthetic n (default 1e6)")
    ap.add_argument("--repeat", type=int, default=5,
                    help="fits per row for the median (default 5; one fit from n = 1e6 on)")
    ap.add_argument("--slope", action="store_true",
                    help="also time the random-slope models (schoolcal year_c, synthetic slope on x)")
    ap.add_argument("--no-memory", action="store_true", help="skip the tracemalloc run")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    max_n = int(args.max_n)

    print(f"mlmeta {mlmeta.__version__}, Python {platform.python_version()}, "
          f"numpy {np.__version__}, {platform.machine()} {platform.system()}")
    print(f"fit = median of {args.repeat} end-to-end meregress() calls (1 call from n = 1e6); "
          f"objective = one deviance evaluation at the optimum\n")
    rows = []
    warnings.simplefilter("ignore")     # boundary / convergence notes are in the table

    sc = load_schoolcal()
    cases = [("schoolcal", sc, SCHOOLCAL, "var")]
    if args.slope:
        cases.append(("schoolcal slope", sc, SCHOOLCAL_SLOPE, "var"))
    for label, data, f, var in cases:
        rows.append(measure(label, len(data), data, f, var, args.repeat, not args.no_memory))
        print_progress(rows[-1])

    for slope in ([False, True] if args.slope else [False]):
        n = 1000
        while n <= max_n:
            data = make_three_level(n, seed=args.seed, slope=slope)
            label = "synthetic 3-level" + (" slope" if slope else "")
            repeat = args.repeat if n < 1_000_000 else 1
            rows.append(measure(label, n, data, synthetic_formula(slope), "v", repeat,
                                not args.no_memory))
            print_progress(rows[-1])
            del data
            n *= 10
    print()
    print_table(rows)


def print_progress(r):
    print(f"  done {r['label']} n={r['n']:,}: fit {r['fit']:.3g} s, llf {r['llf']:.6f}",
          file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
