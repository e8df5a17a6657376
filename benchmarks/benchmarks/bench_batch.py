"""asv benchmarks: many fits of one model (fit_batch), and cluster-robust inference."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from synthetic import load_schoolcal, make_three_level  # noqa: E402

import mlmeta  # noqa: E402


class FitBatch:
    """``fit_batch``: 200 simulated outcome vectors, per fit; 1 and 2 threads."""

    params = (["schoolcal", 1000, 10000], [1, 2])
    param_names = ["n", "threads"]
    number = 1
    repeat = (1, 5, 60.0)
    timeout = 900

    def setup(self, size, threads):
        warnings.simplefilter("ignore")
        if size == "schoolcal":
            self.model = mlmeta.Model("stdmdiff ~ 1 + (1 | district) + (1 | district:school)",
                                      load_schoolcal(), variance="var")
        else:
            df = make_three_level(int(size), seed=1)
            self.model = mlmeta.Model("y ~ x + (1 | a) + (1 | a:b)", df, variance="v")
        self.Y = self.model.simulate(200, seed=1)

    def time_fit_batch(self, size, threads):
        mlmeta.fit_batch(self.model, self.Y, n_jobs=threads)

    def track_evals_per_fit(self, size, threads):
        """Objective evaluations per fit (the engine's share of the time)."""
        return float(mlmeta.fit_batch(self.model, self.Y, n_jobs=threads).n_evals.mean())

    track_evals_per_fit.unit = "evaluations"


class Robust:
    """CR2 with Satterthwaite df after a two-level fit, by number of clusters."""

    params = ([1000, 10000, 50000],)
    param_names = ["clusters"]
    number = 1
    repeat = (1, 3, 120.0)
    timeout = 900

    def setup(self, clusters):
        warnings.simplefilter("ignore")
        df = make_three_level(3 * clusters, seed=2)
        self.res = mlmeta.meregress("y ~ x + (1 | a) + (1 | a:b)", df, variance="v",
                                    safeguard=False)

    def time_cr2(self, clusters):
        self.res.robust(type="CR2")

    def peakmem_cr2(self, clusters):
        self.res.robust(type="CR2")
