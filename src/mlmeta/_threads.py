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
import contextvars
import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

__all__ = ["blas_threads", "one_blas_thread", "parallel_calls", "border_blas_threads",
           "BORDER_THREADS_MIN_NB", "START_THREADS_MIN_OBS", "start_threads", "fit_threads"]

_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def _forget_pool():
    global _pool, _pool_size
    _pool, _pool_size = None, 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


@functools.cache
def n_cpus() -> int:
    """The number of CPUs (``os.cpu_count()``, read once: it costs microseconds a call)."""
    return os.cpu_count() or 1


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


_controller = None


def _blas_controller():
    """One threadpoolctl controller per process (finding the BLAS libraries costs ~0.1 ms;
    a limit through a kept controller a few microseconds). Made on first use, after the
    compiled core has loaded SciPy's BLAS."""
    global _controller
    if _controller is None:
        from threadpoolctl import ThreadpoolController

        _controller = ThreadpoolController()
    return _controller


class _BlasLimit:
    """Context manager: BLAS libraries at ``n`` threads inside, restored on leaving.

    Limits nest, from any thread: entering one while the libraries already run at that
    number is free, and the libraries' own settings come back when the last limit is
    left. The thread counts are set through threadpoolctl's per-library controllers
    directly (a few microseconds; ``ThreadpoolController.limit`` looks the libraries up
    again on every call)."""

    _lock = threading.Lock()
    _active: list = []          # the limits entered and not yet left, in order
    _applied = None             # the number the libraries are set to (None: their own)
    _saved: list = []           # (library, its own number) while any limit is active

    def __init__(self, libs, n):
        self.libs, self.n = libs, int(n)

    @classmethod
    def _apply(cls, n):
        if n != cls._applied:
            for lib, own in cls._saved:
                lib.set_num_threads(own if n is None else n)
            cls._applied = n

    def __enter__(self):
        cls = _BlasLimit
        with cls._lock:
            if not cls._active:
                cls._saved = [(lib, lib.get_num_threads()) for lib in self.libs]
            cls._active.append(self.n)
            cls._apply(self.n)
        return self

    def __exit__(self, *exc):
        cls = _BlasLimit
        with cls._lock:
            cls._active.remove(self.n)
            cls._apply(cls._active[-1] if cls._active else None)
            if not cls._active:
                cls._saved = []
        return False


_blas_libs = None


def blas_threads(n=1):
    """Context manager limiting BLAS to ``n`` threads (a no-op when ``n`` is None or
    threadpoolctl is missing). Every fit runs inside ``blas_threads(1)``: its BLAS calls
    are on blocks of a few effects (a per-cluster tree) or, for crossed terms, a border
    whose factorisation is cheap next to the thread start-up and oversubscription costs;
    a border of :data:`BORDER_THREADS_MIN_NB` effects or more is the exception
    (:func:`border_blas_threads`)."""
    global _blas_libs
    if n is None:
        return contextlib.nullcontext()
    if _blas_libs is None:
        try:
            controller = _blas_controller()
        except ImportError:
            return contextlib.nullcontext()
        _blas_libs = [lib for lib in controller.lib_controllers if lib.user_api == "blas"]
    return _BlasLimit(_blas_libs, n)


#: a crossed border at least this wide is factored with threaded BLAS
BORDER_THREADS_MIN_NB = 512


def border_blas_threads(nb: int, kernel_threads: int = 1) -> int:
    """BLAS threads for one fit's engine runs: 1, except for a crossed border of at least
    :data:`BORDER_THREADS_MIN_NB` effects in a single-threaded run, whose dense
    factorisation and inverse (O(nb^3) for each evaluation with the gradient) dominate
    and share out over up to 4 cores (InstEval's 1,142-wide border: about 0.75 of the
    time per evaluation on 2 cores). The tree's products stay small, where OpenBLAS
    keeps one thread."""
    if nb < BORDER_THREADS_MIN_NB or kernel_threads > 1:
        return 1
    return max(1, min(4, n_cpus()))


#: a fit's extra starts are shared out over the cores from this many observations
START_THREADS_MIN_OBS = 1_000

_fit_threads: contextvars.ContextVar = contextvars.ContextVar("mlmeta_fit_threads", default=None)


@contextlib.contextmanager
def fit_threads(n: int):
    """Context manager: the extra starts of the fits made inside run on at most ``n``
    kernel threads (work that already runs fits side by side: replicates in worker
    processes)."""
    token = _fit_threads.set(max(1, int(n)))
    try:
        yield
    finally:
        _fit_threads.reset(token)


def start_threads(n_obs: int) -> int:
    """Kernel threads for the extra starts of one fit (independent engine runs, shared
    out over the cores; each run's numbers are the same on any thread): the cores from
    :data:`START_THREADS_MIN_OBS` observations on (below, a run's rounds take tens of
    microseconds and handing them to a thread costs as much), at most the limit of
    :func:`fit_threads`; 1 off the main thread, where the caller already runs fits side
    by side."""
    if n_obs < START_THREADS_MIN_OBS or threading.current_thread() is not threading.main_thread():
        return 1
    n = n_cpus()
    limit = _fit_threads.get()
    return max(1, min(n, limit) if limit is not None else n)


def one_blas_thread(fn):
    """Decorator: ``fn`` runs inside ``blas_threads(1)`` (model building and fitting: QR
    factorisations of the design and the kernels' products are small next to what
    starting and synchronising BLAS threads costs, which grows when the cores are busy)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with blas_threads(1):
            return fn(*args, **kwargs)
    return wrapper
