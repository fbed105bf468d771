"""Output and checkpoint directories never cost the user data: --overwrite and cleanups remove only this tool's own
directories, the swap leaves OUT or the previous OUT at every moment, killed runs are cleaned up, SIGTERM cleans up
like Ctrl-C, and every refusal is one line before any work."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from lowrank_compress import outdir
from lowrank_compress.cli import cli
from lowrank_compress.errors import LowrankError
from lowrank_compress.finetune import FinetuneSettings, finetune
from tests.fixtures import tiny_llama

REPO = Path(__file__).resolve().parents[1]
SVD = ["--method", "svd", "--policy", "uniform"]


# --------------------------------------------------------------------------------------------------- helpers


def tree(directory: Path) -> dict[str, str]:
    """Every file under `directory` (hidden ones included) by relative path, with its SHA-256."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def temporaries(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def run(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_error_line(res, code: int = 1) -> str:
    """The command failed with `code` and said so in exactly one line (warnings aside), without a traceback."""
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output
    lines = [x for x in res.stderr.strip().splitlines() if not x.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


def user_files(directory: Path) -> dict[str, str]:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "thesis.tex").write_text("three years of work\n")
    (directory / "data").mkdir(exist_ok=True)
    (directory / "data" / "results.csv").write_text("a,b\n1,2\n")
    return tree(directory)


def our_output(directory: Path, content: str = "old") -> dict[str, str]:
    """A finished output of this tool (marker and all), as atomic_output_dir writes it."""
    with outdir.atomic_output_dir(directory, overwrite=False) as tmp:
        (tmp / "model.safetensors").write_text(content)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "x.json").write_text(json.dumps({"content": content}))
    return tree(directory)


