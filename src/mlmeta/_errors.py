"""Warning classes shared across mlmeta."""

__all__ = ["MissingDataWarning", "ConvergenceWarning", "BoundaryWarning"]


class MissingDataWarning(UserWarning):
    """Rows were dropped because a variable used by the model was missing."""


class ConvergenceWarning(UserWarning):
    """The optimiser stopped before meeting its convergence criteria."""


class BoundaryWarning(UserWarning):
    """An estimate lies on the boundary of the parameter space (e.g. a zero variance)."""
