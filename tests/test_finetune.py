"""`finetune` end to end on tiny models: outputs that load and reproduce the trained model, resume, bad inputs."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import lowrank_compress
from lowrank_compress.cli import cli
from lowrank_compress.errors import InterruptedWithCheckpoint
from lowrank_compress.finetune import FinetuneSettings, batch_rows, finetune, pack
from lowrank_compress.format import LOAD_GUARD, LOAD_GUARD_KEY
from lowrank_compress.modules import LowRankLinear
from tests.fixtures import tiny_llama, tiny_tokenizer, training_text

FAST = {"seq_len": 64, "rank": 4, "eval_tokens": 1024, "batch_size": 2}


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("dense"))


def settings(data: Path, **kw: object) -> FinetuneSettings:
    return FinetuneSettings(data=str(data), **{**FAST, "steps": 4, **kw})


def ids() -> torch.Tensor:
    return torch.randint(4, 300, (2, 16), generator=torch.Generator().manual_seed(3))


def logits(model: torch.nn.Module) -> torch.Tensor:
    """On the CPU, from the model on whichever device it is (finetune trains on a GPU when there is one)."""
    with torch.no_grad():
        return model(input_ids=ids().to(model.device)).logits.float().cpu()


def test_packing_frames_each_sequence_with_bos_and_keeps_text_order() -> None:
    tok = tiny_tokenizer()
    rows = pack(tok, training_text(3000), 32)
    assert rows.shape[1] == 32 and rows.shape[0] >= 2
    assert bool((rows[:, 0] == tok.bos_token_id).all())
    body = tok(training_text(3000), add_special_tokens=False)["input_ids"]
    assert rows[:, 1:].reshape(-1).tolist() == body[: rows.shape[0] * 31]


def test_batch_order_is_a_seeded_permutation_per_epoch() -> None:
    first = batch_rows(10, seed=0, position=0, count=10)
    assert sorted(first) == list(range(10))
    assert batch_rows(10, 0, 10, 10) != first and sorted(batch_rows(10, 0, 10, 10)) == list(range(10))
    assert (
        batch_rows(10, 0, 3, 9) == (first + batch_rows(10, 0, 10, 10))[3:12]
    )  # any window of the same stream
    assert batch_rows(10, 1, 0, 10) != first


def test_lora_adapters_load_with_peft_and_match_the_exact_merge(
    factorized: Path, data: Path, tmp_path: Path
) -> None:
    from peft import PeftModel

    adapters = finetune(factorized, tmp_path / "adapters", settings(data, lr=5e-3))
    merged = finetune(factorized, tmp_path / "merged", settings(data, lr=5e-3, merge=True))
    assert adapters.kind == "adapters" and merged.kind == "lowrank"
    assert adapters.losses == merged.losses  # seeded: the same run
    assert {"adapter_config.json", "adapter_model.safetensors", "finetune.json"} <= {
        p.name for p in (tmp_path / "adapters").iterdir()
    }
    config = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(factorized.resolve())

    base = lowrank_compress.load(factorized)
    ranks_before = {n: m.rank for n, m in base.named_modules() if isinstance(m, LowRankLinear)}
    before = logits(base)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapters")
    with_adapters = logits(peft_model)
    assert float((with_adapters - before).abs().max()) > 1e-4  # training changed something
    reloaded = lowrank_compress.load(tmp_path / "merged")
    torch.testing.assert_close(logits(reloaded), with_adapters, rtol=1e-4, atol=1e-4)
    # the merged output is an output like factorize's: plain transformers without the package refuses it
    assert json.loads((tmp_path / "merged" / "config.json").read_text())[LOAD_GUARD_KEY] == LOAD_GUARD
    # grow: every factorized layer gained the adapter's rank, and the count is the real one
    ranks_after = {n: m.rank for n, m in reloaded.named_modules() if isinstance(m, LowRankLinear)}
    assert ranks_after == {n: r + 4 for n, r in ranks_before.items()}
    assert merged.params_after == sum(p.numel() for p in reloaded.parameters())
    assert merged.perplexity["merged"] == pytest.approx(merged.perplexity["after"], rel=1e-3)


def test_keep_merge_writes_the_original_ranks(factorized: Path, data: Path, tmp_path: Path) -> None:
    result = finetune(
        factorized, tmp_path / "keep", settings(data, merge=True, merge_rank="keep", adapter="dora")
    )
    original = lowrank_compress.load(factorized)
    reloaded = lowrank_compress.load(tmp_path / "keep")
    rank = {n: m.rank for n, m in original.named_modules() if isinstance(m, LowRankLinear)}
    assert {n: m.rank for n, m in reloaded.named_modules() if isinstance(m, LowRankLinear)} == rank
    assert result.params_after == result.params_before
    assert result.merge["whitened"] and 0 <= result.merge["max_relative_error"] < 1


def test_resume_continues_the_same_loss_curve(factorized: Path, data: Path, tmp_path: Path) -> None:
    straight = finetune(factorized, tmp_path / "straight", settings(data, steps=6, save_every=2))
    out, ckpt = tmp_path / "resumed", tmp_path / "ckpt"
    with pytest.raises(InterruptedWithCheckpoint, match="--resume"):
        finetune(factorized, out, settings(data, steps=6, save_every=2), checkpoint_dir=ckpt, stop_after=3)
    assert not out.exists()  # no partial output
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 3 and len(state["losses"]) == 3
    resumed = finetune(
        factorized, out, settings(data, steps=6, save_every=2), checkpoint_dir=ckpt, resume=ckpt
    )
    assert resumed.resumed_from_step == 3
    assert resumed.losses == pytest.approx(straight.losses, rel=1e-5, abs=1e-6)
    assert not ckpt.exists()  # the finished output replaces the checkpoint
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "straight" / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_resume_refuses_other_settings(factorized: Path, data: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    with pytest.raises(InterruptedWithCheckpoint):
        finetune(factorized, tmp_path / "o", settings(data), checkpoint_dir=ckpt, stop_after=1)
    with pytest.raises(lowrank_compress.LowrankError, match="other settings.*lr"):
        finetune(factorized, tmp_path / "o", settings(data, lr=1e-2), checkpoint_dir=ckpt, resume=ckpt)
    # forgetting --resume does not silently throw the earlier run's progress away
    with pytest.raises(lowrank_compress.LowrankError, match="--resume"):
        finetune(factorized, tmp_path / "o", settings(data), checkpoint_dir=ckpt)
    assert (ckpt / "state.json").is_file()


def test_training_the_factors_with_truncation_writes_smaller_ranks(
    factorized: Path, data: Path, tmp_path: Path
) -> None:
    result = finetune(
        factorized, tmp_path / "f", settings(data, train="factors", lr=1e-3, nuclear=1e-3, truncate_every=2,
                                             truncate_energy=0.6, steps=3),
    )  # fmt: skip
    original = lowrank_compress.load(factorized)
    reloaded = lowrank_compress.load(tmp_path / "f")
    before = {n: m.rank for n, m in original.named_modules() if isinstance(m, LowRankLinear)}
    after = {n: m.rank for n, m in reloaded.named_modules() if isinstance(m, LowRankLinear)}
    assert after.keys() == before.keys() and all(after[n] < before[n] for n in before)
    assert result.params_after == sum(p.numel() for p in reloaded.parameters()) < result.params_before
    assert result.perplexity["merged"] == pytest.approx(result.perplexity["after"], rel=1e-3)


def test_dense_model_gets_plain_lora_and_a_dense_merge(dense: Path, data: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    result = finetune(dense, tmp_path / "d", settings(data, merge=True, lr=5e-3))
    assert result.kind == "dense"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "d")
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())
    assert result.perplexity["merged"] == pytest.approx(result.perplexity["after"], rel=1e-3)


def test_nf4_finetune_merges_into_the_dequantized_factors(
    factorized: Path, data: Path, tmp_path: Path
) -> None:
    pytest.importorskip("bitsandbytes")
    result = finetune(factorized, tmp_path / "q", settings(data, quantize="nf4", merge=True, lr=5e-3))
    assert result.quantize["quantized_linears"] > 0
    assert result.perplexity["merged"] == pytest.approx(result.perplexity["after"], rel=2e-2)
    lowrank_compress.load(tmp_path / "q")


# --------------------------------------------------------------------------------------------------- CLI


def run(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_cli_json(factorized: Path, data: Path, tmp_path: Path) -> None:
    res = run("finetune", factorized, "--data", data, "-o", tmp_path / "o", "--steps", "2", "--seq-len", "64",
              "--rank", "2", "--eval-tokens", "512", "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["steps"] == 2 and len(doc["losses"]) == 2 and doc["kind"] == "adapters"
    assert doc["perplexity"]["before"] > 0 and doc["perplexity"]["after"] > 0
    assert json.loads((tmp_path / "o" / "finetune.json").read_text())["steps"] == 2


def _fails_cleanly(res, out: Path) -> str:
    assert res.exit_code == 1, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert "Traceback" not in res.output
    assert not out.exists()
    return lines[0]


def test_bad_inputs_fail_cleanly(factorized: Path, dense: Path, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    short = tmp_path / "short.txt"
    short.write_text("A few words only.")
    base = ["--steps", "1", "--seq-len", "64", "-o", out]
    assert "empty" in _fails_cleanly(run("finetune", factorized, "--data", empty, *base), out)
    assert "shorter than one training sequence" in _fails_cleanly(
        run("finetune", factorized, "--data", short, "--eval-data", short, *base), out
    )
    assert "MODEL is dense" in _fails_cleanly(
        run("finetune", dense, "--data", data, "--merge", "--merge-rank", "keep", *base), out
    )
    assert "factorized MODEL" in _fails_cleanly(
        run("finetune", dense, "--data", data, "--train", "factors", *base), out
    )
    assert "no such" in _fails_cleanly(run("finetune", tmp_path / "nope", "--data", data, *base), out).lower()
    assert "--steps or --epochs" in _fails_cleanly(
        run("finetune", factorized, "--data", data, "--epochs", "1", *base), out
    )
    assert "not a finetune checkpoint" in _fails_cleanly(
        run("finetune", factorized, "--data", data, "--resume", tmp_path, *base), out
    )
    assert "drop --quantize" in _fails_cleanly(
        run("finetune", factorized, "--data", data, "--train", "factors", "--quantize", "nf4", *base), out
    )
    long = ["--steps", "1", "--seq-len", "100000", "-o", out]  # used to hang for minutes
    assert "longer than the model's context" in _fails_cleanly(
        run("finetune", factorized, "--data", data, *long), out
    )
    for flag in ("--alpha", "--lr", "--warmup"):  # blamed on the wrong option before it was checked here
        res = run("finetune", factorized, "--data", data, flag, "nan", *base)
        assert res.exit_code == 2 and not out.exists() and "Traceback" not in res.output
        assert f"Invalid value for '{flag}': 'nan' is not a finite number" in res.stderr


def test_a_non_finite_loss_stops_training_and_writes_nothing(dense: Path, data: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "nan-model"
    shutil.copytree(dense, broken)
    weights = load_file(str(broken / "model.safetensors"))
    weights["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "o"
    res = run(
        "finetune", broken, "--data", data, "--steps", "2", "--seq-len", "64", "--eval-tokens", "0",
        "--answers", "none", "-o", out,
    )  # fmt: skip
    assert "training loss is nan at step 1" in _fails_cleanly(res, out)


def test_missing_bitsandbytes_fails_cleanly(
    factorized: Path, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    out = tmp_path / "o"
    res = run("finetune", factorized, "--data", data, "--quantize", "nf4", "--steps", "1", "-o", out)
    assert "lowrank-compress[nf4]" in _fails_cleanly(res, out)


def test_interrupt_exits_130_with_a_resume_hint(
    factorized: Path, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib

    ft = importlib.import_module(
        "lowrank_compress.finetune"
    )  # the module (the package re-exports the function)
    original = ft.finetune
    monkeypatch.setattr(ft, "finetune", lambda *a, **k: original(*a, **k, stop_after=1))
    out = tmp_path / "o"
    res = run("finetune", factorized, "--data", data, "--steps", "3", "--seq-len", "64", "--eval-tokens", "0",
              "-o", out)  # fmt: skip
    assert res.exit_code == 130, res.output
    assert "--resume" in res.output and not out.exists()
    assert (tmp_path / "o.checkpoint" / "state.json").is_file()


def test_two_processes_train_as_ddp_and_one_writes(factorized: Path, data: Path, tmp_path: Path) -> None:
    """What `accelerate launch` does on several GPUs, on CPU: torchrun starts two processes, accelerate joins them
    over gloo, each takes its own rows of every step, one process writes and reports."""
    import subprocess
    import sys

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "lowrank_compress.cli",
           "finetune", str(factorized), "--data", str(data), "-o", str(out), "--steps", "2", "--seq-len", "64",
           "--rank", "2", "--eval-tokens", "0", "--json"]  # fmt: skip
    cpu_only = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # its subject is gloo on the CPU
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=cpu_only)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)  # one JSON document: only the main process reports
    assert doc["processes"] == 2 and doc["steps"] == 2
    assert (out / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_smollm2_lora_lowers_held_out_perplexity_and_keep_merge_keeps_the_size(tmp_path: Path) -> None:
    from lowrank_compress.demo import default_model_path
    from lowrank_compress.pipeline import factorize_model
    from lowrank_compress.recipe import build_settings

    fz = tmp_path / "smol"
    factorize_model(
        default_model_path(), fz, build_settings(samples=4, seq_len=256, grad_samples=2, budget=0.8)
    )
    result = finetune(
        fz, tmp_path / "ft", FinetuneSettings(steps=8, merge=True, merge_rank="keep", eval_tokens=4096)
    )
    p = result.perplexity
    assert p["after"] < p["before"] and p["merged"] < p["before"]
    assert result.params_after == result.params_before
    reloaded = lowrank_compress.load(tmp_path / "ft")
    assert sum(q.numel() for q in reloaded.parameters()) == result.params_after


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_runs_on_the_gpu_and_the_merge_reloads_on_the_cpu(
    factorized: Path, data: Path, tmp_path: Path
) -> None:
    """With a GPU, finetune trains there (accelerate picks it), the loss stays finite and falls from its first
    step, and the merged factors load on the CPU."""
    res = run("finetune", factorized, "--data", data, "-o", tmp_path / "o", "--steps", "8", "--seq-len", "64",
              "--rank", "2", "--lr", "5e-3", "--eval-tokens", "512", "--merge", "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["device"].startswith("cuda") and doc["kind"] == "lowrank"
    assert all(map(math.isfinite, doc["losses"])) and min(doc["losses"][4:]) < doc["losses"][0]
    assert torch.isfinite(logits(lowrank_compress.load(tmp_path / "o"))).all()


def test_more_processes_than_gpus_is_refused_in_one_line(
    factorized: Path, data: Path, tmp_path: Path, monkeypatch
) -> None:
    """Two torchrun processes on a machine with one GPU would both train on it (NCCL refuses two ranks on one
    card; on an H200 both processes failed): refused before anything is read, with what to do instead."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(
        lowrank_compress.LowrankError, match="2 training processes .* but 1 GPU.*CUDA_VISIBLE_DEVICES"
    ):
        finetune(factorized, tmp_path / "o", settings(data))
    assert not (tmp_path / "o").exists()