def dead_pid() -> int:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(proc.stdout)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    return pid


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("model"))


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a model means work began: every refusal here must come before it."""

    def load_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("work started before the refusal")

    monkeypatch.setattr("lowrank_compress.loading.load_model", load_model)


# --------------------------------------------------------------------------------------------------- finetune's checkpoint dir


@pytest.mark.parametrize("case", ["equal", "equal-ours", "parent", "inside", "foreign", "model"])
def test_finetune_refuses_a_checkpoint_dir_that_would_delete_data(
    case: str, factorized: Path, data: Path, tmp_path: Path, no_work: None
) -> None:
    model_before = tree(factorized)
    work = tmp_path / "work"
    out = work / "o"
    extra: list[str] = []
    if case == "equal":  # the end-of-run cleanup would delete the result just written
        ckpt = out
    elif case == "equal-ours":  # ... or, with --overwrite, the previous output
        our_output(out)
        ckpt, extra = out, ["--overwrite"]
    elif case == "parent":  # ... or the whole folder holding it
        ckpt = work
    elif case == "inside":
        ckpt = out / "ckpt"
    elif case == "foreign":  # --overwrite must not make a foreign folder fair game
        ckpt, extra = tmp_path / "mine", ["--overwrite"]
        user_files(ckpt)
    else:
        ckpt = factorized
    if case == "parent":
        user_files(work / "notes")
    kept = {p: tree(p) for p in (work, ckpt) if p.is_dir()}

    res = run(
        "finetune", factorized, "--data", data, "-o", out, "--checkpoint-dir", ckpt, "--steps", "1", *extra
    )
    line = one_error_line(res)
    expected = "not a lowrank-compress checkpoint" if case == "foreign" else "checkpoint directory"
    assert expected in line and str(ckpt) in line, line
    assert tree(factorized) == model_before
    for path, before in kept.items():
        assert tree(path) == before
    if case != "equal-ours":
        assert not out.exists()
    assert temporaries(tmp_path) == [] and (not work.is_dir() or temporaries(work) == [])


def test_finetune_keeps_a_users_empty_checkpoint_dir_and_removes_only_its_own(
    factorized: Path, data: Path, tmp_path: Path
) -> None:
    settings = FinetuneSettings(data=str(data), seq_len=64, rank=2, eval_tokens=0, batch_size=2, steps=2)
    empty = tmp_path / "empty"
    empty.mkdir()
    finetune(factorized, tmp_path / "a", settings, checkpoint_dir=empty)  # an empty directory may be used
    assert empty.is_dir() and not any(empty.iterdir())  # no checkpoint was written into it: it stays

    ckpt = tmp_path / "ckpt"
    finetune(factorized, tmp_path / "b", dataclasses.replace(settings, save_every=1), checkpoint_dir=ckpt)
    assert not ckpt.exists()  # its own checkpoint (marked) is removed at the end
    assert (tmp_path / "b" / ".lowrank-compress").is_file() and temporaries(tmp_path) == []


# --------------------------------------------------------------------------------------------------- -o . and -o ''


@pytest.mark.parametrize("where", [".", ""])
@pytest.mark.parametrize("command", ["factorize", "finetune", "sweep", "analyze"])
def test_the_current_directory_is_never_an_output(
    command: str, where: str, model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_work: None
) -> None:
    cwd = tmp_path / "cwd"
    before = user_files(cwd)
    model_before = tree(model)
    monkeypatch.chdir(cwd)
    option = "--out" if command == "analyze" else "-o"
    extra = ["--budgets", "0.5"] if command == "sweep" else []
    line = one_error_line(run(command, model, option, where, "--overwrite", *extra))
    assert "current directory" in line, line
    assert tree(cwd) == before and tree(model) == model_before
    assert temporaries(tmp_path) == [] and temporaries(cwd) == []


def test_a_parent_of_the_current_directory_is_never_an_output(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_work: None
) -> None:
    before = user_files(tmp_path / "a")
    (tmp_path / "a" / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a" / "b")
    line = one_error_line(run("factorize", model, "-o", "..", "--overwrite"))
    assert "contains the current directory" in line
    assert tree(tmp_path / "a") == before


# --------------------------------------------------------------------------------------------------- --overwrite


def test_overwrite_refuses_a_foreign_directory(model: Path, tmp_path: Path, no_work: None) -> None:
    out = tmp_path / "out"
    before = user_files(out)
    line = one_error_line(run("factorize", model, "-o", out, "--overwrite", *SVD))
    assert "not a lowrank-compress output" in line and str(out) in line
    assert tree(out) == before and temporaries(tmp_path) == []


@pytest.mark.parametrize(
    ("command", "option"),
    [("factorize", "--calibration"), ("sweep", "--data"), ("sweep", "--answers"), ("finetune", "--data"),
     ("finetune", "--eval-data"), ("finetune", "--answers")],
)  # fmt: skip
def test_overwrite_never_deletes_a_data_file_inside_the_old_output(
    command: str, option: str, model: Path, factorized: Path, data: Path, tmp_path: Path, no_work: None
) -> None:
    """A text or answer set the user keeps inside an earlier output and passes to the run would be deleted with
    that output by --overwrite (after the run had read it): refused before any work, everything left as it was."""
    out = tmp_path / "out"
    our_output(out)
    mine = out / ("mine.jsonl" if option == "--answers" else "mine.txt")
    mine.write_text(LINE if option == "--answers" else data.read_text())
    before = tree(out)
    source = factorized if command == "finetune" else model
    extra = {"sweep": ["--budgets", "0.5"], "finetune": ["--data", data]}.get(command, [])
    line = one_error_line(run(command, source, "-o", out, "--overwrite", *extra, option, mine))
    assert "contains the input" in line and str(mine) in line, line
    assert tree(out) == before and temporaries(tmp_path) == []


LINE = '{"prompt": "What is 2 + 2?", "answers": ["4"]}\n'


def test_overwrite_replaces_a_previous_output(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    model_before = tree(model)
    assert run("factorize", model, "-o", out, "--budget", "0.7", *SVD).exit_code == 0
    assert json.loads((out / ".lowrank-compress").read_text())["tool"] == "lowrank-compress"
    res = run("factorize", model, "-o", out, "--budget", "0.5", "--overwrite", *SVD)
    assert res.exit_code == 0, res.output
    assert json.loads((out / "report.json").read_text())["settings"]["budget"] == 0.5
    assert tree(model) == model_before and temporaries(tmp_path) == []


def test_overwrite_replaces_a_legacy_output_without_the_marker(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "lowrank"}}))
    (out / "model.safetensors").write_text("old")
    assert outdir.ours(out) == "output"
    with outdir.atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "model.safetensors").write_text("new")
    assert (out / "model.safetensors").read_text() == "new" and not (out / "config.json").exists()
    assert temporaries(tmp_path) == []
    # a folder that merely has a config.json of another kind is not ours
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (other / "report.json").write_text(json.dumps({"accuracy": 0.9}))
    assert outdir.ours(other) is None
    with pytest.raises(LowrankError, match="not a lowrank-compress output"):
        outdir.check_output_dir(other, overwrite=True)


# --------------------------------------------------------------------------------------------------- the swap


def _swap_states(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool) -> list[str]:
    """Replace an output of ours, looking at the directory after every rename / exchange: OUT must hold the old or
    the new output, or (the documented window of the two-rename fallback) the old one must sit at .out.old-*."""
    out = tmp_path / "out"
    old = our_output(out, "old")
    new: dict[str, str] = {}
    states: list[str] = []

    def look() -> None:
        if out.is_dir() and tree(out) in (old, new):
            states.append("old" if tree(out) == old else "new")
            return
        aside = [p for p in tmp_path.iterdir() if ".out.old-" in p.name]
        assert len(aside) == 1 and tree(aside[0]) == old, sorted(p.name for p in tmp_path.iterdir())
        states.append("aside")

    real_rename, real_exchange = os.rename, outdir.exchange

    def rename(a: object, b: object) -> None:
        real_rename(a, b)
        look()

    def swap(a: Path, b: Path) -> bool:
        if not exchange:
            return False
        done = real_exchange(a, b)
        look()
        return done

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(outdir, "exchange", swap)
    with outdir.atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "model.safetensors").write_text("new")
        new.update(tree(tmp))
        look()
    assert tree(out) == new and temporaries(tmp_path) == []
    return states


def test_the_exchange_leaves_out_at_every_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    if not outdir.exchange(a, b):
        pytest.skip("no renameat2(RENAME_EXCHANGE) here")
    assert (b / "x").read_text() == "a" and not (a / "x").exists()  # one atomic swap
    swap = tmp_path / "swap"
    swap.mkdir()
    assert _swap_states(swap, monkeypatch, exchange=True) == ["old", "new"]


def test_the_two_rename_fallback_keeps_the_old_output_beside_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # between the two renames OUT is missing, but the previous OUT is complete beside it (and restored by the next
    # run, see test_a_run_killed_mid_fallback_is_restored_by_the_next_one)
    assert _swap_states(tmp_path, monkeypatch, exchange=False) == ["old", "aside", "new"]


def test_a_crash_right_after_the_exchange_leaves_the_new_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    our_output(out, "old")
    real = outdir.exchange

    def exchange_then_crash(a: Path, b: Path) -> bool:
        if not real(a, b):
            pytest.skip("no renameat2(RENAME_EXCHANGE) here")
        assert (Path(b) / "model.safetensors").read_text() == "new"  # OUT is the new one already,
        assert (Path(a) / "model.safetensors").read_text() == "old"  # the old one is complete beside it
        raise RuntimeError("crash")

    monkeypatch.setattr(outdir, "exchange", exchange_then_crash)
    with pytest.raises(RuntimeError, match="crash"), outdir.atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "model.safetensors").write_text("new")
    assert (out / "model.safetensors").read_text() == "new" and temporaries(tmp_path) == []


def test_a_failed_second_rename_puts_the_old_output_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    old = our_output(out, "old")
    real_rename = os.rename
    calls = []

    def rename(a: object, b: object) -> None:
        calls.append((a, b))
        if len(calls) == 2:
            raise OSError(errno.EIO, "Input/output error", str(a))
        real_rename(a, b)

    monkeypatch.setattr(outdir, "exchange", lambda a, b: False)
    monkeypatch.setattr(os, "rename", rename)
    failed = pytest.raises(LowrankError, match=r"^cannot replace .*out: Input/output error$")
    with failed, outdir.atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "model.safetensors").write_text("new")
    assert tree(out) == old and temporaries(tmp_path) == []


_CHILD = """
import os, sys, types
from pathlib import Path
pkg = types.ModuleType("lowrank_compress"); pkg.__path__ = [sys.argv[1]]; sys.modules["lowrank_compress"] = pkg
from lowrank_compress import outdir
real_rename = os.rename
def rename(a, b):
    real_rename(a, b)
    os._exit(9)  # killed between the two renames of the fallback
