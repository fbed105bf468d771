"""Reports: JSON, Markdown and PNG plots. matplotlib is imported only when a plot is drawn."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from lowrank_compress.analyze import AnalysisResult


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, allow_nan=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    by_type: dict[str, list] = defaultdict(list)
    for layer in result.layers:
        if layer.finite:
            by_type[layer.layer_type].append(layer)

    if result.mode == "exact" and by_type:
        n = len(by_type)
        cols = min(n, 4)
        rows = (n + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
        cmap = plt.get_cmap("viridis")
        for ax, (ltype, layers) in zip(axes.flat, sorted(by_type.items()), strict=False):
            depths = [x.depth or 0 for x in layers]
            top = max(depths) or 1
            for layer in layers:
                s = layer.singular_values or []
                if not s or s[0] <= 0:
                    continue
                xs = [i / len(s) for i in range(len(s))]
                ax.plot(xs, [v / s[0] for v in s], color=cmap((layer.depth or 0) / top), lw=0.8)
            ax.set_title(ltype)
            ax.set_yscale("log")
            ax.set_xlabel("index / full rank")
            ax.set_ylabel("sigma / sigma_max")
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        fig.suptitle("Normalized spectra by layer type (colour: depth)")
        fig.tight_layout()
        path = out_dir / "spectra.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    if by_type:
        fig, ax = plt.subplots(figsize=(7, 4))
        for ltype, layers in sorted(by_type.items()):
            pts = sorted(
                (x.depth if x.depth is not None else 0, x.stable_rank / x.break_even_rank) for x in layers
            )
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=ltype)
        ax.set_xlabel("depth (block index)")
        ax.set_ylabel("stable rank / break-even rank")
        ax.set_title("Stable rank by depth")
        ax.legend(fontsize="small", ncol=2)
        fig.tight_layout()
        path = out_dir / "stable_rank_by_depth.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_analysis_report(result: AnalysisResult, out_dir: Path) -> list[Path]:
    """report.json (with spectra), report.md and the plots, into out_dir (created if needed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "report.json", result.to_dict(with_spectra=True))
    (out_dir / "report.md").write_text(analysis_markdown(result))
    return [out_dir / "report.json", out_dir / "report.md", *analysis_plots(result, out_dir)]


def factorize_model_card(report: dict[str, Any], source: str) -> str:
    """The README.md model card written beside a factorized model."""
    s = report["summary"]
    st = report["settings"]
    cal = report["calibration"]
    cal_line = (
        "none (data-free)"
        if not cal.get("source")
        else f"{cal['source']} ({cal['split']} split), {cal['tokens']:,} tokens "
        f"({cal['samples']} x {cal['seq_len']}, seed {cal['seed']}), sha256 {cal['text_sha256'][:16]}..."
    )
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
        "## Load",
        "",
        "```python",
        "import lowrank_compress  # registers the 'lowrank' format with transformers",
        "from transformers import AutoModelForCausalLM",
        "model = AutoModelForCausalLM.from_pretrained('PATH/TO/THIS/DIR')",
        "```",
        "",
        "`recipe.yaml` holds the exact settings (`lowrank-compress factorize MODEL -o OUT --recipe recipe.yaml`);",
        "`report.json` holds per-layer ranks, parameter counts and errors.",
    ]
    return "\n".join(lines) + "\n"
