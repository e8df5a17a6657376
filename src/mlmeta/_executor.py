"""Work handed to a user's executor: a :class:`concurrent.futures.Executor` (threads or
processes) or a Dask ``distributed.Client``.

Many fits of one model (outcome columns, bootstrap and permutation replicates) are cut
into contiguous chunks, a few per worker (:func:`chunks`), so the cost of shipping a
task and the model is paid a few times per worker, not once per fit. :func:`run`
submits ``fn(shared, chunk, *args)`` per chunk and returns the results in chunk order:
every item is computed by the same code from the same inputs as in a serial run (the
replicates' random numbers come from per-replicate seeds drawn before the split), so
the numbers do not depend on the executor or the number of workers. On Dask the shared
object (the model) is scattered once to every worker.
"""

from __future__ import annotations

import concurrent.futures as cf
import os

__all__ = ["check", "is_dask", "n_workers", "chunks", "submit", "run", "completed"]

TASKS_PER_WORKER = 4


def is_dask(executor) -> bool:
    """Whether ``executor`` is a Dask ``distributed.Client``."""
    return type(executor).__module__.split(".")[0] == "distributed"


def check(executor):
    """``executor`` itself, or ValueError when it cannot run tasks."""
    if executor is None or callable(getattr(executor, "submit", None)):
        return executor
    raise ValueError(f"executor must be a concurrent.futures.Executor (ThreadPoolExecutor, "
                     f"ProcessPoolExecutor) or a dask distributed.Client, got {executor!r}")


def n_workers(executor) -> int:
    """How many tasks the executor runs at once (its threads on Dask; its max_workers for
    concurrent.futures; the number of cores when it does not say)."""
    if is_dask(executor):
        return max(1, int(sum(executor.nthreads().values())))
    n = getattr(executor, "_max_workers", None)
    return max(1, int(n)) if n else max(1, os.cpu_count() or 1)


def chunks(n_items: int, executor, per_worker: int = TASKS_PER_WORKER) -> list[tuple[int, int]]:
    """Contiguous (start, stop) ranges covering ``range(n_items)``: ``per_worker`` per
    worker (fewer when there are fewer items), sizes differing by at most one."""
    n_tasks = max(1, min(int(n_items), per_worker * n_workers(executor)))
    size, extra = divmod(int(n_items), n_tasks)
    out, start = [], 0
    for k in range(n_tasks):
        stop = start + size + (k < extra)
        out.append((start, stop))
        start = stop
    return out


def submit(executor, fn, *args):
    """``executor.submit(fn, *args)``; on Dask as an impure task (never merged with
    another by the hash of its arguments)."""
    if is_dask(executor):
        return executor.submit(fn, *args, pure=False)
    return executor.submit(fn, *args)


def completed(futures, executor):
    """The futures in completion order when the executor tells it, else in order."""
    if isinstance(executor, cf.Executor):
        return cf.as_completed(futures)
    if is_dask(executor):
        from distributed import as_completed

        return as_completed(futures)
    return iter(futures)


def run(executor, fn, shared, parts, *args) -> list:
    """``[fn(shared, part, *args) for part in parts]`` computed on ``executor``, in order.
    On Dask ``shared`` is scattered to every worker once and the results gathered."""
    if is_dask(executor):
        handle = executor.scatter(shared, broadcast=True, hash=False)
        futures = [executor.submit(fn, handle, part, *args, pure=False) for part in parts]
        return executor.gather(futures)
    futures = [executor.submit(fn, shared, part, *args) for part in parts]
    return [f.result() for f in futures]
