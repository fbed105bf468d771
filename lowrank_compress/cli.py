"""The `lowrank-compress` command line: parses, calls the library, renders. No math here.

Start-up is kept light: this module imports click and the torch-free settings only, and each command imports the
library it needs inside its function, after checking its arguments, so that `--help`, usage errors and refusals
answer without importing torch or transformers. The entry point is `console.main`, which handles Ctrl-C and
SIGTERM before this module is imported.
"""

from __future__ import annotations

# `python -m lowrank_compress.cli` runs the console script's main: the signal handlers first, then this module is
# imported again, as lowrank_compress.cli, and runs.
if __name__ == "__main__":
    from lowrank_compress.console import main

    raise SystemExit(main())

import json
import math
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from lowrank_compress.choices import (
    ADAPTER_INFO,
    ADAPTERS,
    DEVICES,
    GRAD_SOURCES,
    INITS,
    MERGE_RANKS,
    METHODS,
    OPTIMIZERS,
    POLICIES,
    RANK_SCHEDULES,
    SELF_STARTS,
    check_device,
)
from lowrank_compress.console import command_running, interrupt_code, interrupt_message, signal_received
from lowrank_compress.console import main as main  # the console script of earlier installs names cli:main
from lowrank_compress.errors import InterruptedWithCheckpoint, LowrankError
from lowrank_compress.recipe import REFINE_STEPS, FactorizeSettings, FinetuneSettings

_DEFAULTS = FactorizeSettings()
_FT = FinetuneSettings()


class Output:
    """One object that knows human vs JSON mode: results to stdout, progress and warnings to stderr."""

    def __init__(self, json_mode: bool) -> None:
        from rich.console import Console

        self.json_mode = json_mode
        # Console text is not markup: tensor names contain "[" and "]".
        self.out = Console(markup=False, highlight=False, soft_wrap=False)
        if not self.out.is_terminal:  # piped or redirected: do not squeeze tensor names into 80 columns
            self.out = Console(markup=False, highlight=False, soft_wrap=False, width=160)
        self.err = Console(stderr=True, markup=False, highlight=False)

    def warn(self, message: str) -> None:
        self.err.print(f"warning: {message}", style="yellow", soft_wrap=True)  # one line, whatever the width

    def info(self, message: str) -> None:
        if not self.json_mode:
            self.err.print(message, style="dim")

    def emit_json(self, data: Any) -> None:
        sys.stdout.write(json.dumps(data, indent=2, allow_nan=False) + "\n")

    @contextmanager
    def progress(self, description: str, total: int | None = None) -> Iterator[Any]:
        """A transient progress bar on stderr when it is a terminal; otherwise one line per finished phase with its
        time (a log then shows how far a long command got). Yields update(done, total, label, phase=None); the
        phase defaults to the label, and a new phase ends the previous one."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        terminal = self.err.is_terminal
        bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[label]}", markup=False),
            console=self.err,
            transient=True,
            disable=not terminal,
        )
        phases = PhaseLines(description, self._phase_line)
        with bar:
            task = bar.add_task(description, total=total, label="")

            def update(
                done: int, total_: int | None = None, label: str = "", phase: str | None = None
            ) -> None:
                bar.update(task, completed=done, total=total_ if total_ is not None else total, label=label)
                if not terminal:
                    phases.update(
                        phase if phase is not None else label, done, total_ if total_ is not None else total
                    )

            yield update
            phases.close()

    def _phase_line(self, line: str) -> None:
        self.err.print(line, soft_wrap=True)


# What a phase line looks like, for tools that read stderr (a log filter, the bad-inputs benchmark, tests).
PHASE_LINE = r"^(analyze|factorize|evaluate|sweep|finetune)(: .*?)?( \(\d+/\d+\))? \d+\.\d s$"


class PhaseLines:
    """One line per phase, printed when the phase ends: `command: phase (done/total) 12.3 s`. The time runs from the
    previous line (or the start), not from the phase's first progress report, which may come only at its end."""

    def __init__(self, command: str, emit: Callable[[str], None]) -> None:
        import time

        self.command, self.emit = command, emit
        self.phase: str | None = None
        self.start = time.perf_counter()
        self.done: int = 0
        self.total: int | None = None

    def update(self, phase: str, done: int, total: int | None) -> None:
        if phase != self.phase:
            self.close()
            self.phase = phase
        self.done, self.total = done, total

    def close(self) -> None:
        """End the current phase (if any) with its line."""
        import time

        if self.phase is None:
            return
        now = time.perf_counter()
        count = f" ({self.done}/{self.total})" if self.total and self.done else ""  # not "(0/1)"
        name = f": {self.phase}" if self.phase else ""
        self.emit(f"{self.command}{name}{count} {now - self.start:.1f} s")
        self.phase, self.start = None, now


