"""BLAS thread limits for code that works on many small matrices.

Multi-threaded BLAS makes products and factorisations of small blocks several
times slower (threads are started and synchronised for microseconds of work), and
oversubscribes the cores when replicates already run side by side.
"""

from __future__ import annotations

import contextlib

__all__ = ["blas_threads"]


def blas_threads(n=1):
    """Context manager limiting BLAS to ``n`` threads (a no-op when ``n`` is None or
    threadpoolctl is missing)."""
    if n is None:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=int(n), user_api="blas")
