"""Analyze SmolLM2-135M in exact and fast mode: wall time, peak RSS, and how close fast mode's stable ranks are.

python benchmarks/bench_analyze.py      # writes benchmarks/results/analyze.json
"""

from __future__ import annotations

import math

from _common import main_or_help, run_child, save

CODE = """
import time
t0 = time.perf_counter()
from lowrank_compress.analyze import analyze
from lowrank_compress.demo import default_model_path
r = analyze(default_model_path(), fast={fast})
RESULT = {{"mode": r.mode, "layers": len(r.layers), "analyze_s": round(r.seconds, 2),
          "total_s": round(time.perf_counter() - t0, 2),
          "stable_ranks": {{x.module: x.stable_rank for x in r.layers}}}}
"""


def main() -> None:
    rows = {}
    for fast in (False, True):
        rows["fast" if fast else "exact"] = run_child(CODE.format(fast=fast))
    exact, fast = rows["exact"]["stable_ranks"], rows["fast"]["stable_ranks"]
    rel = [abs(fast[k] - exact[k]) / exact[k] for k in exact]
    accuracy = {"max_rel_err_stable_rank": max(rel), "mean_rel_err_stable_rank": math.fsum(rel) / len(rel)}
    print(f"{'mode':6} {'layers':>6} {'analyze s':>10} {'process s':>10} {'peak RSS MB':>12}")
    for mode, r in rows.items():
        print(
            f"{mode:6} {r['layers']:>6} {r['analyze_s']:>10.2f} {r['process_wall_s']:>10.2f} {r['peak_rss_mb']:>12.0f}"
        )
    print(
        f"fast-mode stable rank vs exact: max rel. error {accuracy['max_rel_err_stable_rank']:.2e}, "
        f"mean {accuracy['mean_rel_err_stable_rank']:.2e}"
    )
    for r in rows.values():
        r.pop("stable_ranks")
    path = save(
        "analyze", {"model": "SmolLM2-135M-Instruct Q4_1 GGUF", "runs": rows, "fast_accuracy": accuracy}
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main_or_help(main, __doc__)
