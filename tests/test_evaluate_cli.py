"""`lowrank-compress evaluate`: dense and compressed models, a baseline in the same run, JSON, bad inputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from lowrank_compress.cli import cli
from lowrank_compress.evaluate import perplexity
from lowrank_compress.loading import load_model
from lowrank_compress.pipeline import factorize_model
from lowrank_compress.recipe import build_settings
from lowrank_compress.text import load_text
from tests.fixtures import tiny_bert, tiny_llama

SMALL = ("--max-tokens", "300", "--window", "64", "--stride", "32")


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("eval")
    dense = tiny_llama(root)
    compressed = root / "compressed"
    factorize_model(dense, compressed, build_settings(method="svd", policy="uniform", budget=0.5))
    return dense, compressed


def run(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_json_has_both_models_and_ratios(pair: tuple[Path, Path]) -> None:
    dense, compressed = pair
    res = run("evaluate", compressed, "--baseline", dense, *SMALL, "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    model, base = data["models"]
    assert (model["role"], base["role"]) == ("model", "baseline")
    # the same numbers as the library's perplexity on the held-out text, computed directly
    for entry, path in ((model, compressed), (base, dense)):
        m, tok, _ = load_model(path)
        direct = perplexity(
            m, tok, load_text("builtin", split="heldout"), window=64, stride=32, max_tokens=300
        )
        assert entry["perplexity"] == pytest.approx(direct.perplexity, rel=1e-9)
        assert entry["bits_per_char"] == pytest.approx(direct.bits_per_char, rel=1e-9)
        assert entry["params"] == sum(p.numel() for p in m.parameters())
        assert all(v > 0 for v in entry["prefill_tokens_per_s"].values()) and entry["decode_tokens_per_s"] > 0
    ratios = data["ratios"]
    assert ratios["perplexity"] == pytest.approx(model["perplexity"] / base["perplexity"])
    assert ratios["params"] == pytest.approx(model["params"] / base["params"]) and ratios["params"] < 1
    for n, r in ratios["prefill_tokens_per_s"].items():
        assert r == pytest.approx(model["prefill_tokens_per_s"][n] / base["prefill_tokens_per_s"][n])
    assert data["split"] == "heldout" and len(data["text_sha256"]) == 64


def test_table_output_and_a_file_scored_whole(pair: tuple[Path, Path], tmp_path: Path) -> None:
    dense, _ = pair
    text = tmp_path / "eval.jsonl"
    text.write_text(
        "\n".join(json.dumps({"text": load_text("builtin")[i * 2000 : (i + 1) * 2000]}) for i in range(3))
    )
    res = run("evaluate", dense, "--data", text, *SMALL, "--no-speed")
    assert res.exit_code == 0, res.output
    assert "perplexity" in res.stdout and "(all)" in res.stdout and "model / baseline" not in res.stdout
    res = run("evaluate", dense, "--data", text, *SMALL, "--no-speed", "--json")
    entry = json.loads(res.stdout)["models"][0]
    assert entry["prefill_tokens_per_s"] is None and math.isfinite(entry["perplexity"])


def test_an_encoder_has_no_perplexity(tmp_path: Path) -> None:
    res = run("evaluate", tiny_bert(tmp_path), *SMALL)
    assert res.exit_code == 1 and res.stderr.strip().startswith("error: ")
    assert len(res.stderr.strip().splitlines()) == 1


def test_bad_inputs(pair: tuple[Path, Path], tmp_path: Path) -> None:
    dense, _ = pair
    cases = [
        (("evaluate", tmp_path / "missing"), "no such file"),
        (("evaluate", dense, "--baseline", tmp_path / "missing"), "no such file"),
        (("evaluate", dense, "--data", tmp_path / "none.txt"), "no such file"),
        (("evaluate", dense, "--window", "1"), "window"),
        (("evaluate", dense, "--window", "4096"), "context"),
        (("evaluate", dense, "--device", "cuda:0"), "CUDA"),
    ]
    for args, needle in cases:
        res = run(*args)
        assert res.exit_code == 1, (args, res.output)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], (args, res.stderr)
    assert run("evaluate", dense, "--max-tokens", "-1").exit_code == 2


def test_what_cannot_be_scored_is_refused_in_one_line(pair: tuple[Path, Path], tmp_path: Path) -> None:
    """An encoder (no next-token loss: it crashed on 'logits'), NaN weights (a nan perplexity with exit 0, or a
    crash under --json), and a factorize output fed to factorize again."""
    import shutil

    from safetensors.torch import load_file, save_file

    dense, compressed = pair
    broken = tmp_path / "nan"
    shutil.copytree(dense, broken)
    weights = load_file(str(broken / "model.safetensors"))
    weights["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    encoder = tiny_bert(tmp_path)
    cases = [
        (("evaluate", encoder, *SMALL), "BertModel is not a causal language model; evaluate"),
        (("evaluate", dense, "--baseline", encoder, *SMALL), "BertModel is not a causal language model"),
        (
            ("sweep", encoder, "--budgets", "0.8", "-o", tmp_path / "sw"),
            "BertModel is not a causal language model; sweep",
        ),
        (("evaluate", broken, *SMALL), "model.layers.0.mlp.up_proj.weight has NaN or Inf values"),
        (("evaluate", broken, *SMALL, "--json"), "model.layers.0.mlp.up_proj.weight has NaN or Inf values"),
        (("factorize", compressed, "-o", tmp_path / "again"), "is already factorized"),
    ]
    for args, needle in cases:
        res = run(*args)
        assert res.exit_code == 1, (args, res.output)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], (args, res.stderr)
        assert res.stdout == "" and not (tmp_path / "sw").exists() and not (tmp_path / "again").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_scores_what_the_cpu_scores(pair: tuple[Path, Path]) -> None:
    """--device cuda: the same perplexity as the CPU run on the same text (float32 on both), within round-off."""
    scores = {}
    for device in ("cpu", "cuda"):
        res = run("evaluate", pair[1], *SMALL, "--device", device, "--json")
        assert res.exit_code == 0, res.output
        scores[device] = json.loads(res.stdout)["models"][0]["perplexity"]
    assert scores["cuda"] == pytest.approx(scores["cpu"], rel=1e-4)


@pytest.mark.parametrize("guarded", [True, False], ids=["guarded", "older"])
def test_an_output_that_lost_its_quantization_config_is_not_evaluated(
    pair: tuple[Path, Path], guarded: bool, tmp_path: Path
) -> None:
    """Without its quantization_config the factorized layers would be random: evaluate (and finetune, through the
    same loader) refuses in one line. An output from before the load guard is caught by the checkpoint reader, which
    finds factor tensors where config.json describes dense layers."""
    import shutil

    from lowrank_compress.format import LOAD_GUARD_KEY

    out = tmp_path / "edited"
    shutil.copytree(pair[1], out)
    config = json.loads((out / "config.json").read_text())
    del config["quantization_config"]
    if not guarded:
        del config[LOAD_GUARD_KEY]
    (out / "config.json").write_text(json.dumps(config))
    needle = "load guard but no quantization_config" if guarded else "has no lowrank quantization_config"
    for args in (("evaluate", out, *SMALL), ("evaluate", pair[0], "--baseline", out, *SMALL, "--json")):
        res = run(*args)
        assert res.exit_code == 1, (args, res.output)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], (args, res.stderr)
        assert res.stdout == ""
    res = run("factorize", out, "-o", tmp_path / "again")
    assert res.exit_code == 1 and "has no lowrank quantization_config" in res.stderr, res.output


def test_answers_kept_are_those_right_in_both_models(pair: tuple[Path, Path], tmp_path: Path) -> None:
    """The JSON's counts agree with its own per-item verdicts, and those with judging each output afresh."""
    from lowrank_compress.answers import is_right

    dense, compressed = pair
    items = tmp_path / "set.jsonl"
    items.write_text(
        "".join(json.dumps({"prompt": f"Say {w}.", "answers": [w, "the"]}) + "\n" for w in "abcd")
    )
    res = run("evaluate", compressed, "--baseline", dense, *SMALL, "--no-speed", "--answers", items, "--json")
    assert res.exit_code == 0, res.output
    answers = json.loads(res.stdout)["answers"]
    results = answers["results"]
    assert answers["items"] == len(results) == 4 and answers["source"] == str(items)
    for r in results:
        for role in ("model", "baseline"):
            assert r["right"][role] == is_right(r["outputs"][role], r["answers"])
    base = sum(r["right"]["baseline"] for r in results)
    both = sum(r["right"]["baseline"] and r["right"]["model"] for r in results)
    assert answers["right"] == {"model": sum(r["right"]["model"] for r in results), "baseline": base}
    assert answers["kept"] == both
    res = run("evaluate", compressed, "--baseline", dense, *SMALL, "--no-speed", "--answers", items)
    assert "answers right: model" in res.stdout and "sample answers" in res.stdout


def test_answers_none_skips_the_check_and_a_bad_set_is_one_line(
    pair: tuple[Path, Path], tmp_path: Path
) -> None:
    dense, _ = pair
    res = run("evaluate", dense, *SMALL, "--no-speed", "--answers", "none", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["answers"] is None
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "answers": []}\n')
    for args in (("--answers", bad), ("--answers", tmp_path / "missing.jsonl")):
        res = run("evaluate", dense, *SMALL, *args)
        assert res.exit_code == 1 and res.stdout == ""
        assert len(res.stderr.strip().splitlines()) == 1 and res.stderr.startswith("error: ")