outdir.exchange = lambda a, b: False
os.rename = rename
with outdir.atomic_output_dir(Path(sys.argv[2]), overwrite=True) as tmp:
    (tmp / "model.safetensors").write_text("new")
"""


def test_a_run_killed_mid_fallback_is_restored_by_the_next_one(tmp_path: Path) -> None:
    out = tmp_path / "out"
    old = our_output(out, "old")
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(REPO / "lowrank_compress"), str(out)], timeout=60
    )
    assert proc.returncode == 9
    assert not out.exists()
    aside = [p for p in tmp_path.iterdir() if ".out.old-" in p.name]
    assert len(aside) == 1 and tree(aside[0]) == old and len(temporaries(tmp_path)) == 2

    said: list[str] = []
    with pytest.raises(LowrankError, match="not empty"):  # the old output is back, so a plain run is refused
        outdir.check_output_dir(out, overwrite=False, warn=said.append)
    assert tree(out) == old and temporaries(tmp_path) == []
    assert (
        len(said) == 2
        and any(m.startswith(f"restored {out}") for m in said)
        and any("removed" in m for m in said)
    )


# --------------------------------------------------------------------------------------------------- stale temporaries


def test_stale_temporaries_of_killed_runs_are_removed_and_reported(tmp_path: Path) -> None:
    out = tmp_path / "out"
    pid = dead_pid()
    stale = tmp_path / f".out.tmp-{pid}-0123abcd"  # ours, its process gone: removed
    stale.mkdir()
    outdir.write_marker(stale)
    (stale / "model.safetensors").write_text("half")
    unmarked = tmp_path / f".out.tmp-{pid}-4567abcd"  # no marker: not ours, left alone
    unmarked.mkdir()
    (unmarked / "keep.txt").write_text("keep")
    running = tmp_path / f".out.tmp-{os.getpid()}-89abcdef"  # its process is alive: left alone
    running.mkdir()
    outdir.write_marker(running)
    other = tmp_path / f".other.tmp-{pid}-0123abcd"  # beside another output: not looked at
    other.mkdir()
    outdir.write_marker(other)

    said: list[str] = []
    outdir.check_output_dir(out, overwrite=False, warn=said.append)
    assert not stale.exists()
    assert said == [f"removed {stale}, left by a killed run (pid {pid})"]
    assert (unmarked / "keep.txt").read_text() == "keep" and running.is_dir() and other.is_dir()


def test_stale_temporaries_are_reported_on_stderr_by_the_cli(
    model: Path, tmp_path: Path, no_work: None
) -> None:
    pid = dead_pid()
    stale = tmp_path / f".out.old-{pid}-0123abcd"
    stale.mkdir()
    outdir.write_marker(stale)
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("mine")
    res = run("factorize", model, "-o", out, *SVD)  # refused (not empty), after the cleanup
    assert f"warning: removed {stale}, left by a killed run (pid {pid})" in res.stderr
    assert (
        "not empty" in one_error_line(res) and not stale.exists() and (out / "mine.txt").read_text() == "mine"
    )


def test_scratch_space_of_killed_runs_is_removed_by_the_next(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    pid = dead_pid()
    stale = tmp_path / f"lowrank-compress-stash-{pid}-abc123"  # ours, its process gone: removed
    stale.mkdir()
    outdir.write_marker(stale, outdir.SCRATCH)
    (stale / "text-3.safetensors").write_text("hidden states")
    unmarked = tmp_path / f"lowrank-compress-stash-{pid}-def456"  # no marker: not ours, left alone
    unmarked.mkdir()
    output = tmp_path / f"lowrank-compress-sweep-{pid}-0a1b2c"  # marked an output: not scratch, left alone
    output.mkdir()
    outdir.write_marker(output)
    running = tmp_path / f"lowrank-compress-stash-{os.getpid()}-789abc"  # its process is alive: left alone
    running.mkdir()
    outdir.write_marker(running, outdir.SCRATCH)

    said: list[str] = []
    with outdir.scratch_dir("sweep", said.append) as fresh:
        assert Path(fresh).name.startswith(f"lowrank-compress-sweep-{os.getpid()}-")
        assert outdir.marker_kind(fresh) == outdir.SCRATCH
    assert not Path(fresh).exists() and not stale.exists()
    assert said == [f"removed {stale}, left by a killed run (pid {pid})"]
    assert unmarked.is_dir() and output.is_dir() and running.is_dir()


def test_a_factorize_killed_outright_leaves_its_stash_to_the_next_run(model: Path, tmp_path: Path) -> None:
    """SIGKILL (the OOM killer) cannot be cleaned up after: the next run removes what it left, output and stash."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(scratch)}
    cmd = [sys.executable, "-m", "lowrank_compress.cli", "factorize", str(model), "-o", "out"]
    cmd += ["--self-mix", "0"]  # the sensitivity policy's gradient windows are stashed for the backward pass
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        marked = lambda: [d for d in scratch.iterdir() if outdir.marker_kind(d) == outdir.SCRATCH]  # noqa: E731
        while not marked() and proc.poll() is None and time.monotonic() < deadline:  # the stash, marked
            time.sleep(0.005)
        proc.kill()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    left = [p.name for p in scratch.iterdir()]
    assert left and all(name.startswith(f"lowrank-compress-stash-{proc.pid}-") for name in left), left

    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    for name in left:
        assert f"warning: removed {scratch / name}, left by a killed run (pid {proc.pid})" in again.stderr
    assert list(scratch.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["out", "tmp"]


# --------------------------------------------------------------------------------------------------- SIGTERM


def test_sigterm_cleans_up_like_ctrl_c(model: Path, tmp_path: Path) -> None:
    model_before = tree(model)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "lowrank_compress.cli",
        "factorize",
        str(model),
        "-o",
        "out",
        *SVD,
        "--evaluate",
    ]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 240
        while not temporaries(tmp_path) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert temporaries(tmp_path), "the run never built its output"  # evaluating the written model
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = [
        x
        for x in err.replace("\r", "\n").splitlines()
        if x.strip() and not x.startswith("warning: ") and "%|" not in x  # progress bars of libraries
    ]
    assert proc.returncode == 143, err
    assert lines == ["terminated (SIGTERM); nothing was written"], err
    assert sorted(p.name for p in tmp_path.iterdir()) == [] and tree(model) == model_before


