"""Timing helpers shared by the benchmark scripts (medians; the machine is noisy)."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def median_time(fn: Callable[[], object], repeat: int) -> float:
    """The median wall time of ``repeat`` calls of ``fn``, in seconds."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def ms(seconds: float, digits: int = 2) -> str:
    """Seconds as a right-aligned milliseconds figure."""
    return f"{seconds * 1000:8.{digits}f} ms"
