"""What the two resumable commands share (finetune's checkpoints, factorize's pass-1 checkpoint): where the
checkpoint directory is and whether it may be used, and its state.json, read and checked against the command that
resumes it. Each command writes its own contents; both write them into a marked temporary directory swapped into
place (outdir.py), so a crash leaves a whole checkpoint or none."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

from lowrank_compress.errors import LowrankError
from lowrank_compress.outdir import check_checkpoint_dir, discard, ours, replace_dir, replaceable

STATE = "state.json"
# The shortest time between two block records of a pass's progress. A record writes the hidden states entering the
# next block (0.27-0.54 GB at the 7B shape, 0.6 s with an fsync on a plain disk), while a block of a small model, or
# of a 7B one on a GPU, takes seconds: at most one record a minute keeps that cost to about a percent, and a stop
# then loses at most a minute of blocks besides the one it was in.
RECORD_INTERVAL_S = 60.0


class RecordClock:
    """Whether a pass's next block record is due (RECORD_INTERVAL_S since the pass began or last recorded)."""

    def __init__(self) -> None:
        self._last = time.monotonic()

    def due(self) -> bool:
        return time.monotonic() - self._last >= RECORD_INTERVAL_S

    def reset(self) -> None:
        self._last = time.monotonic()


def default_checkpoint_dir(out: str | Path) -> Path:
    return Path(out).parent / f"{Path(out).name}.checkpoint"


def checkpoint_dir_for(
    out: str | Path, checkpoint_dir: str | Path | None, apart_from: Mapping[str, str | Path],
    resume: str | Path | None, overwrite: bool, warn: Callable[[str], None] | None,
) -> Path:  # fmt: skip
    """The checkpoint directory (`checkpoint_dir`, else OUT.checkpoint), apart from OUT and the inputs
    (`check_checkpoint_dir`). An earlier run's checkpoint there is not thrown away without --overwrite, unless
    this run resumes from it."""
    directory = Path(checkpoint_dir) if checkpoint_dir else default_checkpoint_dir(out)
    check_checkpoint_dir(directory, {"the output": out, **apart_from}, warn=warn)
    resuming_here = resume is not None and Path(resume).resolve() == directory.resolve()
    if ours(directory) == "checkpoint" and not resuming_here and not overwrite:
        raise LowrankError(
            f"{directory}: a checkpoint of an earlier run is there; continue it with --resume {directory}, "
            "or pass --overwrite to start afresh"
        )
    return directory


@contextlib.contextmanager
def writing_checkpoint(directory: Path, temporary: Callable[[], Path | None]) -> Iterator[None]:
    """Around a checkpoint's writing: any failure removes this run's temporary directory (`temporary()`, None
    where another process owns it), and an OSError becomes one line."""
    try:
        yield
    except OSError as e:
        discard(temporary())
        raise LowrankError(f"cannot write the checkpoint {directory}: {e.strerror or e}") from e
    except BaseException:
        discard(temporary())
        raise


def finish_checkpoint(tmp: Path, directory: Path, state: dict[str, Any]) -> None:
    """state.json into the checkpoint built in `tmp`, then the swap into place, unless something other than a
    checkpoint took the place meanwhile."""
    (tmp / STATE).write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
    if not replaceable(directory, ("checkpoint",)):
        raise LowrankError(f"{directory}: not a lowrank-compress checkpoint any more; not replacing it")
    replace_dir(tmp, directory)


def read_state(directory: Path, command: str) -> dict[str, Any]:
    """The checkpoint's state.json, refusing a missing or damaged one and another command's (finetune's written
    before the field existed name no command)."""
    state_file = directory / STATE
    if not state_file.is_file():
        raise LowrankError(f"{directory}: not a {command} checkpoint (no {STATE})")
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LowrankError(f"{directory}: the checkpoint's {STATE} is damaged ({e})") from None
    if not isinstance(state, dict):
        raise LowrankError(f"{directory}: the checkpoint's {STATE} is damaged (not a JSON object)")
    made_by = state.get("command", "finetune")
    if made_by != command:
        raise LowrankError(f"{directory}: a {made_by} checkpoint; {command} cannot resume it")
    return state


def check_same_model(directory: Path, state: Mapping[str, Any], model_path: str | Path) -> None:
    if state.get("model") != str(Path(model_path).resolve()):
        raise LowrankError(
            f"{directory}: the checkpoint was made from {state.get('model')}, not {model_path}"
        )


def check_same_settings(
    directory: Path, saved: Mapping[str, Any], settings: Any, free: Collection[str] = ()
) -> None:
    """Refuse a checkpoint made with other settings than `settings` (a settings dataclass), except the `free` ones;
    an option added since the checkpoint was written counts as its default there."""
    mine, default = dataclasses.asdict(settings), dataclasses.asdict(type(settings)())
    differ = sorted(
        k for k in mine if k not in free and _jsonable(saved.get(k, default[k])) != _jsonable(mine[k])
    )
    if differ:
        raise LowrankError(
            f"{directory}: the checkpoint was made with other settings ({', '.join(differ)}); "
            "resume with the same command"
        )


def _jsonable(value: Any) -> Any:
    """A value as it reads back from JSON (tuples are lists there)."""
    return json.loads(json.dumps(value))