def test_answers_are_asked_before_and_after_training(
    factorized: Path, data: Path, tmp_path: Path, monkeypatch
) -> None:
    """finetune.json's answer check: "baseline" holds MODEL's greedy answers before training, "model" those of the
    trained model, each judged against the set. Which model answered is checked by its logits when asked (greedy
    text of a tiny random model flips on round-off): MODEL's own, then those of the saved adapters through peft."""
    from peft import PeftModel

    import lowrank_compress.answers as answers

    own = tmp_path / "set.jsonl"
    own.write_text(
        "".join(json.dumps({"prompt": f"Say {w}.", "answers": [w]}) + "\n" for w in ("yes", "no", "up"))
    )
    asked: list[tuple[torch.Tensor, list[str]]] = []
    real = answers.generate_answers

    def recorded(model, *args, **kwargs):
        said = real(model, *args, **kwargs)
        asked.append((logits(model), said))
        return said

    monkeypatch.setattr(answers, "generate_answers", recorded)
    result = finetune(factorized, tmp_path / "a", settings(data, lr=5e-3, answers=str(own), precision="fp32"))
    assert len(asked) == 2
    (before_logits, before), (after_logits, after) = asked
    # 1e-4: the models answered on the training device, the references run on the CPU; training moved them >1e-3
    torch.testing.assert_close(before_logits, logits(lowrank_compress.load(factorized)), rtol=1e-4, atol=1e-4)
    trained = PeftModel.from_pretrained(lowrank_compress.load(factorized), tmp_path / "a")
    torch.testing.assert_close(after_logits, logits(trained), rtol=1e-4, atol=1e-4)
    assert before_logits.sub(after_logits).abs().max() > 1e-3  # training changed the model
    checked = result.answers
    assert checked is not None and checked["items"] == 3 and checked["source"] == str(own)
    assert [r["outputs"]["baseline"] for r in checked["results"]] == before
    assert [r["outputs"]["model"] for r in checked["results"]] == after
    items = answers.load_answer_set(own).items
    right = {role: sum(answers.is_right(o, i.answers) for o, i in zip(outs, items, strict=True))
             for role, outs in (("model", after), ("baseline", before))}  # fmt: skip
    assert checked["right"] == right
    saved = json.loads((tmp_path / "a" / "finetune.json").read_text())
    assert saved["answers"]["results"] == checked["results"]
    assert finetune(factorized, tmp_path / "n", settings(data, answers="none")).answers is None


