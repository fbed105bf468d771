"""Calibrate on one domain, evaluate on both: how far factorize's quality carries to text unlike its calibration set.

    python benchmarks/bench_cross_domain.py                 # budget 0.8; writes benchmarks/results/cross_domain.json
    python benchmarks/bench_cross_domain.py --budgets 0.8,0.6
    python benchmarks/bench_cross_domain.py --configs "default;mix 0.5" --calibrate-on fiction --out NAME  # a subset
    python benchmarks/bench_cross_domain.py --configs "default;mix 0.75" --seeds 0,1,2,3 --out NAME  # mean and range

Domains: "python" = the built-in Python reference text; "fiction" = The Devil's Dictionary, the plain text from Project
Gutenberg (literary English; read here only, never by the installed tool), from `--fiction FILE` (default: the
project's shared copy, ../shared/data/devils-dictionary.txt beside the repository). Each is split in halves: calibration on the first half of one,
held-out perplexity (first 8,192 tokens, windows of 512 without overlap) on the second half of both.
in-domain ratio = ppl / dense ppl on the calibration domain; cross-domain ratio = the same on the other domain.
answers kept = the built-in answer set's items (`--answers FILE|builtin|none`) right in the dense model and still right
in the factorized one, out of those right in the dense one: a default that keeps fewer answers is not better because
its perplexity is.
"""

from __future__ import annotations

import itertools
import json
import statistics
import sys
import tempfile
from pathlib import Path

from _common import arg, main_or_help, run_child, save, seeds_arg

ROOT = Path(__file__).resolve().parent.parent
DOMAINS = {
    "python": "builtin",
    "fiction": arg("--fiction", str(ROOT.parent / "shared" / "data" / "devils-dictionary.txt")),
}
# label -> settings beyond today's defaults (the figures in the READMEs were measured on the defaults of their day)
CONFIGS = {
    "svd+uniform": {"method": "svd", "policy": "uniform", "self_mix": 0.0},  # data-free
    "asvd+uniform, text only": {"method": "asvd", "policy": "uniform", "self_mix": 0.0},
    "fisher+uniform, text only": {"method": "fisher", "policy": "uniform", "self_mix": 0.0},
    "whiten+uniform, text only": {"policy": "uniform", "self_mix": 0.0},
    "whiten+stable-rank, text only": {"policy": "stable-rank", "self_mix": 0.0},
    "whiten+energy, text only": {"policy": "energy", "self_mix": 0.0},
    "text only (previous default)": {"self_mix": 0.0},
    "default": {},
    "default, seed 1": {"seed": 1},
    "mix 0.5": {"self_mix": 0.5},
    "mix 0.75": {"self_mix": 0.75},
    "mix 0.75, seed 1": {"self_mix": 0.75, "seed": 1},
    "default, seed 2": {"seed": 2},
    "default, seed 3": {"seed": 3},
    "mix 0.75, seed 2": {"self_mix": 0.75, "seed": 2},
    "mix 0.75, seed 3": {"self_mix": 0.75, "seed": 3},
    "prefix start": {"self_start": "prefix"},
    "self 256": {"self_seq_len": 256},  # shorter sampled windows: more of them are the starts of answers
    "self 128": {"self_seq_len": 128},
    "32 samples": {"samples": 32},  # twice the calibration tokens in both parts
    "32 samples, seed 1": {"samples": 32, "seed": 1},
    "self grads": {"grad_source": "self"},
    "self only": {"self_mix": 1.0},
    # the block-sequential fit (README, factorize, pass 2): each layer fitted to the dense inputs (SVD-LLM), or to the
    # dense outputs from the compressed prefix's inputs, with or without damping or a block-wise refinement
    # the default before the block fit
    "dense-input fit, no damping": {"error_aware": False, "damping": 0.0, "refine_steps": 0},
    "dense-input fit": {"error_aware": False, "refine_steps": 0},
    "no refine": {"refine_steps": 0},  # the closed form alone: the default before 8 from 0.5
    "refine 4": {"refine_steps": 4, "refine_from": 0.0},
    "refine 8": {"refine_steps": 8, "refine_from": 0.0},  # every block
    "refine 16": {"refine_steps": 16, "refine_from": 0.0},
    "refine 8 from 0.5": {"refine_steps": 8, "refine_from": 0.5},  # the later half of the blocks: the default
    "loss-weighted": {"loss_weighted": True},  # output errors weighted by the loss gradient (now the default)
    "no loss-weighted": {"loss_weighted": False},  # every output channel alike: the default before
    "loss-weighted, self grads": {"loss_weighted": True, "grad_source": "self"},
    # gradients from the model's greedy answers to the built-in prompts, the loss on the answers alone
    "answer grads": {"grad_source": "answers", "loss_weighted": False},
    "loss-weighted, answer grads": {"loss_weighted": True, "grad_source": "answers"},
    "damping 0.05": {"damping": 0.05},
    "damping 0.2": {"damping": 0.2},
    "chat": {"chat": True},  # self-generated conversations through the chat template, the text plain
    "chat text": {"chat": True, "chat_text": True},  # the text windows wrapped as turns too
    "chat text, seed 1": {"chat": True, "chat_text": True, "seed": 1},
    "no chat": {"chat": False},  # plain windows even for a chat model
    "chat share 0.5": {"chat_share": 0.5},  # half the samples conversations, half free text
    "chat share 0.25": {"chat_share": 0.25},
    "chat share 0.75": {"chat_share": 0.75},
    "chat text, mix 0.8": {"chat": True, "chat_text": True, "self_mix": 0.8},
    "chat text, self only": {"chat": True, "chat_text": True, "self_mix": 1.0},
    "chat text, self grads": {"chat": True, "chat_text": True, "grad_source": "self"},
    "chat text, refine 8": {"chat": True, "chat_text": True, "refine_steps": 8, "refine_from": 0.0},
    "chat text, refine 32": {"chat": True, "chat_text": True, "refine_steps": 32, "refine_from": 0.0},
    "chat text, temperature 0.7": {"chat": True, "chat_text": True, "self_temperature": 0.7},
    "chat text, temperature 0.5": {"chat": True, "chat_text": True, "self_temperature": 0.5},
    "chat text exchanges 128": {"chat": True, "chat_text": True, "self_answer_tokens": 128},
    "chat text exchanges 64": {"chat": True, "chat_text": True, "self_answer_tokens": 64},
    "chat text exchanges 128, temperature 0.7": {
        "chat": True,
        "chat_text": True,
        "self_answer_tokens": 128,
        "self_temperature": 0.7,
    },
    "error-aware fit": {"error_aware": True},
    "error-aware, damping 0.1": {"error_aware": True, "damping": 0.1},
    "error-aware, refine 32": {"error_aware": True, "refine_steps": 32, "refine_from": 0.0},
    "dense-input fit, refine 32": {"error_aware": False, "refine_steps": 32, "refine_from": 0.0},
}

