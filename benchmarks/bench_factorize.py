"""Factorize SmolLM2-135M with each method and the default policy at budgets 0.8 and 0.6; held-out perplexity.

    python benchmarks/bench_factorize.py            # writes benchmarks/results/factorize.json
    python benchmarks/bench_factorize.py --quick    # budget 0.8 only
    python benchmarks/bench_factorize.py --runs "default" --out factorize-default   # a subset, its own JSON

Calibration uses the built-in text's calibration half; perplexity is measured on the held-out half (first 16384
tokens, windows of 512 without overlap). Each factorize runs in its own process (wall time and peak RSS are its
own); each perplexity in another. The paper methods calibrate on the text alone (`self_mix` 0), as published.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from _common import arg, main_or_help, run_child, save

TEXT_ONLY = {"policy": "uniform", "self_mix": 0.0}
RUNS = {  # label -> settings beyond the defaults
    "svd": {"method": "svd", **TEXT_ONLY},
    "asvd": {"method": "asvd", **TEXT_ONLY},
    "whiten+uniform": {"method": "whiten", **TEXT_ONLY},
    "fisher": {"method": "fisher", **TEXT_ONLY},
    "whiten+sensitivity, text only": {"self_mix": 0.0},  # the default before the self-generated mix
    "default": {},
}

FACTORIZE = """
import time
t0 = time.perf_counter()
from lowrank_compress.demo import default_model_path
from lowrank_compress.pipeline import factorize_model
from lowrank_compress.recipe import build_settings
r = factorize_model(default_model_path(), {out!r}, build_settings(budget={budget}, **{extra!r}))
RESULT = {{"timings_s": r.timings, "kept_fraction_targets": r.kept_fraction_targets,
          "kept_fraction_model": r.kept_fraction_model, "total_s": round(time.perf_counter() - t0, 2)}}
"""

PERPLEXITY = """
from lowrank_compress.loading import load_model
from lowrank_compress.evaluate import perplexity
from lowrank_compress.text import load_text
model, tok, _ = load_model({path!r})
p = perplexity(model, tok, load_text("builtin", split="heldout"), window=512, stride=512, max_tokens=16384)
RESULT = {{"perplexity": p.perplexity, "tokens": p.n_tokens}}
"""


def main() -> None:
    budgets = [0.8] if "--quick" in sys.argv else [0.8, 0.6]
    labels = arg("--runs", ";".join(RUNS)).split(";")
    if any(label not in RUNS for label in labels):
        sys.exit(f"--runs takes labels from {list(RUNS)}")
    from lowrank_compress.demo import default_model_path

    dense = run_child(PERPLEXITY.format(path=str(default_model_path())))["perplexity"]
    print(f"dense held-out perplexity {dense:.3f}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for budget in budgets:
            for i, label in enumerate(labels):
                out = str(Path(tmp) / f"{i}-{budget}")
                fact = run_child(FACTORIZE.format(out=out, budget=budget, extra=RUNS[label]))
                ppl = run_child(PERPLEXITY.format(path=out))["perplexity"]
                row = {"budget": budget, "label": label, "settings": RUNS[label],
                       "perplexity": ppl, "excess": ppl / dense - 1.0,
                       "factorize_wall_s": fact["process_wall_s"], "factorize_peak_rss_mb": round(fact["peak_rss_mb"]),
                       "kept_fraction_targets": fact["kept_fraction_targets"], "timings_s": fact["timings_s"]}  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"\n{'budget':>6} {'run':30} {'ppl':>8} {'ppl/dense':>9} {'wall s':>7} {'RSS MB':>7} {'kept':>7}")
    for r in rows:
        print(f"{r['budget']:>6} {r['label']:30} {r['perplexity']:>8.3f} {r['perplexity'] / dense:>9.3f} "
              f"{r['factorize_wall_s']:>7.1f} {r['factorize_peak_rss_mb']:>7} {r['kept_fraction_targets']:>7.4f}")  # fmt: skip
    verdicts = {}
    for budget in budgets:
        by = {r["label"]: r for r in rows if r["budget"] == budget}
        if "default" in by and "whiten+uniform" in by:
            ratio = by["default"]["excess"] / by["whiten+uniform"]["excess"]
            verdicts[str(budget)] = {"excess_ratio_default_vs_whiten_uniform": ratio}
            print(f"budget {budget}: default's excess perplexity = {ratio:.2f} x whiten+uniform's")
    path = save(arg("--out", "factorize"), {"model": "SmolLM2-135M-Instruct Q4_1 GGUF", "dense_perplexity": dense,
                              "runs": rows, "verdicts": verdicts})  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main_or_help(main, __doc__)
