"""Tiny random checkpoints for tests: built from configs, saved to a temporary directory, fast.

Every builder takes a parent directory (pytest's `tmp_path`) and returns the path it wrote, so one test can build
several models side by side. Models are seeded, so two calls with the same arguments give the same weights.
A small byte-level BPE tokenizer is trained offline and saved with each model, because the calibration and
evaluation commands need one.
"""

from __future__ import annotations

import functools
import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

TINY_VOCAB = 320
LLAMA_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3, matching the config ids set below
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def training_text(n_chars: int = 60_000) -> str:
    """Real English text that ships with every CPython (the Python reference), for tokenizers and calibration."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))[:n_chars]


@functools.lru_cache(maxsize=8)
def _tokenizer_json(vocab_size: int, style: str) -> str:
    """Train once per (size, style) and cache the serialized tokenizer; training is the slow part."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = BERT_SPECIALS if style == "bert" else LLAMA_SPECIALS
    tok = Tokenizer(models.BPE(unk_token=specials[1] if style == "bert" else specials[0]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([training_text()], trainer=trainer)
    if style == "llama":
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    elif style == "bert":
        cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok.to_str()


def tiny_tokenizer(vocab_size: int = TINY_VOCAB, style: str = "llama"):
    """A `PreTrainedTokenizerFast` (byte-level BPE, at most `vocab_size` tokens).

    style: "llama" (prepends <s>; ids <unk>=0 <s>=1 </s>=2 <pad>=3), "gpt2" (same ids, nothing prepended)
    or "bert" ([PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4, wraps in [CLS] ... [SEP]).
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if style not in ("llama", "gpt2", "bert"):
        raise ValueError(f"unknown tokenizer style {style!r}")
    backend = Tokenizer.from_str(_tokenizer_json(vocab_size, style))
    if style == "bert":
        specials = dict(
            pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]"
        )
    else:
        specials = dict(unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    return PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=512, **specials)


def save_model(
    model: torch.nn.Module,
    out: Path,
    sharded: bool = False,
    tokenizer=None,
    dtype: torch.dtype | None = None,
) -> Path:
    """save_pretrained into `out` (several small shards plus an index when `sharded`), with the tokenizer beside it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(out, max_shard_size="60KB" if sharded else "5GB")
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def _build(config, model_cls, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = model_cls(config)
    model.eval()
    return model


def tiny_llama(
    tmp_path: Path,
    gqa: bool = False,
    tied: bool = False,
    sharded: bool = False,
    *,
    seed: int = 0,
    name: str | None = None,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    vocab_size: int = TINY_VOCAB,
    dtype: torch.dtype | None = None,
    tokenizer: bool = True,
) -> Path:
    """A random LlamaForCausalLM (4 heads of 16; 2 kv heads when `gqa`), saved with a tokenizer. Returns its dir."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2 if gqa else 4,
        vocab_size=vocab_size,
        max_position_embeddings=1024,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    model = _build(config, LlamaForCausalLM, seed)
    name = name or "tiny-llama" + ("-gqa" if gqa else "") + ("-tied" if tied else "") + (
        "-sharded" if sharded else ""
    )
    tok = tiny_tokenizer(min(vocab_size, TINY_VOCAB), "llama") if tokenizer else None
    return save_model(model, Path(tmp_path) / name, sharded=sharded, tokenizer=tok, dtype=dtype)


def tiny_gpt2(
    tmp_path: Path,
    sharded: bool = False,
    *,
    tied: bool = True,
    seed: int = 0,
    name: str | None = None,
    hidden_size: int = 64,
    num_layers: int = 2,
    vocab_size: int = TINY_VOCAB,
    max_positions: int = 256,
    dtype: torch.dtype | None = None,
    tokenizer: bool = True,
) -> Path:
    """A random GPT2LMHeadModel (Conv1D layers, head tied to `wte` when `tied`), saved with a tokenizer.

    transformers reads GPT-2 GGUF files without their context length (n_positions stays 1024), so a GPT-2 meant for
    `tiny_gguf` and a comparison with transformers' GGUF loader needs `max_positions=1024`.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_embd=hidden_size,
        n_layer=num_layers,
        n_head=4,
        n_positions=max_positions,
        vocab_size=vocab_size,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    model = _build(config, GPT2LMHeadModel, seed)
    name = name or "tiny-gpt2" + ("" if tied else "-untied") + ("-sharded" if sharded else "")
    tok = tiny_tokenizer(min(vocab_size, TINY_VOCAB), "gpt2") if tokenizer else None
    return save_model(model, Path(tmp_path) / name, sharded=sharded, tokenizer=tok, dtype=dtype)


def tiny_bert(
    tmp_path: Path,
    masked_lm: bool = False,
    sharded: bool = False,
    *,
    seed: int = 0,
    name: str | None = None,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    vocab_size: int = TINY_VOCAB,
    dtype: torch.dtype | None = None,
    tokenizer: bool = True,
) -> Path:
    """A random BertModel (or BertForMaskedLM, whose decoder is tied to the word embeddings). Returns its dir."""
    from transformers import BertConfig, BertForMaskedLM, BertModel

    config = BertConfig(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        vocab_size=vocab_size,
        max_position_embeddings=1024,
        pad_token_id=0,
    )
    model = _build(config, BertForMaskedLM if masked_lm else BertModel, seed)
    name = name or "tiny-bert" + ("-mlm" if masked_lm else "") + ("-sharded" if sharded else "")
    tok = tiny_tokenizer(min(vocab_size, TINY_VOCAB), "bert") if tokenizer else None
    return save_model(model, Path(tmp_path) / name, sharded=sharded, tokenizer=tok, dtype=dtype)


def load_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved safetensors model (single file or shards), read eagerly: an independent reference."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(f))
    return out


# --- GGUF ---------------------------------------------------------------------------------------------------------

# HF module suffix inside a block -> GGUF tensor base name (the "standardized tensor names" of the GGUF spec).
LLAMA_TO_GGUF = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
GPT2_TO_GGUF = {
    "attn.c_attn": "attn_qkv",
    "attn.c_proj": "attn_output",
    "mlp.c_fc": "ffn_up",
    "mlp.c_proj": "ffn_down",
    "ln_1": "attn_norm",
    "ln_2": "ffn_norm",
}
# Tensors outside the blocks.
GGUF_TOP_LEVEL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "transformer.wte.weight": "token_embd.weight",
    "transformer.wpe.weight": "position_embd.weight",
    "transformer.ln_f.weight": "output_norm.weight",
    "transformer.ln_f.bias": "output_norm.bias",
}

# Default storage types: a mix, so one file exercises plain floats, half floats and a block-quantized type.
DEFAULT_GGUF_QTYPES = {
    "token_embd": "F16",
    "position_embd": "F32",
    "output": "F32",
    "attn_q": "F32",
    "attn_k": "Q8_0",
    "attn_v": "F16",
    "attn_qkv": "Q8_0",
    "attn_output": "Q8_0",
    "ffn_gate": "F16",
    "ffn_up": "Q8_0",
    "ffn_down": "F32",
}


def hf_to_gguf_name(hf_name: str) -> str:
    """`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`, likewise for GPT-2 (`transformer.h.N`).

    Written by hand from the GGUF spec, independent of the reader's use of transformers' mapping.
    """
    if hf_name in GGUF_TOP_LEVEL:
        return GGUF_TOP_LEVEL[hf_name]
    parts = hf_name.split(".")
    if parts[:2] == ["model", "layers"]:
        table, block, rest = LLAMA_TO_GGUF, parts[2], parts[3:-1]
    elif parts[:2] == ["transformer", "h"]:
        table, block, rest = GPT2_TO_GGUF, parts[2], parts[3:-1]
    else:
        raise ValueError(f"no GGUF name for {hf_name}")
    return f"blk.{block}.{table['.'.join(rest)]}.{parts[-1]}"


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The row permutation llama.cpp's converter applies to q/k weights (rotary halves -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tokens(source: Path, vocab_size: int) -> list[str]:
    """The vocabulary in id order (from tokenizer.json when there is one), padded to the model's vocab size."""
    tokens = [f"<unused{i}>" for i in range(vocab_size)]
    tok_file = source / "tokenizer.json"
    if tok_file.exists():
        vocab = json.loads(tok_file.read_text())["model"]["vocab"]
        for token, i in vocab.items():
            if i < vocab_size:
                tokens[i] = token
    return tokens


def tiny_gguf(
    tmp_path: Path,
    source: Path | None = None,
    qtypes: Mapping[str, str] | None = None,
    *,
    name: str = "tiny-gguf",
    tokenizer: bool = True,
) -> Path:
    """Convert a tiny Llama or GPT-2 checkpoint (a GQA Llama when `source` is None) to GGUF as llama.cpp does.

    Tensors are renamed to GGUF names, Llama q/k rows permuted, GPT-2 Conv1D weights transposed to (out x in), and
    stored with the types of `qtypes` (keyed by GGUF base name such as "attn_q"; 1-D tensors are always F32). The
    file lands in `tmp_path/name/model.gguf`, with the source's tokenizer files beside it when `tokenizer`.
    Returns the .gguf path.
    """
    import gguf

    if source is None:
        source = tiny_llama(Path(tmp_path) / f"{name}-source", gqa=True)
    source = Path(source)
    cfg = json.loads((source / "config.json").read_text())
    arch = cfg.get("model_type")
    if arch not in ("llama", "gpt2"):
        raise ValueError("tiny_gguf converts Llama and GPT-2 checkpoints only")
    types = {**DEFAULT_GGUF_QTYPES, **(qtypes or {})}

    out_dir = Path(tmp_path) / name
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.gguf"
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny {arch}")
    if arch == "llama":
        n_head, n_kv = (
            cfg["num_attention_heads"],
            cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        )
        writer.add_block_count(cfg["num_hidden_layers"])
        writer.add_context_length(cfg["max_position_embeddings"])
        writer.add_embedding_length(cfg["hidden_size"])
        writer.add_feed_forward_length(cfg["intermediate_size"])
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_kv)
        writer.add_rope_dimension_count(cfg.get("head_dim") or cfg["hidden_size"] // n_head)
        writer.add_rope_freq_base(float(cfg.get("rope_parameters", {}).get("rope_theta", 10000.0)))
        writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    else:
        writer.add_block_count(cfg["n_layer"])
        writer.add_context_length(cfg["n_positions"])
        writer.add_embedding_length(cfg["n_embd"])
        writer.add_feed_forward_length(cfg.get("n_inner") or 4 * cfg["n_embd"])
        writer.add_head_count(cfg["n_head"])
        writer.add_layer_norm_eps(cfg["layer_norm_epsilon"])
    writer.add_vocab_size(cfg["vocab_size"])
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(_gguf_tokens(source, cfg["vocab_size"]))

    for hf_name, tensor in sorted(load_state_dict(source).items()):
        gname = hf_to_gguf_name(hf_name)
        w = tensor.float().numpy()
        if ".attn_q." in gname:
            w = llamacpp_permute(w, n_head)
        elif ".attn_k." in gname:
            w = llamacpp_permute(w, n_kv)
        elif arch == "gpt2" and w.ndim == 2 and gname.startswith("blk."):
            w = w.T  # Conv1D stores (in x out); GGUF holds (out x in)
        base = gname.split(".")[-2]
        qtype = "F32" if w.ndim == 1 else types.get(base, "F32")
        if qtype == "F32":
            writer.add_tensor(gname, np.ascontiguousarray(w, dtype=np.float32))
        elif qtype == "F16":
            writer.add_tensor(gname, np.ascontiguousarray(w, dtype=np.float16))
        else:
            qt = gguf.GGMLQuantizationType[qtype]
            writer.add_tensor(gname, gguf.quants.quantize(np.ascontiguousarray(w), qt), raw_dtype=qt)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    if tokenizer:
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (source / f).exists():
                shutil.copy(source / f, out_dir / f)
    return path


# --- editing saved files (for tests of corrupt inputs) ---------------------------------------------------------------


def read_safetensors_raw(path: Path) -> tuple[dict, bytes]:
    """The JSON header and the raw data section of a safetensors file."""
    blob = Path(path).read_bytes()
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def write_safetensors_raw(path: Path, header: dict, data: bytes) -> Path:
    """Write a header (any content, even a lying one) and a data section as a safetensors file."""
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as the format recommends
    Path(path).write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return Path(path)


def interrupt_pass_2(monkeypatch, error: BaseException, block: int = 1) -> None:
    """Raise `error` as factorize's pass 2 starts writing block `block` (0-based)."""
    from lowrank_compress.pipeline import Prepared

    write_block = Prepared._write_block

    def failing(self: Prepared, i: int, *args: object) -> object:
        if i == block:
            raise error
        return write_block(self, i, *args)

    monkeypatch.setattr(Prepared, "_write_block", failing)