def test_a_bad_answer_set_fails_before_training(factorized: Path, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "no answers here"}\n')
    res = run("finetune", factorized, "--data", data, "--steps", "1", "--answers", bad, "-o", out)
    assert "bad.jsonl" in _fails_cleanly(res, out)


def test_distillation_loss_is_the_kl_divergence_of_the_next_token_distributions() -> None:
    """KD (Hinton et al.): KL(p_t || p) = sum_v p_t(v) (log p_t(v) - log p(v)) per position, here averaged over the
    positions; computed in float64 numpy from the softmaxes as the reference. Zero when the two models agree."""
    import numpy as np

    from lowrank_compress.training.loop import distillation_loss

    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 11, generator=gen), 3 * torch.randn(2, 5, 11, generator=gen)

    def softmax(x: np.ndarray) -> np.ndarray:
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    p_t, p_s = softmax(teacher.double().numpy()), softmax(student.double().numpy())
    expected = (p_t * (np.log(p_t) - np.log(p_s))).sum(-1).mean()
    assert float(distillation_loss(student, teacher)) == pytest.approx(expected, rel=1e-5)
    assert float(distillation_loss(teacher, teacher)) == pytest.approx(0.0, abs=1e-6)


def _kl_to(teacher_path: Path, model: torch.nn.Module, data: Path) -> float:
    """Mean KL(teacher || model) over four rows of the text's held-out half (the training rows are the first)."""
    from lowrank_compress.loading import load_model
    from lowrank_compress.text import load_text
    from lowrank_compress.training.loop import distillation_loss

    teacher, tok, _ = load_model(teacher_path)
    held = pack(tok, load_text(str(data), split="heldout"), 64)[:4]
    with torch.no_grad():
        return float(distillation_loss(model(input_ids=held).logits, teacher(input_ids=held).logits))


