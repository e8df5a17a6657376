"""mlmeta: multilevel and multivariate meta-regression with a fast Cython core.

>>> import mlmeta
>>> df = mlmeta.datasets.load("schoolcal")
>>> res = mlmeta.meregress("stdmdiff ~ 1 + (1 | district) + (1 | district:school)",
...                        data=df, variance="var")
>>> print(f"{res.params['_cons']:.4f}")
0.1847
"""

from mlmeta._errors import BoundaryWarning, ConvergenceWarning, MissingDataWarning
from mlmeta.api import meregress, multilevel, sensitivity
from mlmeta.batch import BatchResults, Model, fit_batch
from mlmeta.compare import compare, estimates_table, lrtest
from mlmeta.marginal_means import EMMeans, emmeans
from mlmeta.mixed import MixedResults, mixed
from mlmeta.ols import OLSResults, ols
from mlmeta.satterthwaite import satterthwaite_df
from mlmeta.twostage import TwoStageResults, two_stage
from mlmeta.results import MeregressResults
from mlmeta.robust import RobustResults, cluster_robust, robust
from mlmeta.vcalc import vcalc

try:                                    # the one version number is project(version:) in meson.build
    from importlib.metadata import PackageNotFoundError, version as _version

    __version__ = _version("mlmeta")
except PackageNotFoundError:            # pragma: no cover - imported from a source tree
    __version__ = "0+unknown"


def __getattr__(name):
    if name in ("datasets", "plots", "simulate", "simstudy"):
        import importlib

        return importlib.import_module(f"mlmeta.{name}")
    raise AttributeError(f"module 'mlmeta' has no attribute {name!r}")


__all__ = [
    "meregress", "multilevel", "sensitivity", "mixed", "MeregressResults", "MixedResults",
    "ols", "OLSResults", "two_stage", "TwoStageResults", "satterthwaite_df", "simulate",
    "simstudy", "Model", "fit_batch", "BatchResults", "lrtest", "compare", "estimates_table",
    "robust", "cluster_robust", "RobustResults", "vcalc", "datasets", "emmeans", "EMMeans",
    "MissingDataWarning", "ConvergenceWarning", "BoundaryWarning", "__version__",
]
