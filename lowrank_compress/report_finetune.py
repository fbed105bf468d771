"""`lowrank-compress report` of a finetune output: the loss curve, held-out perplexity before / after / merged, and
the answers kept when finetune.json carries an answer check.

Why its own module: a finetune output has finetune.json instead of report.json, and what a reader asks of it is
different (did training win back what compression lost?), so it gets its own verdict and plot; the HTML rendering
and the file writing are the factorize report's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lowrank_compress.errors import LowrankError


def read_finetune_report(output: Path) -> dict[str, Any] | None:
    """finetune.json of a finetune output (None when there is none; an unreadable one is an error)."""
    path = Path(output) / "finetune.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LowrankError(f"{path}: not readable JSON ({e})") from e
    if not isinstance(data, dict) or not {"losses", "perplexity", "settings"} <= set(data):
        raise LowrankError(f"{path}: not a finetune report (no losses, perplexity and settings)")
    return data


def loss_label(teacher: str | None) -> str:
    """What the training loss is: the KL to the teacher when distilling (finetune --teacher), else the text's."""
    return "KL to the teacher" if teacher else "loss"


def finetune_plots(data: dict[str, Any]) -> dict[str, bytes]:
    """loss.png: the training loss per step, with a running mean when there are enough steps to smooth."""
    from lowrank_compress.report import legend_beside, png_bytes, pyplot

    losses = data["losses"]
    if not losses:
        return {}
    start = data.get("resumed_from_step", 0)
    steps = list(range(start + 1, start + len(losses) + 1))
    fig, ax = pyplot().subplots(figsize=(7.5, 4))
    label = loss_label(data["settings"].get("teacher"))
    ax.plot(steps, losses, lw=0.8, alpha=0.6, label=label)
    k = max(1, len(losses) // 20)
    if k > 1:
        mean = [
            sum(losses[max(0, i - k + 1) : i + 1]) / len(losses[max(0, i - k + 1) : i + 1])
            for i in range(len(losses))
        ]
        ax.plot(steps, mean, lw=1.5, label=f"running mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel(f"training {label}" if label == "loss" else label)
    ax.set_title("Training loss")
    legend_beside(ax)
    return {"loss.png": png_bytes(fig)}


def finetune_verdict(data: dict[str, Any]) -> list[str]:
    """The opening: perplexity before -> after (and merged), answers right before -> after, the loss's first and
    last values, the size."""
    p = data["perplexity"]
    said = [f"{data['steps']} steps of {data['settings']['train']} ({data['settings']['adapter']}, "
            f"rank {data['settings']['rank']}) on {data['data'].get('tokens', 0):,} tokens"]  # fmt: skip
    rows = ["| | perplexity |", "|---|---|"]
    for key, name in (("before", "before finetuning"), ("after", "after"), ("merged", "merged")):
        if p.get(key) is not None:
            rows.append(f"| {name} | {p[key]:.3f} |")
    if p.get("before") is not None and p.get("after") is not None:
        said.append(
            f"held-out perplexity {p['before']:.3f} -> {p['after']:.3f} ({p['after'] / p['before']:.2f}x)"
        )
    answers = data.get("answers")
    if answers:  # "baseline" is MODEL before training, "model" the trained one
        right = answers["right"]
        said.append(f"answers right {right['baseline']} -> {right['model']} of {answers['items']}")
    losses = data["losses"]
    if losses:
        said.append(f"{loss_label(data['settings'].get('teacher'))} {losses[0]:.3f} -> {losses[-1]:.3f}")
    said.append(f"{data['params_after']:,} parameters ({data['kind']})")
    return ["## Verdict", "", "; ".join(said) + ".", "", *rows, ""]


def finetune_markdown(data: dict[str, Any], image_names: list[str]) -> str:
    """report.md of a finetune output."""
    from lowrank_compress.report import answer_lines

    st = data["settings"]
    lines = [f"# lowrank-compress finetune report: {data['out']}", "", *finetune_verdict(data)]
    lines += answer_lines(data.get("answers"))
    lines += ["## Run", "", "| | |", "|---|---|", f"| model | {data['model']} |", f"| kind | {data['kind']} |",
              f"| learning rate | {st['lr']} |", f"| batch | {st['batch_size']} x {st['seq_len']} tokens, "
              f"grad accum {st['grad_accum']} |", f"| precision | {data['precision']} on {data['device']} |",
              f"| seconds per step | {data['step_seconds']:.2f} |", f"| tokens/s | {data['tokens_per_s']:,.0f} |",
              f"| trainable params | {data['trainable_params']:,} |", ""]  # fmt: skip
    lines += method_lines(data.get("methods") or {})
    lines += [f"**warning: {w}**" for w in data.get("warnings") or []]
    lines += [f"![{name}]({name})" for name in image_names] + [""]
    return "\n".join(lines) + "\n"


def method_lines(methods: dict[str, Any]) -> list[str]:
    """What the training methods did (finetune.json `methods`): final rank spread, regularizer values, cuts."""
    rows = []
    for name, rec in methods.items():
        said = []
        if rec.get("spread"):
            s = rec["spread"]
            said.append(
                f"ranks {s['min']} .. {s['max']}, mean {s['mean']:.1f} over {len(rec.get('ranks') or {})} layers"
            )
        if rec.get("trainable_start") is not None:
            said.append(f"trainable {rec['trainable_start']:,} -> {rec['trainable_end']:,}")
        for key in ("last_value", "orthogonality"):
            if rec.get(key) is not None:
                said.append(f"{key.replace('_', ' ')} {rec[key]:.4g}")
        if rec.get("cuts") is not None:
            said.append(f"{len(rec['cuts'])} truncations")
        if rec.get("adjustments") is not None:
            said.append(f"{len(rec['adjustments'])} prune/expand rounds")
        if name == "lora_pro":
            said.append(f"gradients adjusted on {rec.get('layers', 0)} layers")
        if said:
            rows.append(f"| {name} | {'; '.join(said)} |")
    return ["## Training methods", "", "| method | what it did |", "|---|---|", *rows, ""] if rows else []
