"""The training methods of issue 15 on SmolLM2 factorized at 0.8: plain LoRA against LoRA-Pro, GoRA, AdaLoRA,
ElaLoRA and ARD-LoRA at LoRA r=16's budget, same steps and data; and LoRA with LoRAE's regularizer (`lorae`).

    python benchmarks/bench_methods.py                                     # every method, 60 steps
    python benchmarks/bench_methods.py --steps 2 --methods lora,gora --eval-tokens 1024        # a smoke run
    (--devils FILE: where The Devil's Dictionary is, if not at ../shared/data/devils-dictionary.txt;
     --model DIR: another factorized model instead of results/smollm2-0.8/ (a tiny one for a smoke run);
     --lr R: the learning rate of every method (1e-3); --out NAME: results/NAME.json instead of methods.json;
     --low-rank-reg W: the weight of LoRAE's term in the `lorae` run (1e-3))

SmolLM2-135M-Instruct factorized at budget 0.8 with the default settings (cached in results/smollm2-0.8/, shared with
bench_finetune and bench_adapters). Every method trains LoRA at r=16 (alpha 32) for `--steps` steps (batch 4 x 256
tokens, cosine schedule, warmup 0.05, float32) on the built-in text's first half and merges exactly (grow). The
budget is plain LoRA's: GoRA shares out r (in + out) per layer by importance; AdaLoRA starts at 24 triplets per layer
and ends at 16 on average; ElaLoRA keeps 16 active per layer on average out of a pool of 32; ARD-LoRA's ranks end at most 16 on average (pool 32). Reported per method:
trainable params, median s/step, peak RSS during training, held-out perplexity before / after / merged on the
built-in text's second half (first `--eval-tokens` tokens, windows of 512 without overlap), the merged model's
perplexity on The Devil's Dictionary, the final rank pattern's spread (min / max / mean), and the answers right
(built-in set, greedy, through the chat template) before and after training. Writes results/methods.json.
"""

from __future__ import annotations

import json

from _common import FACTORIZE, PPL, RESULTS, arg, main_or_help, run_child, save

DEVILS = arg("--devils", str(RESULTS.parents[2] / "shared" / "data" / "devils-dictionary.txt"))
METHODS = {
    "lora": {},
    "lora-pro": {"optimizer": "lora-pro"},
    "gora": {"init": "gora"},
    "adalora": {"rank_schedule": "adalora"},
    "elalora": {"rank_schedule": "elalora"},
    "ard": {"rank_schedule": "ard"},
    "lorae": {"low_rank_reg": float(arg("--low-rank-reg", "1e-3"))},
}

FINETUNE = """
from lowrank_compress.finetune import FinetuneSettings, finetune
r = finetune({model!r}, {out!r}, FinetuneSettings(**{settings!r}), overwrite=True)
RESULT = r.to_dict()
"""


def devils_ppl(model: str, tokens: int) -> float:
    return run_child(PPL.format(model=model, text=DEVILS, tokens=tokens))["ppl"]


def one_run(model: str, name: str, lr: float, steps: int, eval_tokens: int) -> dict:
    settings = {"adapter": "lora", "rank": 16, "lr": lr, "steps": steps, "merge": True, "save_every": 10**6,
                "precision": "fp32", "eval_tokens": eval_tokens, **METHODS[name]}  # fmt: skip
    out = str(RESULTS / "ft-methods")
    r = run_child(FINETUNE.format(model=model, out=out, settings=settings))
    p = r["perplexity"]
    record = next(iter(v for k, v in r["methods"].items() if k in ("gora", "adalora", "elalora", "ard")), {})
    reg = r["methods"].get("low_rank_reg") or {}
    return {
        "method": name, "lr": lr, "steps": r["steps"], "trainable_params": r["trainable_params"],
        "step_s": r["step_seconds"], "train_peak_rss_mb": r["peak_memory_mb"], "before": p["before"],
        "after": p["after"], "merged": p["merged"], "devils_merged": devils_ppl(out, eval_tokens),
        "rank_spread": record.get("spread"), "ranks": record.get("ranks"), "losses": r["losses"],
        "answers_right": (r["answers"] or {}).get("right"),  # {"baseline": before training, "model": after}
        "low_rank_reg": reg.get("weight"), "low_rank_reg_last": reg.get("last_value"),
    }  # fmt: skip


def main() -> None:
    steps = int(arg("--steps", "60"))
    eval_tokens = int(arg("--eval-tokens", "16384"))
    lr = float(arg("--lr", "1e-3"))
    names = arg("--methods", ",".join(METHODS)).split(",")
    model = arg("--model", str(RESULTS / "smollm2-0.8"))
    if model == str(RESULTS / "smollm2-0.8") and not (RESULTS / "smollm2-0.8" / "config.json").is_file():
        print("factorizing SmolLM2 at 0.8 (default settings) ...", flush=True)
        run_child(FACTORIZE.format(out=model))
    devils_before = devils_ppl(model, eval_tokens)
    print(f"Devil's Dictionary perplexity of the factorized model: {devils_before:.3f}", flush=True)
    rows = []
    for name in names:
        rows.append(one_run(model, name, lr, steps, eval_tokens))
        print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("losses", "ranks")}), flush=True)
    print(f"\n{'method':9} {'params':>9} {'s/step':>7} {'before':>8} {'after':>8} {'merged':>8} {'devils':>8} "
          f"{'ranks min/max/mean':>20}")  # fmt: skip
    for r in rows:
        s = r["rank_spread"]
        ranks = f"{s['min']}/{s['max']}/{s['mean']:.1f}" if s else "16 (fixed)"
        print(f"{r['method']:9} {r['trainable_params']:>9,} {r['step_s']:>7.2f} {r['before']:>8.3f} {r['after']:>8.3f} "
              f"{r['merged']:>8.3f} {r['devils_merged']:>8.3f} {ranks:>20}")  # fmt: skip
    path = save(arg("--out", "methods"), {"model": model, "steps": steps, "lr": lr, "eval_tokens": eval_tokens,
                                          "devils_before": devils_before, "runs": rows})  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main_or_help(main, __doc__)