class Group(click.Group):
    """A click group with the project's single exit path for errors: one line, exit 1, no traceback; Ctrl-C and
    SIGTERM (console.py) one line, exit 130 and 143."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with command_running():
                return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except InterruptedWithCheckpoint as e:
            _exit_interrupted(str(e))
        except KeyboardInterrupt:
            _exit_interrupted(interrupt_message())
        except Exception as e:
            if signal_received():  # the signal's doing, whatever it became (console.signal_received)
                _exit_interrupted(interrupt_message())
            if isinstance(e, LowrankError):
                _fail(str(e))
            # an unexpected failure is a bug: still one line unless debugging
            if os.environ.get("LOWRANK_DEBUG"):
                raise
            _fail(f"unexpected {type(e).__name__}: {e} (this is a bug; LOWRANK_DEBUG=1 shows the traceback)")


# SIGTERM (kill, a scheduler's time limit, torchrun stopping its workers) cleans up exactly like Ctrl-C: the handler
# raises KeyboardInterrupt, so temporary directories are removed and finetune leaves a checkpoint; the exit code is
# 143 (128 + SIGTERM) instead of Ctrl-C's 130 (console.py).
def _exit_interrupted(message: str) -> None:
    click.echo(message, err=True)
    sys.exit(interrupt_code())


def _fail(message: str) -> None:
    if os.environ.get("LOWRANK_DEBUG"):
        import traceback

        traceback.print_exc()
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}

target_option = click.option(
    "--target",
    "targets",
    multiple=True,
    metavar="PATTERN",
    help="Only modules matching PATTERN (glob, or regex with a 're:' prefix). Repeatable.",
)
ignore_option = click.option(
    "--ignore", "ignores", multiple=True, metavar="PATTERN", help="Skip modules matching PATTERN. Repeatable."
)
json_option = click.option(
    "--json", "json_mode", is_flag=True, help="Print one JSON document on stdout, nothing else."
)
threads_option = click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="CPU threads for torch.  [default: torch's, lowered with a warning when the machine is busy]",
)
pickle_option = click.option(
    "--allow-pickle", is_flag=True, help="Allow pickled .bin/.pt weights (loaded with weights_only=True)."
)


def _print_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    """--version, reading the installed version only when asked (importlib.metadata takes a while)."""
    if not value or ctx.resilient_parsing:
        return
    from lowrank_compress import __version__

    click.echo(f"lowrank-compress, version {__version__}")
    ctx.exit()


@click.group(cls=Group, context_settings=CONTEXT)
@click.option(
    "-V", "--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
    help="Show the version and exit.",
)  # fmt: skip
def cli() -> None:
    """Post-training low-rank compression of transformer checkpoints.

    \b
    analyze    which layers are compressible, and by how much
    factorize  SVD-factorize Linear layers to a parameter budget
    evaluate   perplexity, bits per character and speed, against a baseline
    report     report.md and a self-contained report.html for factorize outputs
    sweep      factorize and evaluate at several budgets: the curve to choose one
    finetune   LoRA / DoRA (optionally on a frozen NF4 base) or the factors themselves, to win quality back
    """


def _finite(number: float, value: Any, kind: click.ParamType, param: click.Parameter | None,
            ctx: click.Context | None) -> float:  # fmt: skip
    if not math.isfinite(number):
        kind.fail(f"{value!r} is not a finite number", param, ctx)
    return number


class FiniteFloat(click.FloatRange):
    """A float option in a range that refuses nan and inf (which every range check lets through)."""

    name = "number"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        return _finite(super().convert(value, param, ctx), value, self, param, ctx)


class AnyFinite(click.ParamType):
    """A float option that refuses nan and inf; a plain type, not an unbounded FloatRange, whose help would read
    "x<=None"."""

    name = "number"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        return _finite(click.FLOAT.convert(value, param, ctx), value, self, param, ctx)


FINITE = AnyFinite()


def _threads(threads: int | None, out: Output) -> None:
    """Apply --threads (imports torch: call it once the arguments are checked)."""
    from lowrank_compress.threads import choose_threads

    choose_threads(threads, out.warn)


def _model_or_default(model: str | None) -> str:
    if model is not None and not model.strip():
        raise click.BadParameter(
            "an empty path (an unset variable?); pass a model, or leave MODEL out for the built-in one",
            param_hint="MODEL",
        )
    if model:
        return model
    from lowrank_compress.demo import default_model_path

    return str(default_model_path())


@cli.command(context_settings=CONTEXT)
@click.argument("model", required=False)
@click.option(
    "--fast/--exact",
    default=None,
    help="Norms and stable rank without a full SVD (default: fast above 1B params).",
)
@target_option
@ignore_option
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    help="Write report.json, report.md and PNG plots here.",
)
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out directory.")
@click.option(
    "--top", default=0, show_default="all", help="Show only the N most compressible layers in the table."
)
@threads_option
@pickle_option
@json_option
def analyze(
    model: str | None,
    fast: bool | None,
    targets: tuple[str, ...],
    ignores: tuple[str, ...],
    out_dir: Path | None,
    overwrite: bool,
    top: int,
    threads: int | None,
    allow_pickle: bool,
    json_mode: bool,
) -> None:
    """Measure each Linear layer's spectrum, stable rank and energy ranks.

    MODEL is a model directory, a .safetensors or .gguf file (default: the built-in SmolLM2-135M-Instruct).
    """
    out = Output(json_mode)
    path = _model_or_default(model)
    if out_dir is not None:
        from lowrank_compress.outdir import check_output_dir

        check_output_dir(out_dir, overwrite, inputs=[Path(path)], warn=out.warn, option="--out")
    _threads(threads, out)
    from lowrank_compress.analyze import analyze as run_analyze

    with out.progress("analyze") as update:
        result = run_analyze(
            path,
            fast=fast,
            target=targets or None,
            ignore=ignores or None,
            allow_pickle=allow_pickle,
            progress=lambda done, total, name: update(done, total, name, "layers"),
        )
    files: list[Path] = []
    if out_dir is not None:
        from lowrank_compress.outdir import atomic_output_dir
        from lowrank_compress.report import write_analysis_report

        with atomic_output_dir(out_dir, overwrite, [Path(path)], warn=out.warn, option="--out") as tmp:
            names = [p.name for p in write_analysis_report(result, tmp)]
        files = [out_dir / n for n in names]
    for name in result.summary()["non_finite_layers"]:
        out.warn(f"{name} has NaN or Inf weights; it was not analyzed")
    if json_mode:
        data = result.to_dict()
        data["files"] = [str(f) for f in files]
        out.emit_json(data)
        return
    _render_analysis(out, result, top)
    for f in files:
        out.out.print(f"wrote {f}")


def _render_analysis(out: Output, result: Any, top: int) -> None:
    from rich.table import Table

    exact = result.mode == "exact"
    table = Table(title=f"{result.model} ({result.mode} mode)", title_justify="left")
    for col in ("layer", "shape", "stable rank", "SR / break-even"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    if exact:
        for col in ("eff. rank", "r90", "r95", "r99"):
            table.add_column(col, justify="right")
    table.add_column("break-even", justify="right")
    rows = result.sorted_layers()
    for layer in rows[:top] if top > 0 else rows:
        if not layer.finite:
            cells = [layer.module, f"{layer.out_features}x{layer.in_features}", "NaN/Inf", "-"]
            cells += ["-"] * 4 if exact else []
        else:
            cells = [
                layer.module,
                f"{layer.out_features}x{layer.in_features}",
                f"{layer.stable_rank:.1f}",
                f"{layer.compressibility:.3f}",
            ]
            if exact:
                er = layer.energy_ranks
                cells += [f"{layer.effective_rank:.0f}", str(er[0.9]), str(er[0.95]), str(er[0.99])]
        cells.append(f"{layer.break_even_rank:.0f}")
        table.add_row(*cells)
    out.out.print(table)
    s = result.summary()
    out.out.print(
        f"total params {s['total_params']:,}; targetable {s['targetable_params']:,} "
        f"({s['targetable_fraction']:.1%}) in {s['layers']} layers; {len(result.skipped)} tensors not targeted"
    )
    if s["kept_at_energy"]:
        for e, k in s["kept_at_energy"].items():
            out.out.print(
                f"  keep {float(e):.0%} energy: {k['target_params']:,} target params "
                f"({k['target_fraction']:.1%} of targets, {k['model_fraction']:.1%} of the model)"
            )
    out.out.print(f"analyzed in {result.seconds:.1f} s")


def _explicit(ctx: click.Context, name: str, value: Any) -> Any:
    """A flag's value only when the user typed it, so that a recipe's value is not overridden by a default."""
    from click.core import ParameterSource

    return value if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE else None


def settings_options(f: Any) -> Any:
    """The factorize settings (everything a recipe holds but the budget), shared by factorize and sweep."""
    options = [
        click.option("--method", type=click.Choice(METHODS), default=_DEFAULTS.method, show_default=True,
                     help="SVD variant."),
        click.option("--policy", type=click.Choice(POLICIES), default=_DEFAULTS.policy, show_default=True,
                     help="Rank allocation."),
        click.option("--energy", type=FINITE, default=None,
                     help="energy policy: the kept energy (default: met to the budget)."),
        click.option("--calibration", default=_DEFAULTS.calibration, show_default=True, metavar="FILE|builtin|self",
                     help="Calibration text (.txt, .jsonl with a 'text' field), builtin, or self (sampled from the model)."),
        click.option("--samples", type=int, default=_DEFAULTS.samples, show_default=True,
                     help="Calibration sequences."),
        click.option("--seq-len", type=int, default=_DEFAULTS.seq_len, show_default=True,
                     help="Tokens per calibration sequence."),
        click.option("--grad-samples", type=int, default=_DEFAULTS.grad_samples, show_default=True,
                     help="Calibration sequences used for loss gradients (sensitivity policy, fisher method)."),
        click.option("--seed", type=int, default=_DEFAULTS.seed, show_default=True,
                     help="Seed for calibration windows."),
        click.option("--damping", type=FINITE, default=_DEFAULTS.damping, show_default=True,
                     help="whiten: add this fraction of the Gram's mean diagonal (hedges against narrow calibration)."),
        click.option("--self-mix", type=FiniteFloat(0.0, 1.0), default=_DEFAULTS.self_mix, show_default=True,
                     help="Share of the statistics from --samples windows sampled from the model, beside the text's "
                          "(0: text only, nothing sampled)."),
        click.option("--self-seq-len", type=int, default=None, show_default="--seq-len",
                     help="Tokens per self-generated window."),
        click.option("--self-temperature", type=FiniteFloat(0.0, 10.0, min_open=True),
                     default=_DEFAULTS.self_temperature, show_default=True,
                     help="Sampling temperature of the self-generated windows (1: the model's full distribution)."),
        click.option("--self-start", type=click.Choice(SELF_STARTS), default=_DEFAULTS.self_start,
                     show_default=True, help="Self-generated windows open on a random ordinary token, or the bare BOS."),
        click.option("--chat/--no-chat", default=_DEFAULTS.chat, show_default="when the tokenizer has a chat template",
                     help="Chat models: the self-generated share is conversations (built-in user prompts, the "
                          "model's answers) through the chat template (--chat without a template: ignored, with a "
                          "note)."),
        click.option("--chat-text/--no-chat-text", default=_DEFAULTS.chat_text, show_default=True,
                     help="Chat calibration: wrap the text windows as turns too (off: they stay plain text)."),
        click.option("--chat-share", type=FiniteFloat(0.0, 1.0), default=_DEFAULTS.chat_share, show_default=True,
                     help="Chat calibration: the share of the self-generated windows that are conversations (the "
                          "rest: free text, as for a base model)."),
        click.option("--self-answer-tokens", type=int, default=None, show_default="one answer fills the window",
                     help="Chat calibration: each sampled answer ends at its end of turn or after this many tokens, "
                          "and the window goes on with the next prompt and answer until full."),
        click.option("--grad-source", type=click.Choice(GRAD_SOURCES), default=_DEFAULTS.grad_source,
                     show_default=True, help="Windows for loss gradients: the whole mix, the self-generated ones, or "
                                            "(chat models) the model's greedy answers to the built-in prompts, "
                                            "the loss on the answers alone."),
        click.option("--rank-multiple", type=int, default=_DEFAULTS.rank_multiple, show_default=True,
                     help="Round ranks to a multiple of this."),
        click.option("--error-aware/--no-error-aware", default=_DEFAULTS.error_aware, show_default=True,
                     help="whiten/asvd: fit each layer to the dense model's outputs from the inputs it sees behind "
                          "the already compressed blocks (off: fit to the dense inputs, as SVD-LLM)."),
        click.option("--loss-weighted/--no-loss-weighted", default=_DEFAULTS.loss_weighted,
                     show_default="whiten on language models",
                     help="whiten: weight each output channel's error, and the ranks, by the loss's mean squared "
                          "gradient there (off: every channel alike, as SVD-LLM)."),
        click.option("--refine-steps", type=int, default=_DEFAULTS.refine_steps,
                     show_default=f"{REFINE_STEPS} with --method whiten, else 0",
                     help="Adam steps per block refining its factors against the dense block's outputs, one "
                          "calibration window a step (0: the closed-form fit alone)."),
        click.option("--refine-from", type=FiniteFloat(0.0, 1.0, max_open=True), default=_DEFAULTS.refine_from,
                     show_default=True,
                     help="Refine only the blocks from this share of the depth on (0: every block, 0.5: the "
                          "later half)."),
        click.option("--offload/--no-offload", default=_DEFAULTS.offload, show_default=True,
                     help="Keep calibration hidden states in CPU memory while blocks run on --device."),
        target_option,
        ignore_option,
        click.option("--recipe", type=click.Path(path_type=Path),
                     help="YAML settings; flags given on the command line win."),
        click.option("--device", default=_DEFAULTS.device, show_default=True, help=f"{DEVICES}."),
    ]  # fmt: skip
    for option in reversed(options):
        f = option(f)
    return f


def answers_option(what: str) -> Any:
    return click.option("--answers", "answers", default="builtin", show_default=True, metavar="FILE|builtin|none",
                        help=f"Short prompts with checkable answers (.jsonl of prompt / answers), asked greedily; "
                             f"{what}")  # fmt: skip


def eval_options(f: Any) -> Any:
    """What text to score and how, shared by evaluate and sweep."""
    options = [
        click.option("--data", default="builtin", show_default=True, metavar="FILE|builtin",
                     help="Text to score (.txt or .jsonl); builtin = the held-out half of the built-in text."),
        click.option("--max-tokens", type=click.IntRange(min=0), default=8192, show_default=True,
                     help="Score at most this many tokens (0: all)."),
        click.option("--window", type=int, default=None,
                     help="Tokens per model input.  [default: 512, or the model's context if shorter]"),
        click.option("--stride", type=int, default=256, show_default=True, help="Tokens each window advances."),
        click.option("--speed/--no-speed", default=True, show_default=True,
                     help="Measure prefill and decode throughput."),
        answers_option("counts the answers kept."),
    ]  # fmt: skip
    for option in reversed(options):
        f = option(f)
    return f


def _settings(ctx: click.Context, flags: dict[str, Any], **extra: Any) -> FactorizeSettings:
    """Defaults, then --recipe, then the flags the user typed."""
    from lowrank_compress.recipe import build_settings

    names = {"targets": "target", "ignores": "ignore"}
    given = {names.get(k, k): _explicit(ctx, k, v) for k, v in flags.items() if k != "recipe"}
    for key in ("target", "ignore"):
        if given[key] is not None:
            given[key] = list(given[key])
    return build_settings(flags.get("recipe"), **given, **extra)  # checks --device too


def _phase_of(label: str) -> str:
    """The phase a progress label belongs to, without its block counter: "pass 1, block 3/30 (peak 812 MB)" and
    "pass 1, block 4/30 ..." are one phase, "pass 1" (so a log gets one line for it, not one per block)."""
    import re

    return re.split(r",? block\b", label, maxsplit=1)[0]


_PHASES = {
    "sampling calibration": "sampling calibration windows from the model",
    "spectra": "layer spectra",
}


@cli.command(context_settings=CONTEXT)
@click.argument("model", required=False)
@click.option(
    "-o", "--output", "output", required=True, type=click.Path(path_type=Path), help="Output directory."
)
@click.option(
    "--budget", type=FINITE, default=_DEFAULTS.budget, show_default=True,
    help="Fraction of targeted Linear params kept, 0 < b < 1.",
)  # fmt: skip
@settings_options
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output directory.")
@click.option(
    "--max-shard-size", default="2GB", show_default=True, help="Largest safetensors shard (e.g. 500MB)."
)
@click.option(
    "--evaluate", "run_evaluate", is_flag=True,
    help="Also measure perplexity and speed against MODEL (as `evaluate OUT --baseline MODEL`) into the report.",
)  # fmt: skip
@click.option(
    "--checkpoint-dir", type=click.Path(path_type=Path), default=None,
    help="Where pass 1's progress and results are saved as it goes, and pass 2's blocks as they are done.  "
    "[default: OUTPUT.checkpoint]",
)  # fmt: skip
@click.option(
    "--resume", type=click.Path(path_type=Path), default=None, metavar="DIR",
    help="Go on from a checkpoint: pass 1 where it stopped (after the sampling, the gradients or a block) or its "
    "results, and pass 2 from the block it stopped in (the same command with --resume added; the budget may differ, "
    "then pass 2 starts over).",
)  # fmt: skip
@click.option(
    "--keep-checkpoint",
    is_flag=True,
    help="Keep pass 1's checkpoint when done, to factorize at other budgets.",
)
@threads_option
@pickle_option
@json_option
@click.pass_context
def factorize(ctx: click.Context, model: str | None, output: Path, overwrite: bool, max_shard_size: str,
              run_evaluate: bool, checkpoint_dir: Path | None, resume: Path | None, keep_checkpoint: bool,
              threads: int | None, allow_pickle: bool, json_mode: bool, **flags: Any) -> None:  # fmt: skip
    """SVD-factorize Linear layers to keep a fraction of their parameters; write a loadable lowrank model.

    MODEL is a model directory or a .gguf file (default: the built-in SmolLM2-135M-Instruct). Pass 1's results are
    saved when it ends, and pass 2's blocks as they are done (OUTPUT.checkpoint): an interrupted run resumes from
    there with --resume.
    """
    out = Output(json_mode)
    settings = _settings(ctx, flags)
    shard_size = _shard_size(max_shard_size)
    path = _model_or_default(model)
    _threads(threads, out)
    from lowrank_compress.pipeline import factorize_model

    with out.progress("factorize") as update:
        result = factorize_model(
            path,
            output,
            settings,
            overwrite=overwrite,
            allow_pickle=allow_pickle,
            progress=lambda phase, done, total: update(
                done, total, _PHASES.get(phase, phase), _phase_of(phase)
            ),
            warn=out.warn,
            max_shard_size=shard_size,
            evaluate=run_evaluate,
            checkpoint_dir=checkpoint_dir,
            resume=resume,
            keep_checkpoint=keep_checkpoint,
        )
    settings = result.settings
    data = result.to_dict()
    if json_mode:
        out.emit_json(data)
        return
    s = data["summary"]
    out.out.print(
        f"factorized {s['layers_factorized']} layers ({s['layers_dense']} kept dense) with {settings.method} / "
        f"{settings.policy} at budget {settings.budget}"
    )
    out.out.print(
        f"kept {s['kept_fraction_targets']:.4f} of target params ({s['target_params_after']:,} of "
        f"{s['target_params_before']:,}); {s['kept_fraction_model']:.4f} of the model "
        f"({s['total_params_after']:,} of {s['total_params_before']:,})"
    )
    if data["evaluation"]:
        _render_evaluation(out, data["evaluation"])
    timing = ", ".join(f"{k} {v:.1f}s" for k, v in data["timings_s"].items())
    out.out.print(f"time: {timing}")
    out.out.print(
        f"wrote {output} (load it: import lowrank_compress; AutoModelForCausalLM.from_pretrained(...))"
    )


@cli.command(context_settings=CONTEXT)
@click.argument("model", required=False)
@click.option(
    "--baseline", metavar="MODEL", help="A second model measured in the same run (ratios: MODEL / baseline)."
)
@eval_options
@click.option("--device", default="cpu", show_default=True, help=f"{DEVICES}.")
@threads_option
@pickle_option
@json_option
def evaluate(model: str | None, baseline: str | None, data: str, max_tokens: int, window: int, stride: int,
             speed: bool, answers: str, device: str, threads: int | None, allow_pickle: bool,
             json_mode: bool) -> None:  # fmt: skip
    """Strided perplexity, bits per character, answers kept, and prefill/decode speed of MODEL (default: the
    built-in SmolLM2).

    MODEL may be a dense checkpoint or a factorize output. With --baseline both are measured in the same run.
    """
    check_device(device)
    from lowrank_compress.answers import optional_answer_set

    answer_set = optional_answer_set(answers)
    out = Output(json_mode)
    _threads(threads, out)
    from lowrank_compress.evaluate import evaluate_models

    with out.progress("evaluate") as update:
        result = evaluate_models(
            _model_or_default(model),
            baseline,
            data=data,
            window=window,
            stride=stride,
            max_tokens=max_tokens or None,
            speed=speed,
            device=device,
            allow_pickle=allow_pickle,
            answers=answer_set,
            progress=lambda phase, done, total: update(done, total, phase),
        )
    data_out = result.to_dict()
    if json_mode:
        out.emit_json(data_out)
        return
    _render_evaluation(out, data_out)


def _render_evaluation(out: Output, data: dict[str, Any]) -> None:
    from rich.table import Table

    from lowrank_compress.report import speed_cells, speed_note

    table = Table(title=f"{data['data']} ({data['split']}), sha256 {data['text_sha256'][:12]}")
    models = data["models"]
    seq_lens = list((models[0]["prefill_tokens_per_s"] or {}).keys())
    for col in [
        "",
        "params",
        "perplexity",
        "bits/char",
        *[f"prefill@{n} tok/s" for n in seq_lens],
        "decode tok/s",
    ]:
        table.add_column(col, justify="left" if not col else "right")
    for m in models:
        table.add_row(m["role"], f"{m['params']:,}", f"{m['perplexity']:.3f}", f"{m['bits_per_char']:.4f}",
                      *speed_cells(m, seq_lens))  # fmt: skip
    ratios = data["ratios"]
    if ratios:
        table.add_row("model / baseline", f"{ratios['params']:.3f}", f"{ratios['perplexity']:.3f}",
                      f"{ratios['bits_per_char']:.3f}", *speed_cells(ratios, seq_lens, ratio=True))  # fmt: skip
    out.out.print(table)
    m = models[0]
    out.out.print(
        f"{m['tokens_scored']:,} tokens scored (window {m['window']}, stride {m['stride']}) in {data['seconds']:.1f} s"
    )
    if data.get("speed"):
        check = data["speed"]
        load = "unknown" if check["load_average"] is None else f"{check['load_average']:.2f}"
        out.out.print(
            f"speeds: median of repeats, ± half their range; {check['threads']} threads, load average {load} on "
            f"{check['cores']} cores"
        )
        note = speed_note(data)
        if note:
            out.warn(note)
    if data.get("answers"):
        _render_answers(out, data["answers"])


def _render_answers(out: Output, answers: dict[str, Any]) -> None:
    """The answer check: right per model, answers kept, and the side-by-side samples."""
    from rich.table import Table

    from lowrank_compress.answers import answers_summary

    out.out.print(answers_summary(answers))
    roles = list(answers["right"])
    table = Table(title="sample answers", title_justify="left", show_lines=True)
    for col in ("prompt", *roles):
        table.add_column(col, overflow="fold", max_width=50)
    for i in answers["samples"]:
        r = answers["results"][i]
        table.add_row(r["prompt"], *[("ok  " if r["right"][x] else "--  ") + r["outputs"][x] for x in roles])
    out.out.print(table)


@cli.command(context_settings=CONTEXT)
@click.argument("model", required=False)
@click.option(
    "--budgets",
    default="0.9,0.8,0.7,0.6",
    show_default=True,
    help="Comma-separated fractions of target params.",
)
@click.option(
    "-o", "--output", "output", required=True, type=click.Path(path_type=Path),
    help="Directory for sweep.json, sweep.md, sweep.png (and models/ with --keep-models).",
)  # fmt: skip
@click.option("--keep-models", is_flag=True, help="Keep each factorized model under OUTPUT/models/.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output directory.")
@click.option(
    "--resume", type=click.Path(path_type=Path), default=None, metavar="DIR",
    help="Take pass 1's results from a factorize checkpoint (factorize --keep-checkpoint) with the same settings "
    "(an unfinished pass 1 there goes on, recording nothing).",
)  # fmt: skip
@settings_options
@eval_options
@threads_option
@pickle_option
@json_option
@click.pass_context
def sweep(ctx: click.Context, model: str | None, budgets: str, output: Path, keep_models: bool, overwrite: bool,
          resume: Path | None, data: str, max_tokens: int, window: int, stride: int, speed: bool, answers: str,
          threads: int | None, allow_pickle: bool, json_mode: bool, **flags: Any) -> None:  # fmt: skip
    """Factorize MODEL at several budgets and evaluate each against the dense model: choose a budget.

    Calibration runs once; each budget is then allocated, written, scored and timed (interleaved with the dense
    model). Prints a table and writes sweep.json, sweep.md and sweep.png.
    """
    from lowrank_compress.sweep import parse_budgets, sweep_markdown
    from lowrank_compress.sweep import sweep as run_sweep

    out = Output(json_mode)
    values = parse_budgets(budgets)
    settings = _settings(ctx, flags, budget=values[0])
    from lowrank_compress.answers import optional_answer_set

    answer_set = optional_answer_set(answers)
    _threads(threads, out)
    with out.progress("sweep") as update:
        result = run_sweep(
            _model_or_default(model),
            values,
            settings,
            output,
            keep_models=keep_models,
            overwrite=overwrite,
            resume=resume,
            data=data,
            window=window,
            stride=stride,
            max_tokens=max_tokens or None,
            speed=speed,
            allow_pickle=allow_pickle,
            answers=answer_set,
            progress=lambda phase, done, total: update(
                done, total, _PHASES.get(phase, phase), _phase_of(phase)
            ),
            warn=out.warn,
        )
    if json_mode:
        out.emit_json(result.to_dict())
        return
    out.out.print(sweep_markdown(result))
    out.out.print(f"wrote {', '.join(result.files[:3])}")


@cli.command(context_settings=CONTEXT)
@click.argument("outputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "-o", "--out", "out_dir", type=click.Path(path_type=Path), help="Where to write (default: the first OUT)."
)
@json_option
def report(outputs: tuple[Path, ...], out_dir: Path | None, json_mode: bool) -> None:
    """Render report.md, report.html (plots embedded) and PNG plots for one or more factorize outputs.

    Several outputs (e.g. budgets of one model, each made with --evaluate) add a perplexity-vs-size plot.
    """
    from lowrank_compress.report import write_factorize_report

    out = Output(json_mode)
    written = write_factorize_report(list(outputs), out_dir)
    if json_mode:
        out.emit_json({"files": [str(p) for p in written]})
        return
    for p in written:
        out.out.print(f"wrote {p}")


def _adapter_epilog() -> str:
    """The adapter table for `finetune --help` (click keeps lines after a \\b line as they are)."""
    rows = [
        f"  {name:<8} {info[0]}; params {info[1]}; merge {info[2]}; {info[3]}"
        for name, info in ADAPTER_INFO.items()
    ]
    return "\b\nAdapters (--adapter), for an out x in layer:\n" + "\n".join(rows)


@cli.command(context_settings=CONTEXT, epilog=_adapter_epilog())
@click.argument("model")
@click.option(
    "--data",
    default=_FT.data,
    show_default=True,
    metavar="FILE|builtin|chat",
    help="Training text (.txt, .jsonl). Without --eval-data: trained on its first half, scored on the second. chat: "
    "conversations sampled from --teacher through the chat template (scored on --eval-data or the built-in text).",
)
@click.option(
    "-o", "--output", "output", required=True, type=click.Path(path_type=Path), help="Output directory."
)
@click.option(
    "--teacher",
    default=None,
    metavar="MODEL",
    help="Distill: the loss is the KL divergence to this model's next-token distribution (the dense model MODEL "
    "was compressed from), not the text's next token.",
)
@click.option(
    "--chat-samples",
    type=int,
    default=_FT.chat_samples,
    show_default=True,
    help="--data chat: conversations sampled (one --seq-len row each).",
)
@click.option(
    "--adapter",
    type=click.Choice(ADAPTERS),
    default=_FT.adapter,
    show_default=True,
    help="The adapter's structure (listed below).",
)
@click.option(
    "--rank", type=int, default=_FT.rank, show_default=True, help="Adapter rank r (c3a: sizes its blocks)."
)
@click.option("--alpha", type=FINITE, default=None, help="LoRA / GraLoRA alpha.  [default: 2 x rank]")
@click.option(
    "--block-size",
    type=int,
    default=None,
    help="c3a: circulant block size b, dividing both widths.  [default: per layer, about LoRA's parameters at --rank]",
)
@click.option("--blocks", type=int, default=_FT.blocks, show_default=True, help="gralora: k (k x k blocks).")
@click.option(
    "--quantize",
    type=click.Choice(["none", "nf4"]),
    default=_FT.quantize,
    show_default=True,
    help="nf4: frozen base in 4-bit NF4 with double quantization (needs the [nf4] extra).",
)
@click.option("--steps", type=int, default=None, help="Optimizer steps.  [default: one epoch]")
@click.option(
    "--epochs", type=FINITE, default=None, help="Passes over the training text (instead of --steps)."
)
@click.option("--lr", type=FINITE, default=_FT.lr, show_default=True, help="Peak learning rate.")
@click.option(
    "--batch-size", type=int, default=_FT.batch_size, show_default=True, help="Sequences per micro-batch."
)
@click.option(
    "--grad-accum",
    type=int,
    default=_FT.grad_accum,
    show_default=True,
    help="Micro-batches per optimizer step.",
)
@click.option(
    "--seq-len", type=int, default=_FT.seq_len, show_default=True, help="Tokens per packed sequence."
)
@click.option(
    "--warmup", type=FINITE, default=_FT.warmup, show_default=True, help="Warmup, as a fraction of the steps."
)
@click.option("--weight-decay", type=FINITE, default=_FT.weight_decay, show_default=True)
@click.option("--eval-data", default=None, metavar="FILE", help="Held-out text scored before and after.")
@click.option(
    "--eval-tokens",
    type=int,
    default=_FT.eval_tokens,
    show_default=True,
    help="Tokens scored (0: no evaluation).",
)
@answers_option("before and after training (not with --eval-tokens 0).")
@click.option(
    "--merge/--no-merge",
    default=_FT.merge,
    show_default=True,
    help="Fold the adapters into the model (else write them in PEFT's format).",
)
@click.option(
    "--merge-rank",
    type=click.Choice(MERGE_RANKS),
    default=_FT.merge_rank,
    show_default=True,
    help="grow: exact, rank r + the update's rank (low-rank adapters only); keep: back to rank r by a whitened SVD; "
    "break-even: exact, grown while that saves parameters, else the layer stored dense.",
)
@click.option(
    "--train",
    type=click.Choice(["adapters", "factors"]),
    default=_FT.train,
    show_default=True,
    help="factors: train the factorized layers' own factors (LoRD) instead of adapters.",
)
@click.option(
    "--nuclear",
    type=FINITE,
    default=_FT.nuclear,
    show_default=True,
    help="factors: weight of the TRP nuclear-norm penalty.",
)
@click.option(
    "--truncate-every",
    type=int,
    default=_FT.truncate_every,
    show_default=True,
    help="factors: every N steps cut each layer to the rank keeping --truncate-energy (0: never).",
)
@click.option("--truncate-energy", type=FINITE, default=_FT.truncate_energy, show_default=True)
@click.option(
    "--low-rank-reg",
    type=FINITE,
    default=_FT.low_rank_reg,
    show_default=True,
    help="LoRAE: weight of the exact nuclear norm of each trained product (lora / dora's B A, or the factors).",
)
@click.option(
    "--optimizer",
    type=click.Choice(OPTIMIZERS),
    default=_FT.optimizer,
    show_default=True,
    help="lora-pro: LoRA-Pro's gradients (the closest low-rank update to the full gradient), then AdamW (lora).",
)
@click.option(
    "--init",
    type=click.Choice(INITS),
    default=_FT.init,
    show_default=True,
    help="gora: GoRA's ranks per layer (gradient importance, same trainable budget) and gradient init (lora).",
)
@click.option(
    "--rank-schedule",
    type=click.Choice(RANK_SCHEDULES),
    default=_FT.rank_schedule,
    show_default=True,
    help="adalora: peft's AdaLoRA, pruned down to --rank per layer on average; elalora: ElaLoRA, pruned and expanded "
    "at --rank per layer on average; ard: ARD-LoRA, learned per-layer scales set the ranks (lora).",
)
@click.option(
    "--ard-l1", type=FINITE, default=_FT.ard_l1, show_default=True, help="ard: weight of the l1 term."
)
@click.option(
    "--ard-tv",
    type=FINITE,
    default=_FT.ard_tv,
    show_default=True,
    help="ard: weight of the total-variation term.",
)
@click.option(
    "--init-batches",
    type=int,
    default=_FT.init_batches,
    show_default=True,
    help="gora: batches whose gradients are accumulated.",
)
@click.option(
    "--gora-gamma",
    type=FINITE,
    default=_FT.gora_gamma,
    show_default=True,
    help="gora: the initial update is -(gamma / rank) x the gradient projected on A's rows.",
)
@click.option(
    "--precision",
    type=click.Choice(["auto", "fp32", "bf16"]),
    default=_FT.precision,
    show_default=True,
    help="auto: bf16 where the device multiplies it faster (CUDA with bf16, a CPU with AMX), else fp32.",
)
@click.option(
    "--save-every", type=int, default=_FT.save_every, show_default=True, help="Checkpoint every N steps."
)
@click.option(
    "--checkpoint-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Where checkpoints go.  [default: OUTPUT.checkpoint]",
)
@click.option(
    "--resume",
    type=click.Path(path_type=Path),
    default=None,
    metavar="DIR",
    help="Continue from a checkpoint (run the same command with --resume added).",
)
@click.option("--seed", type=int, default=_FT.seed, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output directory.")
@threads_option
@pickle_option
@json_option
def finetune(model: str, output: Path, checkpoint_dir: Path | None, resume: Path | None, overwrite: bool,
             threads: int | None, allow_pickle: bool, json_mode: bool, **flags: Any) -> None:  # fmt: skip
    """Train adapters (or the factors) to win back what compression lost; write adapters or a merged model.

    MODEL is a factorize output (or a dense checkpoint: plain (Q)LoRA). Run it plainly on CPU or a GPU, or under
    `accelerate launch` on several GPUs. Ctrl-C leaves a checkpoint to --resume from and never a partial output.
    """
    settings = FinetuneSettings(**flags).validate()
    out = Output(json_mode)
    _threads(threads, out)
    from lowrank_compress.finetune import finetune as run_finetune

    with out.progress("finetune") as update:
        result = run_finetune(
            model, output, settings, resume=resume, checkpoint_dir=checkpoint_dir, overwrite=overwrite,
            allow_pickle=allow_pickle, warn=out.warn,
            progress=lambda phase, done, total, label: update(done, total, f"{phase} {label}".strip(), phase),
        )  # fmt: skip
    if int(os.environ.get("RANK", "0")) != 0:  # under `accelerate launch`, the main process reports
        return
    data = result.to_dict()
    if json_mode:
        out.emit_json(data)
        return
    from rich.table import Table

    from lowrank_compress.report_finetune import loss_label

    p = result.perplexity
    table = Table(title=f"{model} -> {output} ({result.kind})", title_justify="left")
    for col in ("", "perplexity"):
        table.add_column(col, justify="left" if not col else "right")
    for key in ("before", "after", "merged"):
        if p.get(key) is not None:
            table.add_row(key, f"{p[key]:.3f}")
    out.out.print(table)
    first, last = result.losses[0], result.losses[-1]
    loss = loss_label(result.settings.teacher)
    out.out.print(
        f"{result.steps} steps ({result.settings.train}, {result.precision}) on {result.data['tokens']:,} tokens; "
        f"{loss} {first:.3f} -> {last:.3f}; {result.step_seconds:.2f} s/step, {result.tokens_per_s:,.0f} tok/s; "
        f"{result.trainable_params:,} trainable params"
    )
    if result.answers:
        _render_answers(out, result.answers)
    if result.kind == "adapters":
        out.out.print(
            f"wrote {output} (PEFT adapters: import lowrank_compress; PeftModel.from_pretrained(model, ...))"
        )
    else:
        out.out.print(
            f"wrote {output} ({result.params_after:,} params; load it after import lowrank_compress)"
        )


def _shard_size(text: str) -> str | int:
    """A shard size as huggingface_hub takes it ('500MB', '2GB', or bytes), checked here for a clear usage error."""
    import re

    number = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]B)?", text, flags=re.IGNORECASE)
    if number is None or (number.group(2) is None and "." in text):
        raise click.BadParameter(
            f"{text!r} is not a size like 500MB, 2GB or a byte count", param_hint="--max-shard-size"
        )
    if float(number.group(1)) <= 0:
        raise click.BadParameter("a shard must be larger than 0 bytes", param_hint="--max-shard-size")
    return text.upper() if number.group(2) else int(text)
