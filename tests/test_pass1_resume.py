"""factorize's unfinished pass 1 resumes where it stopped: after the sampling, after the gradients, or at the block
of the statistics pass after the last one recorded, to the output an uninterrupted run writes, without drawing or
measuring again what the checkpoint holds (pass1_checkpoint.Recorder)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from lowrank_compress import pass1_checkpoint, resume
from lowrank_compress.cli import cli
from lowrank_compress.errors import InterruptedWithCheckpoint, LowrankError
from lowrank_compress.pass1_checkpoint import Recorder, describe
from lowrank_compress.pipeline import Prepared, factorize_model
from lowrank_compress.recipe import build_settings
from tests.fixtures import interrupt_pass_2, load_state_dict, tiny_llama

# the default method and policy (whiten, sensitivity, loss-weighted, self-generated share), small
SMALL = {"samples": 8, "seq_len": 64, "grad_samples": 2, "budget": 0.6}


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("model"), num_layers=4)


@pytest.fixture(autouse=True)
def record_every_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny model's blocks take milliseconds: without this, pass 1 would record no block."""
    monkeypatch.setattr(resume, "RECORD_INTERVAL_S", 0.0)


def stop_after_record(mp: pytest.MonkeyPatch, when: str) -> None:
    """Stop (KeyboardInterrupt) right after pass 1 records `when` ("the sampling", "the gradients", "2 blocks"):
    a stop anywhere before the next record leaves the same checkpoint."""
    record = Recorder.record

    def stopping(self: Recorder, state: dict, tensors: dict, progress: dict) -> None:
        record(self, state, tensors, progress)
        if describe(progress) == when:
            raise KeyboardInterrupt

    mp.setattr(Recorder, "record", stopping)


def stop_in_statistics(mp: pytest.MonkeyPatch, block: int) -> None:
    """Stop (KeyboardInterrupt) as the statistics pass sums block `block` (1-based)."""
    block_sums, summed = Prepared._block_sums, []

    def stopping(self: Prepared, modules: dict) -> object:
        summed.extend([1] if modules else [])  # (the gradient windows' pass sums nothing)
        if len(summed) == block:
            raise KeyboardInterrupt
        return block_sums(self, modules)

    mp.setattr(Prepared, "_block_sums", stopping)


def spy(mp: pytest.MonkeyPatch) -> dict[str, list]:
    """What a run does of pass 1: the calibration drawn, the gradient passes, the statistics pass's first block."""
    seen: dict[str, list] = {"drawn": [], "gradients": [], "statistics_from": []}
    draw, gradient_pass, forward = Prepared._draw_calibration, Prepared._gradient_pass, Prepared._forward

    def drawing(self: Prepared, *a: object) -> None:
        seen["drawn"].append(True)
        draw(self, *a)

    def gradients(self: Prepared, *a: object) -> object:
        seen["gradients"].append(True)
        return gradient_pass(self, *a)

    def forwarding(self: Prepared, flow: object, spectra: object = None, *a: object, **kw: object) -> None:
        if spectra is not None:
            seen["statistics_from"].append(kw.get("start", 0))
        forward(self, flow, spectra, *a, **kw)

    mp.setattr(Prepared, "_draw_calibration", drawing)
    mp.setattr(Prepared, "_gradient_pass", gradients)
    mp.setattr(Prepared, "_forward", forwarding)
    return seen


def same_tensors(a: Path, b: Path) -> bool:
    sa, sb = load_state_dict(a), load_state_dict(b)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def same_report(out: Path, reference: Path) -> None:
    report, ref = (json.loads((d / "report.json").read_text()) for d in (out, reference))
    for key in ("layers", "summary", "spectra"):
        assert report[key] == ref[key], key
    memory = ("self_sampling_peak_mb",)  # measured by the stopped run, not the reference
    assert {k: v for k, v in report["calibration"].items() if k not in memory} == {
        k: v for k, v in ref["calibration"].items() if k not in memory
    }