PPL = """
from lowrank_compress.answers import check_answers, load_answer_set
from lowrank_compress.evaluate import perplexity
from lowrank_compress.loading import load_model
from lowrank_compress.text import load_text
def ppl(path):
    model, tok, _ = load_model(path)
    out = {{d: perplexity(model, tok, load_text(src, split="heldout"), window=512, stride=512, max_tokens=8192).perplexity
            for d, src in {domains!r}.items()}}
    if {answers!r} != "none":
        out["answers_right"] = check_answers({{"model": (model, tok)}}, load_answer_set({answers!r})).right["model"]
    return out
"""

DENSE = (
    PPL
    + """
from lowrank_compress.demo import default_model_path
RESULT = ppl(str(default_model_path()))
"""
)

RUN = (
    PPL
    + """
from lowrank_compress.demo import default_model_path
from lowrank_compress.pipeline import factorize_model
from lowrank_compress.recipe import build_settings
r = factorize_model(default_model_path(), {out!r}, build_settings(calibration={cal!r}, budget={budget}, **{extra!r}))
RESULT = {{"ppl": ppl({out!r}), "kept": r.kept_fraction_targets, "seconds": sum(v for k, v in r.timings.items() if not k.endswith("_mb")),
          "timings": r.timings, "calibration_perplexity": r.calibration.get("perplexity"),
          "warnings": r.calibration.get("warnings")}}
"""
)


def kept_answers(dense: list[bool] | None, model: list[bool] | None) -> dict:
    """Answers right in the dense model and still right in the factorized one (empty without an answer set)."""
    if dense is None or model is None:
        return {}
    kept = sum(d and m for d, m in zip(dense, model, strict=True))
    return {"answers_right": sum(model), "answers_kept": kept, "answers_dense_right": sum(dense),
            "answers_kept_fraction": kept / sum(dense) if sum(dense) else None}  # fmt: skip


