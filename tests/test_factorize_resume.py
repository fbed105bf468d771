"""factorize's checkpoint: an interrupted pass 2 resumes to the output an uninterrupted run writes, without
measuring pass 1 again, and at the block it stopped in (pass 2's progress); a checkpoint is taken only by the run it
belongs to (same files, text and pass-1 settings), a pass-2 progress only at the same budget and pass-2 settings."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from lowrank_compress import resume
from lowrank_compress.cli import cli
from lowrank_compress.errors import BudgetError, InterruptedWithCheckpoint, LowrankError
from lowrank_compress.pipeline import Prepared, factorize_model
from lowrank_compress.recipe import build_settings
from tests.fixtures import (
    interrupt_pass_2,
    load_state_dict,
    tiny_bert,
    tiny_gguf,
    tiny_gpt2,
    tiny_llama,
    training_text,
)

# the default method and policy (whiten, sensitivity, loss-weighted, self-generated share), small
SMALL = {"samples": 8, "seq_len": 64, "grad_samples": 2, "budget": 0.6}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("model"))


@pytest.fixture(autouse=True)
def record_every_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny model's blocks take milliseconds: without this, pass 2 would record only its last one."""
    monkeypatch.setattr(resume, "RECORD_INTERVAL_S", 0.0)


def forbid_pass_1(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("a resumed run measured pass 1 again")

    monkeypatch.setattr(Prepared, "_draw_calibration", fail)
    monkeypatch.setattr(Prepared, "_pass1", fail)


def same_tensors(a: Path, b: Path) -> bool:
    sa, sb = load_state_dict(a), load_state_dict(b)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_an_interrupted_pass_2_resumes_to_the_uninterrupted_output(model: Path, tmp_path: Path) -> None:
    settings = build_settings(**SMALL)
    reference = factorize_model(model, tmp_path / "reference", settings)
    assert not (tmp_path / "reference.checkpoint").exists()  # removed once the output is in place
    out, ckpt = tmp_path / "out", tmp_path / "out.checkpoint"

    with pytest.MonkeyPatch.context() as mp:
        interrupt_pass_2(mp, KeyboardInterrupt())
        with pytest.raises(
            InterruptedWithCheckpoint, match=rf"nothing was written to {out}.*--resume {ckpt}$"
        ):
            factorize_model(model, out, settings)
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))
    assert json.loads((ckpt / "state.json").read_text())["command"] == "factorize"

    with pytest.MonkeyPatch.context() as mp:
        forbid_pass_1(mp)
        resumed = factorize_model(model, out, settings, resume=ckpt)
    assert same_tensors(out, tmp_path / "reference")
    assert [x.rank for x in resumed.layers] == [x.rank for x in reference.layers]
    report = json.loads((out / "report.json").read_text())
    assert report["resumed_from"] == str(ckpt) and "resume" in report["timings_s"]
    calibration = json.loads((tmp_path / "reference" / "report.json").read_text())["calibration"]
    measured = ("self_sampling_peak_mb",)  # memory, which differs from run to run
    assert {k: v for k, v in report["calibration"].items() if k not in measured} == {
        k: v for k, v in calibration.items() if k not in measured
    }
    assert not ckpt.exists()


@pytest.mark.parametrize("kind", ["gpt2", "bert", "llama-sharded-tied", "gguf"])
def test_every_kind_of_checkpoint_resumes_to_the_same_output(kind: str, tmp_path: Path) -> None:
    """GPT-2's Conv1D blocks, an encoder (no loss: uniform ranks, the text alone, no gradients), shards with a tied
    head, and a GGUF file: the resumed output equals the uninterrupted one."""
    source = {
        "gpt2": lambda: tiny_gpt2(tmp_path),
        "bert": lambda: tiny_bert(tmp_path),
        "llama-sharded-tied": lambda: tiny_llama(tmp_path, sharded=True, tied=True),
        "gguf": lambda: tiny_gguf(tmp_path),
    }[kind]()
    settings = build_settings(**SMALL)
    factorize_model(source, tmp_path / "reference", settings)
    with pytest.MonkeyPatch.context() as mp:
        interrupt_pass_2(mp, KeyboardInterrupt())
        with pytest.raises(InterruptedWithCheckpoint):
            factorize_model(source, tmp_path / "out", settings)
    with pytest.MonkeyPatch.context() as mp:
        forbid_pass_1(mp)
        factorize_model(source, tmp_path / "out", settings, resume=tmp_path / "out.checkpoint")
    assert same_tensors(tmp_path / "out", tmp_path / "reference")