@pytest.fixture(scope="module")
def reference(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "out"
    factorize_model(source, out, build_settings(**SMALL))
    return out


@pytest.mark.parametrize(
    ("when", "drawn", "gradients", "statistics_from"),
    [("the sampling", 0, 1, 0), ("the gradients", 0, 0, 0), ("2 blocks", 0, 0, 2)],
)
def test_a_stop_in_pass_1_goes_on_where_it_stopped(
    source: Path, reference: Path, tmp_path: Path, when: str, drawn: int, gradients: int, statistics_from: int
) -> None:
    out, ckpt = tmp_path / "out", tmp_path / "out.checkpoint"
    settings = build_settings(**SMALL)
    with pytest.MonkeyPatch.context() as mp:
        stop_after_record(mp, when)
        with pytest.raises(
            InterruptedWithCheckpoint,
            match=rf"nothing was written to {out}; pass 1's progress \({when}\) is in {ckpt}: "
            rf"run the same command with --resume {ckpt}$",
        ):
            factorize_model(source, out, settings)
    assert not out.exists()
    assert describe(json.loads((ckpt / "state.json").read_text())["progress"]) == when

    with pytest.MonkeyPatch.context() as mp:
        seen = spy(mp)
        result = factorize_model(source, out, settings, resume=ckpt)
    assert (len(seen["drawn"]), len(seen["gradients"]), seen["statistics_from"]) == (
        drawn, gradients, [statistics_from]
    )  # fmt: skip
    assert same_tensors(out, reference)
    same_report(out, reference)
    report = json.loads((out / "report.json").read_text())
    assert result.pass1_resumed_after == report["pass1_resumed_after"] == when
    assert report["resumed_from"] == str(ckpt) and "resume" in report["timings_s"]
    assert {"sampling", "gradients", "calibration"} <= report["timings_s"].keys()
    assert not ckpt.exists()  # removed once the output is in place


def test_a_resumed_pass_1_stopped_again_resumes_again_and_then_in_pass_2(
    source: Path, reference: Path, tmp_path: Path
) -> None:
    """Stopped after 1 block, resumed and stopped after 3, resumed and stopped in pass 2, resumed: the same
    output; the continued run records into the checkpoint it resumed."""
    out, ckpt = tmp_path / "out", tmp_path / "out.checkpoint"
    settings = build_settings(**SMALL)
    for when, resume_from in (("1 block", None), ("3 blocks", ckpt)):
        with pytest.MonkeyPatch.context() as mp:
            stop_after_record(mp, when)
            with pytest.raises(
                InterruptedWithCheckpoint, match=rf"pass 1's progress \({when}\) is in {ckpt}"
            ):
                factorize_model(source, out, settings, resume=resume_from)
    with pytest.MonkeyPatch.context() as mp:
        interrupt_pass_2(mp, KeyboardInterrupt())
        with pytest.raises(
            InterruptedWithCheckpoint, match="pass 1's results and pass 2's finished blocks are in"
        ):
            factorize_model(source, out, settings, resume=ckpt)
    assert json.loads((ckpt / "state.json").read_text())["progress"] is None
    with pytest.MonkeyPatch.context() as mp:
        seen = spy(mp)
        result = factorize_model(source, out, settings, resume=ckpt)
    assert seen == {"drawn": [], "gradients": [], "statistics_from": []}
    assert result.pass2_resumed_at == 2 and result.pass1_resumed_after is None
    assert same_tensors(out, reference)
    same_report(out, reference)


def test_data_free_spectra_are_recorded_block_by_block(source: Path, tmp_path: Path) -> None:
    """Data-free spectra (the energy policy) read the weights alone: recorded after each block, resumed at the
    next one."""
    settings = build_settings(method="svd", policy="energy", budget=0.6)
    reference = factorize_model(source, tmp_path / "reference", settings)
    out = tmp_path / "out"
    with pytest.MonkeyPatch.context() as mp:
        stop_after_record(mp, "2 blocks")
        with pytest.raises(InterruptedWithCheckpoint, match=r"pass 1's progress \(2 blocks\)"):
            factorize_model(source, out, settings)
    measured: list[str] = []
    spectra = Prepared._spectra

    def measuring(self: Prepared, names: list[str], *a: object, **kw: object) -> None:
        measured.extend(names)
        spectra(self, names, *a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Prepared, "_spectra", measuring)
        resumed = factorize_model(source, out, settings, resume=tmp_path / "out.checkpoint")
    assert measured and all(".layers.2." in n or ".layers.3." in n for n in measured)
    assert same_tensors(out, tmp_path / "reference")
    assert [x.rank for x in resumed.layers] == [x.rank for x in reference.layers]


def test_a_statistics_pass_that_stashes_goes_on_after_the_sampling(source: Path, tmp_path: Path) -> None:
    """Sensitivity ranks without the loss-weighted fit run the backward pass after the statistics pass, from the
    gradient windows' inputs it stashed: those are not kept, so that pass records no block, and a stop inside it
    goes on after the sampling."""
    settings = build_settings(**SMALL, loss_weighted=False)
    factorize_model(source, tmp_path / "reference", settings)
    out = tmp_path / "out"
    with pytest.MonkeyPatch.context() as mp:
        stop_in_statistics(mp, block=3)
        with pytest.raises(InterruptedWithCheckpoint, match=r"pass 1's progress \(the sampling\)"):
            factorize_model(source, out, settings)
    with pytest.MonkeyPatch.context() as mp:
        seen = spy(mp)
        factorize_model(source, out, settings, resume=tmp_path / "out.checkpoint")
    assert seen == {"drawn": [], "gradients": [True], "statistics_from": [0]}
    assert same_tensors(out, tmp_path / "reference")


def test_an_error_in_pass_1_on_the_input_removes_the_progress_a_disk_error_keeps_it(
    source: Path, tmp_path: Path
) -> None:
    """Resuming would meet an error on the input again: the progress this run recorded goes. A record it could
    not write (a full disk) keeps the last one, named; so does a resumed run (with what it recorded)."""
    settings = build_settings(**SMALL)
    spectra = Prepared._spectra

    def bad_block_3(self: Prepared, names: list[str], *a: object, **kw: object) -> None:
        if any(".layers.2." in n for n in names):
            raise LowrankError("model.layers.2.mlp.up_proj.weight has NaN values")
        spectra(self, names, *a, **kw)

    out, ckpt = tmp_path / "out", tmp_path / "out.checkpoint"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Prepared, "_spectra", bad_block_3)
        with pytest.raises(LowrankError, match="has NaN values$"):
            factorize_model(source, out, settings)
    assert not out.exists() and not ckpt.exists()

    save = pass1_checkpoint.save

    def disk_full(directory: Path, state: dict, tensors: dict, unless: object = None) -> bool:
        if describe(state["progress"]) == "2 blocks":
            raise LowrankError(f"cannot write the checkpoint {directory}: No space left on device")
        return save(directory, state, tensors, unless)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pass1_checkpoint, "save", disk_full)
        with pytest.raises(
            LowrankError,
            match=rf"pass 1's progress \(1 block\) is kept in {ckpt}: run the command again with",
        ):
            factorize_model(source, out, settings)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Prepared, "_spectra", bad_block_3)
        with pytest.raises(
            LowrankError, match=rf"has NaN values; pass 1's progress \(2 blocks\) is kept in {ckpt}"
        ):
            factorize_model(source, out, settings, resume=ckpt)
    assert describe(json.loads((ckpt / "state.json").read_text())["progress"]) == "2 blocks"


