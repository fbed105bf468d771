"""Budget sweep: factorize one model at several budgets and evaluate each, the curve a user reads to choose a budget.

Calibration and spectra are computed once (`pipeline.Prepared`, pass 1); each budget is then an allocation, a write and an
evaluation. Perplexity and speed are measured against the dense model, loaded once; speed interleaves the two.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from lowrank_compress.errors import BudgetError
from lowrank_compress.recipe import FactorizeSettings

if TYPE_CHECKING:
    from lowrank_compress.evaluate import Perplexity, Speed
    from lowrank_compress.pipeline import Prepared

ProgressFn = Callable[[str, int, int], None]


@dataclass
class SweepPoint:
    budget: float
    kept_fraction_targets: float
    kept_fraction_model: float
    params: int
    perplexity: float
    bits_per_char: float
    prefill_ratio: dict[str, float] | None  # seq_len -> compressed / dense tokens per second
    decode_ratio: float | None
    output: str | None  # where the model was kept (None: discarded)
    answers_right: int | None = None  # of the answer set's items
    answers_kept: int | None = None  # right in the dense model and still right here
    answers_kept_fraction: float | None = None  # answers_kept / answers the dense model got right
    # False: the spread across repeats or the machine's load make the speed ratios doubtful
    speed_reliable: bool | None = None


@dataclass
class SweepResult:
    model: str
    settings: dict[str, Any]
    dense: dict[str, Any]
    points: list[SweepPoint]
    files: list[str] = field(default_factory=list)
    resumed_from: str | None = None  # the factorize checkpoint pass 1's results came from

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "settings": self.settings,
            "dense": self.dense,
            "points": [dataclasses.asdict(p) for p in self.points],
            "files": self.files,
            "resumed_from": self.resumed_from,
        }


def parse_budgets(text: str) -> list[float]:
    """'0.9,0.8,0.7' -> [0.9, 0.8, 0.7]; each strictly between 0 and 1, no repeats."""
    try:
        budgets = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BudgetError(f"budgets must be comma-separated numbers like 0.9,0.8,0.7; got {text!r}") from None
    if not budgets:
        raise BudgetError("no budgets given; pass e.g. --budgets 0.9,0.8,0.7")
    bad = [b for b in budgets if not 0.0 < b < 1.0]
    if bad:
        raise BudgetError(f"every budget must be strictly between 0 and 1; got {bad[0]}")
    if len(set(budgets)) != len(budgets):
        raise BudgetError(f"budgets repeat: {text}")
    return budgets


def _require_language_model(source: Any, model_path: str | Path, allow_pickle: bool) -> None:
    """Refuse an encoder from its checkpoint's header and config, before any calibration runs."""
    from lowrank_compress.checkpoint import Checkpoint
    from lowrank_compress.loading import require_language_model

    with Checkpoint.open(
        source.path if source.gguf_file else source.directory, allow_pickle=allow_pickle
    ) as ckpt:
        arch, model_type = ckpt.architecture, (ckpt.config or {}).get("model_type")
    config = SimpleNamespace(architectures=[arch] if arch else None, model_type=model_type)
    require_language_model(config, model_path, "sweep")


def _inputs(
    source: Any, settings: FactorizeSettings, data: str, answer_file: str | None, resume: str | Path | None
) -> list[Path]:
    """What the sweep's output may not touch: factorize's inputs, the evaluation text and answer set, the
    checkpoint resumed from."""
    from lowrank_compress.outdir import data_files, protected_inputs

    return [
        *protected_inputs(source, settings),
        *data_files(data, answer_file),
        *([Path(resume)] if resume else []),
    ]