def test_a_teacher_makes_the_loss_the_kl_to_it_and_training_lowers_it(
    factorized: Path, dense: Path, data: Path, tmp_path: Path
) -> None:
    """--teacher: a model distilled from itself starts at a loss of 0 (the KL, not the text's next-token loss);
    the factorized model trained on its factors against the dense model it came from ends closer to it on text
    it never saw, and finetune.json records the teacher."""
    itself = finetune(dense, tmp_path / "self", settings(data, teacher=str(dense), steps=1))
    assert itself.losses[0] == pytest.approx(0.0, abs=1e-5)
    kd = settings(data, teacher=str(dense), train="factors", lr=3e-3, steps=8)
    result = finetune(factorized, tmp_path / "kd", kd)
    before = _kl_to(dense, lowrank_compress.load(factorized), data)
    after = _kl_to(dense, lowrank_compress.load(tmp_path / "kd"), data)
    assert after < 0.8 * before, (before, after)
    assert result.losses[0] > 0
    saved = json.loads((tmp_path / "kd" / "finetune.json").read_text())
    assert saved["settings"]["teacher"] == str(dense)
    from lowrank_compress.report_finetune import finetune_verdict

    assert "; KL to the teacher " in " ".join(finetune_verdict(saved))  # the report names the loss


def test_chat_data_is_the_teachers_conversations_through_the_chat_template(
    factorized: Path, dense: Path, tmp_path: Path
) -> None:
    """--data chat: the rows are the conversations `sample_chat_exchanges` draws from the teacher with the same
    seed (the token hash in finetune.json matches an independent draw); held-out text is the built-in half."""
    import hashlib

    from transformers import AutoTokenizer

    from lowrank_compress.calibration import sample_chat_exchanges
    from lowrank_compress.loading import load_model
    from tests.test_pipeline import _chat_copy

    model = _chat_copy(factorized, tmp_path / "chat-model")
    s = FinetuneSettings(
        data="chat", teacher=str(dense), chat_samples=3, **{**FAST, "steps": 2, "eval_tokens": 0}
    )
    result = finetune(model, tmp_path / "o", s)
    assert result.data["eval"] == "builtin (second half)"
    # drawn as finetune draws it: on the training device, in bf16 where it trains in bf16
    device, dtype = result.device, torch.bfloat16 if result.precision == "bf16" else torch.float32
    teacher, tok = load_model(dense, device=device, dtype=dtype)[0], AutoTokenizer.from_pretrained(model)
    rows = sample_chat_exchanges(
        teacher, tok, samples=3, seq_len=64, answer_tokens=128, seed=0, device=device
    )
    assert result.data["sequences"] == 3 and result.data["train"].startswith("3 conversations sampled from")
    assert result.data["sha256"] == hashlib.sha256(rows.numpy().tobytes()).hexdigest()
    prompt = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    assert tok.decode(rows[0]).startswith(prompt[: prompt.index("x")])  # the template's opening


