"""How many CPU threads torch may use: `--threads N`, or torch's own default lowered when the machine is busy.

Why: on a machine whose cores are busy, torch's threads spin against each other and against the other jobs. On the
2-core machine this project is developed on, the demo's evaluate took 1,635 s with torch's default threads and 175 s
with one, and its speed ratios came out inverted (prefill 0.76x where one thread measures 1.16x). Lowering the
default to the cores nobody else is using costs little on an idle machine (nothing is lowered) and saves the run
on a busy one.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from lowrank_compress.errors import LowrankError


def idle_cores(load: float | None, cores: int) -> int | None:
    """Cores not taken by other work by the 1-minute load average (at least 1; None when the load is unknown)."""
    if load is None:
        return None
    return max(1, round(cores - load))


def choose_threads(requested: int | None, warn: Callable[[str], None]) -> int:
    """Set torch's intra-op threads and return the number: `requested` when given, else torch's default, lowered
    to the idle cores (with a warning) when the load average says other jobs hold the rest, unless OMP_NUM_THREADS
    already says how many the user wants."""
    import torch

    from lowrank_compress.evaluate import load_average, machine_cores

    if requested is not None:
        if requested < 1:
            raise LowrankError(f"--threads must be at least 1, got {requested}")
        torch.set_num_threads(requested)
        return requested
    default = torch.get_num_threads()
    if os.environ.get("OMP_NUM_THREADS"):  # the user chose torch's threads already
        return default
    load, cores = load_average(), machine_cores()
    free = idle_cores(load, cores)
    if free is not None and free < default:
        warn(
            f"the machine is busy (load average {load:.2f} on {cores} cores): using {free} thread"
            f"{'s' if free > 1 else ''} instead of torch's {default}; --threads N chooses"
        )
        torch.set_num_threads(free)
        return free
    return default
