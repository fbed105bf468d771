"""Output and checkpoint directories: what lowrank-compress may write to, what it may replace, and the swap.

Every directory the tool creates (outputs, finetune checkpoints, and the hidden temporaries they are built in) holds
a small JSON marker, `.lowrank-compress`. `--overwrite` and every cleanup remove only a directory that carries it (or,
for outputs written before the marker existed, one that a small legacy rule recognizes), and never the current
directory, a directory holding it, an input, or anything else: a non-empty foreign directory is refused before any
work is done. An empty existing directory may always be used.

A result is built in a hidden temporary directory beside its target, `.NAME.tmp-PID-TAG`, and moved into place at
the end. On Linux an existing target is swapped with renameat2(RENAME_EXCHANGE), one atomic step, so a crash at any
moment leaves the target or the previous target; the previous one is then deleted. Where the system cannot exchange
(no renameat2, or a file system without RENAME_EXCHANGE) it takes two renames: the previous target becomes
`.NAME.old-PID-TAG`, then the new one takes its name. A crash between those two leaves no target but the previous one
beside it, and the next run on that target puts it back.

Temporary directories of killed runs (marked, and whose process is gone) are removed, or restored, when the next run
checks the same target, with a warning. Scratch space in the system's temporary folder (the calibration stash, a
sweep's models), `lowrank-compress-WHAT-PID-*`, is marked too, and what a killed run left there is removed when the
next run asks for scratch space.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import re
import shutil
import signal
import stat
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from lowrank_compress.errors import LowrankError

MARKER = ".lowrank-compress"
KINDS = ("output", "checkpoint", "report")  # report: a folder `report -o DIR` created
SCRATCH = "scratch"  # a marked directory in the system's temporary folder (never an output)

# Directories written before the marker existed: a file of this tool whose JSON object has these keys.
_LEGACY_FILES = {
    "output": (
        ("report.json", ("summary", "layers")),  # factorize and analyze
        ("finetune.json", ("settings", "losses")),
        ("sweep.json", ("dense", "points")),
    ),
    "checkpoint": (("state.json", ("step", "settings")),),
}

Warn = Callable[[str], None]


def _stderr_warn(message: str) -> None:
    sys.stderr.write(f"warning: {message}\n")


def _cause(e: OSError) -> str:
    return e.strerror or str(e)


# --------------------------------------------------------------------------------------------------- ownership


def write_marker(directory: Path, kind: str = "output") -> None:
    """Mark `directory` as made by lowrank-compress (an output, a finetune checkpoint, a report folder or scratch
    space)."""
    if kind not in (*KINDS, SCRATCH):
        raise ValueError(f"unknown directory kind {kind!r}")
    data = {"tool": "lowrank-compress", "kind": kind, "marker_version": 1}
    (Path(directory) / MARKER).write_text(json.dumps(data) + "\n", encoding="utf-8")


def _json_object(path: Path) -> dict | None:
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > 64 * 2**20:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def marker_kind(directory: str | Path) -> str | None:
    """The kind ("output", "checkpoint", "report", "scratch") when `directory` carries this tool's marker, else
    None."""
    data = _json_object(Path(directory) / MARKER)
    if not data or data.get("tool") != "lowrank-compress":
        return None
    kind = data.get("kind", "output")
    return kind if kind in (*KINDS, SCRATCH) else None


def ours(directory: str | Path) -> str | None:
    """The kind of lowrank-compress directory `directory` is ("output" or "checkpoint"), or None when it is not one
    (or is not a real directory). The marker decides; without it, the legacy rule for outputs and checkpoints written
    before the marker existed: config.json of quant_method "lowrank", our report.json / finetune.json / sweep.json, or
    a finetune checkpoint's state.json."""
    d = Path(directory)
    if d.is_symlink() or not d.is_dir():
        return None
    kind = marker_kind(d)
    if kind:
        return kind
    config = _json_object(d / "config.json")
    quant = config.get("quantization_config") if config else None
    if isinstance(quant, dict) and quant.get("quant_method") == "lowrank":
        return "output"
    for kind, files in _LEGACY_FILES.items():
        for name, keys in files:
            data = _json_object(d / name)
            if data is not None and all(k in data for k in keys):
                return kind
    return None


