"""Factorize a Llama-2-7B-shaped checkpoint (random weights) block by block: peak RSS, wall time, output size.

    python benchmarks/bench_scale.py                          # 4 layers, every config; writes results/scale.json
    python benchmarks/bench_scale.py --layers 32 --configs data-free
    python benchmarks/bench_scale.py --layers 2,4 --configs data-free --out scale-depth
    python benchmarks/bench_scale.py --tiny --out scale-tiny      # a dry run on a small shape

The checkpoint is generated here (never committed): hidden 4096, intermediate 11008, 32 heads, `--layers` decoder
layers, SmolLM2's tokenizer (vocab 49152), bf16 weights drawn N(0, 0.02) in 2 GB shards, written with the project's
streaming ShardWriter. Each factorize runs as `lowrank-compress factorize` under `/usr/bin/time -v`, so the peak RSS
is the kernel's (file pages the reader maps count too). Configs:

- data-free: `--method svd --policy uniform` (no calibration at all)
- text: the default on the built-in text alone (`--self-mix 0`): whitening, sensitivity ranks (block-wise
  backward pass), error-aware fit
- default: everything default, self-generated samples included (the model samples them itself)

`--samples N` (default 16) sets the calibration windows of 512 tokens for the data-aware configs.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import arg, save

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {
    "data-free": ["--method", "svd", "--policy", "uniform"],
    "text": ["--self-mix", "0"],
    "default": [],
}
SHAPE = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
}
TINY = {
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
}  # --tiny


def make_checkpoint(directory: Path, layers: int, shape: dict) -> int:
    """Write the random checkpoint; returns its size in bytes."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig

    from lowrank_compress.demo import default_model_path
    from lowrank_compress.writer import ShardWriter

    directory.mkdir(parents=True)
    gguf = default_model_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok.save_pretrained(directory)
    vocab = len(tok)
    config = LlamaConfig(vocab_size=vocab, num_hidden_layers=layers, max_position_embeddings=4096,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
                         dtype="bfloat16", architectures=["LlamaForCausalLM"], **shape)  # fmt: skip
    config.save_pretrained(directory)
    gen = torch.Generator().manual_seed(0)
    writer = ShardWriter(directory, "2GB")
    h, f = shape["hidden_size"], shape["intermediate_size"]

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    writer.add("model.embed_tokens.weight", rand(vocab, h))
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            writer.add(f"{p}self_attn.{name}.weight", rand(h, h))
        writer.add(f"{p}mlp.gate_proj.weight", rand(f, h))
        writer.add(f"{p}mlp.up_proj.weight", rand(f, h))
        writer.add(f"{p}mlp.down_proj.weight", rand(h, f))
        writer.add(f"{p}input_layernorm.weight", torch.ones(h, dtype=torch.bfloat16))
        writer.add(f"{p}post_attention_layernorm.weight", torch.ones(h, dtype=torch.bfloat16))
    writer.add("model.norm.weight", torch.ones(h, dtype=torch.bfloat16))
    writer.add("lm_head.weight", rand(vocab, h))
    writer.finalize()
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def run(model: Path, out: Path, flags: list[str], samples: str) -> dict:
    exe = Path(sys.executable).parent / "lowrank-compress"
    data_flags = [] if flags[:2] == ["--method", "svd"] else ["--samples", samples]
    cmd = [
        "/usr/bin/time",
        "-v",
        str(exe),
        "factorize",
        str(model),
        "-o",
        str(out),
        "--json",
        *flags,
        *data_flags,
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"factorize failed:\n{proc.stderr[-3000:]}")
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    report = json.loads(proc.stdout)
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return {"wall_s": round(wall, 1), "peak_rss_mb": round(peak_kb / 1024), "output_bytes": size,
            "timings_s": report["timings_s"], "peak_block_mb": report["peak_block_mb"], "kept_fraction_targets": report["summary"]["kept_fraction_targets"],
            "warnings": report["calibration"].get("warnings")}  # fmt: skip


def main() -> None:
    layer_counts = [int(x) for x in arg("--layers", "4").split(",")]
    labels = arg("--configs", ";".join(CONFIGS)).split(";")
    samples = arg("--samples", "16")
    shape = TINY if "--tiny" in sys.argv else SHAPE
    rows = []
    with tempfile.TemporaryDirectory(dir=arg("--tmp", None)) as tmp:
        for layers in layer_counts:
            model = Path(tmp) / f"llama7b-shape-{layers}"
            size = make_checkpoint(model, layers, shape)
            print(f"{layers} layers: checkpoint {size / 1e9:.2f} GB", flush=True)
            for label in labels:
                out = Path(tmp) / f"out-{label}"
                row = {"layers": layers, "config": label, "checkpoint_bytes": size, "samples": samples,
                       **run(model, out, CONFIGS[label], samples)}  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
                shutil.rmtree(out)
            shutil.rmtree(model)
    print(f"\n{'layers':>6} {'config':10} {'wall s':>8} {'peak RSS MB':>12} {'output GB':>10}")
    for r in rows:
        print(
            f"{r['layers']:>6} {r['config']:10} {r['wall_s']:>8} {r['peak_rss_mb']:>12} {r['output_bytes'] / 1e9:>10.2f}"
        )
    print(f"wrote {save(arg('--out', 'scale'), {'shape': shape, 'runs': rows})}")


if __name__ == "__main__":
    main()
