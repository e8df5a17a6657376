"""asv benchmarks: end-to-end fits, one objective evaluation, one gradient.

Every class is parametrised by the data size and the model shape:

* size ``"schoolcal"`` is the bundled schoolcal data (56 effect sizes, schools
  in districts); an integer n is synthetic three-level data with n effect sizes
  (``benchmarks/synthetic.py``, ~10 effects per inner group, ~10 inner groups
  per outer group);
* shape ``"intercepts"`` is the three-level random-intercept model, ``"slope"``
  adds an independent random slope on the moderator at the top level, ``"single"`` is
  the random-intercept model on data with one effect per inner group and ~5 per outer
  group (the deepest level folded into the diagonal; schoolcal has this shape already).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np

# benchmarks/synthetic.py sits next to this package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from synthetic import formula as synthetic_formula  # noqa: E402
from synthetic import load_schoolcal, make_three_level  # noqa: E402

import mlmeta  # noqa: E402
from mlmeta._threads import blas_threads  # noqa: E402
from mlmeta.api import build_model  # noqa: E402
from mlmeta.optimize import fit_nested, start_theta  # noqa: E402

SIZES = ["schoolcal", 1000, 10000, 100000]
SHAPES = ["intercepts", "slope", "single"]

_SCHOOLCAL = {
    "intercepts": "stdmdiff ~ 1 + (1 | district) + (1 | district:school)",
    "slope": "stdmdiff ~ year_c + (1 + year_c || district) + (1 | district:school)",
}


def inputs(size, shape):
    """(data, formula, variance column) for one benchmark case."""
    if size == "schoolcal":
        return load_schoolcal(), _SCHOOLCAL["slope" if shape == "slope" else "intercepts"], "var"
    slope = shape == "slope"
    layout = dict(per_b=1, per_a=5) if shape == "single" else {}
    return (make_three_level(int(size), seed=1, slope=slope, **layout), synthetic_formula(slope),
            "v")


class _Case:
    params = (SIZES, SHAPES)
    param_names = ["n", "model"]
    timeout = 900

    def setup(self, size, shape):
        warnings.simplefilter("ignore")
        self.data, self.formula, self.variance = inputs(size, shape)


class Fit(_Case):
    """``mlmeta.meregress`` end to end: formula, design, EM + optimiser, results."""

    number = 1
    repeat = (1, 7, 60.0)
    warmup_time = 0.0

    def time_meregress(self, size, shape):
        mlmeta.meregress(self.formula, self.data, variance=self.variance)

    def peakmem_meregress(self, size, shape):
        mlmeta.meregress(self.formula, self.data, variance=self.variance)

    def track_evaluations(self, size, shape):
        """Objective evaluations one fit uses."""
        res = mlmeta.meregress(self.formula, self.data, variance=self.variance)
        return res.fit_record.n_evals

    track_evaluations.unit = "evaluations"


class FitNoSafeguard(_Case):
    """The optimiser alone (model already built), without the extra starts."""

    number = 1
    repeat = (1, 7, 60.0)
    warmup_time = 0.0

    def setup(self, size, shape):
        super().setup(size, shape)
        self.model = build_model(self.formula, self.data, variance=self.variance)[0]

    def time_fit_nested(self, size, shape):
        fit_nested(self.model, safeguard=False)


class BuildModel(_Case):
    """Formula, model frame, sorted nested design and precomputed blocks."""

    def time_build_model(self, size, shape):
        build_model(self.formula, self.data, variance=self.variance)

    def peakmem_build_model(self, size, shape):
        build_model(self.formula, self.data, variance=self.variance)


class _Evaluate(_Case):
    def setup(self, size, shape):
        super().setup(size, shape)
        self.model = build_model(self.formula, self.data, variance=self.variance)[0]
        self.theta = np.asarray(start_theta(self.model), dtype=float)
        self.model.evaluate(self.theta, gradient=True)     # fail in setup, not timing
        self._one_thread = blas_threads(1)                  # as in a fit
        self._one_thread.__enter__()

    def teardown(self, size, shape):
        self._one_thread.__exit__(None, None, None)


class Objective(_Evaluate):
    """One deviance evaluation (beta profiled out), the engine's own (``model.evaluate``
    keeps its last result at a theta)."""

    def time_objective(self, size, shape):
        self.model.problem.evaluate(self.theta)


class Gradient(_Evaluate):
    """One deviance evaluation with its analytic gradient (the engine's own)."""

    def time_gradient(self, size, shape):
        self.model.problem.evaluate(self.theta, gradient=True)


class MixedModel:
    """``mlmeta.mixed`` end to end on repeated-measures data: groups x observations per
    group, three predictors with correlated random slopes (four random effects,
    unstructured), with and without the extra starts."""

    params = ([(50, 50), (200, 20)], [True, False])
    param_names = ["groups x obs", "safeguard"]
    timeout = 600

    def setup(self, shape, safeguard):
        from mlmeta.simulate import lmm

        warnings.simplefilter("ignore")
        self.data = lmm(shape[0], 3, shape[1], seed=1)[0]
        self.formula = "DV ~ IV1 + IV2 + IV3 + (IV1 + IV2 + IV3 | Group)"

    def time_mixed(self, shape, safeguard):
        mlmeta.mixed(self.formula, self.data, safeguard="auto" if safeguard else False)
