"""``confidence_router.serving.cpu``: idle cores from /proc/stat-format readings, and the
number of prompt-batch threads derived from them (pure; no model needed).

The readings come from /proc/stat-format files written by the tests and clocks the tests
advance (the operating system's inputs), plus one check on the real /proc/stat under load.
"""

from __future__ import annotations

import math
import os
import time

import pytest

from confidence_router.errors import InvalidArgumentError
from confidence_router.serving.cpu import IDLE_MARGIN, IdleCores, batch_threads, read_cpu_sample

TICKS = os.sysconf("SC_CLK_TCK")


def stat_text(per_cpu: list[tuple[int, int]]) -> str:
    """A /proc/stat text with (busy, idle) ticks per core (busy as user time)."""
    busy = sum(b for b, _ in per_cpu)
    idle = sum(i for _, i in per_cpu)
    lines = [f"cpu  {busy} 0 0 {idle} 0 0 0 0 0 0"]
    lines += [f"cpu{n} {b} 0 0 {i} 0 0 0 0 0 0" for n, (b, i) in enumerate(per_cpu)]
    lines += ["intr 1 2 3", "ctxt 12345", "procs_running 3"]
    return "\n".join(lines) + "\n"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def machine(tmp_path):
    """A 2-core machine: ``advance(seconds, busy_per_core, own_s)`` moves time on."""
    path = tmp_path / "stat"
    state = {"cpus": [[0, 0], [0, 0]], "own": 0.0}
    wall = Clock()

    def write() -> None:
        path.write_text(stat_text([tuple(c) for c in state["cpus"]]))

    def advance(seconds: float, busy: list[float], own_s: float = 0.0) -> None:
        for core, share in zip(state["cpus"], busy):
            ticks = round(seconds * TICKS)
            core[0] += round(ticks * share)
            core[1] += ticks - round(ticks * share)
        state["own"] += own_s
        wall.now += seconds
        write()

    write()
    monitor = IdleCores(window_s=0.25, stat_path=str(path), cpus={0, 1},
                        own_cpu_s=lambda: state["own"], wall_s=wall)
    return monitor, advance, path


def test_idle_cores_counts_what_other_processes_leave(machine):
    monitor, advance, _ = machine
    advance(1.0, [0.0, 0.0])
    assert monitor.idle_cores() == pytest.approx(2.0, abs=0.02)
    advance(1.0, [1.0, 0.0])  # another process holds one core
    assert monitor.idle_cores() == pytest.approx(1.0, abs=0.02)
    advance(1.0, [1.0, 1.0])
    assert monitor.idle_cores() == pytest.approx(0.0, abs=0.02)


def test_own_cpu_time_is_not_counted_as_busy(machine):
    monitor, advance, _ = machine
    # This process used 1.5 core-seconds over the second (a 2-thread batch, then decoding):
    # the cores are busy, but with our own work, which is not a reason to use fewer threads.
    advance(1.0, [1.0, 0.5], own_s=1.5)
    assert monitor.idle_cores() == pytest.approx(2.0, abs=0.02)
    advance(1.0, [1.0, 1.0], own_s=1.0)  # ours on one core, someone else's on the other
    assert monitor.idle_cores() == pytest.approx(1.0, abs=0.02)


def test_a_short_window_keeps_the_last_complete_figure(machine):
    monitor, advance, _ = machine
    advance(1.0, [1.0, 0.0])
    assert monitor.idle_cores() == pytest.approx(1.0, abs=0.02)
    advance(0.1, [1.0, 1.0])  # shorter than window_s: too few ticks to judge
    assert monitor.idle_cores() == pytest.approx(1.0, abs=0.02)
    advance(0.2, [1.0, 1.0])  # now 0.3 s since the last complete window, all of it busy
    assert monitor.idle_cores() == pytest.approx(0.0, abs=0.05)


def test_only_the_cores_this_process_may_use_count(tmp_path):
    path = tmp_path / "stat"
    wall = Clock()
    path.write_text(stat_text([(0, 0)] * 4))
    monitor = IdleCores(stat_path=str(path), cpus={2, 3}, own_cpu_s=lambda: 0.0, wall_s=wall)
    wall.now += 1.0
    # cores 0 and 1 busy, 2 and 3 idle: two idle cores of the two usable ones.
    t = TICKS
    path.write_text(stat_text([(t, 0), (t, 0), (0, t), (0, t)]))
    assert monitor.idle_cores() == pytest.approx(2.0, abs=0.02)


@pytest.mark.parametrize("content", ["", "intr 1 2\n", "cpu0 x y z\n", "\xff\xfe"])
def test_unreadable_stat_means_unknown(tmp_path, content):
    path = tmp_path / "stat"
    path.write_bytes(content.encode("latin-1"))
    assert read_cpu_sample(str(path)) is None
    monitor = IdleCores(stat_path=str(path), own_cpu_s=lambda: 0.0)
    assert monitor.idle_cores() is None
    assert read_cpu_sample(str(tmp_path / "missing")) is None


@pytest.mark.parametrize("window", [0, -1, math.nan, math.inf, True, "1"])
def test_bad_window_is_refused(window):
    with pytest.raises(InvalidArgumentError, match="window_s"):
        IdleCores(window_s=window)


@pytest.mark.parametrize(
    ("n_threads", "idle", "max_threads", "expected"),
    [
        (1, None, 2, 1),  # unknown: never more than n_threads
        (1, 2.0, 2, 2),
        (1, 2.0 - IDLE_MARGIN, 2, 2),  # the other core 75% idle: free enough
        (1, 1.7, 2, 1),  # the other core 30% used by someone else: not free
        (1, 1.0, 2, 1),
        (1, 0.0, 2, 1),  # fully busy: still n_threads (never fewer)
        (1, 8.0, 2, 2),  # capped at max_threads
        (2, 8.0, 4, 4),
        (2, 3.0, 4, 3),
        (4, 2.0, 8, 4),
        (2, 8.0, 2, 2),  # max_threads <= n_threads: nothing to add
    ],
)
def test_batch_threads(n_threads, idle, max_threads, expected):
    assert batch_threads(n_threads, idle_cores=idle, max_threads=max_threads) == expected


def test_real_proc_stat_sees_other_processes_busy(busy_cores):
    # Busy loops in other processes on every usable core: the monitor must not report a free
    # core (so the backend adds no thread), whatever else runs on the machine.
    monitor = IdleCores(window_s=0.5)
    time.sleep(1.0)
    idle = monitor.idle_cores()
    assert idle is not None
    assert idle < 1.0 - IDLE_MARGIN
    assert batch_threads(1, idle_cores=idle, max_threads=2) == 1
