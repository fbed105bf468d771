"""factorize's checkpoint: what pass 1 measured, saved when pass 1 ends (in OUT.checkpoint, or --checkpoint-dir),
removed once the output is in place; and pass 1's progress, recorded while it runs.

At the 7B shape on a CPU the sampling and pass 1 take most of a run (3,866 s of 6,729 in one measured in
benchmarks/README.md): an interrupted pass 2 (Ctrl-C, SIGTERM, a full disk) resumes here with `--resume DIR` instead
of starting over, and one pass 1 can be factorized at other budgets. What is saved is what pass 2 reads of pass 1,
small whatever the model (2.4 MB at the 4-layer 7B shape): the calibration token ids, each target's singular values
and loss-gradient statistics, and what the report says about them; pass 2 recomputes the hidden states from the
token ids.

Pass 1 itself takes hours at the 32-layer 7B shape on a CPU (sampling, gradients and statistics 6,454 s in one run
measured there), so the same checkpoint is also written while it runs, marked unfinished (`progress`): after the
sampling, after the gradients, and after a block of the statistics pass (at most once a minute), with the hidden
states that enter the next block. `--resume DIR` then goes on from there. Each record is a whole checkpoint swapped
into place, so a stop at any moment leaves the last one.

A checkpoint is refused unless the model's files are the ones it was made from (names, sizes, modification times),
the calibration text reads the same, and every setting pass 1 reads is the same; the settings only pass 2 reads
(`PASS2_ONLY`) may differ.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from lowrank_compress.errors import LowrankError
from lowrank_compress.outdir import discard, new_temp_dir
from lowrank_compress.recipe import FactorizeSettings
from lowrank_compress.resume import (
    STATE,
    RecordClock,
    check_same_model,
    check_same_settings,
    finish_checkpoint,
    read_state,
    writing_checkpoint,
)

VERSION = 1
TENSORS = "pass1.safetensors"
# what allocation and pass 2 read alone: a resumed run may change them
PASS2_ONLY = ("budget", "energy", "rank_multiple", "error_aware", "refine_steps", "refine_from", "device",
              "offload")  # fmt: skip
# state.json's objects (beside the command, version, model and chat flags)
SECTIONS = ("files", "requested", "settings", "spectra", "mean_grad_sq", "stable_ranks", "part_weights", "grad_rows",
            "calibration", "timings")  # fmt: skip


def fingerprint(files: Sequence[Path]) -> dict[str, list[int]]:
    """Each model file's size and modification time: a checkpoint of other weights is refused."""
    out = {}
    for f in files:
        st = os.stat(f)
        out[str(Path(f).resolve())] = [st.st_size, st.st_mtime_ns]
    return out


def describe(progress: dict[str, Any]) -> str:
    """An unfinished pass 1's progress in words: "the sampling", "the gradients", "3 blocks"."""
    if progress["phase"] == "blocks":
        n = progress["blocks_done"]
        return f"{n} block{'s' if n != 1 else ''}"
    return f"the {progress['phase']}"


class Recorder:
    """Where a run records pass 1's progress (its checkpoint directory), and what it last recorded there: a run
    stopped in pass 1 names it; one whose pass 1 fails on its input (not on writing a record) removes what it
    recorded (`owned`: the run made this checkpoint, rather than resuming it).

    Two runs resuming one unfinished checkpoint both record in it; the first to finish pass 1 saves its results
    there and goes on to pass 2, which records beside them. The other must then not swap its unfinished pass 1 over
    them: each save writes the run's token into state.json, so a finished pass 1 under a token other than the one
    this run last saw or wrote there is another run's, and this run records nothing more (`warn`)."""

    def __init__(
        self, directory: Path, owned: bool = True, warn: Callable[[str], None] | None = None
    ) -> None:
        self.directory = Path(directory)
        self.owned = owned
        self.warn = warn
        self.recorded: str | None = None  # `describe` of the last record, None before the first
        # a record could not be written (a full disk): the last one is worth keeping
        self.write_failed = False
        self.clock = RecordClock()  # when a block's record is due
        self.token = uuid.uuid4().hex  # this run's, in each state it saves
        # the token of the checkpoint this run last saw or saved there
        self.seen = (_state(self.directory) or {}).get("run")
        self.gave_up = False  # another run finished pass 1 there meanwhile

    def record(
        self, state: dict[str, Any], tensors: dict[str, torch.Tensor], progress: dict[str, Any]
    ) -> None:
        if self.save(state, tensors, progress):
            self.recorded = describe(progress)
        self.clock.reset()

    def save(
        self, state: dict[str, Any], tensors: dict[str, torch.Tensor], progress: dict[str, Any] | None
    ) -> bool:
        """The checkpoint with `progress` (None: pass 1's results) swapped into place; False, saving nothing, once
        another run has finished pass 1 there (said once)."""
        if not self.gave_up:
            state = {**state, "progress": progress, "run": self.token}
            try:
                saved = save(self.directory, state, tensors, unless=self._taken)
            except LowrankError:
                self.write_failed = True
                raise
            if saved:
                self.seen = self.token
                return True
            self.gave_up = True
            if self.warn is not None:
                self.warn(
                    f"another run finished pass 1 in {self.directory} meanwhile; this run records nothing more "
                    "there, and goes on"
                )
        return False

    def _taken(self) -> bool:
        state = _state(self.directory)
        return _finished(state) and (state or {}).get("run") != self.seen

    def due(self) -> bool:
        """A block's record is due: at most one a minute (resume.RECORD_INTERVAL_S; a phase's end is always
        recorded)."""
        return not self.gave_up and self.clock.due()

    def kept(self) -> str | None:
        """What the checkpoint holds of this pass 1, in words, for the message of a stop."""
        if self.gave_up:
            return "another run's pass 1 results are"
        return self.recorded and f"pass 1's progress ({self.recorded}) is"