def test_the_cli_says_where_pass_1_stopped_and_resumes(source: Path, reference: Path, tmp_path: Path) -> None:
    out, ckpt = tmp_path / "out", tmp_path / "out.checkpoint"
    command = ["factorize", str(source), "-o", str(out), "--budget", "0.6", "--samples", "8", "--seq-len", "64",
               "--grad-samples", "2"]  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        stop_after_record(mp, "2 blocks")
        res = CliRunner().invoke(cli, command)
    assert res.exit_code == 130, res.output
    assert res.stderr.strip().splitlines()[-1] == (
        f"interrupted; nothing was written to {out}; pass 1's progress (2 blocks) is in {ckpt}: "
        f"run the same command with --resume {ckpt}"
    )
    res = CliRunner().invoke(cli, command)
    assert res.exit_code == 1 and f"continue it with --resume {ckpt}" in res.stderr
    res = CliRunner().invoke(cli, [*command, "--resume", str(ckpt), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["pass1_resumed_after"] == "2 blocks"
    assert same_tensors(out, reference)


def test_going_on_without_a_recorder_records_nothing(source: Path, tmp_path: Path) -> None:
    """sweep's way: `Prepared.load(resume=)` with no recorder goes on with an unfinished pass 1 to the same
    spectra, and leaves the checkpoint as it was."""
    settings = build_settings(**SMALL)
    ckpt = tmp_path / "out.checkpoint"
    with pytest.MonkeyPatch.context() as mp:
        stop_after_record(mp, "3 blocks")
        with pytest.raises(InterruptedWithCheckpoint):
            factorize_model(source, tmp_path / "out", settings)
    before = {p.name: p.read_bytes() for p in ckpt.iterdir() if p.is_file()}
    went_on, fresh = Prepared.load(source, settings, resume=ckpt), Prepared.load(source, settings)
    assert went_on.pass1_resumed_after == "3 blocks" and not went_on.pass1_finished_in_checkpoint
    for a, b in zip(went_on.candidates, fresh.candidates, strict=True):
        assert a.name == b.name and a.sensitivity == b.sensitivity and a.stable_rank == b.stable_rank
        assert torch.equal(a.decomposition.s, b.decomposition.s), a.name
    assert {p.name: p.read_bytes() for p in ckpt.iterdir() if p.is_file()} == before


def test_block_records_come_at_most_once_a_minute(
    source: Path, reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record writes the hidden states; blocks that take seconds (a small model, a GPU) are recorded at most once
    a minute (resume.RECORD_INTERVAL_S), the ends of the sampling and of the gradients always: here a stop in the
    statistics pass goes on after the gradients, one in pass 2 from its first block, to the same output."""
    monkeypatch.setattr(resume, "RECORD_INTERVAL_S", 3600.0)
    out, ckpt = tmp_path / "out", tmp_path / "out.checkpoint"
    settings = build_settings(**SMALL)
    with pytest.MonkeyPatch.context() as mp:
        stop_in_statistics(mp, block=3)
        with pytest.raises(InterruptedWithCheckpoint, match=r"pass 1's progress \(the gradients\)"):
            factorize_model(source, out, settings)
    with pytest.MonkeyPatch.context() as mp:
        seen = spy(mp)
        interrupt_pass_2(mp, KeyboardInterrupt(), block=2)
        with pytest.raises(InterruptedWithCheckpoint, match="pass 2's finished blocks are in"):
            factorize_model(source, out, settings, resume=ckpt)
    assert seen == {"drawn": [], "gradients": [], "statistics_from": [0]}
    assert not (ckpt / "pass2" / "state.json").exists()
    result = factorize_model(source, out, settings, resume=ckpt)
    assert result.pass2_resumed_at is None
    assert same_tensors(out, reference)


def test_a_run_resuming_beside_another_never_swaps_over_its_finished_pass_1(
    source: Path, reference: Path, tmp_path: Path
) -> None:
    """Two runs resume one unfinished checkpoint; the other finishes pass 1 first and records pass 2 beside it. This
    run's next record must not swap its unfinished pass 1 over them (the other's shards would go): it records
    nothing more, says so, and writes the same output."""
    import fcntl
    import shutil

    out, ckpt = tmp_path / "out", tmp_path / "out.checkpoint"
    settings = build_settings(**SMALL)
    with pytest.MonkeyPatch.context() as mp:
        stop_after_record(mp, "2 blocks")
        with pytest.raises(InterruptedWithCheckpoint):
            factorize_model(source, out, settings)
    others = tmp_path / "other.checkpoint"  # the other run's checkpoint once its pass 1 has ended
    factorize_model(source, tmp_path / "other", settings, checkpoint_dir=others, keep_checkpoint=True)
    (others / "pass2").mkdir()
    (others / "pass2" / "state.json").write_text("{}")
    locks = []
    save = Recorder.save

    def other_run_finished_first(self: Recorder, *a: object) -> bool:
        if not locks:
            shutil.rmtree(ckpt)
            shutil.copytree(others, ckpt)
            locks.append(open(ckpt / "pass2.lock", "a"))  # noqa: SIM115 - closed below
            fcntl.flock(locks[0], fcntl.LOCK_EX)  # the other run's pass 2 holds it
        return save(self, *a)

    warnings: list[str] = []
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(Recorder, "save", other_run_finished_first)
            factorize_model(source, out, settings, resume=ckpt, warn=warnings.append)
    finally:
        locks[0].close()
    said = (
        f"another run finished pass 1 in {ckpt} meanwhile; this run records nothing more there, and goes on"
    )
    assert said in warnings
    assert json.loads((ckpt / "state.json").read_text())["progress"] is None
    assert (ckpt / "pass2" / "state.json").read_text() == "{}"
    assert same_tensors(out, reference)


def test_the_check_and_the_swap_of_a_record_hold_one_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record checks whether another run finished pass 1 there and then swaps its own in, both under an exclusive
    flock on the checkpoint's parent directory: another save (another open file description) cannot run between
    them."""
    import fcntl
    import os

    held: list[bool] = []

    def probe() -> bool:
        fd = os.open(tmp_path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held.append(True)
        else:
            held.append(False)
        finally:
            os.close(fd)
        return False

    swap = pass1_checkpoint.finish_checkpoint
    monkeypatch.setattr(pass1_checkpoint, "finish_checkpoint", lambda *a: (probe(), swap(*a)))
    ckpt = tmp_path / "ckpt"
    assert pass1_checkpoint.save(ckpt, {"progress": None}, {"x": torch.ones(2)}, unless=probe)
    assert held == [True, True]  # at the check and at the swap
    assert pass1_checkpoint.finished(ckpt)
    probe()
    assert held[-1] is False  # and let go after


def test_a_record_where_the_parent_cannot_be_locked_is_still_saved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file system without flock on directories (some NFS mounts) refuses the lock: the record is saved all the
    same, unlocked, rather than failing the run."""
    import fcntl

    def refuse(fd: int, op: int) -> None:
        raise OSError(9, "Bad file descriptor")

    monkeypatch.setattr(fcntl, "flock", refuse)
    ckpt = tmp_path / "ckpt"
    assert pass1_checkpoint.save(ckpt, {"progress": None}, {"x": torch.ones(2)})
    assert pass1_checkpoint.finished(ckpt)