def _is_empty_dir(directory: Path) -> bool:
    try:
        return not any(directory.iterdir())
    except OSError as e:
        raise LowrankError(f"cannot read {directory}: {_cause(e)}") from None


def replaceable(directory: str | Path, kinds: Sequence[str] = KINDS) -> bool:
    """True when `directory` does not exist, is an empty directory, or is one of this tool's (of `kinds`)."""
    d = Path(directory)
    if not (d.exists() or d.is_symlink()):
        return True
    if d.is_symlink() or not d.is_dir():
        return False
    return _is_empty_dir(d) or ours(d) in kinds


# --------------------------------------------------------------------------------------------------- checks


def _is_within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _cwd() -> Path | None:
    try:
        return Path.cwd().resolve()
    except OSError:  # the current directory was deleted
        return None


def _shown(path: Path) -> str:
    return str(path) or "."


def _check_not_cwd(path: Path, option: str) -> None:
    cwd = _cwd()
    if cwd is not None and _is_within(cwd, path.resolve()):
        where = "is the current directory" if path.resolve() == cwd else "contains the current directory"
        raise LowrankError(f"{_shown(path)}: {where}; it can never be replaced, pick another {option}")


def _check_creatable(path: Path) -> None:
    """Fail early, in one line, when the directory that would hold `path` cannot be written: a parent that is a file,
    a read-only file system, no permission."""
    parent = Path(os.path.abspath(path)).parent
    while not (parent.exists() or parent.is_symlink()) and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise LowrankError(f"cannot create {_shown(path)}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        cause = "Permission denied"
        with contextlib.suppress(OSError, AttributeError):
            if os.statvfs(parent).f_flag & os.ST_RDONLY:
                cause = "Read-only file system"
        raise LowrankError(f"cannot create {_shown(path)}: {parent} is not writable ({cause})")


_KEYWORDS = {"builtin", "chat", "none"}  # values of --data / --calibration / --answers that name no file


def data_files(*values: str | Path | None) -> list[Path]:
    """Of options' values, those naming an existing file (a calibration text, an answer set): user data that an
    output must not contain, for --overwrite would delete it with the old output. Keywords (builtin, chat, none)
    and unset options name no file."""
    return [
        Path(v)
        for v in values
        if v is not None and str(v).strip().lower() not in _KEYWORDS and Path(v).is_file()
    ]


def named_inputs(source: Any, settings: Any) -> dict[str, Path]:
    """What a factorize output or checkpoint may neither be, sit inside, nor contain, by name: the model (and its
    directory) and the calibration text."""
    files = {f"the calibration text {p}": p for p in data_files(settings.calibration)}
    return {"MODEL": Path(source.path), "the model's directory": Path(source.directory), **files}


def protected_inputs(source: Any, settings: Any) -> list[Path]:
    return list(named_inputs(source, settings).values())


def check_output_dir(
    out: str | Path,
    overwrite: bool,
    inputs: Sequence[str | Path] = (),
    *,
    warn: Warn | None = None,
    option: str = "-o",
) -> None:
    """Refuse, before any work, an output that would clobber something: a path equal to, inside, or containing an
    input or the current directory; a file or a symbolic link; a non-empty directory without `overwrite`, or with
    it one that is not a lowrank-compress output or checkpoint; a place that cannot be written. Removes (or restores)
    what killed runs left beside `out` first (see `clean_stale`)."""
    out = Path(out)
    target = out.resolve()
    for inp in inputs:
        src = Path(inp).resolve()
        if _is_within(target, src):
            raise LowrankError(
                f"{_shown(out)}: the output is inside the input {inp}; never write into the input, "
                f"pick another {option}"
            )
        if _is_within(src, target):
            raise LowrankError(
                f"{_shown(out)}: the output directory contains the input {inp}; pick another {option}"
            )
    _check_not_cwd(out, option)
    clean_stale(out, warn)
    if out.is_symlink():
        raise LowrankError(f"{out}: is a symbolic link; give the directory itself, or pick another {option}")
    if out.exists():
        if not out.is_dir():
            raise LowrankError(f"{out}: exists and is not a directory; pick another {option}")
        if not _is_empty_dir(out):
            if not overwrite:
                raise LowrankError(
                    f"{out}: output directory is not empty; pass --overwrite or pick another {option}"
                )
            if ours(out) is None:
                raise LowrankError(
                    f"{out}: not a lowrank-compress output (no {MARKER} marker), so --overwrite will not replace it; "
                    f"pick another {option} or empty it yourself"
                )
    _check_creatable(out)


def check_checkpoint_dir(
    directory: str | Path,
    apart_from: Mapping[str, str | Path],
    *,
    warn: Warn | None = None,
    option: str = "--checkpoint-dir",
) -> None:
    """Refuse a checkpoint directory equal to, inside, or containing any of `apart_from` (e.g. {"the output": OUT,
    "MODEL": MODEL}) or the current directory, one that is a file or a link, or a non-empty one that is not a
    lowrank-compress checkpoint (the finished run removes its checkpoint; only ours may be removed)."""
    d = Path(directory)
    target = d.resolve()
    for what, other in apart_from.items():
        o = Path(other).resolve()
        if _is_within(target, o) or _is_within(o, target):
            relation = "is" if target == o else "is inside" if _is_within(target, o) else "contains"
            raise LowrankError(
                f"{_shown(d)}: the checkpoint directory {relation} {what} {other}; it is deleted when the run "
                f"finishes, so pick another {option}"
            )
    _check_not_cwd(d, option)
    clean_stale(d, warn)
    if d.is_symlink() or (d.exists() and not d.is_dir()):
        raise LowrankError(f"{d}: exists and is not a directory; pick another {option}")
    if d.exists() and not _is_empty_dir(d) and ours(d) != "checkpoint":
        raise LowrankError(
            f"{d}: not a lowrank-compress checkpoint (no {MARKER} marker); checkpoints replace and finally delete "
            f"their directory, so pick another {option}"
        )
    _check_creatable(d)


# --------------------------------------------------------------------------------------------------- stale temporaries


def _alive(pid: int) -> bool:
    if (
        pid == os.getpid() or os.name == "nt"
    ):  # on Windows os.kill would terminate the process: never guess there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError, ValueError):  # EPERM: alive, someone else's
        return True
    return True


def _temp_name(target: Path, what: str) -> str:
    return f".{target.name}.{what}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def clean_stale(target: str | Path, warn: Warn | None = None) -> list[Path]:
    """Remove the `.NAME.tmp-PID-*` / `.NAME.old-PID-*` directories that killed runs left beside `target`: only those
    carrying the marker whose process is gone. A previous output moved aside (`.old-`) by a run killed mid-swap is
    renamed back to `target` when `target` is missing. Each is reported through `warn` (default: a stderr line).
    Returns the paths acted on."""
    target = Path(target)
    say = warn or _stderr_warn
    if not target.name:
        return []
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(?P<what>tmp|old)-(?P<pid>\d+)-[0-9a-f]+")
    stale = _left_by_killed_runs(target.parent, pattern, KINDS)
    stale.sort(key=lambda s: (s[0]["what"] != "old", -_mtime(s[1])))  # the newest previous output first
    done = []
    for m, p in stale:
        if m["what"] == "old" and not (target.exists() or target.is_symlink()):
            try:
                os.rename(p, target)
            except OSError as e:
                say(
                    f"could not restore {target} from {p}, left by a killed run (pid {m['pid']}): {_cause(e)}"
                )
                continue
            say(f"restored {target} from {p.name}, which a killed run (pid {m['pid']}) left mid-replacement")
            done.append(p)
        elif _remove_reported(p, m["pid"], say):
            done.append(p)
    return done


def _left_by_killed_runs(
    folder: Path, pattern: re.Pattern[str], kinds: Sequence[str]
) -> list[tuple[re.Match[str], Path]]:
    """The directories in `folder` marked as one of `kinds` whose name matches `pattern` and whose process (group
    `pid`) is gone."""
    try:
        entries = list(folder.iterdir())
    except OSError:
        return []
    found = []
    for p in entries:
        m = pattern.fullmatch(p.name)
        if m and not p.is_symlink() and p.is_dir() and not _alive(int(m["pid"])) and marker_kind(p) in kinds:
            found.append((m, p))
    return found


def _remove_reported(path: Path, pid: str, say: Warn) -> bool:
    """Remove what a killed run left and say so (or why it could not be); True when removed."""
    try:
        _remove_tree(path)
    except OSError as e:
        say(f"could not remove {path}, left by a killed run (pid {pid}): {_cause(e)}")
        return False
    say(f"removed {path}, left by a killed run (pid {pid})")
    return True


def scratch_dir(what: str, warn: Warn | None = None) -> tempfile.TemporaryDirectory:
    """A marked directory in the system's temporary folder, `lowrank-compress-WHAT-PID-*`, deleted when the returned
    object is cleaned up or collected. First removes those that killed runs (SIGKILL, the OOM killer) left there:
    a run's calibration stash holds hidden states for every block."""
    clean_stale_scratch(warn)
    scratch = tempfile.TemporaryDirectory(prefix=f"lowrank-compress-{what}-{os.getpid()}-")
    write_marker(Path(scratch.name), SCRATCH)
    return scratch


_SCRATCH_NAME = re.compile(r"lowrank-compress-[a-z]+-(?P<pid>\d+)-.+")


def clean_stale_scratch(warn: Warn | None = None) -> list[Path]:
    """Remove the scratch directories (this user's, marked) whose process is gone; returns those removed."""
    say = warn or _stderr_warn
    done = []
    for m, p in _left_by_killed_runs(Path(tempfile.gettempdir()), _SCRATCH_NAME, (SCRATCH,)):
        if _mine(p) and _remove_reported(p, m["pid"], say):
            done.append(p)
    return done


def _mine(path: Path) -> bool:
    """Owned by this user (another user's scratch is theirs to clean)."""
    try:
        return path.stat().st_uid == os.getuid()
    except OSError:
        return False


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0


def _remove_tree(path: Path) -> None:
    """Delete a directory, its marker last: a deletion cut short still carries the marker, so a later run finishes
    it."""
    for child in path.iterdir():
        if child.name == MARKER:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    (path / MARKER).unlink(missing_ok=True)
    path.rmdir()


def remove_ours(directory: str | Path, kinds: Sequence[str] = KINDS, warn: Warn | None = None) -> bool:
    """Delete `directory` only if it is a lowrank-compress directory of one of `kinds`; True when it was deleted."""
    d = Path(directory)
    if ours(d) not in kinds:
        return False
    try:
        _remove_tree(d)
    except OSError as e:
        (warn or _stderr_warn)(f"could not remove {d}: {_cause(e)}")
        return False
    return True


# --------------------------------------------------------------------------------------------------- the swap

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


@functools.lru_cache(maxsize=1)
def _renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library older than glibc 2.28
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def exchange(a: str | Path, b: str | Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 RENAME_EXCHANGE). False where the system cannot
    (no renameat2, or a file system without RENAME_EXCHANGE); an OSError for any other failure."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM for the few system calls of a swap, then deliver them: the bookkeeping of which
    directory is which cannot be cut between two of its steps."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(sig)
        if handler is not None:
            previous[sig] = signal.signal(sig, lambda s, _frame: pending.append(s))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(pending):
            signal.raise_signal(sig)


def current_umask() -> int:
    """The process's umask (read by setting and restoring it: the only portable way)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def ordinary_permissions(root: Path) -> None:
    """Give everything under `root` the permissions a plain `open` or `mkdir` would: files 0666 (0777 when they were
    executable) and folders 0777, less the umask. Why: some writers create private files (safetensors' save_file,
    which save_pretrained calls, writes 0600), and a published model should be readable like the rest of its
    folder. Symlinks are left alone."""
    allowed = ~current_umask()
    for folder, dirs, files in os.walk(root):
        os.chmod(folder, 0o777 & allowed)
        for name in files:
            path = os.path.join(folder, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISREG(mode):
                os.chmod(path, (0o777 if mode & 0o111 else 0o666) & allowed)
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(folder, d))]


def replace_dir(tmp: Path, target: Path, warn: Warn | None = None) -> None:
    """Move the finished directory `tmp` to `target`, replacing what is there (the caller has checked that it may be
    replaced), so that every crash window leaves `target` or the previous `target` (module docstring). Its files get
    ordinary permissions first (`ordinary_permissions`)."""
    tmp, target = Path(tmp), Path(target)
    try:
        ordinary_permissions(tmp)
    except OSError as e:
        raise LowrankError(f"cannot set the permissions of {target}: {_cause(e)}") from None
    with _signals_deferred():
        if not (target.exists() or target.is_symlink()):
            try:
                os.rename(tmp, target)
            except OSError as e:
                raise LowrankError(f"cannot create {target}: {_cause(e)}") from None
            return
        if (
            marker_kind(target) is None
        ):  # a legacy output, or empty: mark it so a cut-short deletion is finished later
            with contextlib.suppress(OSError):
                write_marker(target, ours(target) or "output")
        try:
            if exchange(tmp, target):
                old = tmp  # tmp holds the previous target now
            else:
                old = target.parent / _temp_name(target, "old")
                os.rename(target, old)
                # a crash here leaves no target, and the previous one at `old`: the next run renames it back
                try:
                    os.rename(tmp, target)
                except BaseException:
                    os.rename(old, target)
                    raise
        except OSError as e:
            raise LowrankError(f"cannot replace {target}: {_cause(e)}") from None
        try:
            _remove_tree(old)
        except OSError as e:
            (warn or _stderr_warn)(f"could not remove the previous {target} (now {old}): {_cause(e)}")


def new_temp_dir(target: str | Path, kind: str = "output") -> Path:
    """A fresh marked hidden directory beside `target` (parents created), named `.NAME.tmp-PID-TAG`."""
    target = Path(target)
    try:
        if not target.parent.is_dir():
            target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LowrankError(f"cannot create {e.filename or target.parent}: {_cause(e)}") from None
    tmp = target.parent / _temp_name(target, "tmp")
    try:
        tmp.mkdir()
    except OSError as e:
        raise LowrankError(f"cannot create {target}: {_cause(e)}") from None
    try:
        write_marker(tmp, kind)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise LowrankError(f"cannot create {target}: {_cause(e)}") from None
        raise
    return tmp


def discard(tmp: Path | None) -> None:
    """Remove a temporary directory of this run, quietly (a failure leaves a marked directory for a later run)."""
    if tmp is not None and tmp.is_dir() and not tmp.is_symlink():
        with contextlib.suppress(OSError):
            _remove_tree(tmp)


@contextlib.contextmanager
def atomic_output_dir(
    out: str | Path,
    overwrite: bool,
    inputs: Sequence[str | Path] = (),
    *,
    warn: Warn | None = None,
    kind: str = "output",
    option: str = "-o",
) -> Iterator[Path]:
    """Yield a fresh marked hidden directory beside `out`; on success it replaces `out` (see `replace_dir`).

    `out` is checked first (`check_output_dir`) and again before the swap. On any exception (KeyboardInterrupt
    included) the temporary directory is removed and `out` is untouched; an OSError becomes one LowrankError line.
    """
    out = Path(out)
    check_output_dir(out, overwrite, inputs, warn=warn, option=option)
    tmp = None
    try:
        tmp = new_temp_dir(out, kind)
        yield tmp
        check_output_dir(out, overwrite, inputs, warn=warn, option=option)  # did something appear meanwhile?
        replace_dir(tmp, out, warn)
    except OSError as e:
        discard(tmp)
        raise LowrankError(f"cannot write {out}: {_cause(e)}") from e
    except BaseException:
        discard(tmp)
        raise