def sweep(
    model_path: str | Path,
    budgets: Sequence[float],
    settings: FactorizeSettings,
    out_dir: str | Path,
    *,
    keep_models: bool = False,
    overwrite: bool = False,
    resume: str | Path | None = None,
    data: str = "builtin",
    window: int | None = None,
    stride: int = 256,
    max_tokens: int | None = 8192,
    speed: bool = True,
    allow_pickle: bool = False,
    answers: str | Path | Any | None = "builtin",
    progress: ProgressFn | None = None,
    warn: Callable[[str], None] | None = None,
) -> SweepResult:
    """Factorize and evaluate at each budget; write sweep.json, sweep.md and sweep.png (and the models, with
    `keep_models`, under models/) into `out_dir`, atomically. window: default 512, or the model's context when
    shorter. answers: the answer set asked of the dense model once and of each budget's model (None: skipped), so
    a budget is judged by the answers it keeps, not only by its perplexity. resume: a factorize checkpoint to take
    pass 1's results from (kept: it is factorize's)."""
    from lowrank_compress.answers import AnswerSet, load_answer_set
    from lowrank_compress.loading import resolve
    from lowrank_compress.outdir import atomic_output_dir, check_output_dir, scratch_dir
    from lowrank_compress.pipeline import Prepared
    from lowrank_compress.text import load_text

    report = progress or (lambda *a: None)
    answer_set = answers if isinstance(answers, AnswerSet) or answers is None else load_answer_set(answers)
    out_dir = Path(out_dir)
    source = resolve(model_path)
    inputs = _inputs(source, settings, data, answer_set.source if answer_set is not None else None, resume)
    check_output_dir(out_dir, overwrite, inputs=inputs, warn=warn)
    text = load_text(data, split="heldout" if data == "builtin" else "all")
    _require_language_model(source, model_path, allow_pickle)
    prepared = Prepared.load(
        model_path,
        settings,
        allow_pickle=allow_pickle,
        progress=report,
        warn=warn,
        budgets=budgets,
        resume=resume,
    )
    # the dense model, whole, for its perplexity and speed (factorize itself streams it block by block)
    dense = _dense_reference(
        model_path, allow_pickle, text, window, stride, max_tokens, answer_set, speed, settings.device, report
    )
    dense_speed = None
    points: list[SweepPoint] = []
    with (
        atomic_output_dir(out_dir, overwrite, inputs, warn=warn) as tmp,
        scratch_dir("sweep", warn) as scratch,
    ):
        for i, budget in enumerate(budgets):
            where = (tmp / "models" if keep_models else Path(scratch)) / f"budget-{budget:g}"
            output = str(out_dir / "models" / where.name) if keep_models else None
            point, dense_speed = _budget_point(dense, prepared, budget, where, output, (i, len(budgets)))
            points.append(point)
            if not keep_models and where.parent == Path(scratch):  # only the sweep's own scratch copy
                shutil.rmtree(where)
        result = SweepResult(
            model=str(model_path),
            settings=dataclasses.asdict(prepared.settings),
            dense=_dense_summary(prepared.total_before, dense.quality, dense_speed, dense.answers),
            points=points,
            resumed_from=str(resume) if resume else None,
        )
        _write_sweep_files(result, tmp, out_dir)
    return result


@dataclass
class _Dense:
    """What every budget's model is measured with and against, gathered once: the dense model is loaded and scored a
    single time for the whole sweep, and each budget's step takes this one argument instead of eight."""

    model: Any
    score: Callable[[Any, Any, str], Perplexity]  # (model, tokenizer, label): perplexity on the sweep's text
    quality: Perplexity
    answer_set: Any
    answers: Any  # `_ask`'s (outputs, right) of the dense model; None without an answer set
    seq_lens: list[int] | None  # speed sequence lengths; None: speed is not measured
    device: str
    report: ProgressFn


def _dense_reference(
    model_path: str | Path,
    allow_pickle: bool,
    text: str,
    window: int | None,
    stride: int,
    max_tokens: int | None,
    answer_set: Any,
    speed: bool,
    device: str,
    report: ProgressFn,
) -> _Dense:
    """Load the dense model whole and score it; its context fixes the window and speed lengths of every budget."""
    from lowrank_compress.evaluate import context_length, perplexity
    from lowrank_compress.loading import load_model, require_finite

    dense_model, tokenizer, _ = load_model(model_path, device=device, allow_pickle=allow_pickle)
    require_finite(dense_model, model_path)
    context = context_length(dense_model)
    window = window or (min(512, context) if context else 512)
    seq_lens = [n for n in (128, 512) if context is None or n <= context] or [context]

    def score(model: Any, tokenizer: Any, label: str) -> Perplexity:
        return perplexity(
            model, tokenizer, text, window=window, stride=stride, max_tokens=max_tokens, device=device,
            progress=lambda done, total: report(f"perplexity ({label})", done, total),
        )  # fmt: skip

    dense_q = score(dense_model, tokenizer, "dense")
    dense_answers = _ask(dense_model, tokenizer, answer_set, device, "dense", report)
    return _Dense(
        dense_model, score, dense_q, answer_set, dense_answers, seq_lens if speed else None, device, report
    )


