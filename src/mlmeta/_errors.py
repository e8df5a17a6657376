"""Warning classes shared across mlmeta, and :func:`warn`, which points every warning
mlmeta raises at the user's line."""

import os
import sys
import warnings

__all__ = ["MissingDataWarning", "ConvergenceWarning", "BoundaryWarning", "warn"]


class MissingDataWarning(UserWarning):
    """Rows were dropped because a variable used by the model was missing.

    The fit goes on without them; ``res.n_dropped`` counts them and ``res.sample``
    marks the rows used.

    Examples
    --------
    >>> import warnings
    >>> import mlmeta
    >>> df = mlmeta.datasets.load("schoolcal")
    >>> df.loc[0, "var"] = float("nan")
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     res = mlmeta.meregress("stdmdiff ~ 1 + (1 | district)", df, variance="var")
    >>> any(issubclass(w.category, mlmeta.MissingDataWarning) for w in caught)
    True
    >>> res.n_dropped, res.nobs
    (1, 55)
    """


class ConvergenceWarning(UserWarning):
    """The optimiser stopped before meeting its convergence criteria.

    ``res.converged`` is False, ``res.fit_record.messages`` says why, and the summary
    carries a note.

    Examples
    --------
    >>> import warnings
    >>> import mlmeta
    >>> df = mlmeta.datasets.load("schoolcal")
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore", mlmeta.ConvergenceWarning)
    ...     res = mlmeta.meregress("stdmdiff ~ 1 + (1 | district) + (1 | district:school)",
    ...                            df, variance="var", em_iter=0, maxiter=1, safeguard=False)
    >>> res.converged
    False
    """


class BoundaryWarning(UserWarning):
    """An estimate lies on the boundary of the parameter space (e.g. a zero variance).

    ``res.boundary`` lists the estimates concerned; the summary flags them.

    Examples
    --------
    >>> import warnings
    >>> import mlmeta
    >>> data, _, _ = mlmeta.simulate.lmm(10, 1, 8, seed=2)
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     res = mlmeta.mixed("DV ~ IV1 + (IV1 | Group)", data)
    >>> [str(w.message) for w in caught if w.category is mlmeta.BoundaryWarning]
    ['singular fit: estimates on the boundary of the parameter space: corr(IV1,_cons) at level Group is +1']
    """


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
