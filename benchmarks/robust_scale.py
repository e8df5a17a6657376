"""Cluster-robust CR2 inference with Satterthwaite df on many clusters.

Synthetic two-level meta-analytic data: ``--clusters`` studies (default 50,000)
with 1 + Poisson(2) effect sizes each (~3 on average), three moderators and a
random study intercept:

    y = 0.2 + 0.1 x1 - 0.1 x2 + 0.05 x3 + u_study + e,
    u_study ~ N(0, 0.3^2),  e ~ N(0, v),  v ~ Uniform(0.01, 0.1).

Prints the time of the fit, of ``robust(res, type=...)`` (the sandwich, CR2
adjustments and the Satterthwaite df of every coefficient) and of one HTZ test
of the three moderators, with memory: the peak of traced allocations during the
robust step (tracemalloc, in a separate untimed run) and the process's resident
high-water mark (``resource.getrusage``) at the end.

    python benchmarks/robust_scale.py
    python benchmarks/robust_scale.py --clusters 200000 --type CR3
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
import tracemalloc
import warnings

import numpy as np
import pandas as pd

import mlmeta
from mlmeta.robust import robust


def make_data(n_clusters: int, seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    sizes = 1 + rng.poisson(2, n_clusters)
    study = np.repeat(np.arange(n_clusters), sizes)
    n = study.shape[0]
    X = rng.normal(size=(n, 3))
    v = rng.uniform(0.01, 0.1, n)
    y = (0.2 + X @ np.array([0.1, -0.1, 0.05]) + rng.normal(0, 0.3, n_clusters)[study]
         + rng.normal(0, np.sqrt(v)))
    return pd.DataFrame({"y": y, "x1": X[:, 0], "x2": X[:, 1], "x3": X[:, 2], "v": v, "study": study})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clusters", type=float, default=50_000)
    ap.add_argument("--type", default="CR2")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    J = int(args.clusters)
    df = make_data(J, args.seed)
    print(f"{J:,} clusters, {len(df):,} effect sizes, 3 moderators; type={args.type}, Satterthwaite df")

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = mlmeta.meregress("y ~ x1 + x2 + x3 + (1 | study)", df, variance="v")
    t_fit = time.perf_counter() - t0

    t0 = time.perf_counter()
    rr = robust(res, type=args.type)
    t_rob = time.perf_counter() - t0
    t0 = time.perf_counter()
    w = rr.wald_test("x1 = 0, x2 = 0, x3 = 0")
    t_htz = time.perf_counter() - t0

    tracemalloc.start()
    robust(res, type=args.type)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    maxrss_mb = maxrss / 1024 if sys.platform != "darwin" else maxrss / 2**20

    print(f"fit (meregress)                       {t_fit:8.2f} s")
    print(f"robust({args.type}, Satterthwaite df)       {t_rob:8.2f} s")
    print(f"HTZ test of 3 constraints             {t_htz:8.3f} s   (F = {w.statistic:.1f}, "
          f"df = {w.df_num}, {w.df_denom:.1f})")
    print(f"peak traced memory in robust()        {peak / 2**20:8.1f} MiB")
    print(f"process max resident set size         {maxrss_mb:8.1f} MiB")
    print()
    print(rr.summary())


if __name__ == "__main__":
    main()
