"""Reports: JSON, Markdown and PNG plots. matplotlib is imported only when a plot is drawn."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from lowrank_compress.analyze import AnalysisResult
from lowrank_compress.errors import LowrankError


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, allow_nan=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend: plots become files, never windows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig: Any, dpi: int = 100, tight: bool = True) -> bytes:
    """The figure as PNG bytes, then closed. `tight` crops to what is drawn, so legends beside the axes are kept."""
    import io

    buf = io.BytesIO()
    if tight:
        fig.tight_layout()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight" if tight else None)
    pyplot().close(fig)
    return buf.getvalue()


def legend_beside(ax: Any, fontsize: str = "small") -> None:
    """A legend to the right of the axes, where it cannot cover a line (the figure is saved with bbox "tight")."""
    ax.legend(fontsize=fontsize, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def _fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def analysis_markdown(result: AnalysisResult) -> str:
    """A Markdown report: summary, then one row per layer, most compressible first."""
    s = result.summary()
    lines = [
        f"# Spectral analysis of `{result.model}`",
        "",
        f"Mode: {result.mode}. Format: {result.format}. {s['layers']} target layers, "
        f"{s['targetable_params']:,} of {s['total_params']:,} parameters ({s['targetable_fraction']:.1%}).",
        "",
    ]
    if s["kept_at_energy"]:
        lines += ["| energy kept | target params kept | of targets | of model |", "|---|---|---|---|"]
        for e, k in s["kept_at_energy"].items():
            lines.append(
                f"| {float(e):.0%} | {k['target_params']:,} | {k['target_fraction']:.1%} | {k['model_fraction']:.1%} |"
            )
        lines.append("")
    if s["non_finite_layers"]:
        lines += [f"Layers with NaN/Inf weights (not analyzed): {', '.join(s['non_finite_layers'])}", ""]
    lines += [
        "| layer | shape | stable rank | effective rank | r90 | r95 | r99 | break-even |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for layer in result.sorted_layers():
        er = layer.energy_ranks or {}
        lines.append(
            f"| `{layer.module}` | {layer.out_features}x{layer.in_features} | {_fmt(layer.stable_rank)} | "
            f"{_fmt(layer.effective_rank)} | {er.get(0.9, '-')} | {er.get(0.95, '-')} | {er.get(0.99, '-')} | "
            f"{layer.break_even_rank:.0f} |"
        )
    return "\n".join(lines) + "\n"


def analysis_plots(result: AnalysisResult, out_dir: Path) -> list[Path]:
    """Spectrum curves per layer type (exact mode) and stable rank by depth. Returns the files written."""
    by_type: dict[str, list] = defaultdict(list)
    for layer in result.layers:
        if layer.finite:
            by_type[layer.layer_type].append(layer)
    if not by_type:
        return []
    images: dict[str, bytes] = {}
    if result.mode == "exact":
        top = max((x.depth or 0 for x in result.layers), default=0) or 1  # one colour scale for every panel
        images["spectra.png"] = _spectra_panels(by_type, top)
    series = {t: [(x.depth or 0, x.stable_rank / x.break_even_rank) for x in ls] for t, ls in by_type.items()}
    images["stable_rank_by_depth.png"] = _by_depth(
        series, "stable rank / break-even rank", "Stable rank by depth", dpi=110
    )
    for name, data in images.items():
        (out_dir / name).write_bytes(data)
    return [out_dir / name for name in images]


def _spectra_panels(by_type: dict[str, list], top: int) -> bytes:
    """One panel per layer type: each layer's normalized spectrum, coloured by depth on one colour scale."""
    import matplotlib

    plt = pyplot()
    n = len(by_type)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, (ltype, layers) in zip(axes.flat, sorted(by_type.items()), strict=False):
        for layer in layers:
            s = layer.singular_values or []
            if s and s[0] > 0:
                xs = [i / len(s) for i in range(len(s))]
                ax.plot(xs, [v / s[0] for v in s], color=cmap((layer.depth or 0) / top), lw=0.8)
        ax.set_title(ltype)
        ax.set_yscale("log")
        ax.set_xlabel("index / full rank")
        ax.set_ylabel("sigma / sigma_max")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle("Normalized spectra by layer type (colour: depth)")
    fig.tight_layout()  # before the colour bar, which tight_layout cannot place
    scale = plt.cm.ScalarMappable(cmap=cmap, norm=matplotlib.colors.Normalize(0, top))
    fig.colorbar(scale, ax=axes.ravel().tolist(), label="depth (block index)", shrink=0.8)
    return png_bytes(fig, dpi=110, tight=False)