def _budget_point(
    dense: _Dense, prepared: Prepared, budget: float, where: Path, output: str | None, step: tuple[int, int]
) -> tuple[SweepPoint, Speed | None]:
    """Write one budget's model to `where` and measure it against the dense model. Also returns the dense model's
    speed from this budget's interleaved timing (None without speed): the sweep reports the last one."""
    from lowrank_compress.evaluate import measure_speed, speed_ratios
    from lowrank_compress.loading import load_model

    written = prepared.write(where, budget)
    compressed, tok, _ = load_model(where, device=dense.device)
    q = dense.score(compressed, tok, f"budget {budget:g}")
    check = _judge(
        compressed, tok, dense.answer_set, dense.answers, dense.device, f"budget {budget:g}", dense.report
    )
    dense_speed = prefill_ratio = decode_ratio = reliable = None
    if dense.seq_lens is not None:
        dense.report("speed", *step)
        sp = measure_speed(
            {"dense": dense.model, "compressed": compressed},
            seq_lens=dense.seq_lens,
            device=dense.device,
        )
        dense_speed = sp["dense"]
        ratios = speed_ratios(sp["compressed"], sp["dense"])
        prefill_ratio, decode_ratio = ratios["prefill_tokens_per_s"], ratios["decode_tokens_per_s"]
        reliable = _speed_reliable(sp, dense.device)
    point = SweepPoint(
        budget=budget,
        kept_fraction_targets=written.kept_fraction_targets,
        kept_fraction_model=written.kept_fraction_model,
        params=written.total_params_after,
        perplexity=q.perplexity,
        bits_per_char=q.bits_per_char,
        prefill_ratio=prefill_ratio,
        decode_ratio=decode_ratio,
        output=output,
        answers_right=check.count("model") if check else None,
        answers_kept=check.kept() if check else None,
        answers_kept_fraction=check.kept_fraction() if check else None,
        speed_reliable=reliable,
    )
    return point, dense_speed


def _write_sweep_files(result: SweepResult, tmp: Path, out_dir: Path) -> None:
    """Name the sweep's files in `result` as they will be in `out_dir`, then write them into `tmp`, the staging
    directory that becomes `out_dir` only once the whole sweep has succeeded."""
    from lowrank_compress.report import write_json

    names = ["sweep.json", "sweep.md", "sweep.png"]
    result.files = [str(out_dir / n) for n in names] + [p.output for p in result.points if p.output]
    write_json(tmp / "sweep.json", result.to_dict())
    (tmp / "sweep.md").write_text(sweep_markdown(result))
    (tmp / "sweep.png").write_bytes(sweep_plot(result))


def _dense_summary(params: int, quality: Any, speed: Any, answers: Any) -> dict[str, Any]:
    """sweep.json's `dense`: the dense model's size, perplexity, speed and answers right, the points' reference."""
    return {
        "params": params,
        "perplexity": quality.perplexity,
        "bits_per_char": quality.bits_per_char,
        "tokens_scored": quality.n_tokens,
        "prefill_tokens_per_s": {str(k): v for k, v in speed.prefill_tokens_per_s.items()} if speed else None,
        "decode_tokens_per_s": speed.decode_tokens_per_s if speed else None,
        "answers_right": sum(answers[1]) if answers else None,
        "answers_items": len(answers[1]) if answers else None,
    }


def _speed_reliable(speeds: dict[str, Any], device: str) -> bool:
    """Whether one budget's speed ratios can be taken as measured (see `evaluate.speed_verdict`)."""
    from lowrank_compress.evaluate import judge_speeds

    return bool(judge_speeds(speeds, "compressed", "dense", device)["reliable"])


def _ask(model: Any, tokenizer: Any, answer_set: Any, device: str, label: str, report: ProgressFn) -> Any:
    """The dense model's outputs and verdicts on the set (None when there is no set)."""
    if answer_set is None:
        return None
    from lowrank_compress.answers import check_answers

    check = check_answers({label: (model, tokenizer)}, answer_set, device=device, progress=report)
    return check.outputs[label], check.right[label]


