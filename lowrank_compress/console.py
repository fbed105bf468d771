"""The `lowrank-compress` entry point: Ctrl-C and SIGTERM are handled first, then the CLI is imported and run.

Why a module of its own: a console script imports the module holding `main` before calling it, and
`lowrank_compress.cli` imports click and builds every command's options. A Ctrl-C while that runs, or while a
command imports torch, must still be one line on stderr and exit 130 (SIGTERM: 143), never a traceback; so this
module imports only the standard library and `main` installs the handlers before importing anything else.

What a signal does depends on when it comes:
- before a command runs (start-up imports, argument parsing): the process ends at once, since nothing was written
  (`os._exit`: a normal exit would finalize half-imported modules, which can print errors of their own);
- while a command runs: KeyboardInterrupt, so that temporary directories are removed and finetune leaves a checkpoint;
  the CLI's error path prints the line;
- a second signal while cleaning up is ignored (SIGKILL still works), and so is one after the command finished: the
  process is only exiting, and Python's shutdown would otherwise die of it silently (it restores the default action).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

_installed: list[int] = []  # the signals whose handler install() set
_received: list[int] = []  # the first signal, once one came
_running = [False]  # a command is running


def signal_received() -> bool:
    """A Ctrl-C or SIGTERM came while the command ran. Its KeyboardInterrupt can surface as another error: raised
    inside a library's native code (safetensors' reader), it comes back wrapped as that library's failure."""
    return bool(_received)


def interrupt_code() -> int:
    """128 + the signal: 143 after SIGTERM, else 130 (Ctrl-C, or a KeyboardInterrupt raised in-process)."""
    return 128 + signal.SIGTERM if signal.SIGTERM in _received else 130


def interrupt_message() -> str:
    what = "terminated (SIGTERM)" if signal.SIGTERM in _received else "interrupted"
    return f"{what}; nothing was written"


def _on_signal(signum: int, frame: FrameType | None) -> None:
    if _received:
        return
    _received.append(signum)
    if _running[0]:
        raise KeyboardInterrupt
    try:
        sys.stderr.write(interrupt_message() + "\n")
        sys.stderr.flush()
    finally:
        os._exit(interrupt_code())


@contextmanager
def command_running() -> Iterator[None]:
    """While a command runs, a signal raises KeyboardInterrupt (its cleanup runs); afterwards it is ignored."""
    _running[0] = True
    try:
        yield
    finally:
        _running[0] = False
        for signum in _installed:
            signal.signal(signum, signal.SIG_IGN)


def install() -> None:
    """Handle SIGINT and SIGTERM where Python's defaults are in place: a SIGINT that the parent made ignored (a
    background job) or a launcher's own SIGTERM handler stays as it is."""
    for signum, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
        if signal.getsignal(signum) == default:
            signal.signal(signum, _on_signal)
            _installed.append(signum)


def main() -> None:
    """The console script `lowrank-compress`, and `python -m lowrank_compress.cli`."""
    install()
    from lowrank_compress.cli import cli

    cli(prog_name="lowrank-compress")
