"""Shared bits of the benchmark scripts: run a child Python process and read its wall time and peak RSS."""

from __future__ import annotations

import json
import os
import platform
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }


def run_child(code: str, tree: Path | None = None) -> dict:
    """Run `code` in a fresh interpreter; it must set RESULT (a dict), printed as the last JSON line with the
    child's peak_rss_mb; process_wall_s is added. `tree`: import the project from that checkout instead (a -c child
    puts its cwd before PYTHONPATH on sys.path, so it runs there)."""
    wrapper = (
        "import json, resource, sys\n"
        + code
        + "\nprint(json.dumps({**RESULT, 'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))\n"
    )
    start = time.perf_counter()
    where = {} if tree is None else {"cwd": tree, "env": {**os.environ, "PYTHONPATH": str(tree)}}
    proc = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True, **where)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"child failed:\n{proc.stderr[-3000:]}")
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    data["process_wall_s"] = round(wall, 2)
    return data


def save(name: str, data: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **data}, indent=2) + "\n")
    return path


# Child programs for `run_child`, shared by the finetune-side benchmarks (fill with str.format):
# SmolLM2 factorized at budget 0.8 with the default settings into `out`; held-out perplexity of `model` on `text`.
FACTORIZE = """
from lowrank_compress.demo import default_model_path
from lowrank_compress.pipeline import factorize_model
from lowrank_compress.recipe import build_settings
r = factorize_model(default_model_path(), {out!r}, build_settings(budget=0.8), overwrite=True)
RESULT = {{"kept": r.kept_fraction_targets}}
"""

PPL = """
import lowrank_compress
from lowrank_compress.evaluate import perplexity
from lowrank_compress.loading import load_model
from lowrank_compress.text import load_text
model, tok, _ = load_model({model!r})
RESULT = {{"ppl": perplexity(model, tok, load_text({text!r}), window=512, stride=512, max_tokens={tokens}).perplexity}}
"""

__all__ = ["FACTORIZE", "PPL", "machine", "main_or_help", "resource", "run_child", "save", "seeds_arg"]


def arg(flag: str, default: str) -> str:
    """The value after `flag` on the command line, or `default`."""
    return sys.argv[sys.argv.index(flag) + 1] if flag in sys.argv else default


def seeds_arg(default: str) -> list[int]:
    """--seeds as a list of non-negative integers (none when empty), refused in one line otherwise."""
    text = arg("--seeds", default)
    if text and not all(x.strip().isdigit() for x in text.split(",")):
        sys.exit(f"--seeds takes comma-separated non-negative integers, got {text!r}")
    return [int(x) for x in text.split(",")] if text else []


def main_or_help(main: Callable[[], None], doc: str | None) -> None:
    """Run the script's `main`, or print its docstring for --help / -h. SIGTERM (kill, a time limit) exits like
    Ctrl-C: the running child is killed and temporary directories are removed (a 7B-shaped checkpoint is 13.8 GB)."""
    if "--help" in sys.argv or "-h" in sys.argv:
        print(doc)
        return
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    main()


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)
