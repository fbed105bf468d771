"""Several runs of one piece of code in lockstep: each run goes until it reaches a pause point, and only when every run
has reached it does the caller act (fit a group of layers from all batches' inputs) and let them go on.

The in-order error-aware fit needs, for each group of layers in a block, the inputs every calibration batch gives it
with the groups before it already factorized. Running the block once per group up to that group costs several
forward passes per block; pausing one forward pass per batch at each group costs one. Each run lives in its own
thread, but only one thread runs at a time (the cores go to one forward pass), so the result is what running the
batches one after another would give.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Iterator, Sequence
from types import TracebackType
from typing import Any

import torch

from lowrank_compress.errors import LowrankError


class _Aborted(BaseException):
    """Raised inside a paused run when the lockstep is abandoned, so its thread unwinds and ends."""


class Lockstep:
    """Run `jobs` (one per batch) in lockstep. In a job, `pause(key, value)` parks the run; `pauses()` yields
    (key, [(job index, value), ...]) each time every unfinished run is parked at the same key, and resumes them when
    the caller asks for the next one. `results` holds each job's return value once `pauses()` is exhausted.

    Use as a context manager: leaving it early (an error in the caller) abandons the parked runs cleanly."""

    def __init__(self, jobs: Sequence[Callable[[], Any]]) -> None:
        self._jobs = list(jobs)
        self.results: list[Any] = [None] * len(self._jobs)
        self._turn = [threading.Event() for _ in self._jobs]
        self._back = threading.Event()
        self._parked: dict[int, tuple[Hashable, Any]] = {}
        self._waiting = set(range(len(self._jobs)))  # runs blocked until their turn: not started, or parked
        self._error: BaseException | None = None
        self._abort = False
        self._threads: list[threading.Thread] = []
        self._local = threading.local()

    def __enter__(self) -> Lockstep:
        # a new thread starts with OpenMP's default team size, not the caller's torch setting
        threads = torch.get_num_threads()
        for i in range(len(self._jobs)):
            t = threading.Thread(target=self._body, args=(i, threads), daemon=True, name=f"lockstep-{i}")
            t.start()
            self._threads.append(t)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._abort = True
        for i in sorted(self._waiting):
            self._step(i)
        for t in self._threads:
            t.join()

    def pause(self, key: Hashable, value: Any = None) -> None:
        """Called from inside a job: park this run at `key` until the caller resumes it."""
        i = self._local.index
        self._parked[i] = (key, value)
        self._waiting.add(i)
        self._back.set()
        self._turn[i].wait()
        self._turn[i].clear()
        if self._abort:
            raise _Aborted

    def pauses(self) -> Iterator[tuple[Hashable, list[tuple[int, Any]]]]:
        live = list(range(len(self._jobs)))
        while live:
            for i in live:
                self._step(i)
            if self._error is not None:
                raise self._error
            live = [i for i in live if i in self._parked]
            if not live:
                return
            keys = {self._parked[i][0] for i in live}
            if len(keys) > 1:
                raise LowrankError(
                    f"the calibration batches took different paths through the block (paused at {sorted(map(str, keys))})"
                )
            yield keys.pop(), [(i, self._parked[i][1]) for i in live]

    def _step(self, i: int) -> None:
        """Let run i go on until it parks or ends; the caller's thread waits meanwhile."""
        self._parked.pop(i, None)
        self._waiting.discard(i)
        self._back.clear()
        self._turn[i].set()
        self._back.wait()

    def _body(self, i: int, threads: int) -> None:
        self._local.index = i
        torch.set_num_threads(threads)
        self._turn[i].wait()
        self._turn[i].clear()
        try:
            if not self._abort:
                self.results[i] = self._jobs[i]()
        except _Aborted:
            pass
        except BaseException as e:  # handed to the caller's thread, which raises it
            self._error = self._error or e
        finally:
            self._back.set()
