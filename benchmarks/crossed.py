"""Crossed random effects: mlmeta against lme4's ``lmer`` in one run, side by side.

* InstEval (lme4's data: 73,421 ratings, 2,972 students x 1,128 instructors x 14
  departments, all crossed): ``y ~ 1 + service + (1|s) + (1|d) + (1|dept)``, REML. The
  data come from R (lme4 must be installed for this row).
* A simulated subjects x items design (500 x 200 = 100,000 rows) with a random slope
  for items: ``y ~ x + (1 | subj) + (1 + x | item)``, REML.

Each tool's time is the wall time of one fit from the data frame (mlmeta timed in
Python, lmer inside R with ``system.time``, R start-up not counted), with the log
likelihood (lme4's REML convention) to show that both reach the same optimum, and
the peak resident memory of an mlmeta fit in a fresh process.

    python benchmarks/crossed.py            # both designs
    python benchmarks/crossed.py --no-r     # mlmeta only
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd

import mlmeta

R_EXPORT = r"""
suppressPackageStartupMessages(library(lme4))
d <- InstEval
write.csv(data.frame(y = d$y, service = as.integer(d$service == "1"), s = as.integer(d$s),
                     d = as.integer(d$d), dept = as.integer(d$dept)), commandArgs(TRUE)[1],
          row.names = FALSE)
"""

R_FIT = r"""
suppressPackageStartupMessages(library(lme4))
args <- commandArgs(TRUE)
dat <- read.csv(args[1])
f <- as.formula(args[2])
t <- system.time(m <- lmer(f, dat, REML = TRUE))[["elapsed"]]
cat(sprintf('{"seconds": %.6f, "loglik": %.10f}\n', t, as.numeric(logLik(m))))
"""

# the child's own peak: /proc/self/status VmHWM (ru_maxrss keeps the parent's peak
# across fork and exec on Linux), ru_maxrss elsewhere
PEAK = textwrap.dedent("""
    import resource, sys, pandas as pd, mlmeta

    def peak_mb():
        try:
            with open("/proc/self/status") as fh:
                return next(int(x.split()[1]) for x in fh if x.startswith("VmHWM:")) / 1024
        except (OSError, StopIteration):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    df = pd.read_csv(sys.argv[1])
    base = peak_mb()
    mlmeta.mixed(sys.argv[2], df)
    print(peak_mb(), base)
""")


def subjects_items(n_subj=500, n_item=200, seed=1) -> pd.DataFrame:
    """Every subject sees every item once; x varies by trial; items carry a random
    intercept and slope, subjects a random intercept."""
    rng = np.random.default_rng(seed)
    subj = np.repeat(np.arange(n_subj), n_item)
    item = np.tile(np.arange(n_item), n_subj)
    x = rng.normal(size=subj.size)
    u_s = rng.normal(scale=0.8, size=n_subj)
    u_i = rng.normal(scale=[0.5, 0.3], size=(n_item, 2))
    y = 2 + 0.3 * x + u_s[subj] + u_i[item, 0] + u_i[item, 1] * x + rng.normal(size=subj.size)
    return pd.DataFrame({"y": y, "x": x, "subj": subj, "item": item})


def run_r(script, *args):
    with tempfile.NamedTemporaryFile("w", suffix=".R", delete=False) as fh:
        fh.write(script)
    out = subprocess.run(["Rscript", fh.name, *map(str, args)], capture_output=True, text=True,
                         check=True)
    return out.stdout


def fit_mlmeta(df, formula):
    t = time.perf_counter()
    res = mlmeta.mixed(formula, df)
    return time.perf_counter() - t, res


def peak_memory(path, formula):
    out = subprocess.run([sys.executable, "-c", PEAK, str(path), formula], capture_output=True,
                         text=True, check=True).stdout.split()
    return float(out[0]), float(out[1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-r", action="store_true", help="skip lme4 (and InstEval, which comes from R)")
    args = ap.parse_args(argv)
    has_r = not args.no_r and shutil.which("Rscript") is not None
    work = Path(tempfile.mkdtemp())
    cases = []
    if has_r:
        path = work / "insteval.csv"
        run_r(R_EXPORT, path)
        cases.append(("InstEval 73,421 (s x d x dept)", path,
                      "y ~ 1 + service + (1 | s) + (1 | d) + (1 | dept)"))
    path = work / "subjects_items.csv"
    subjects_items().to_csv(path, index=False)
    cases.append(("subjects x items 500 x 200", path, "y ~ x + (1 | subj) + (1 + x | item)"))
    print(f"{'design':34} {'tool':8} {'time':>9} {'ratio':>7} {'loglik (lme4 REML)':>20} {'peak MB':>8}")
    for name, path, formula in cases:
        df = pd.read_csv(path)
        seconds, res = fit_mlmeta(df, formula)
        peak, base = peak_memory(path, formula)
        print(f"{name:34} {'mlmeta':8} {seconds:9.3f} {1.0:7.1f} {res.llf_lme4:20.4f} "
              f"{peak:8.0f}  (converged={res.converged}; {base:.0f} MB before the fit)")
        if has_r:
            r = json.loads(run_r(R_FIT, path, formula).strip().splitlines()[-1])
            print(f"{'':34} {'lme4':8} {r['seconds']:9.3f} {r['seconds'] / seconds:7.1f} "
                  f"{r['loglik']:20.4f}")


if __name__ == "__main__":
    main()
