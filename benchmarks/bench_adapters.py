"""The adapter family on SmolLM2 factorized at 0.8: what each adapter wins back for its size (issue 14).

    python benchmarks/bench_adapters.py                                    # all adapters, 3 rates each, 60 steps
    python benchmarks/bench_adapters.py --steps 2 --adapters lora,c3a --rates 1 --eval-tokens 1024   # a smoke run
    (--devils FILE: where The Devil's Dictionary is, if not at ../shared/data/devils-dictionary.txt;
     --out NAME: write results/NAME.json instead of results/adapters.json, to run the adapters in several parts)

SmolLM2-135M-Instruct factorized at budget 0.8 with the default settings (cached in results/smollm2-0.8/, shared with
bench_finetune). Every adapter trains the same `--steps` steps (batch 4 x 256 tokens, cosine schedule, warmup 0.05,
float32 throughout: with bf16 training finetune scores "after" on the bf16 copy and "merged" on the float32 weights,
which differed by 1.2% for LoRA's exact merge in a 2-step smoke run) on the built-in text's first half, at about LoRA
r=16's trainable parameter count: lora / dora / gralora r=16 (gralora k=2: the same count as LoRA), c3a at the
per-layer block size nearest LoRA's count (finetune's default), bone and singlora r=32 (r out and r max(in, out):
LoRA's count on the square attention layers, more or less elsewhere), bora r=16 (LoRA's count plus in + out), surm
r=16 (2 r max(in, out): LoRA's count on the square layers); loldu cannot come near it (r + 1 per layer by
construction; r=16 here). The table gives each one's exact count. Learning rates: the best of three per adapter
(`--rates N` keeps the first N, in this order): 1e-3, 3e-3, 3e-4 for all but c3a, whose update is divided by the
input width (576-1536 here), so its rates are 1e-1, 3e-1, 3e-2, and surm (its update scaled by 1 / max(in, out)):
3e-2, 1e-1, 1e-2.

Each run merges (grow where the update is low-rank, keep for c3a and surm; these two then train once more at their
best rate and merge with break-even, exactly, their layers stored dense) and reports: trainable params, median
s/step, peak RSS during training, held-out perplexity before / after / merged on the built-in text's second half
(first `--eval-tokens` tokens, windows of 512 without overlap), the merged model's perplexity on The Devil's
Dictionary (../shared/data/devils-dictionary.txt; before = the factorized model), and the merged model's parameters
and bytes on disk, and the answers right (built-in set, greedy, through the chat template) before and after
training. On the Devil's Dictionary "after" (unmerged) is not measured: finetune scores one held-out text
in-process; for exact merges merged equals after (the held-out columns check it). Writes results/adapters.json.
"""

from __future__ import annotations

import json

from _common import FACTORIZE, PPL, RESULTS, arg, main_or_help, run_child, save

DEVILS = arg("--devils", str(RESULTS.parents[2] / "shared" / "data" / "devils-dictionary.txt"))
ADAPTERS = {
    "lora": {"rank": 16},
    "dora": {"rank": 16},
    "c3a": {"rank": 16, "merge_rank": "keep"},
    "gralora": {"rank": 16, "blocks": 2},
    "bone": {"rank": 32},
    "singlora": {"rank": 32},
    "loldu": {"rank": 16},
    "bora": {"rank": 16},
    "surm": {"rank": 16, "merge_rank": "keep"},
}
RATES = [1e-3, 3e-3, 3e-4]  # the first N with --rates N: the middle and the high rate before the low one
C3A_RATES = [1e-1, 3e-1, 3e-2]
SURM_RATES = [3e-2, 1e-1, 1e-2]

FINETUNE = """
from pathlib import Path
from lowrank_compress.finetune import FinetuneSettings, finetune
r = finetune({model!r}, {out!r}, FinetuneSettings(**{settings!r}), overwrite=True)
RESULT = {{**r.to_dict(), "bytes": sum(p.stat().st_size for p in Path({out!r}).glob("*.safetensors"))}}
"""


