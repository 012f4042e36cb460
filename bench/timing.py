"""Timing a call on CPU for the small benchmarks."""

from __future__ import annotations

import statistics
import time


def median_ms(fn, repeats: int) -> float:
    """The median wall time of `repeats` calls of `fn`, in milliseconds, after one call
    out of the figures (allocations, lazy set-up)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)
