"""factorize in this checkout against another revision, back to back: wall time, and quality with --evaluate.

    python benchmarks/bench_against.py                          # against the last in-memory factorize (06b9777^)
    python benchmarks/bench_against.py --ref v0.1.0 --rounds 2 --budgets 0.6 --out against-v010
    python benchmarks/bench_against.py --new '{"loss_weighted": true}' --out against-loss-weighted
    python benchmarks/bench_against.py --budgets 0.8,0.6 --evaluate --out against-quality   # and their quality
    python benchmarks/bench_against.py --budgets 0.8 --seeds 1,2,3 --evaluate --out against-seeds  # both sides per seed

The other revision is checked out with `git worktree add` into a temporary folder (removed afterwards) and imported
from there through PYTHONPATH, so both run in this venv with the same torch, on the built-in SmolLM2 with the default
settings of their own time (built-in calibration text); `--new JSON` adds settings (recipe keys; the seed goes with `--seeds`) to this checkout's
runs only, to time an option against the old default. Runs alternate (old, new, old, new, ...) so that a slow
patch of the machine hits both; the ratio is new / old per round, at each of `--budgets` and `--seeds` (the
calibration seed, given to both sides: each seed's new run is compared with the old one at that seed). `--evaluate` scores
every output with this checkout's evaluator, as bench_cross_domain does: held-out perplexity on the built-in text and
the Devil's Dictionary (ratios to the dense model's) and the built-in answers kept. Run it alone on the machine.
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import arg, main_or_help, run_child, save, seeds_arg
from bench_cross_domain import DENSE, DOMAINS, PPL, kept_answers

ROOT = Path(__file__).resolve().parent.parent
CHILD = """
from lowrank_compress.demo import default_model_path
from lowrank_compress.pipeline import factorize_model
from lowrank_compress.recipe import build_settings
r = factorize_model(default_model_path(), {out!r}, build_settings(calibration="builtin", budget={budget}, **{extra!r}))
import torch
RESULT = {{"timings": r.timings, "kept": r.kept_fraction_targets, "threads": torch.get_num_threads()}}
"""
SCORE = PPL + "\nRESULT = ppl({out!r})\n"


def timed(tree: Path, out: Path, budget: float, extra: dict) -> dict:
    """One factorize in a fresh interpreter importing the project from `tree`, with `extra` settings."""
    result = run_child(CHILD.format(out=str(out), budget=budget, extra=extra), tree=tree)
    return {"wall_s": result.pop("process_wall_s"), **result}


def scored(out: Path, dense: dict) -> dict:
    """An output's held-out perplexity ratios and answers kept, by this checkout's evaluator whichever side wrote it."""
    r = run_child(SCORE.format(domains=DOMAINS, answers="builtin", out=str(out)))
    ratios = {f"{d}_ratio": r[d] / dense[d] for d in DOMAINS}
    return {
        "ppl": {d: r[d] for d in DOMAINS},
        **ratios,
        **kept_answers(dense["answers_right"], r["answers_right"]),
    }


def new_settings(text: str) -> dict:
    """--new's settings, checked before the first run (not after the old revision's) against this checkout's."""
    from lowrank_compress.errors import LowrankError
    from lowrank_compress.recipe import build_settings

    try:
        new = json.loads(text)
    except json.JSONDecodeError as e:
        raise SystemExit(f"--new: not JSON ({e})") from None
    if not isinstance(new, dict):
        raise SystemExit("--new takes a JSON object of settings, e.g. '{\"loss_weighted\": true}'")
    if "seed" in new:
        raise SystemExit("--new: give the seed with --seeds, which sets it on both sides")
    try:
        build_settings(calibration="builtin", **new)
    except (TypeError, LowrankError) as e:
        raise SystemExit(f"--new: {e}") from None
    return new


def main() -> None:
    ref, rounds = arg("--ref", "06b9777^"), int(arg("--rounds", "1"))
    budgets = [float(x) for x in arg("--budgets", "0.8").split(",")]
    new, seeds = new_settings(arg("--new", "{}")), seeds_arg("0")
    dense = run_child(DENSE.format(domains=DOMAINS, answers="builtin")) if "--evaluate" in sys.argv else None
    if dense is not None:
        print(
            f"dense: {json.dumps({d: dense[d] for d in DOMAINS})}, answers right {sum(dense['answers_right'])}"
        )
    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        old_tree = Path(tmp) / "old"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old_tree), ref], check=True,
                       capture_output=True)  # fmt: skip
        try:
            for budget, seed, r in itertools.product(budgets, seeds, range(rounds)):
                for label, tree, extra in (
                    ("old", old_tree, {"seed": seed}),
                    ("new", ROOT, {**new, "seed": seed}),
                ):
                    out = Path(tmp) / f"{label}-{budget}-{seed}-{r}"
                    run = {"budget": budget, "seed": seed, "round": r, "which": label,
                           **timed(tree, out, budget, extra)}  # fmt: skip
                    if dense is not None:
                        run.update(scored(out, dense))
                    shutil.rmtree(out)
                    runs.append(run)
                    print(json.dumps(run), flush=True)
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old_tree)], check=False
            )
    pairs = list(zip(runs[::2], runs[1::2], strict=True))
    ratios = [b["wall_s"] / a["wall_s"] for a, b in pairs]
    print(f"new / old wall time per round: {', '.join(f'{x:.2f}' for x in ratios)}")
    if dense is not None:
        for a, b in pairs:
            excess = {d: (b[f"{d}_ratio"] - 1) / (a[f"{d}_ratio"] - 1) for d in DOMAINS}
            print(f"budget {a['budget']}, seed {a['seed']}: new / old excess perplexity (ratio - 1) "
                  + ", ".join(f"{d} {x:.2f}" for d, x in excess.items())
                  + f"; answers kept {a['answers_kept']} old, {b['answers_kept']} new")  # fmt: skip
    dense_figures = dense and {**{d: dense[d] for d in DOMAINS}, "answers_right": sum(dense["answers_right"])}
    path = save(
        arg("--out", "against"),
        {
            "ref": ref,
            "budgets": budgets,
            "seeds": seeds,
            "new_settings": new,
            "dense": dense_figures,
            "runs": runs,
            "ratios": ratios,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main_or_help(main, __doc__)
