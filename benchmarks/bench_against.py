"""factorize's wall time in this checkout against another revision of the project, same settings, back to back.

    python benchmarks/bench_against.py                          # against the last in-memory factorize (06b9777^)
    python benchmarks/bench_against.py --ref v0.1.0 --rounds 2 --budget 0.6 --out against-v010
    python benchmarks/bench_against.py --new '{"loss_weighted": true}' --out against-loss-weighted

The other revision is checked out with `git worktree add` into a temporary folder (removed afterwards) and imported
from there through PYTHONPATH, so both run in this venv with the same torch, on the built-in SmolLM2 with the default
settings of their own time (built-in calibration text); `--new JSON` adds settings (recipe keys) to this checkout's
runs only, to time an option against the old default. Runs alternate (old, new, old, new, ...) so that a slow
patch of the machine hits both; the ratio is new / old per round. Run it alone on the machine.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

from _common import arg, main_or_help, run_child, save

ROOT = Path(__file__).resolve().parent.parent
CHILD = """
from lowrank_compress.demo import default_model_path
from lowrank_compress.pipeline import factorize_model
from lowrank_compress.recipe import build_settings
r = factorize_model(default_model_path(), {out!r}, build_settings(calibration="builtin", budget={budget}, **{extra!r}))
import torch
RESULT = {{"timings": r.timings, "kept": r.kept_fraction_targets, "threads": torch.get_num_threads()}}
"""


def timed(tree: Path, out: Path, budget: float, extra: dict) -> dict:
    """One factorize in a fresh interpreter importing the project from `tree`, with `extra` settings."""
    result = run_child(CHILD.format(out=str(out), budget=budget, extra=extra), tree=tree)
    return {"wall_s": result.pop("process_wall_s"), **result}


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
    try:
        build_settings(calibration="builtin", **new)
    except (TypeError, LowrankError) as e:
        raise SystemExit(f"--new: {e}") from None
    return new


def main() -> None:
    ref, budget, rounds = arg("--ref", "06b9777^"), float(arg("--budget", "0.8")), int(arg("--rounds", "1"))
    new = new_settings(arg("--new", "{}"))
    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        old_tree = Path(tmp) / "old"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old_tree), ref], check=True,
                       capture_output=True)  # fmt: skip
        try:
            for r in range(rounds):
                for label, tree, extra in (("old", old_tree, {}), ("new", ROOT, new)):
                    timing = timed(tree, Path(tmp) / f"{label}-{r}", budget, extra)
                    run = {"round": r, "which": label, **timing}
                    runs.append(run)
                    print(json.dumps(run), flush=True)
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old_tree)], check=False
            )
    ratios = [b["wall_s"] / a["wall_s"] for a, b in zip(runs[::2], runs[1::2], strict=True)]
    print(f"new / old wall time per round: {', '.join(f'{x:.2f}' for x in ratios)}")
    path = save(
        arg("--out", "against"),
        {"ref": ref, "budget": budget, "new_settings": new, "runs": runs, "ratios": ratios},
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main_or_help(main, __doc__)