def _judge(
    model: Any, tokenizer: Any, answer_set: Any, dense: Any, device: str, label: str, report: ProgressFn
) -> Any:
    """One budget's answers judged against the dense model's (asked once, before the budgets)."""
    if answer_set is None:
        return None
    from lowrank_compress.answers import AnswerCheck, check_answers

    mine = check_answers({"model": (model, tokenizer)}, answer_set, device=device, progress=report)
    outputs = {"model": mine.outputs["model"], "baseline": dense[0]}
    return AnswerCheck(answer_set.source, answer_set.sha256, answer_set.items, outputs, mine.chat_template,
                       mine.max_new_tokens)  # fmt: skip


def sweep_markdown(result: SweepResult) -> str:
    d = result.dense
    answers = d.get("answers_right")
    dense_answers = f", answers right {answers} of {d['answers_items']}" if answers is not None else ""
    lines = [
        f"# Budget sweep of {result.model}",
        "",
        f"{result.settings['method']} / {result.settings['policy']}; dense: {d['params']:,} params, "
        f"perplexity {d['perplexity']:.3f}{dense_answers}",
        "",
        "| budget | kept of targets | kept of model | params | perplexity | ppl / dense | bits/char | "
        "answers kept | prefill ratio | decode ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in result.points:
        prefill = ", ".join(f"{k}: {v:.2f}x" for k, v in (p.prefill_ratio or {}).items()) or "-"
        decode = f"{p.decode_ratio:.2f}x" if p.decode_ratio else "-"
        if p.speed_reliable is False:
            prefill, decode = f"{prefill} (unreliable)", f"{decode} (unreliable)"
        kept = "-"
        if p.answers_kept is not None:
            share = f" ({p.answers_kept_fraction:.0%})" if p.answers_kept_fraction is not None else ""
            kept = f"{p.answers_kept} of {answers}{share}"
        lines.append(
            f"| {p.budget:g} | {p.kept_fraction_targets:.4f} | {p.kept_fraction_model:.4f} | {p.params:,} | "
            f"{p.perplexity:.3f} | {p.perplexity / d['perplexity']:.3f} | {p.bits_per_char:.4f} | {kept} | "
            f"{prefill} | {decode} |"
        )
    return "\n".join(lines) + "\n"


def sweep_plot(result: SweepResult) -> bytes:
    """Perplexity and speed ratios against the fraction of the model's parameters kept (PNG bytes)."""
    from lowrank_compress.report import legend_beside, png_bytes, pyplot

    pts = sorted(result.points, key=lambda p: p.kept_fraction_model)
    xs = [p.kept_fraction_model for p in pts]
    fig, (ax1, ax2) = pyplot().subplots(1, 2, figsize=(11, 4))
    ax1.plot(xs + [1.0], [p.perplexity for p in pts] + [result.dense["perplexity"]], marker="o")
    ax1.set_xlabel("params kept (fraction of the model; 1 = dense)")
    ax1.set_ylabel("perplexity")
    ax1.set_title("Quality")
    if any(p.answers_kept_fraction is not None for p in pts):
        kept = ax1.twinx()  # answers kept on their own axis: 1 at the dense model by definition
        fractions = [
            p.answers_kept_fraction if p.answers_kept_fraction is not None else float("nan") for p in pts
        ]
        kept.plot(xs + [1.0], fractions + [1.0], marker="s", color="tab:red", ls="--")
        kept.set_ylim(0, 1.05)
        kept.set_ylabel("answers kept (of the dense model's right ones)", color="tab:red")
    if any(p.prefill_ratio for p in pts):
        for n in pts[0].prefill_ratio or {}:
            ax2.plot(
                xs,
                [(p.prefill_ratio or {}).get(n, float("nan")) for p in pts],
                marker="o",
                label=f"prefill@{n}",
            )
        if any(p.decode_ratio for p in pts):
            ax2.plot(xs, [p.decode_ratio or float("nan") for p in pts], marker="s", label="decode")
        ax2.axhline(1.0, color="grey", ls=":")
        legend_beside(ax2)
    ax2.set_xlabel("params kept (fraction of the model)")
    ax2.set_ylabel("throughput / dense")
    ax2.set_title("Speed")
    return png_bytes(fig)