def devils_ppl(model: str, tokens: int) -> float:
    return run_child(PPL.format(model=model, text=DEVILS, tokens=tokens))["ppl"]


def one_run(
    model: str, name: str, lr: float, steps: int, eval_tokens: int, merge_rank: str | None = None
) -> dict:
    settings = {"adapter": name, "lr": lr, "steps": steps, "merge": True, "save_every": 10**6, "precision": "fp32",
                "eval_tokens": eval_tokens, **ADAPTERS[name]}  # fmt: skip
    if merge_rank:
        settings["merge_rank"] = merge_rank
    out = str(RESULTS / "ft-adapters")
    r = run_child(FINETUNE.format(model=model, out=out, settings=settings))
    p = r["perplexity"]
    merge = {k: v for k, v in r["merge"].items() if k not in ("ranks", "relative_errors", "dense_layers")}
    merge["dense_layers"] = len(r["merge"].get("dense_layers", []))  # per layer: too long
    return {
        "adapter": name + (f" ({merge_rank})" if merge_rank else ""), "lr": lr, "steps": r["steps"], "trainable_params": r["trainable_params"],
        "step_s": r["step_seconds"], "train_peak_rss_mb": r["peak_memory_mb"], "before": p["before"],
        "after": p["after"], "merged": p["merged"], "merge": merge, "params_after": r["params_after"],
        "merged_bytes": r["bytes"], "devils_merged": devils_ppl(out, eval_tokens), "losses": r["losses"],
        "answers_right": (r["answers"] or {}).get("right"),  # {"baseline": before training, "model": after}
    }  # fmt: skip


def main() -> None:
    steps = int(arg("--steps", "60"))
    eval_tokens = int(arg("--eval-tokens", "16384"))
    names = arg("--adapters", ",".join(ADAPTERS)).split(",")
    n_rates = int(arg("--rates", "3"))
    model = RESULTS / "smollm2-0.8"
    if not (model / "config.json").is_file():
        print("factorizing SmolLM2 at 0.8 (default settings) ...", flush=True)
        run_child(FACTORIZE.format(out=str(model)))
    devils_before = devils_ppl(str(model), eval_tokens)
    print(f"Devil's Dictionary perplexity of the factorized model: {devils_before:.3f}", flush=True)
    best, runs = [], []
    for name in names:
        tried = []
        for lr in {"c3a": C3A_RATES, "surm": SURM_RATES}.get(name, RATES)[:n_rates]:
            row = one_run(str(model), name, lr, steps, eval_tokens)
            tried.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)
        runs += tried
        best.append(min(tried, key=lambda r: r["after"]))
        if ADAPTERS[name].get("merge_rank") == "keep":  # the best rate again, merged exactly (dense layers)
            row = one_run(str(model), name, best[-1]["lr"], steps, eval_tokens, merge_rank="break-even")
            print(json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)
            runs.append(row)
            best.append(row)
    print(f"\n{'adapter':22} {'lr':>7} {'params':>9} {'s/step':>7} {'peak MB':>8} {'before':>8} {'after':>8} "
          f"{'merged':>8} {'devils':>8} {'merged MB':>9}")  # fmt: skip
    for r in best:
        print(f"{r['adapter']:22} {r['lr']:>7.0e} {r['trainable_params']:>9,} {r['step_s']:>7.2f} "
              f"{r['train_peak_rss_mb'] or 0:>8.0f} {r['before']:>8.3f} {r['after']:>8.3f} {r['merged']:>8.3f} "
              f"{r['devils_merged']:>8.3f} {r['merged_bytes'] / 2**20:>9.1f}")  # fmt: skip
    path = save(arg("--out", "adapters"), {"model": "SmolLM2-135M-Instruct Q4_1 GGUF, factorized at 0.8", "steps": steps,
                             "eval_tokens": eval_tokens, "devils_before": devils_before, "best": best,
                             "runs": runs})  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main_or_help(main, __doc__)