def test_a_kept_checkpoint_takes_another_budget_but_not_other_pass_1_settings(
    model: Path, tmp_path: Path
) -> None:
    ckpt = tmp_path / "pass1"
    factorize_model(
        model, tmp_path / "at-0.6", build_settings(**SMALL), checkpoint_dir=ckpt, keep_checkpoint=True
    )
    assert (ckpt / "state.json").is_file()
    other_budget = build_settings(**{**SMALL, "budget": 0.8})
    factorize_model(model, tmp_path / "fresh-0.8", other_budget, checkpoint_dir=tmp_path / "c2")
    with pytest.MonkeyPatch.context() as mp:
        forbid_pass_1(mp)
        result = factorize_model(
            model, tmp_path / "resumed-0.8", other_budget, resume=ckpt, keep_checkpoint=True
        )
    assert result.settings.budget == 0.8 and same_tensors(tmp_path / "resumed-0.8", tmp_path / "fresh-0.8")

    for changed, named in (
        ({"seed": 1}, "seed"),
        ({"method": "asvd"}, "loss_weighted, method"),  # asvd fits without loss weights
        ({"samples": 4}, "samples"),
    ):
        with pytest.raises(LowrankError, match=rf"other settings \({named}\)"):
            factorize_model(model, tmp_path / "no", build_settings(**{**SMALL, **changed}), resume=ckpt)
        assert not (tmp_path / "no").exists()
    assert (ckpt / "state.json").is_file()  # a refused resume leaves the checkpoint as it was

    from lowrank_compress.sweep import sweep

    with (
        pytest.MonkeyPatch.context() as mp
    ):  # a sweep takes the same pass 1, and leaves factorize's checkpoint
        forbid_pass_1(mp)
        swept = sweep(model, [0.8], build_settings(**SMALL), tmp_path / "sweep", keep_models=True, resume=ckpt,
                      max_tokens=256, window=64, stride=64, speed=False, answers=None)  # fmt: skip
    assert swept.resumed_from == str(ckpt) and (ckpt / "state.json").is_file()
    assert same_tensors(tmp_path / "sweep" / "models" / "budget-0.8", tmp_path / "fresh-0.8")


def test_a_checkpoint_of_other_weights_or_text_or_command_is_refused(tmp_path: Path) -> None:
    source = tiny_llama(tmp_path)
    text = tmp_path / "text.txt"
    text.write_text(training_text(20_000), encoding="utf-8")
    settings = build_settings(**SMALL, calibration=str(text))
    ckpt = tmp_path / "pass1"
    factorize_model(source, tmp_path / "a", settings, checkpoint_dir=ckpt, keep_checkpoint=True)

    saved = (ckpt / "state.json").read_text()
    state = json.loads(saved)
    del state["spectra"]
    (ckpt / "state.json").write_text(json.dumps(state))
    with pytest.raises(LowrankError, match=r"state.json is damaged \(no spectra\)"):
        factorize_model(source, tmp_path / "b", settings, resume=ckpt)
    state = json.loads(saved)
    state["part_weights"] = {"nope": 1.0}  # no such calibration part in the tensors
    (ckpt / "state.json").write_text(json.dumps(state))
    with pytest.raises(LowrankError, match=r"the checkpoint is damaged \(KeyError: 'calibration.nope'\)"):
        factorize_model(source, tmp_path / "b", settings, resume=ckpt)
    (ckpt / "state.json").write_text(saved)

    text.write_text(training_text(20_000).replace("the", "a"), encoding="utf-8")
    with pytest.raises(LowrankError, match="calibration text .* changed"):
        factorize_model(source, tmp_path / "b", settings, resume=ckpt)
    weights = source / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(LowrankError, match="model's files changed"):
        factorize_model(source, tmp_path / "b", settings, resume=ckpt)
    with pytest.raises(LowrankError, match="was made from"):
        factorize_model(tiny_llama(tmp_path, name="other"), tmp_path / "b", settings, resume=ckpt)

    (ckpt / "state.json").write_text(json.dumps({"command": "finetune"}))
    res = CliRunner().invoke(
        cli, ["factorize", str(source), "-o", str(tmp_path / "b"), "--resume", str(ckpt)]
    )
    assert res.exit_code == 1 and res.stderr.strip().endswith(
        "a finetune checkpoint; factorize cannot resume it"
    )
    res = CliRunner().invoke(
        cli, ["factorize", str(source), "-o", str(tmp_path / "b"), "--resume", str(tmp_path)]
    )
    assert res.exit_code == 1 and "not a factorize checkpoint (no state.json)" in res.stderr
    assert "Traceback" not in res.output and not (tmp_path / "b").exists()


