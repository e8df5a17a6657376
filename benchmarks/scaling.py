"""How fit time and memory grow with the number of effect sizes.

Prints one table, all measured in this run:

* the schoolcal three-level model (56 effect sizes), and
* synthetic three-level random-intercept data (``synthetic.make_three_level``)
  with 10^3, 10^4, ... up to ``--max-n`` effect sizes, ~10 effects per lowest group
  ("synthetic") and one effect per lowest group, 5 per study ("5 per study"),
* a moderator with 200 levels (``synthetic.make_many_levels``, 224 effects, 200 fixed
  effects),

with, per row: the end-to-end ``mlmeta.meregress`` time (median of ``--repeat``
runs after one untimed warm-up run; at most 3 from 10^6 on), its ratio to the previous row (10x the data),
the number of objective evaluations the fit used, the same with
``safeguard=False`` (no extra starts against local optima), the time to build the model
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
import sys
import tracemalloc
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic import formula as synthetic_formula  # noqa: E402
from synthetic import MANY_LEVELS, load_schoolcal, make_many_levels, make_three_level  # noqa: E402
from timing import fmt_time, median_time  # noqa: E402

import mlmeta  # noqa: E402
from mlmeta._threads import blas_threads  # noqa: E402
from mlmeta.api import build_model  # noqa: E402

SCHOOLCAL = "stdmdiff ~ 1 + (1 | district) + (1 | district:school)"
SCHOOLCAL_SLOPE = "stdmdiff ~ year_c + (1 + year_c || district) + (1 | district:school)"


def _maxrss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024.0 ** 2 if sys.platform == "darwin" else r / 1024.0   # bytes on macOS


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

    fit()       # untimed warm-up: first-touch page faults and lazy initialisation
    fit_t, res = median_time(fit, repeat)
    nosg_t, res_nosg = median_time(
        lambda: mlmeta.meregress(formula, data, variance=variance, safeguard=False), repeat)
    build_t, (model, _, _) = median_time(
        lambda: build_model(formula, data, variance=variance), max(1, min(repeat, 3)))
    theta = res.theta
    # the engine's own evaluation (model.evaluate keeps its last result at a theta)
    with blas_threads(1):
        eval_t, _ = median_time(lambda: model.problem.evaluate(theta), 5, batch=0.05)
        grad_t, _ = median_time(lambda: model.problem.evaluate(theta, gradient=True), 5,
                                batch=0.05)
    peak = _traced_peak_mb(fit) if memory else float("nan")
    return {
        "label": label, "n": n, "fit": fit_t, "evals": res.fit_record.n_evals,
        "nosg": nosg_t, "evals_nosg": res_nosg.fit_record.n_evals,
        "converged": res.converged, "llf": res.llf, "build": build_t, "eval": eval_t,
        "grad": grad_t, "peak": peak, "rss": _maxrss_mb(),
        "data_mb": data.memory_usage(deep=True).sum() / 1024 ** 2,
    }


def print_table(rows):
    head = (f"{'data':<20}{'n':>10}  {'fit':>10} {'x10n':>5} {'evals':>5}  "
            f"{'no-safeg.':>10} {'x10n':>5} {'evals':>5}  {'build':>10}  "
            f"{'objective':>10} {'x10n':>5}  {'obj+grad':>10} {'x10n':>5}  "
            f"{'peak MB':>8} {'data MB':>8} {'maxrss MB':>9}")
    print(head)
    print("-" * len(head))
    prev = None
    for r in rows:
        synth = r["n"] >= 1000 and r["label"] != "200-level moderator"
        if synth and prev is not None and r["n"] == 10 * prev["n"] and r["label"] == prev["label"]:
            rf, rs, re_, rg = (f"{r[k] / prev[k]:5.1f}" for k in ("fit", "nosg", "eval", "grad"))
        else:
            rf = rs = re_ = rg = f"{'':>5}"
        flag = "" if r["converged"] else " (not converged)"
        print(f"{r['label']:<20}{r['n']:>10,}  {fmt_time(r['fit']):>10} {rf} {r['evals']:>5}  "
              f"{fmt_time(r['nosg']):>10} {rs} {r['evals_nosg']:>5}  "
              f"{fmt_time(r['build']):>10}  {fmt_time(r['eval']):>10} {re_}  "
              f"{fmt_time(r['grad']):>10} {rg}  "
              f"{r['peak']:8.1f} {r['data_mb']:8.1f} {r['rss']:9.0f}{flag}")
        prev = r if synth else None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-n", type=float, default=1e6, help="largest synthetic n (default 1e6)")
    ap.add_argument("--repeat", type=int, default=5,
                    help="fits per row for the median (default 5; one fit from n = 1e6 on)")
    ap.add_argument("--slope", action="store_true",
                    help="also time the random-slope models (year_c in schoolcal, x in synthetic)")
    ap.add_argument("--no-memory", action="store_true", help="skip the tracemalloc run")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    max_n = int(args.max_n)

    print(f"mlmeta {mlmeta.__version__}, Python {platform.python_version()}, "
          f"numpy {np.__version__}, {platform.machine()} {platform.system()}")
    print(f"fit = end-to-end meregress(), median of {args.repeat} calls (at most 3 from n = 1e6); "
          f"no-safeg. = the same with safeguard=False (no extra starts);\n"
          f"build = formula + design; objective = one deviance evaluation at the optimum "
          f"(obj+grad: with the gradient);\npeak MB = traced peak of one fit; "
          f"maxrss MB = process high-water mark so far; x10n = time / time of the row above\n")
    rows = []
    warnings.simplefilter("ignore")     # boundary / convergence notes are in the table

    sc = load_schoolcal()
    cases = [("schoolcal", sc, SCHOOLCAL, "var")]
    if args.slope:
        cases.append(("schoolcal slope", sc, SCHOOLCAL_SLOPE, "var"))
    for label, data, f, var in cases:
        rows.append(measure(label, len(data), data, f, var, args.repeat, not args.no_memory))
        print_progress(rows[-1])

    data = make_many_levels(seed=args.seed)
    rows.append(measure("200-level moderator", len(data), data, MANY_LEVELS, "v", args.repeat,
                        not args.no_memory))
    print_progress(rows[-1])

    shapes = [("synthetic", False, {})]
    if args.slope:
        shapes.append(("synthetic slope", True, {}))
    shapes.append(("5 per study", False, {"per_b": 1, "per_a": 5}))
    for label, slope, shape in shapes:
        n = 1000
        while n <= max_n:
            data = make_three_level(n, seed=args.seed, slope=slope, **shape)
            repeat = args.repeat if n < 1_000_000 else min(args.repeat, 3)
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