def write_analysis_report(result: AnalysisResult, out_dir: Path) -> list[Path]:
    """report.json (with spectra), report.md and the plots, into out_dir (created if needed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "report.json", result.to_dict(with_spectra=True))
    (out_dir / "report.md").write_text(analysis_markdown(result))
    return [out_dir / "report.json", out_dir / "report.md", *analysis_plots(result, out_dir)]


def with_spread(text: str, spread: float | None) -> str:
    """A speed figure and its spread across repeats, as plus or minus half the range: "1.16x ±4%"."""
    return text if spread is None else f"{text} ±{spread / 2:.0%}"


def speed_note(ev: dict[str, Any]) -> str | None:
    """What to say about the speed figures: reliable ones need no note; unreliable ones must not read as facts."""
    check = ev.get("speed")
    if not check:
        return None
    if check["reliable"]:
        return None
    return (
        "Speed figures are unreliable: " + "; ".join(check["reasons"]) + ". Measure again on an idle machine."
    )


def speed_cells(m: dict[str, Any], seq_lens: list[str], ratio: bool = False) -> list[str]:
    """Prefill and decode cells of a model's (or the ratios') row, each with its spread."""
    spread = m.get("speed_spread") or {}
    prefill = m.get("prefill_tokens_per_s") or {}
    decode = m.get("decode_tokens_per_s")
    pre_sp = spread.get("prefill") or {}
    fmt = "{:.2f}x" if ratio else "{:.0f}"
    cells = [with_spread(fmt.format(prefill[n]), pre_sp.get(n)) if n in prefill else "-" for n in seq_lens]
    dec = ("{:.2f}x" if ratio else "{:.1f}").format(decode) if decode else "-"
    return [*cells, with_spread(dec, spread.get("decode")) if decode else dec]


def _evaluation_lines(ev: dict[str, Any] | None) -> list[str]:
    """The model card's quality and speed table (from `factorize --evaluate`)."""
    if not ev:
        return []
    models = ev["models"]
    seq_lens = list((models[0]["prefill_tokens_per_s"] or {}).keys())
    head = [
        "",
        "params",
        "perplexity",
        "bits/char",
        *[f"prefill@{n} tok/s" for n in seq_lens],
        "decode tok/s",
    ]
    lines = [
        "## Quality and speed",
        "",
        f"Measured on {ev['data']} ({ev['split']} split), window {models[0]['window']}, stride {models[0]['stride']}, "
        f"{models[0]['tokens_scored']:,} tokens; speeds interleaved in one run on the machine that made this model.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for m in models:
        name = "this model" if m["role"] == "model" else "original"
        cells = [name, f"{m['params']:,}", f"{m['perplexity']:.3f}", f"{m['bits_per_char']:.4f}",
                 *speed_cells(m, seq_lens)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    r = ev.get("ratios")
    if r:
        cells = ["ratio", f"{r['params']:.3f}", f"{r['perplexity']:.3f}", f"{r['bits_per_char']:.3f}",
                 *speed_cells(r, seq_lens, ratio=True)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if seq_lens:
        lines += [
            "Speeds: median of the repeats, ± half the range of the repeats relative to the median.",
            "",
        ]
    note = speed_note(ev)
    if note:
        lines += [f"**{note}**", ""]
    return [*lines, *answer_lines(ev.get("answers"))]


def _cell(text: str, limit: int = 160) -> str:
    """Text for one Markdown table cell: one line, pipes escaped, long outputs cut."""
    text = " ".join(str(text).split())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return text.replace("|", "\\|")


def answer_lines(answers: dict[str, Any] | None) -> list[str]:
    """The answer check in Markdown: right and kept, then a few prompts with both models' answers side by side."""
    if not answers:
        return []
    from lowrank_compress.answers import answers_summary

    roles = list(answers["right"])
    names = {"model": "this model", "baseline": "original"}
    lines = ["## Answers", "", answers_summary(answers) + ".", ""]
    lines += [
        "| prompt | " + " | ".join(names.get(r, r) for r in roles) + " |",
        "|---|" + "---|" * len(roles),
    ]
    for i in answers["samples"]:
        r = answers["results"][i]
        said = [("right: " if r["right"][x] else "wrong: ") + _cell(r["outputs"][x]) for x in roles]
        lines.append(f"| {_cell(r['prompt'])} | " + " | ".join(said) + " |")
    return [*lines, ""]


def _calibration_line(cal: dict[str, Any]) -> str:
    """The model card's calibration cell: source, split, tokens, windows and fingerprints of each part, and whether
    the windows were chat conversations (--chat, --chat-text)."""
    line = _calibration_sources(cal)
    if cal.get("chat"):
        # reports written before --chat-text have no chat_text key: they wrapped the text too
        if "self" not in (cal.get("parts") or {}):
            which = "the text"
        elif cal.get("chat_text", True):
            which = "the text and the samples"
        else:
            which = "the samples"
        line += f"; {which} as conversations through the tokenizer's chat template (--chat)"
    return line


def _calibration_sources(cal: dict[str, Any]) -> str:
    if not cal.get("source"):
        return "none (data-free)"
    parts = cal.get("parts") or {}
    text, own = parts.get("text"), parts.get("self")
    if text and own:  # a mixed set (--self-mix)
        how = " opened on random tokens" if cal.get("self_start") == "random" else ""
        if cal.get("self_temperature") not in (None, 1.0):
            how += f" at temperature {cal['self_temperature']:g}"
        if cal.get("chat_share") not in (None, 1.0):
            how += f", {cal['chat_share']:.0%} of them conversations and the rest free text"
        if cal.get("self_answer_tokens"):
            how += f", several answers to a window (each at most {cal['self_answer_tokens']} tokens)"
        return (
            f"{cal['source']} ({cal['split']} split), {text['samples']} x {text['seq_len']} tokens, sha256 "
            f"{text['sha256'][:16]}..., pooled with {own['samples']} x {own['seq_len']} tokens sampled from the model "
            f"itself{how} (self-mix {cal['self_mix']:g}: their share of the statistics), sha256 "
            f"{own['sha256'][:16]}...; {cal['tokens']:,} tokens, "
            f"seed {cal['seed']}"
        )
    where = "sampled from the model itself" if cal["source"] == "self" or not text and own else cal["source"]
    split = "" if cal.get("split") is None else f" ({cal['split']} split)"
    return (
        f"{where}{split}, {cal['tokens']:,} tokens ({cal['samples']} x {cal['seq_len']}, seed {cal['seed']}), "
        f"sha256 {cal['text_sha256'][:16]}..."
    )


def _perplexity_lines(perplexity: dict[str, float] | None) -> list[str]:
    if not perplexity:
        return []
    return [
        f"The source model's perplexity on the calibration text: {perplexity['text']:.3g}; on its own samples: "
        f"{perplexity['self']:.3g}.",
        "",
    ]


def factorize_model_card(report: dict[str, Any], source: str) -> str:
    """The README.md model card written beside a factorized model."""
    s = report["summary"]
    st = report["settings"]
    cal = report["calibration"]
    cal_line = _calibration_line(cal)
    dense = [x for x in report["layers"] if x["rank"] is None]
    lines = [
        "---",
        "tags: [lowrank-compress, low-rank, svd]",
        "---",
        f"# Low-rank factorized version of `{source}`",
        "",
        f"Made with lowrank-compress {report['tool']['version']}: {s['layers_factorized']} Linear layers replaced by "
        "two SVD factors (`down`: r x in, `up`: out x r).",
        "",
        "| | |",
        "|---|---|",
        f"| method | {st['method']} |",
        f"| rank policy | {st['policy']} |",
        f"| budget (target params kept) | {st['budget']:.3f} |",
        f"| kept of target params | {s['kept_fraction_targets']:.4f} ({s['target_params_after']:,} of {s['target_params_before']:,}) |",
        f"| kept of all params | {s['kept_fraction_model']:.4f} ({s['total_params_after']:,} of {s['total_params_before']:,}) |",
        f"| layers kept dense | {len(dense)} |",
        f"| calibration | {cal_line} |",
        "",
        *_perplexity_lines(cal.get("perplexity")),
        *[f"**Calibration warning:** {w}" for w in cal.get("warnings") or []],
        "",
        *_evaluation_lines(report.get("evaluation")),
        "## Load",
        "",
        "```python",
        "import lowrank_compress  # registers the 'lowrank' format with transformers",
        "from transformers import AutoModelForCausalLM",
        "model = AutoModelForCausalLM.from_pretrained('PATH/TO/THIS/DIR')",
        "```",
        "",
        "Without `import lowrank_compress`, `from_pretrained` stops with a ValueError that says to install and",
        "import it (config.json's `transformers_weights` is a load guard, not a file name); it never returns a",
        "model with randomly initialized layers.",
        "",
        "`recipe.yaml` holds the exact settings (`lowrank-compress factorize MODEL -o OUT --recipe recipe.yaml`);",
        "`report.json` holds per-layer ranks, parameter counts and errors.",
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------- factorize reports


def read_factorize_report(output: Path) -> dict[str, Any]:
    """report.json of a factorize output, with a clear error when it is missing or not ours."""
    path = Path(output) / "report.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise LowrankError(
            f"{output}: no report.json; is it a `lowrank-compress factorize` output?"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LowrankError(f"{path}: not readable JSON ({e})") from e
    if not isinstance(data, dict) or not {"summary", "layers", "settings"} <= set(data):
        raise LowrankError(f"{path}: not a factorize report (no summary, layers and settings)")
    return data


def _layer_type(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def _depth(module: str) -> int:
    from lowrank_compress.checkpoint import module_depth

    return module_depth(module) or 0


def factorize_plots(reports: list[dict[str, Any]]) -> dict[str, bytes]:
    """PNG images (name -> bytes) for the first report, plus perplexity vs size when several carry evaluations."""
    main = reports[0]
    by_type: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for layer in main["layers"]:
        by_type[_layer_type(layer["module"])].append(layer)
    images = {
        "ranks_by_depth.png": _ranks_by_depth(by_type),
        "kept_energy.png": _kept_energy(by_type, main["settings"]["method"]),
    }
    if main.get("spectra"):
        images["spectra.png"] = _extreme_spectra(main["spectra"])
    evaluated = [r for r in reports if r.get("evaluation")]
    if len(evaluated) >= 2:
        images["perplexity_vs_size.png"] = _perplexity_vs_size(evaluated)
    return images


def _by_depth(series: dict[str, list[tuple[int, float]]], ylabel: str, title: str, dpi: int = 100) -> bytes:
    """One line per layer type (name -> (block index, value) points) against depth."""
    fig, ax = pyplot().subplots(figsize=(7.5, 4))
    for ltype, points in sorted(series.items()):
        pts = sorted(points)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=ltype)
    ax.set_xlabel("depth (block index)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    legend_beside(ax)
    return png_bytes(fig, dpi=dpi)


def _layer_series(by_type: dict[str, list[dict[str, Any]]], value: Any) -> dict[str, list[tuple[int, float]]]:
    """`value(layer)` at each report layer's block index, per layer type."""
    return {t: [(_depth(x["module"]), value(x)) for x in layers] for t, layers in by_type.items()}


def _ranks_by_depth(by_type: dict[str, list[dict[str, Any]]]) -> bytes:
    def kept(x: dict[str, Any]) -> float:
        m, n = x["shape"]
        return 1.0 if x["rank"] is None else x["rank"] * (m + n) / (m * n)

    return _by_depth(
        _layer_series(by_type, kept),
        "params kept (rank / break-even rank)",
        "Ranks by depth and layer type (1.0: kept dense)",
    )


def _kept_energy(by_type: dict[str, list[dict[str, Any]]], method: str) -> bytes:
    return _by_depth(
        _layer_series(by_type, lambda x: 1.0 - x["relative_error"] ** 2),
        "kept energy (method's metric)",
        f"Kept energy per layer ({method})",
    )


def _extreme_spectra(spectra: dict[str, list[float]]) -> bytes:
    fig, ax = pyplot().subplots(figsize=(7.5, 4))
    names = list(spectra)
    for i, name in enumerate(names):
        s = spectra[name]
        style = "-" if i < len(names) / 2 else "--"
        ax.plot([j / len(s) for j in range(len(s))], [max(v, 1e-12) for v in s], style, label=name, lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("index / full rank")
    ax.set_ylabel("sigma / sigma_max")
    ax.set_title("Spectra: most compressible (solid) and least (dashed)")
    legend_beside(ax, fontsize="x-small")
    return png_bytes(fig)


def _perplexity_vs_size(evaluated: list[dict[str, Any]]) -> bytes:
    fig, ax = pyplot().subplots(figsize=(7.5, 4))
    pts = sorted(
        (r["summary"]["kept_fraction_model"], r["evaluation"]["models"][0]["perplexity"]) for r in evaluated
    )
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label="factorized")
    base = next((m for m in evaluated[0]["evaluation"]["models"] if m["role"] == "baseline"), None)
    if base is not None:
        ax.axhline(base["perplexity"], color="grey", ls=":", label="original")
    ax.set_xlabel("params kept (fraction of the model)")
    ax.set_ylabel("perplexity")
    ax.set_title("Perplexity vs size")
    legend_beside(ax)
    return png_bytes(fig)


def verdict_lines(report: dict[str, Any]) -> list[str]:
    """The report's opening: what was kept and what it cost, beside the original's figures."""
    s = report["summary"]
    ev = report.get("evaluation")
    kept = f"keeps {s['kept_fraction_model']:.1%} of the parameters ({s['total_params_after']:,} of {s['total_params_before']:,})"
    if not ev:
        return ["## Verdict", "", f"This model {kept}. It was not evaluated: run factorize with --evaluate (or "
                "`lowrank-compress evaluate OUT --baseline MODEL`) for perplexity, answers and speed.", ""]  # fmt: skip
    by = {m["role"]: m for m in ev["models"]}
    r = ev.get("ratios") or {}
    said = [f"This model {kept}"]
    rows = ["| | this model | original | ratio |", "|---|---|---|---|",
            f"| params | {s['total_params_after']:,} | {s['total_params_before']:,} | {s['kept_fraction_model']:.3f} |"]  # fmt: skip
    if "baseline" in by:
        a, b = by["model"], by["baseline"]
        said.append(f"its perplexity is {r['perplexity']:.2f}x the original's")
        rows.append(
            f"| perplexity | {a['perplexity']:.3f} | {b['perplexity']:.3f} | {r['perplexity']:.3f}x |"
        )
    answers = ev.get("answers")
    if answers and answers.get("kept") is not None:
        n, right = answers["items"], answers["right"]
        share = f" ({answers['kept_fraction']:.0%})" if answers["kept_fraction"] is not None else ""
        said.append(
            f"it keeps {answers['kept']} of the {right['baseline']} answers the original gets right{share}"
        )
        rows.append(f"| answers right | {right['model']} of {n} | {right['baseline']} of {n} | "
                    f"kept {answers['kept']} of {right['baseline']}{share} |")  # fmt: skip
    said += _verdict_speed(ev, by, r, rows)
    note = speed_note(ev)
    return ["## Verdict", "", "; ".join(said) + ".", "", *rows, "", *([f"**{note}**", ""] if note else [])]


def _verdict_speed(ev: dict[str, Any], by: dict[str, Any], r: dict[str, Any], rows: list[str]) -> list[str]:
    """Decode speed (or the longest prefill) of both models and their ratio with its spread; appends a table row."""
    if "baseline" not in by or not r.get("prefill_tokens_per_s"):
        return []
    a, b = by["model"], by["baseline"]
    spread = r.get("speed_spread") or {}
    if r.get("decode_tokens_per_s"):
        what, va, vb, ratio, sp = "decode tok/s", a["decode_tokens_per_s"], b["decode_tokens_per_s"], r["decode_tokens_per_s"], spread.get("decode")  # fmt: skip
    else:
        n = list(r["prefill_tokens_per_s"])[-1]
        what, va, vb = f"prefill@{n} tok/s", a["prefill_tokens_per_s"][n], b["prefill_tokens_per_s"][n]
        ratio, sp = r["prefill_tokens_per_s"][n], (spread.get("prefill") or {}).get(n)
    reliable = (ev.get("speed") or {}).get("reliable", True)
    flag = "" if reliable else " (unreliable)"
    rows.append(f"| {what} | {va:.1f} | {vb:.1f} | {with_spread(f'{ratio:.2f}x', sp)}{flag} |")
    return [f"{what.split()[0]} speed {with_spread(f'{ratio:.2f}x', sp)} the original's{flag}"]


def layer_lines(report: dict[str, Any]) -> list[str]:
    """The per-layer table: factorized layers one per row, the layers kept dense collapsed into one row."""
    lines = [f"## Layers of {report['output']}", "", "| module | shape | rank | params after | relative error |", "|---|---|---|---|---|"]  # fmt: skip
    dense = []
    for x in report["layers"]:
        if x["rank"] is None:
            dense.append(x)
            continue
        lines.append(f"| {x['module']} | {x['shape'][0]}x{x['shape'][1]} | {x['rank']} | {x['params_after']:,} | "
                     f"{x['relative_error']:.4f} |")  # fmt: skip
    if dense:
        names = ", ".join(x["module"] for x in dense[:4]) + (", ..." if len(dense) > 4 else "")
        params = sum(x["params_after"] for x in dense)
        lines.append(f"| {len(dense)} layers kept dense ({names}) | - | dense | {params:,} | 0 |")
    return lines


def factorize_markdown(reports: list[dict[str, Any]], image_names: list[str]) -> str:
    """report.md: the verdict, a summary of each output, evaluation and answers, the plots, then the per-layer
    table of the first output."""
    main = reports[0]
    lines = ["# lowrank-compress factorize report", "", *verdict_lines(main)]
    lines += ["## Outputs", ""]
    lines += ["| output | method | policy | budget | kept of targets | kept of model | perplexity |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in reports:
        s, st = r["summary"], r["settings"]
        ev = r.get("evaluation")
        ppl = f"{ev['models'][0]['perplexity']:.3f}" if ev else "-"
        lines.append(f"| {r['output']} | {st['method']} | {st['policy']} | {st['budget']} | "
                     f"{s['kept_fraction_targets']:.4f} | {s['kept_fraction_model']:.4f} | {ppl} |")  # fmt: skip
    lines.append("")
    lines += _evaluation_lines(main.get("evaluation"))
    lines += [f"![{name}]({name})" for name in image_names] + [""]
    lines += layer_lines(main)
    return "\n".join(lines) + "\n"


def factorize_html(markdown_tables: str, images: dict[str, bytes]) -> str:
    """A self-contained HTML page: the Markdown report's tables as HTML, the plots embedded as data URIs."""
    import base64
    import html
    import re

    body: list[str] = []
    table: list[list[str]] = []

    def flush() -> None:
        if table:
            head, *rows = table
            body.append(
                "<table><thead><tr>"
                + "".join(f"<th>{html.escape(c)}</th>" for c in head)
                + "</tr></thead><tbody>"
            )
            body.extend("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
            body.append("</tbody></table>")
            table.clear()

    for line in markdown_tables.splitlines():
        if line.startswith("|"):
            cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]
            if not all(set(c) <= set("-: ") for c in cells):
                table.append(cells)
            continue
        flush()
        if line.startswith("!["):
            name = line[line.index("(") + 1 : line.rindex(")")]
            data = base64.b64encode(images[name]).decode("ascii")
            body.append(
                f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{data}"></figure>'
            )
        elif line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("**") and line.endswith("**"):
            body.append(f'<p class="warn"><strong>{html.escape(line[2:-2])}</strong></p>')
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    flush()
    style = (
        "body{font-family:system-ui,sans-serif;margin:2em auto;max-width:72em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}td,th{border:1px solid #ccc;padding:2px 8px;"
        "text-align:right}td:first-child,th:first-child{text-align:left}img{max-width:100%}"
        ".warn{color:#a40}"
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>lowrank-compress report</title>'
        f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def _claim_report_dir(target: Path) -> None:
    """The report may go into a new or empty folder (then marked as a report folder), a factorize output, or a
    report folder of an earlier run, where it replaces the files it wrote then; never into a user's folder, whose
    report.md it would overwrite."""
    from lowrank_compress.outdir import ours, replaceable, write_marker

    if ours(target) in ("output", "report"):
        return
    if not replaceable(target):
        kind = (
            "a file" if target.exists() and not target.is_dir() else "a folder lowrank-compress did not write"
        )
        raise LowrankError(f"-o {target}: {kind}; pass a new or empty folder, or a factorize output")
    try:
        target.mkdir(parents=True, exist_ok=True)
        write_marker(target, "report")
    except OSError as e:
        raise LowrankError(f"-o {target}: cannot create it ({e.strerror or e})") from None


def write_factorize_report(outputs: list[Path], out_dir: Path | None = None) -> list[Path]:
    """report.md, report.html and the PNG plots for one or more factorize outputs, or for one finetune output, into
    out_dir (default: the first output). Each file is written whole, then moved into place."""
    from lowrank_compress.report_finetune import finetune_markdown, finetune_plots, read_finetune_report

    tuned = None if (Path(outputs[0]) / "report.json").exists() else read_finetune_report(Path(outputs[0]))
    if tuned is not None and len(outputs) > 1:
        raise LowrankError(f"{outputs[0]} is a finetune output: report renders one at a time")
    reports = [] if tuned is not None else [read_factorize_report(o) for o in outputs]
    target = Path(out_dir) if out_dir is not None else Path(outputs[0])
    _claim_report_dir(target)
    if tuned is not None:
        images = finetune_plots(tuned)
        markdown = finetune_markdown(tuned, list(images))
    else:
        images = factorize_plots(reports)
        markdown = factorize_markdown(reports, list(images))
    files = {
        **images,
        "report.md": markdown.encode(),
        "report.html": factorize_html(markdown, images).encode(),
    }
    return _write_files(target, files)


def _write_files(target: Path, files: dict[str, bytes]) -> list[Path]:
    """Each file written beside its name, then moved into place (a reader never sees half a file)."""
    import os

    written = []
    for name, content in files.items():
        tmp = target / f".{name}.tmp"
        tmp.write_bytes(content)
        os.replace(tmp, target / name)
        written.append(target / name)
    return written