def main() -> None:
    budgets = [float(x) for x in arg("--budgets", "0.8").split(",")]
    labels = arg("--configs", ";".join(CONFIGS)).split(";")
    unknown = [x for x in labels if x not in CONFIGS]
    if unknown:
        sys.exit(f"unknown config(s) {unknown}; choose from {list(CONFIGS)}")
    configs = {label: CONFIGS[label] for label in labels}
    calibrate_on = arg("--calibrate-on", ",".join(DOMAINS)).split(",")
    if any(d not in DOMAINS for d in calibrate_on):
        sys.exit(f"--calibrate-on takes domains from {list(DOMAINS)}")
    seeds: list[int | None] = [*seeds_arg("")] or [None]
    answers = arg("--answers", "builtin")
    dense_run = run_child(DENSE.format(domains=DOMAINS, answers=answers))
    dense = {d: dense_run[d] for d in DOMAINS}
    dense_right = dense_run.get("answers_right")
    print(f"dense held-out perplexity: {dense}", flush=True)
    if dense_right is not None:
        print(f"dense answers right: {sum(dense_right)} of {len(dense_right)}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for budget, cal_domain, (label, extra), seed in itertools.product(
            budgets, calibrate_on, configs.items(), seeds
        ):
            settings = extra if seed is None else {**extra, "seed": seed}
            out = str(Path(tmp) / f"{cal_domain}-{len(rows)}")
            code = RUN.format(domains=DOMAINS, out=out, cal=DOMAINS[cal_domain], budget=budget, extra=settings,
                              answers=answers)  # fmt: skip
            row = _row(run_child(code), budget, cal_domain, label, settings, dense, dense_right)
            rows.append(row)
            print(json.dumps(row), flush=True)
    _print_rows(rows)
    summary = _summary(rows) if len(seeds) > 1 else []
    path = save(
        arg("--out", "cross_domain"),
        {"model": "SmolLM2-135M-Instruct Q4_1 GGUF", "dense": dense, "answers": answers,
         "dense_answers_right": sum(dense_right) if dense_right is not None else None, "runs": rows,
         **({"summary": summary} if summary else {})},
    )  # fmt: skip
    print(f"wrote {path}")


def _row(
    r: dict, budget: float, cal_domain: str, label: str, settings: dict, dense: dict, dense_right: list | None
) -> dict:
    """One factorize-and-evaluate child's result as a row: ratios to the dense model, answers kept, timings."""
    other = next(d for d in DOMAINS if d != cal_domain)
    right = r["ppl"].pop("answers_right", None)
    in_ratio = r["ppl"][cal_domain] / dense[cal_domain]
    cross_ratio = r["ppl"][other] / dense[other]
    return {"budget": budget, "calibrated_on": cal_domain, "config": label, "seed": settings.get("seed", 0),
            "settings": settings, "ppl": r["ppl"], "in_domain_ratio": in_ratio, "cross_domain_ratio": cross_ratio,
            "quotient": cross_ratio / in_ratio, "factorize_s": r["seconds"], "timings_s": r["timings"],
            "calibration_perplexity": r["calibration_perplexity"], "warnings": r["warnings"],
            **kept_answers(dense_right, right)}  # fmt: skip


def _print_rows(rows: list[dict]) -> None:
    print(
        f"\n{'budget':>6} {'calibrated on':14} {'config':32} {'seed':>4} {'in-domain':>10} {'cross':>10} "
        f"{'cross/in':>9} {'answers kept':>13}"
    )
    for r in rows:
        kept = f"{r['answers_kept']}/{r['answers_dense_right']}" if r.get("answers_kept") is not None else "-"
        print(f"{r['budget']:>6} {r['calibrated_on']:14} {r['config']:32} {r['seed']:>4} {r['in_domain_ratio']:>10.3f} "
              f"{r['cross_domain_ratio']:>10.3f} {r['quotient']:>9.2f} {kept:>13}")  # fmt: skip


def _summary(rows: list[dict]) -> list[dict]:
    """Per budget, domain and config over the seeds (`--seeds`): mean, lowest and highest of the two ratios and of
    the answers kept. One seed moves the answers by several, so defaults are chosen on these."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["budget"], r["calibrated_on"], r["config"]), []).append(r)
    out = []
    print("\nover the seeds: mean [lowest, highest]")
    for (budget, domain, config), rs in groups.items():
        entry = {
            "budget": budget,
            "calibrated_on": domain,
            "config": config,
            "seeds": [r["seed"] for r in rs],
        }
        for key in ("in_domain_ratio", "cross_domain_ratio", "answers_kept"):
            values = [r[key] for r in rs if r.get(key) is not None]
            if values:
                entry[key] = {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}
        out.append(entry)
        cells = [f"{k.split('_')[0]} {v['mean']:.3f} [{v['min']:.3f}, {v['max']:.3f}]" if k != "answers_kept"
                 else f"answers {v['mean']:.1f} [{v['min']}, {v['max']}]"
                 for k, v in entry.items() if isinstance(v, dict)]  # fmt: skip
        print(f"{budget:>6} {domain:14} {config:32} " + "; ".join(cells))
    return out


if __name__ == "__main__":
    main_or_help(main, __doc__)
