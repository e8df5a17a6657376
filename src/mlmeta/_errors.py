"""Warning classes shared across mlmeta, and :func:`warn`, which points every warning
mlmeta raises at the user's line."""

import os
import sys
import warnings

__all__ = ["MissingDataWarning", "ConvergenceWarning", "BoundaryWarning", "warn"]


class MissingDataWarning(UserWarning):
    """Rows were dropped because a variable used by the model was missing."""


class ConvergenceWarning(UserWarning):
    """The optimiser stopped before meeting its convergence criteria."""


class BoundaryWarning(UserWarning):
    """An estimate lies on the boundary of the parameter space (e.g. a zero variance)."""


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _inside(filename: str) -> bool:
    return os.path.abspath(filename).startswith(_PACKAGE)


def warn(message, category=UserWarning) -> None:
    """``warnings.warn`` attributed to the user's line: the stack level is that of the
    first frame outside the mlmeta package, however deep inside mlmeta the warning is
    raised (``meregress`` -> model frame, ``Model`` -> ``build_model`` -> ...)."""
    frame, level = sys._getframe(0), 1
    while frame is not None and _inside(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