def _state(directory: Path) -> dict[str, Any] | None:
    """The factorize checkpoint's state.json as it is now; None where there is none to read."""
    try:
        return read_state(Path(directory), "factorize")
    except LowrankError:
        return None


def _finished(state: dict[str, Any] | None) -> bool:
    return state is not None and state.get("progress") is None


def finished(directory: Path) -> bool:
    """`directory` holds a factorize checkpoint of a finished pass 1."""
    return _finished(_state(directory))


def save(
    directory: Path, state: dict[str, Any], tensors: dict[str, torch.Tensor],
    unless: Callable[[], bool] | None = None,
) -> bool:  # fmt: skip
    """state.json and the tensors into a marked temporary directory, then swapped into place, unless `unless()`
    says otherwise just before the swap (then nothing is saved: False)."""
    from safetensors.torch import save_file

    tmp = None
    with writing_checkpoint(directory, lambda: tmp):
        tmp = new_temp_dir(directory, "checkpoint")
        save_file({k: t.detach().cpu().contiguous() for k, t in tensors.items()}, str(tmp / TENSORS))
        with _swapping(Path(directory).parent):
            if unless is not None and unless():
                discard(tmp)
                return False
            finish_checkpoint(tmp, directory, {"command": "factorize", "version": VERSION, **state})
    return True


@contextlib.contextmanager
def _swapping(parent: Path) -> Iterator[None]:
    """An exclusive flock on the checkpoint's parent directory, from the check of what is there to the swap: two
    runs saving into one checkpoint cannot check, then both swap (the other's swap landing between this one's check
    and swap). Held for milliseconds; no file is made for it. Where the directory cannot be locked (a file system
    without flock on directories, as some NFS mounts), the record goes on unlocked, as it did before the lock."""
    import fcntl

    try:
        fd = os.open(parent, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # (releases the lock)


def read(
    directory: Path, model_path: str | Path, settings: FactorizeSettings, files: Sequence[Path]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """state.json and the tensors, after checking the checkpoint was made from these files with the same pass-1
    settings (`settings` as applied to the model, before the calibration is drawn)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    state = read_state(directory, "factorize")
    if state.get("version") != VERSION:
        raise LowrankError(f"{directory}: checkpoint version {state.get('version')} is not {VERSION}")
    missing = [k for k in SECTIONS if not isinstance(state.get(k), dict)]
    if missing:
        raise LowrankError(f"{directory}: the checkpoint's {STATE} is damaged (no {missing[0]})")
    check_same_model(directory, state, model_path)
    if state.get("files") != fingerprint(files):
        raise LowrankError(
            f"{directory}: the model's files changed since the checkpoint was made (size or modification time); "
            "start afresh (without --resume, with --overwrite)"
        )
    check_same_settings(directory, state["requested"], settings, free=PASS2_ONLY)
    try:
        tensors = load_file(str(directory / TENSORS))
    except (OSError, SafetensorError) as e:
        raise LowrankError(f"{directory}: the checkpoint's {TENSORS} is missing or damaged ({e})") from None
    return state, tensors


def applied(state: dict[str, Any], settings: FactorizeSettings) -> FactorizeSettings:
    """The settings pass 1 ran with (as it changed them: e.g. --grad-source answers without a chat template), with
    this run's pass-2 settings."""
    fields = {f.name for f in dataclasses.fields(FactorizeSettings)}
    ran = FactorizeSettings(**{k: v for k, v in state["settings"].items() if k in fields})
    return dataclasses.replace(ran, **{k: getattr(settings, k) for k in PASS2_ONLY})
