"""How many CPU threads torch may use: `--threads N`, or torch's own default lowered when the machine is busy.

Why: on a machine whose cores are busy, torch's threads spin against each other and against the other jobs. On the
2-core machine this project is developed on, the demo's evaluate took 1,635 s with torch's default threads and 175 s
with one, and its speed ratios came out inverted (prefill 0.76x where one thread measures 1.16x). Lowering the
default to the cores nobody else is using costs little on an idle machine (nothing is lowered) and saves the run
on a busy one.

"Busy" is what other processes use now, sampled from /proc/stat, not the load average: that one trails by a
minute, so a command started right after another (a script, a benchmark's next run) saw the finished job's load
and ran on one thread of two for nothing (factorize on SmolLM2: 188 s against 143 s).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from lowrank_compress.errors import LowrankError


def idle_cores(busy: float | None, cores: int) -> int | None:
    """Cores not taken by other work (at least 1; None when the other work is unknown)."""
    if busy is None:
        return None
    return max(1, round(cores - busy))


def _cpu_ticks() -> tuple[int, int] | None:
    """Busy and total CPU time of the whole machine since boot, in clock ticks (Linux's /proc/stat; else None)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    if len(fields) < 8:
        return None
    idle = fields[3] + fields[4]  # idle, iowait
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest time is inside user)
    return total - idle, total


def other_busy_cores(interval: float = 0.25) -> float | None:
    """Cores kept busy by other processes over the next `interval` seconds: the machine's busy CPU time less this
    process's own, over the elapsed time (None where /proc/stat is missing)."""
    before, own_before = _cpu_ticks(), _own_cpu_seconds()
    if before is None:
        return None
    time.sleep(interval)
    after, own_after = _cpu_ticks(), _own_cpu_seconds()
    if after is None or after[1] <= before[1]:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    busy = (after[0] - before[0]) - (own_after - own_before) * ticks
    return max(0.0, busy / (after[1] - before[1]) * machine_cores_online())


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def machine_cores_online() -> int:
    """The CPUs /proc/stat's totals cover (all online ones, not only those this process may use)."""
    return os.cpu_count() or 1


def choose_threads(requested: int | None, warn: Callable[[str], None]) -> int:
    """Set torch's intra-op threads and return the number: `requested` when given, else torch's default, lowered
    to the idle cores (with a warning) when other jobs hold the rest now, unless OMP_NUM_THREADS
    already says how many the user wants."""
    import torch

    from lowrank_compress.evaluate import machine_cores

    if requested is not None:
        if requested < 1:
            raise LowrankError(f"--threads must be at least 1, got {requested}")
        torch.set_num_threads(requested)
        return requested
    default = torch.get_num_threads()
    if os.environ.get("OMP_NUM_THREADS"):  # the user chose torch's threads already
        return default
    busy, cores = other_busy_cores(), machine_cores()
    free = idle_cores(busy, cores)
    if free is not None and free < default:
        warn(
            f"the machine is busy (other jobs use {busy:.1f} of {cores} cores): using {free} thread"
            f"{'s' if free > 1 else ''} instead of torch's {default}; --threads N chooses"
        )
        torch.set_num_threads(free)
        return free
    return default
