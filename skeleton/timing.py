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
MAX_OTHERS = 0.25  # share of every core other processes used while timing above this: the CPU was shared


def machine_load() -> float | None:
    """The 1-minute load average per core, or None where the OS does not report one."""
    try:
        return os.getloadavg()[0] / max(os.cpu_count() or 1, 1)
    except OSError:
        return None


def _cpu_sample() -> tuple[float, float, float] | None:
    """(busy CPU seconds of the whole machine, this process's CPU seconds, wall seconds), or None where
    /proc/stat is missing (not Linux)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    busy = (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # guest time is already in user
    own = os.times()
    return busy, own.user + own.system, time.monotonic()


class OtherLoad:
    """The share of the machine's cores that *other* processes used while the block ran (0: idle but
    for this process, 1: every core busy elsewhere), from /proc/stat against this process's own CPU
    time. Unlike the load average, a process's own threads do not count against it: a lone run that
    has just trained on every core reads as idle. ``value`` is None where /proc/stat is missing."""

    def __enter__(self) -> OtherLoad:
        self._start, self.value = _cpu_sample(), None
        return self

    def __exit__(self, *exc) -> None:
        end = _cpu_sample()
        if self._start is None or end is None:
            return
        busy, own, wall = (b - a for a, b in zip(self._start, end))
        if wall > 0:
            cores = max(os.cpu_count() or 1, 1)
            self.value = min(max(busy - own, 0.0) / (wall * cores), 1.0)


def shared_cpu(others: float | None, load: float | None) -> bool:
    """Whether other work shared the CPU: other processes' share of the cores where the OS tells it
    (``OtherLoad``: this process's own threads do not count), else the load average per core."""
    if others is not None:
        return others > MAX_OTHERS
    return load is not None and load > MAX_LOAD


def describe_load(others: float | None, load: float | None) -> str:
    """What ``shared_cpu`` judged, for a message."""
    if others is not None:
        return f"other processes used {others:.0%} of the cores"
    return "load unknown" if load is None else f"load {load:.2f} per core"


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
