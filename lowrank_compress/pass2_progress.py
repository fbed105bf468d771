"""Pass 2's progress in factorize's checkpoint, so that a stopped run resumes at the block it stopped in.

Pass 2 at the 7B shape on a CPU takes about an hour (more than 80 s a block), at 70B many: a stop near its end used to
throw all of it away. Where factorize keeps a checkpoint (pass 1's results, pass1_checkpoint.py), pass 2 writes the
output's shards into CHECKPOINT/pass2/shards/ (hard-linked into the output once it is complete, kept until the output
is in place) and, after a block (at most one record a minute: resume.RECORD_INTERVAL_S), records there what the
next block starts from: the writer's state (which tensors
are in which shard), the hidden states that enter the next block (the dense model's and the compressed prefix's), each
finished layer's result and the block peaks. `--resume CHECKPOINT` at the same budget and pass-2 settings goes on at
the next block; at others, or where the progress is damaged, it is discarded (said) and pass 2 starts from its first
block: the output is the same either way.

What a block adds on disk is its share of the output plus the hidden states (about 0.5 GB at the 7B shape with the
default 32 windows, rewritten with each record), against one block's work of a minute or more on a CPU.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from lowrank_compress.errors import LowrankError
from lowrank_compress.outdir import current_umask
from lowrank_compress.resume import RecordClock
from lowrank_compress.writer import ShardWriter

DIR = "pass2"
SHARDS = "shards"
STATE = "state.json"
VERSION = 1
# what reading a damaged progress raises
_DAMAGED: tuple[type[BaseException], ...] = (
    OSError, ValueError, KeyError, TypeError, AttributeError, LowrankError, SafetensorError,
)  # fmt: skip


class Pass2Progress:
    """One output's pass 2 in the checkpoint `checkpoint`: `key` (the budget, the applied settings, the ranks, the
    shard size) must match for a recorded progress to be taken up."""

    def __init__(self, checkpoint: Path, key: dict[str, Any]) -> None:
        self.directory = Path(checkpoint) / DIR
        self.shards = self.directory / SHARDS
        self.key = json.loads(json.dumps(key))  # as it reads back
        self.clock = RecordClock()

    def due(self) -> bool:
        """A block's record is due: at most one a minute (resume.RECORD_INTERVAL_S)."""
        return self.clock.due()

    def writer(
        self, max_shard_size: str | int, warn: Callable[[str], None]
    ) -> tuple[ShardWriter, tuple[dict[str, Any], dict[str, torch.Tensor]] | None]:
        """A shard writer in the progress's shards, with the recorded state and tensors when they are this pass
        2's (the writer then goes on after the recorded blocks); else a fresh one, the earlier progress discarded:
        one of other settings, or a damaged one, is said."""
        from safetensors.torch import load_file

        state_file = self.directory / STATE
        if state_file.is_file():
            try:
                state = json.loads(state_file.read_text(encoding="utf-8"))
                if state.get("version") == VERSION and state.get("key") == self.key:
                    tensors = load_file(str(self.directory / state["flow"]))
                    return ShardWriter.resume(self.shards, state["writer"], max_shard_size), (state, tensors)
                warn(
                    f"{self.directory} holds pass 2's progress at other settings (budget, pass-2 options or shard "
                    "size); pass 2 starts from its first block"
                )
            except _DAMAGED as e:
                warn(
                    f"{self.directory}: pass 2's progress is damaged ({e}); pass 2 starts from its first block"
                )
        self.remove()
        self.shards.mkdir(parents=True)
        return ShardWriter(self.shards, max_shard_size), None

    def record(self, block: int, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """After `block` blocks: the tensors in a file of their own, then the state naming it swapped into place,
        then the earlier tensors removed; a stop at any point leaves a state and the tensors it names."""
        from safetensors.torch import save_file

        flow = f"flow-{block:05d}.safetensors"
        save_file({k: t.detach().cpu().contiguous() for k, t in tensors.items()}, str(self.directory / flow))
        os.chmod(self.directory / flow, 0o666 & ~current_umask())  # (safetensors writes 0600)
        tmp = self.directory / f".{STATE}.tmp"
        state = {"version": VERSION, "key": self.key, "flow": flow, "blocks_done": block, **state}
        tmp.write_text(json.dumps(state) + "\n", encoding="utf-8")
        os.replace(tmp, self.directory / STATE)
        for old in self.directory.glob("flow-*.safetensors"):
            if old.name != flow:
                old.unlink()
        self.clock.reset()

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


LOCK = f"{DIR}.lock"


@contextlib.contextmanager
def claimed(progress: Pass2Progress | None, warn: Callable[[str], None]) -> Iterator[Pass2Progress | None]:
    """`progress` while this run holds the checkpoint's pass-2 lock (an exclusive flock beside it); None when there is
    none, or another run resuming the same checkpoint holds it (said: this run then records nothing)."""
    import fcntl

    if progress is None:
        yield None
        return
    where = progress.directory.parent
    try:
        lock = open(where / LOCK, "a")  # noqa: SIM115 - closed below
    except OSError as e:  # a read-only checkpoint still gives pass 1's results
        warn(f"cannot record pass 2's progress in {where} ({e.strerror or e}); this run records none")
        yield None
        return
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            warn(f"another run records pass 2 in {where}; this one records no progress")
            yield None
            return
        try:
            yield progress
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
