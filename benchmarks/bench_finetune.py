"""Finetune recovery on a fixed CPU budget: how much of the compression gap LoRA wins back, bf16 vs NF4 base.

    python benchmarks/bench_finetune.py                  # 10 minutes of training per run; writes results/finetune.json
    python benchmarks/bench_finetune.py --minutes 2      # a quicker look

SmolLM2-135M-Instruct factorized at budget 0.8 with the default settings (cached in results/smollm2-0.8/), then
finetuned with LoRA r=16 on the built-in text's first half (the same half factorize calibrates on); held-out
perplexity on the second half (first 16,384 tokens, windows of 512 without overlap, as bench_factorize). Each run
first times 3 steps, then trains for as many steps as fit the budget, so the cosine schedule ends with the budget.
recovered = (before - after) / (before - dense). Peak memory: process RSS sampled during training only.
"""

from __future__ import annotations

import json
import math
import sys

from _common import RESULTS, main_or_help, run_child, save

RUNS = {"LoRA r=16, bf16 base": {}, "LoRA r=16, NF4 base": {"quantize": "nf4"}}

DENSE = """
from lowrank_compress.demo import default_model_path
from lowrank_compress.evaluate import perplexity
from lowrank_compress.loading import load_model
from lowrank_compress.text import load_text
model, tok, _ = load_model(str(default_model_path()))
RESULT = {"ppl": perplexity(model, tok, load_text("builtin", split="heldout"), window=512, stride=512,
                            max_tokens=16384).perplexity}
"""

FACTORIZE = """
from lowrank_compress.demo import default_model_path
from lowrank_compress.pipeline import factorize_model
from lowrank_compress.recipe import build_settings
r = factorize_model(default_model_path(), {out!r}, build_settings(budget=0.8), overwrite=True)
RESULT = {{"kept": r.kept_fraction_targets}}
"""

FINETUNE = """
from lowrank_compress.finetune import FinetuneSettings, finetune
r = finetune({model!r}, {out!r}, FinetuneSettings(**{settings!r}), overwrite=True)
RESULT = r.to_dict()
"""


def main() -> None:
    minutes = float(sys.argv[sys.argv.index("--minutes") + 1]) if "--minutes" in sys.argv else 10.0
    model = RESULTS / "smollm2-0.8"
    if not (model / "config.json").is_file():
        print("factorizing SmolLM2 at 0.8 (default settings) ...", flush=True)
        run_child(FACTORIZE.format(out=str(model)))
    dense = run_child(DENSE)["ppl"]
    print(f"dense held-out perplexity {dense:.3f}", flush=True)
    rows = []
    for label, extra in RUNS.items():
        base = {"rank": 16, "merge": True, "save_every": 10**6, **extra}
        probe = run_child(FINETUNE.format(model=str(model), out=str(RESULTS / "ft-probe"),
                                          settings={**base, "steps": 3, "eval_tokens": 0, "merge": False}))  # fmt: skip
        steps = max(1, math.floor(minutes * 60 / probe["step_seconds"]))
        print(f"{label}: {probe['step_seconds']:.2f} s/step in the probe -> {steps} steps", flush=True)
        r = run_child(
            FINETUNE.format(model=str(model), out=str(RESULTS / "ft-out"), settings={**base, "steps": steps})
        )
        p = r["perplexity"]
        row = {
            "run": label, "steps": r["steps"], "train_s": r["timings"]["train"], "step_s": r["step_seconds"],
            "tokens_per_s": r["tokens_per_s"], "train_peak_rss_mb": r["peak_memory_mb"],
            "process_peak_rss_mb": r["peak_rss_mb"], "precision": r["precision"], "dense": dense,
            "before": p["before"], "after": p["after"], "merged": p["merged"],
            "recovered_after": (p["before"] - p["after"]) / (p["before"] - dense),
            "recovered_merged": (p["before"] - p["merged"]) / (p["before"] - dense),
            "trainable_params": r["trainable_params"], "tokens_seen": r["steps"] * 4 * 256,
            "quantize": r["quantize"], "losses": r["losses"],
        }  # fmt: skip
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)
    print(
        f"\n{'run':24} {'steps':>5} {'s/step':>7} {'peak MB':>8} {'before':>8} {'after':>8} {'merged':>8} {'recovered':>9}"
    )
    for r in rows:
        print(f"{r['run']:24} {r['steps']:>5} {r['step_s']:>7.2f} {r['train_peak_rss_mb']:>8.0f} {r['before']:>8.3f} "
              f"{r['after']:>8.3f} {r['merged']:>8.3f} {r['recovered_merged']:>9.1%}")  # fmt: skip
    path = save("finetune", {"model": "SmolLM2-135M-Instruct Q4_1 GGUF, factorized at 0.8", "minutes": minutes,
                             "runs": rows})  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main_or_help(main, __doc__)
