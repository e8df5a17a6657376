"""Threads for the compiled kernels, and BLAS thread limits.

The kernels release the GIL, so plain Python threads run them side by side: no
OpenMP runtime is involved, which keeps the package fork-safe (a forked child of a
process that has used an OpenMP pool can hang in the runtime) and gives the same
parallelism on every platform. One pool is kept per process and dropped in forked
children, whose copy of it has no threads.

Multi-threaded BLAS makes products and factorisations of small blocks several
times slower (threads are started and synchronised for microseconds of work), and
oversubscribes the cores when replicates already run side by side.
"""

from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor

__all__ = ["blas_threads", "parallel_calls"]

_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def _forget_pool():
    global _pool, _pool_size
    _pool, _pool_size = None, 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _get_pool(n: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < n:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool, _pool_size = ThreadPoolExecutor(max_workers=n, thread_name_prefix="mlmeta"), n
        return _pool


def parallel_calls(fn, args, n_threads: int):
    """``[fn(*a) for a in args]``, the calls spread over ``n_threads`` threads (the
    calling thread runs one share itself). ``fn`` should release the GIL for its work."""
    args = list(args)
    if n_threads <= 1 or len(args) <= 1:
        return [fn(*a) for a in args]
    pool = _get_pool(n_threads - 1)
    futures = [pool.submit(fn, *a) for a in args[1:]]
    first = fn(*args[0])
    return [first] + [f.result() for f in futures]


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
