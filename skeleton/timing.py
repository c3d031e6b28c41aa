"""Timing on shared, noisy machines: interleaved calls and the machine's load (torch only, no Lightning).

``skeleton.bench`` (dense vs pruned latency) and ``skeleton.localize.cost`` (the latency model) both
time several models against each other; interleaving (a, b, a, b, ...) makes load from other
processes and CPU frequency drift hit every model alike.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch

MAX_LOAD = 1.0  # runnable processes per core (1-minute load average) above this: the CPU was shared


def machine_load() -> float | None:
    """The 1-minute load average per core, or None where the OS does not report one."""
    try:
        return os.getloadavg()[0] / max(os.cpu_count() or 1, 1)
    except OSError:
        return None


def interleaved_ms(
    calls: dict[str, Callable[[], object]], *, repeats: int, warmup: int, sync: bool = False
) -> dict[str, list[float]]:
    """Milliseconds of each call over ``repeats`` rounds after ``warmup`` untimed ones, the calls taking
    turns within each round; ``sync`` synchronises CUDA around each call so it is timed to its end."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for step in range(warmup + repeats):
        for name, call in calls.items():
            if sync:
                torch.cuda.synchronize()
            start = time.perf_counter()
            call()
            if sync:
                torch.cuda.synchronize()
            if step >= warmup:
                times[name].append((time.perf_counter() - start) * 1000)
    return times