# --------------------------------------------------------------------------------------------------- unwritable places


def test_a_parent_that_is_a_file_is_one_line(model: Path, tmp_path: Path, no_work: None) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    line = one_error_line(run("factorize", model, "-o", tmp_path / "notes.txt" / "out", *SVD))
    assert (
        line
        == f"error: cannot create {tmp_path / 'notes.txt' / 'out'}: {tmp_path / 'notes.txt'} is not a directory"
    )
    assert (tmp_path / "notes.txt").read_text() == "mine"
    line = one_error_line(run("factorize", model, "-o", tmp_path / "notes.txt", *SVD))
    assert "exists and is not a directory" in line and (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_parent_is_one_line(model: Path, tmp_path: Path, no_work: None) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        line = one_error_line(run("factorize", model, "-o", ro / "out", *SVD))
        assert line == f"error: cannot create {ro / 'out'}: {ro} is not writable (Permission denied)"
    finally:
        ro.chmod(0o755)


def test_an_os_error_while_creating_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def read_only(self: Path, *args: object, **kwargs: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    out = tmp_path / "out"
    with pytest.raises(LowrankError) as e, outdir.atomic_output_dir(out, overwrite=False):
        pass
    assert str(e.value) == f"cannot create {out}: Read-only file system"
    assert temporaries(tmp_path) == []


def test_published_files_get_ordinary_permissions(tmp_path: Path) -> None:
    """safetensors' save_file (behind save_pretrained) writes 0600; what replace_dir publishes is 0666 / 0777 less the
    umask, executables keep their execute bits, and symlinks are left alone."""
    import numpy as np
    from safetensors.numpy import save_file

    from lowrank_compress.outdir import current_umask, new_temp_dir, replace_dir

    target = tmp_path / "out"
    tmp = new_temp_dir(target)
    save_file({"a": np.zeros(2, dtype=np.float32)}, str(tmp / "model.safetensors"))
    (tmp / "sub").mkdir(mode=0o700)
    (tmp / "sub" / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(tmp / "sub" / "run.sh", 0o700)
    private = tmp_path / "private.txt"
    private.write_text("mine\n")
    os.chmod(private, 0o600)
    (tmp / "link").symlink_to(private)
    (tmp / "dirlink").symlink_to(tmp_path)
    before = tmp_path.stat().st_mode
    replace_dir(tmp, target)
    allowed = ~current_umask()
    assert (target / "model.safetensors").stat().st_mode & 0o777 == 0o666 & allowed
    assert (target / "sub").stat().st_mode & 0o777 == 0o777 & allowed
    assert (target / "sub" / "run.sh").stat().st_mode & 0o777 == 0o777 & allowed
    assert (target / "link").is_symlink() and private.stat().st_mode & 0o777 == 0o600
    assert tmp_path.stat().st_mode == before
