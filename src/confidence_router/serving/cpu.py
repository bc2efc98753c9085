"""How many CPU cores other processes leave free, to size llama.cpp's prompt batches.

Evaluating a prompt batch is compute-bound and gains from a second thread; generating a token
is bound by memory bandwidth and gains little. But llama.cpp's threads busy-wait for each
other at every operation, so a thread on a core that another process is using stalls the
whole batch (measured on 2 shared cores with both busy: a 2-thread probe took 2x the 1-thread
one). :class:`LlamaCppBackend <confidence_router.serving.llamacpp.LlamaCppBackend>` therefore
adds batch threads only for cores that other processes left idle over the last
``window_s`` seconds (:class:`IdleCores`), as read from Linux's ``/proc/stat`` minus this
process's own CPU time; :func:`batch_threads` turns that into a thread count.

Pure functions and a small reader; no framework imports.

>>> batch_threads(1, idle_cores=1.9, max_threads=2)   # the other core is free
2
>>> batch_threads(1, idle_cores=1.1, max_threads=2)   # another process uses ~1 core
1
>>> batch_threads(1, idle_cores=None, max_threads=2)  # unknown (not Linux): never more
1
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from confidence_router.errors import InvalidArgumentError

__all__ = ["IDLE_MARGIN", "CpuSample", "IdleCores", "batch_threads", "read_cpu_sample"]

#: A core counts as free when other processes used at most this share of it over the window
#: (so 0.75 of a core must be idle: a core another process half-uses is not free).
IDLE_MARGIN = 0.25

# /proc/stat's columns after the CPU name (kernel docs, proc(5)): user nice system idle
# iowait irq softirq steal; guest time is already inside user/nice.
_IDLE_COLUMNS = (3, 4)  # idle, iowait
_COUNTED_COLUMNS = 8


@dataclass(frozen=True)
class CpuSample:
    """One reading: wall clock, and CPU seconds of the cores read (busy and in total), and
    this process's own CPU seconds (all its threads)."""

    wall_s: float
    busy_s: float
    total_s: float
    own_s: float


def read_cpu_sample(
    stat_path: str = "/proc/stat",
    cpus: set[int] | None = None,
    *,
    own_cpu_s: Callable[[], float] = time.process_time,
    wall_s: Callable[[], float] = time.monotonic,
) -> CpuSample | None:
    """Read ``stat_path`` (``/proc/stat`` format) for the cores in ``cpus`` (all when
    ``None``); ``None`` when the file is missing or unreadable (not Linux)."""
    try:
        with open(stat_path, encoding="ascii") as file:
            lines = file.read().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    busy = total = 0
    found = False
    for line in lines:
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu":
            continue
        try:
            cpu = int(name[3:])
            values = [int(v) for v in rest.split()[:_COUNTED_COLUMNS]]
        except ValueError:
            continue
        if cpus is not None and cpu not in cpus:
            continue
        found = True
        line_total = sum(values)
        total += line_total
        busy += line_total - sum(values[i] for i in _IDLE_COLUMNS if i < len(values))
    if not found:
        return None
    return CpuSample(wall_s=wall_s(), busy_s=busy / ticks, total_s=total / ticks,
                     own_s=own_cpu_s())


class IdleCores:
    """Cores that other processes left idle, averaged over windows of at least ``window_s``.

    :meth:`idle_cores` returns the figure of the last complete window (``None`` until one
    is complete, or where ``/proc/stat`` cannot be read). This process's own CPU time is not
    counted as busy, so the backend's own threads never hold it back. Limits: CPU time of
    other threads of this process counts as idle (Python threads share one core through the
    GIL, at most), and a container's CPU quota is not seen (pass a fixed ``n_threads_batch``
    there).

    >>> monitor = IdleCores(window_s=0.25)
    >>> monitor.idle_cores() is None or monitor.idle_cores() >= 0   # doctest: +SKIP
    True
    """

    def __init__(
        self,
        *,
        window_s: float = 0.25,
        stat_path: str = "/proc/stat",
        cpus: set[int] | None = None,
        own_cpu_s: Callable[[], float] = time.process_time,
        wall_s: Callable[[], float] = time.monotonic,
    ) -> None:
        if isinstance(window_s, bool) or not (isinstance(window_s, (int, float))
                                              and math.isfinite(window_s) and window_s > 0):
            raise InvalidArgumentError(f"window_s must be a positive number, got {window_s!r}")
        if cpus is None and hasattr(os, "sched_getaffinity"):
            cpus = set(os.sched_getaffinity(0))  # the cores this process may run on
        self.window_s = float(window_s)
        self._read = lambda: read_cpu_sample(stat_path, cpus, own_cpu_s=own_cpu_s,
                                             wall_s=wall_s)
        self._n_cpus = len(cpus) if cpus is not None else (os.cpu_count() or 1)
        self._anchor = self._read()
        self._last: float | None = None

    def idle_cores(self) -> float | None:
        """Cores idle apart from this process over the last complete window, or ``None``."""
        now = self._read()
        if now is None or self._anchor is None:
            self._anchor = now
            return self._last
        wall = now.wall_s - self._anchor.wall_s
        if wall >= self.window_s:
            others = (now.busy_s - self._anchor.busy_s) - (now.own_s - self._anchor.own_s)
            cores = (now.total_s - self._anchor.total_s) / wall or self._n_cpus
            self._last = max(0.0, min(float(self._n_cpus), cores) - max(0.0, others) / wall)
            self._anchor = now
        return self._last


def batch_threads(n_threads: int, *, idle_cores: float | None, max_threads: int) -> int:
    """Threads for a prompt batch: ``n_threads`` plus one per further core that is free.

    ``idle_cores`` counts the cores other processes left idle (this process's own use
    excluded, see :class:`IdleCores`); the backend's ``n_threads`` need that many of them,
    and each further one that is at least ``1 - IDLE_MARGIN`` idle gets a thread, up to
    ``max_threads``. ``None`` (unknown) keeps ``n_threads``.
    """
    if idle_cores is None or max_threads <= n_threads:
        return n_threads
    extra = math.floor(idle_cores - n_threads + IDLE_MARGIN)
    return n_threads + max(0, min(extra, max_threads - n_threads))