def test_bad_distillation_inputs_fail_cleanly(factorized: Path, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    base = ["--steps", "1", "--seq-len", "64", "-o", out]
    assert "pass --teacher" in _fails_cleanly(run("finetune", factorized, "--data", "chat", *base), out)
    other = tiny_llama(tmp_path, vocab_size=300, name="other-vocab")
    assert "vocabulary" in _fails_cleanly(
        run("finetune", factorized, "--data", data, "--teacher", other, *base), out
    )
    assert (
        "no such"
        in _fails_cleanly(
            run("finetune", factorized, "--data", data, "--teacher", tmp_path / "nope", *base), out
        ).lower()
    )
    assert "chat template" in _fails_cleanly(
        run("finetune", factorized, "--data", "chat", "--teacher", factorized, *base), out
    )
    assert "--chat-samples" in _fails_cleanly(
        run("finetune", factorized, "--data", data, "--chat-samples", "0", *base), out
    )


def test_the_teacher_is_never_the_output(factorized: Path, data: Path, tmp_path: Path) -> None:
    """-o TEACHER --overwrite is refused before any work, and the teacher's files are untouched."""
    teacher = tiny_llama(tmp_path, name="teacher")
    files = {p.name: p.read_bytes() for p in teacher.iterdir()}
    res = run("finetune", factorized, "--data", data, "--teacher", teacher, "-o", teacher, "--overwrite")
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert {p.name: p.read_bytes() for p in teacher.iterdir()} == files


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "expected"),
    [(True, False, "fp32"), (False, False, "fp32"), (True, True, "bf16"), (False, True, "bf16")],
)
def test_auto_precision_on_cpu_is_bf16_only_with_amx(
    monkeypatch: pytest.MonkeyPatch, avx512_bf16: bool, amx: bool, expected: str
) -> None:
    """AVX512-BF16 without AMX multiplies bf16 slower than fp32 (a distillation step 1.9x), so auto keeps fp32
    there; an explicit precision is never overridden."""
    from lowrank_compress.finetune import resolve_precision

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert resolve_precision("auto", torch.device("cpu")) == expected
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"