def test_an_earlier_checkpoint_is_kept_until_resumed_or_overwritten(model: Path, tmp_path: Path) -> None:
    out, ckpt = tmp_path / "out", tmp_path / "out.checkpoint"
    settings = build_settings(**SMALL)
    with pytest.MonkeyPatch.context() as mp:
        interrupt_pass_2(mp, LowrankError("No space left on device"))
        with pytest.raises(LowrankError, match=rf"^No space left on device; .* --resume {ckpt}$"):
            factorize_model(model, out, settings)
    with pytest.raises(
        LowrankError, match=f"a checkpoint of an earlier run is there; continue it with --resume {ckpt}"
    ):
        factorize_model(model, out, settings)
    factorize_model(model, out, settings, overwrite=True)
    assert (out / "config.json").is_file() and not ckpt.exists()


def test_what_cannot_be_resumed_is_not_saved_and_an_unreachable_budget_stops_first(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Data-free uniform ranks measure nothing in pass 1: no checkpoint, and Ctrl-C is the plain interrupt. A budget
    no allocation meets is refused before the calibration (it was refused after it, hours into a large model)."""
    out = tmp_path / "out"
    with pytest.MonkeyPatch.context() as mp:
        interrupt_pass_2(mp, KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            factorize_model(model, out, build_settings(method="svd", policy="uniform"))
    assert not out.exists() and not (tmp_path / "out.checkpoint").exists()
    said: list[str] = []
    factorize_model(
        model, out, build_settings(method="svd", policy="uniform"), keep_checkpoint=True, warn=said.append
    )
    assert said == [
        "--keep-checkpoint: data-free uniform ranks measure nothing in pass 1, so no checkpoint is saved"
    ]
    assert not (tmp_path / "out.checkpoint").exists()

    forbid_pass_1(monkeypatch)
    refused = tmp_path / "refused"
    with pytest.raises(BudgetError, match="budget 0.01 is unreachable"):
        factorize_model(model, refused, build_settings(**{**SMALL, "budget": 0.01}))
    assert not refused.exists() and not (tmp_path / "refused.checkpoint").exists()


# ------------------------------------------------------------------------------------------- pass 2's progress


def blocks_run(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The blocks pass 2 writes, in order (appended as each is written)."""
    seen: list[int] = []
    write_block = Prepared._write_block

    def counting(self: Prepared, i: int, *args: object) -> object:
        seen.append(i)
        return write_block(self, i, *args)

    monkeypatch.setattr(Prepared, "_write_block", counting)
    return seen


def stop_after_writes(monkeypatch: pytest.MonkeyPatch, block: int, writes: int) -> None:
    """Stop (KeyboardInterrupt) pass 2 in block `block` after it has written `writes` of its tensors: what it wrote
    of the block is in the shards, not in the recorded state."""
    from lowrank_compress.writer import ShardWriter

    write_block, add = Prepared._write_block, ShardWriter.add
    current = {"block": -1, "added": 0}

    def tracking(self: Prepared, i: int, *args: object) -> object:
        current.update(block=i, added=0)
        return write_block(self, i, *args)

    def adding(self: ShardWriter, name: str, tensor: torch.Tensor) -> None:
        if current["block"] == block and current["added"] == writes:
            raise KeyboardInterrupt
        current["added"] += 1
        add(self, name, tensor)

    monkeypatch.setattr(Prepared, "_write_block", tracking)
    monkeypatch.setattr(ShardWriter, "add", adding)


@pytest.mark.parametrize(
    ("shard_size", "policy", "refine_steps"),
    [(2**30, "sensitivity", 0), (40_000, "uniform", 0), (2**30, "uniform", 3)],
)
def test_a_stopped_pass_2_goes_on_at_the_block_it_stopped_in(
    tmp_path: Path, shard_size: int, policy: str, refine_steps: int
) -> None:
    """Four blocks, stopped inside the third after six of its tensors were written (at 40 kB a shard, shards were
    closed before and after the recorded state): the resumed run writes blocks 3 and 4 only, and its output equals
    the uninterrupted run's, file for file. Uniform ranks measure no spectrum in pass 1: the report's come from
    pass 2, those of the blocks before the stop from the recorded progress. Refinement steps take the same windows
    in a resumed run as in the uninterrupted one."""
    source = tiny_llama(tmp_path, num_layers=4)
    settings = build_settings(**SMALL, policy=policy, refine_steps=refine_steps, refine_from=0.0)
    factorize_model(source, tmp_path / "reference", settings, max_shard_size=shard_size)
    out, ckpt = tmp_path / "out", tmp_path / "out.checkpoint"
    with pytest.MonkeyPatch.context() as mp:
        stop_after_writes(mp, block=2, writes=6)
        with pytest.raises(InterruptedWithCheckpoint, match="pass 2's finished blocks are in"):
            factorize_model(source, out, settings, max_shard_size=shard_size)
    state = json.loads((ckpt / "pass2" / "state.json").read_text())
    assert state["blocks_done"] == 2
    closed = len(list((ckpt / "pass2" / "shards").glob("*.safetensors")))
    assert closed > len(state["writer"]["shards"]) if shard_size < 2**30 else closed == 0
    with pytest.MonkeyPatch.context() as mp:
        forbid_pass_1(mp)
        written = blocks_run(mp)
        result = factorize_model(source, out, settings, resume=ckpt, max_shard_size=shard_size)
    assert written == [2, 3] and result.pass2_resumed_at == 3
    assert sorted(p.name for p in out.glob("model*")) == sorted(
        p.name for p in (tmp_path / "reference").glob("model*")
    )
    for f in (tmp_path / "reference").glob("model*"):
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    report, reference = (json.loads((d / "report.json").read_text()) for d in (out, tmp_path / "reference"))
    for key in ("layers", "summary", "spectra"):
        assert report[key] == reference[key], key
    assert report["pass2_resumed_at"] == 3 and reference["pass2_resumed_at"] is None
    assert not ckpt.exists()


def test_pass_2_progress_at_another_budget_is_discarded_and_a_finished_one_removed(
    model: Path, tmp_path: Path
) -> None:
    settings = build_settings(**SMALL)
    out, ckpt = tmp_path / "out", tmp_path / "out.checkpoint"
    with pytest.MonkeyPatch.context() as mp:
        interrupt_pass_2(mp, KeyboardInterrupt())
        with pytest.raises(InterruptedWithCheckpoint):
            factorize_model(model, out, settings)
    assert (ckpt / "pass2" / "state.json").is_file()
    other = build_settings(**{**SMALL, "budget": 0.8})
    factorize_model(model, tmp_path / "fresh", other)
    warnings: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        forbid_pass_1(mp)
        written = blocks_run(mp)
        result = factorize_model(model, out, other, resume=ckpt, keep_checkpoint=True, warn=warnings.append)
    assert written == [0, 1] and result.pass2_resumed_at is None
    assert any("pass 2's progress at other settings" in w for w in warnings)
    assert same_tensors(out, tmp_path / "fresh")
    assert (ckpt / "state.json").is_file() and not (ckpt / "pass2").exists()  # pass 1 kept, pass 2 done


@pytest.mark.parametrize("damage", ["flow", "state", "shards"])
def test_damaged_pass_2_progress_is_said_and_pass_2_starts_over(
    model: Path, tmp_path: Path, damage: str
) -> None:
    settings = build_settings(**SMALL)
    factorize_model(model, tmp_path / "reference", settings)
    out, ckpt = tmp_path / "out", tmp_path / "out.checkpoint"
    with pytest.MonkeyPatch.context() as mp:
        interrupt_pass_2(mp, KeyboardInterrupt())
        with pytest.raises(InterruptedWithCheckpoint):
            factorize_model(model, out, settings)
    progress = ckpt / "pass2"
    if damage == "flow":
        next(progress.glob("flow-*.safetensors")).write_bytes(b"not safetensors")
    elif damage == "state":
        (progress / "state.json").write_text('{"version": 1, "key": ')
    else:
        for f in (progress / "shards").iterdir():
            f.unlink()
    warnings: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        forbid_pass_1(mp)
        written = blocks_run(mp)
        result = factorize_model(model, out, settings, resume=ckpt, warn=warnings.append)
    assert written == [0, 1] and result.pass2_resumed_at is None
    assert [w for w in warnings if "pass 2's progress is damaged" in w and "starts from its first block" in w]
    assert same_tensors(out, tmp_path / "reference")


def test_a_run_beside_another_on_the_same_checkpoint_records_nothing(model: Path, tmp_path: Path) -> None:
    """Two budgets from one kept checkpoint at once: the run that does not hold the lock writes its output
    without recording, leaves the other's progress alone and does not remove the checkpoint when it ends."""
    import fcntl

    ckpt = tmp_path / "pass1"
    factorize_model(
        model, tmp_path / "first", build_settings(**SMALL), checkpoint_dir=ckpt, keep_checkpoint=True
    )
    other = build_settings(**{**SMALL, "budget": 0.8})
    factorize_model(model, tmp_path / "fresh", other)
    (ckpt / "pass2").mkdir()
    (ckpt / "pass2" / "state.json").write_text("{}")  # the other run's
    warnings: list[str] = []
    with open(ckpt / "pass2.lock", "a") as lock:
        fcntl.flock(
            lock, fcntl.LOCK_EX
        )  # (flock locks belong to the open file, so this holds against our run)
        result = factorize_model(model, tmp_path / "second", other, resume=ckpt, warn=warnings.append)
    assert any("another run records pass 2" in w for w in warnings) and result.pass2_resumed_at is None
    assert same_tensors(tmp_path / "second", tmp_path / "fresh")
    # not removed by the run that did not hold it, though it keeps no checkpoint of its own: the other's shards are there
    assert f"{ckpt} is left in place: this run did not record pass 2 in it" in warnings
    assert (ckpt / "pass2" / "state.json").read_text() == "{}"


def test_a_stop_while_the_output_is_completed_loses_no_block(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopped after pass 2's last block, while the model's other files are written (or --evaluate runs): the
    resumed run factorizes no block again. The last block is recorded whatever the time since the last record."""
    from lowrank_compress import format as fmt

    monkeypatch.setattr(resume, "RECORD_INTERVAL_S", 3600.0)
    settings = build_settings(**SMALL)
    factorize_model(model, tmp_path / "reference", settings)
    out, ckpt = tmp_path / "out", tmp_path / "out.checkpoint"

    def stopped(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fmt, "write_model_files", stopped)
        with pytest.raises(InterruptedWithCheckpoint):
            factorize_model(model, out, settings)
    assert not out.exists()
    with pytest.MonkeyPatch.context() as mp:
        forbid_pass_1(mp)
        written = blocks_run(mp)
        result = factorize_model(model, out, settings, resume=ckpt)
    assert written == [] and result.pass2_resumed_at == 3
    assert same_tensors(out, tmp_path / "reference")
