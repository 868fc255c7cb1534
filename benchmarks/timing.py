"""Shared by the benchmark scripts: wall times of repeated calls, warm-up excluded."""

import statistics
import time
from collections.abc import Callable


def run_times(fn: Callable[[], object], runs: int, warmup: int = 1) -> list[float]:
    """Seconds of each of ``runs`` calls of ``fn``, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median_time(fn: Callable[[], object], runs: int) -> tuple[float, float]:
    """(median, min) seconds of ``runs`` calls of ``fn`` after one warm-up call."""
    times = run_times(fn, runs)
    return statistics.median(times), min(times)
