"""Timing helpers shared by the benchmark scripts (``compare.py``, ``scaling.py``)."""

from __future__ import annotations

import gc
import statistics
import time

__all__ = ["median_time", "fmt_time"]


def median_time(fn, repeat: int, batch: float = 0.0, pause_gc: bool = False):
    """Median wall time of one ``fn()`` call over ``repeat`` samples, and the last result.
    With ``batch`` > 0 each sample times a loop of calls lasting about ``batch`` seconds
    (as timeit does), so microsecond calls are timed with warm caches and without
    timer noise; with ``pause_gc`` the garbage collector is paused within a sample (as
    timeit does too): calls back to back. Each sample follows a full collection."""
    number, out = 1, None
    if batch > 0:
        t0 = time.perf_counter()
        out = fn()
        one = time.perf_counter() - t0
        number = max(1, int(batch / max(one, 1e-9)))
    times = []
    for _ in range(repeat):
        gc.collect()
        if pause_gc:
            gc.disable()
        try:
            t0 = time.perf_counter()
            for _ in range(number):
                out = fn()
            times.append((time.perf_counter() - t0) / number)
        finally:
            if pause_gc:
                gc.enable()
    return statistics.median(times), out


def fmt_time(t) -> str:
    """A duration in us, ms or s ("-" for None)."""
    if t is None:
        return "-"
    if t < 1e-3:
        return f"{t * 1e6:.1f} us"
    if t < 1.0:
        return f"{t * 1e3:.2f} ms"
    return f"{t:.2f} s"
