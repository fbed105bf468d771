"""analyze: the library result and the CLI, on tiny random checkpoints, and every bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from lowrank_compress.analyze import analyze
from lowrank_compress.cli import cli
from tests.fixtures import load_state_dict, tiny_gguf, tiny_gpt2, tiny_llama


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("m"), gqa=True)


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


def test_layers_match_numpy(llama: Path) -> None:
    result = analyze(llama)
    sd = load_state_dict(llama)
    # 7 Linear layers per block; the untied output head is a Linear too (a tied one would be skipped)
    assert result.mode == "exact" and len(result.layers) == 2 * 7 + 1
    assert any(x.module == "lm_head" for x in result.layers)
    for layer in result.layers:
        w = sd[f"{layer.module}.weight"].double().numpy()
        s = np.linalg.svd(w, compute_uv=False)
        assert (layer.out_features, layer.in_features) == w.shape
        assert layer.stable_rank == pytest.approx((s**2).sum() / s[0] ** 2, rel=1e-5)
        assert layer.spectral == pytest.approx(s[0], rel=1e-5)
        r95 = int(np.searchsorted(np.cumsum(s**2) / (s**2).sum(), 0.95) + 1)
        assert layer.energy_ranks[0.95] == r95
        m, n = w.shape
        assert layer.params_at_energy[0.95] == min(m * n, r95 * (m + n))
    # the model-wide totals are the real parameter count of the checkpoint
    assert result.total_params == sum(t.numel() for t in sd.values())
    assert result.targetable_params == sum(x.params for x in result.layers)


def test_fast_mode_skips_spectra_but_keeps_stable_rank(llama: Path) -> None:
    exact = {x.module: x for x in analyze(llama).layers}
    fast = analyze(llama, fast=True)
    assert fast.mode == "fast" and fast.summary()["kept_at_energy"] is None
    for layer in fast.layers:
        assert layer.energy_ranks is None
        assert layer.stable_rank == pytest.approx(exact[layer.module].stable_rank, rel=1e-3)


def test_sorted_by_compressibility(llama: Path) -> None:
    ranks = [x.stable_rank / x.break_even_rank for x in analyze(llama).sorted_layers()]
    assert ranks == sorted(ranks)


def test_json_output_is_one_document_with_schema(llama: Path) -> None:
    res = run("analyze", str(llama), "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert set(data) >= {"model", "mode", "summary", "layers", "skipped"}
    assert data["summary"]["layers"] == len(data["layers"]) == 15
    assert {"stable_rank", "effective_rank", "energy_ranks", "break_even_rank", "params_at_energy"} <= set(
        data["layers"][0]
    )
    assert any(s["reason"] == "embedding" for s in data["skipped"])


def test_table_and_summary(llama: Path) -> None:
    res = run("analyze", str(llama), "--top", "3")
    assert res.exit_code == 0, res.output
    assert "stable rank" in res.stdout and "keep 95% energy" in res.stdout
    assert res.stdout.count("model.layers.") == 3


def test_gpt2_conv1d_and_gguf_analyze(tmp_path: Path) -> None:
    gpt2 = analyze(tiny_gpt2(tmp_path))
    c_attn = next(x for x in gpt2.layers if x.module.endswith("0.attn.c_attn"))
    assert (c_attn.out_features, c_attn.in_features) == (3 * 64, 64)
    gguf_result = analyze(tiny_gguf(tmp_path))
    assert gguf_result.format == "gguf" and len(gguf_result.layers) == 15  # untied head included


def test_out_writes_report_files_atomically(llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    res = run("analyze", str(llama), "--out", str(out))
    assert res.exit_code == 0, res.output
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        ".lowrank-compress",
        "report.json",
        "report.md",
        "spectra.png",
        "stable_rank_by_depth.png",
    ]
    data = json.loads((out / "report.json").read_text())
    assert len(data["layers"][0]["singular_values"]) == min(data["layers"][0]["shape"])
    assert (out / "spectra.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a second run refuses the non-empty directory, then replaces it with --overwrite
    again = run("analyze", str(llama), "--out", str(out))
    assert again.exit_code == 1 and "--overwrite" in again.stderr
    assert run("analyze", str(llama), "--out", str(out), "--overwrite").exit_code == 0
    # never inside the input
    inside = run("analyze", str(llama), "--out", str(llama / "rep"))
    assert inside.exit_code == 1 and not (llama / "rep").exists()


def test_nan_weights_are_reported_per_layer(llama: Path, tmp_path: Path) -> None:
    bad = tmp_path / "nan"
    bad.mkdir()
    for f in llama.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    sd = load_file(bad / "model.safetensors")
    sd["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    sd["model.layers.0.self_attn.q_proj.weight"][1, 2] = float("inf")
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    res = run("analyze", str(bad), "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert sorted(data["summary"]["non_finite_layers"]) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.mlp.up_proj",
    ]
    assert "NaN or Inf" in res.stderr
    finite = [x for x in data["layers"] if x["finite"]]
    assert len(finite) == 13 and all(x["stable_rank"] > 0 for x in finite)


def _one_line_error(res) -> str:
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


def test_bad_inputs_give_one_line(llama: Path, tmp_path: Path) -> None:
    assert "no such file" in _one_line_error(run("analyze", str(tmp_path / "missing")))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no model weights" in _one_line_error(run("analyze", str(empty)))
    txt = tmp_path / "weights.txt"
    txt.write_text("not weights")
    _one_line_error(run("analyze", str(txt)))
    blob = (llama / "model.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(blob[: len(blob) // 2])
    assert "cut.safetensors" in _one_line_error(run("analyze", str(cut)))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save({"w": torch.ones(2, 2)}, pickled / "pytorch_model.bin")
    assert "--allow-pickle" in _one_line_error(run("analyze", str(pickled)))
    assert "re:(" in _one_line_error(run("analyze", str(llama), "--target", "re:("))


def test_usage_errors_exit_2(llama: Path) -> None:
    assert run("analyze", str(llama), "--top", "x").exit_code == 2
    assert run("analyze", "--bogus").exit_code == 2
    res = run("analyze", "")  # an unset "$MODEL": not the built-in model
    assert res.exit_code == 2 and "empty path" in res.stderr and "Traceback" not in res.output


def test_version_and_help() -> None:
    from lowrank_compress import __version__

    res = run("--version")
    assert res.exit_code == 0 and __version__ in res.stdout
    assert "analyze" in run("-h").stdout


@pytest.mark.slow
def test_analyze_smollm2() -> None:
    from lowrank_compress.demo import default_model_path

    result = analyze(default_model_path(), fast=True)
    assert len(result.layers) == 30 * 7
    assert result.total_params == 134_515_008  # SmolLM2-135M, tied embeddings stored once
    assert all(x.finite and 1.0 < x.stable_rank < x.break_even_rank for x in result.layers)


def test_the_load_guard_changes_nothing_for_readers(factorized: Path, tmp_path: Path) -> None:
    """factorize writes the load guard into config.json; safetensors, the checkpoint reader and analyze read the
    output exactly as they read it without the guard."""
    import shutil

    from safetensors import safe_open

    from lowrank_compress.checkpoint import Checkpoint
    from lowrank_compress.format import LOAD_GUARD, LOAD_GUARD_KEY

    assert json.loads((factorized / "config.json").read_text())[LOAD_GUARD_KEY] == LOAD_GUARD
    unguarded = tmp_path / "unguarded"
    shutil.copytree(factorized, unguarded)
    config = json.loads((unguarded / "config.json").read_text())
    del config[LOAD_GUARD_KEY]
    (unguarded / "config.json").write_text(json.dumps(config))

    with safe_open(factorized / "model.safetensors", "pt") as fh:
        names = set(fh.keys())
    assert {n for n in names if n.endswith(".down.weight")}
    for path in (factorized, unguarded):
        assert set(Checkpoint.open(path).tensors) == names
    guarded_result, plain_result = analyze(factorized), analyze(unguarded)
    assert [(x.module, x.stable_rank) for x in guarded_result.layers] == [
        (x.module, x.stable_rank) for x in plain_result.layers
    ]
    assert guarded_result.skipped == plain_result.skipped
