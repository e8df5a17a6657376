"""Timing helpers shared by the benchmark scripts (``compare.py``, ``scaling.py``)."""

from __future__ import annotations

import gc
import statistics
import time

__all__ = ["median_time", "back_to_back", "fmt_time"]


def median_time(fn, repeat: int, batch: float = 0.0):
    """Median wall time of one ``fn()`` call over ``repeat`` samples, and the last result.
    With ``batch`` > 0 each sample times a loop of calls lasting about ``batch`` seconds
    (as timeit does), so microsecond calls are timed with warm caches and without
    timer noise."""
    number, out = 1, None
    if batch > 0:
        t0 = time.perf_counter()
        out = fn()
        one = time.perf_counter() - t0
        number = max(1, int(batch / max(one, 1e-9)))
    times = []
    for _ in range(repeat):
        gc.collect()
        t0 = time.perf_counter()
        for _ in range(number):
            out = fn()
        times.append((time.perf_counter() - t0) / number)
    return statistics.median(times), out


def back_to_back(fn, repeat: int, seconds: float = 0.3):
    """Median time of one ``fn()`` call in loops of calls lasting about ``seconds`` each,
    ``repeat`` loops, the garbage collector paused within a loop (as timeit does): the
    time of a call made right after the one before, with warm caches. Returns (time, the
    last result)."""
    out = fn()
    times = []
    for _ in range(repeat):
        gc.collect()
        gc.disable()
        try:
            n, t0 = 0, time.perf_counter()
            while True:
                out = fn()
                n += 1
                elapsed = time.perf_counter() - t0
                if elapsed >= seconds:
                    break
        finally:
            gc.enable()
        times.append(elapsed / n)
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
