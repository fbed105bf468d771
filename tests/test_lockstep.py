"""The lockstep runner behind the in-order error-aware fit: every run pauses at each point until all have reached it,
one run at a time, and nothing is left running when the caller stops early."""

from __future__ import annotations

import ctypes
import threading

import pytest
import torch

from lowrank_compress.errors import LowrankError
from lowrank_compress.lockstep import Lockstep


def _job(lockstep: list[Lockstep], i: int, log: list[str], running: list[int]) -> int:
    def step(what: str) -> None:
        running[0] += 1
        assert running[0] == 1, "two runs at once"
        log.append(f"{what}{i}")
        running[0] -= 1

    step("a")
    lockstep[0].pause("first", i * 10)
    step("b")
    lockstep[0].pause("second", i * 100)
    step("c")
    return i + 1


def test_every_run_reaches_a_pause_before_any_goes_past_it() -> None:
    log: list[str] = []
    running = [0]
    ref: list[Lockstep] = []
    with Lockstep([lambda i=i: _job(ref, i, log, running) for i in range(3)]) as lockstep:
        ref.append(lockstep)
        seen = []
        for key, parked in lockstep.pauses():
            seen.append((key, parked))
            log.append(f"fit {key}")
    assert seen == [("first", [(0, 0), (1, 10), (2, 20)]), ("second", [(0, 0), (1, 100), (2, 200)])]
    assert log == ["a0", "a1", "a2", "fit first", "b0", "b1", "b2", "fit second", "c0", "c1", "c2"]
    assert lockstep.results == [1, 2, 3]


def test_an_error_in_a_run_reaches_the_caller_and_no_thread_is_left() -> None:
    before = threading.active_count()
    ref: list[Lockstep] = []

    def job(i: int) -> None:
        ref[0].pause("first")
        if i == 1:
            raise ValueError("boom")
        ref[0].pause("second")

    with (
        pytest.raises(ValueError, match="boom"),
        Lockstep([lambda i=i: job(i) for i in range(3)]) as lockstep,
    ):
        ref.append(lockstep)
        for _ in lockstep.pauses():
            pass
    assert threading.active_count() == before


def test_a_caller_that_stops_early_leaves_no_thread_and_no_run_goes_on() -> None:
    before = threading.active_count()
    after_pause: list[int] = []
    ref: list[Lockstep] = []

    def job(i: int) -> None:
        ref[0].pause("first")
        after_pause.append(i)

    with pytest.raises(KeyError), Lockstep([lambda i=i: job(i) for i in range(4)]) as lockstep:
        ref.append(lockstep)
        for _ in lockstep.pauses():
            raise KeyError("the fit failed")
    assert after_pause == []
    assert threading.active_count() == before


def test_runs_that_take_different_paths_are_refused_in_one_line() -> None:
    ref: list[Lockstep] = []
    jobs = [lambda: ref[0].pause("q_proj"), lambda: ref[0].pause("expert_3")]
    with pytest.raises(LowrankError, match="different paths"), Lockstep(jobs) as lockstep:
        ref.append(lockstep)
        list(lockstep.pauses())


def test_runs_use_the_callers_torch_thread_count() -> None:
    """A new thread starts with OpenMP's default team size (every core), which MKL's matrix products use, whatever
    torch.set_num_threads said in the caller's thread (torch.get_num_threads() there still reads the global value,
    so the OpenMP runtime itself is asked)."""
    try:
        gomp = ctypes.CDLL("libgomp.so.1")  # the runtime torch loaded, found by its soname
    except OSError:
        pytest.skip("torch here does not use GNU OpenMP")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with Lockstep([gomp.omp_get_max_threads, gomp.omp_get_max_threads]) as lockstep:
            assert list(lockstep.pauses()) == []
        assert lockstep.results == [1, 1]
    finally:
        torch.set_num_threads(previous)
