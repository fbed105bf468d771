"""`factorize_model`: the whole factorize job, from a checkpoint to a written lowrank output, one block at a time.

open the checkpoint (a skeleton on the meta device) -> pick targets -> calibration windows -> pass 1, block by
block: statistics, spectra, then gradients backwards (the gradients first where the spectra read them) -> ranks for
the whole model under the budget -> pass 2, block by block: factors fitted to the dense block's outputs from the
compressed prefix's inputs, streamed into shards -> config, recipe.yaml, report.json, model card -> atomic rename.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lowrank_compress import __version__
from lowrank_compress.console import interrupt_message, signal_received
from lowrank_compress.errors import InterruptedWithCheckpoint, LowrankError
from lowrank_compress.memory import PeakMemory
from lowrank_compress.modules import is_conv1d
from lowrank_compress.recipe import FactorizeSettings

if TYPE_CHECKING:
    from lowrank_compress.factorize import Decomposition
    from lowrank_compress.pass1_checkpoint import Recorder
    from lowrank_compress.pass2_progress import Pass2Progress

ProgressFn = Callable[[str, int, int], None]  # (phase, done, total)


@dataclass
class Target:
    """A Linear (or GPT-2 Conv1D) module of the loaded model that may be factorized."""

    name: str
    module: nn.Module
    out_features: int
    in_features: int

    def weight(self) -> torch.Tensor:
        """The weight as (out x in), whatever the module's storage layout."""
        w = self.module.weight.detach()
        return w.T if is_conv1d(self.module) else w


def find_targets(model: nn.Module, target: list[str], ignore: list[str]) -> list[Target]:
    """Linear layers of the model to factorize.

    By default, the Linear layers inside the repeated blocks (names with a block index): embeddings, output heads
    and poolers stay dense. --target patterns replace that default; --ignore patterns remove modules.
    """
    from lowrank_compress.checkpoint import match_pattern, module_depth

    found = []
    for name, module in model.named_modules():
        if not (isinstance(module, nn.Linear) or is_conv1d(module)):
            continue
        chosen = any(match_pattern(name, p) for p in target) if target else module_depth(name) is not None
        if not chosen or any(match_pattern(name, p) for p in ignore):
            continue
        if is_conv1d(module):
            in_f, out_f = module.weight.shape
        else:
            out_f, in_f = module.weight.shape
        found.append(Target(name, module, out_f, in_f))
    if not found:
        what = (
            f"--target {' '.join(target)}" if target else "the default (Linear layers inside repeated blocks)"
        )
        raise LowrankError(
            f"no Linear layers to factorize match {what}; check the patterns with `lowrank-compress analyze`"
        )
    return found


@dataclass
class LayerResult:
    name: str
    shape: tuple[int, int]
    rank: int | None  # None: kept dense
    params_before: int
    params_after: int
    relative_error: (
        float  # sqrt(discarded / total) of the method's objective (whitened output error for whiten)
    )
    stable_rank: float


@dataclass
class FactorizeResult:
    """What factorize did; `to_dict()` is report.json's core and the `--json` output."""

    output: Path
    settings: FactorizeSettings
    layers: list[LayerResult]
    total_params_before: int
    total_params_after: int
    target_params_before: int
    target_params_after: int
    calibration: dict[str, Any]
    timings: dict[str, float]
    files: list[str] = field(default_factory=list)
    evaluation: dict[str, Any] | None = None  # evaluate_models(OUT, baseline=MODEL).to_dict() with --evaluate
    # normalized spectra (of the method's transformed weight) of the most and least compressible layers
    spectra: dict[str, list[float]] = field(default_factory=dict)
    # the largest memory held while one block was processed (process RSS on CPU, allocator peak on CUDA)
    peak_block_mb: float = 0.0
    # the checkpoint whose pass 1 this run resumed from (its timings are that run's), or None
    resumed_from: str | None = None
    # where the unfinished pass 1 this run went on with had stopped ("the sampling", "3 blocks"), or None
    pass1_resumed_after: str | None = None
    # the block (from 1) a resumed pass 2 went on at, the blocks before it written by the stopped run; or None
    pass2_resumed_at: int | None = None

    @property
    def kept_fraction_targets(self) -> float:
        return self.target_params_after / self.target_params_before

    @property
    def kept_fraction_model(self) -> float:
        return self.total_params_after / self.total_params_before

    def to_dict(self) -> dict[str, Any]:
        return {
            "tool": {"name": "lowrank-compress", "version": __version__},
            "output": str(self.output),
            "settings": self.settings.__dict__,
            "summary": {
                "budget": self.settings.budget,
                "kept_fraction_targets": self.kept_fraction_targets,
                "kept_fraction_model": self.kept_fraction_model,
                "target_params_before": self.target_params_before,
                "target_params_after": self.target_params_after,
                "total_params_before": self.total_params_before,
                "total_params_after": self.total_params_after,
                "layers_factorized": sum(1 for x in self.layers if x.rank is not None),
                "layers_dense": sum(1 for x in self.layers if x.rank is None),
            },
            "calibration": self.calibration,
            "timings_s": self.timings,
            "peak_block_mb": self.peak_block_mb,
            "resumed_from": self.resumed_from,
            "pass1_resumed_after": self.pass1_resumed_after,
            "pass2_resumed_at": self.pass2_resumed_at,
            "layers": [
                {
                    "module": x.name,
                    "shape": list(x.shape),
                    "rank": x.rank,
                    "params_before": x.params_before,
                    "params_after": x.params_after,
                    "relative_error": x.relative_error,
                    "stable_rank": x.stable_rank,
                }
                for x in self.layers
            ],
            "files": self.files,
            "evaluation": self.evaluation,
            "spectra": self.spectra,
        }


def factorize_model(
    model_path: str | Path,
    out: str | Path,
    settings: FactorizeSettings,
    *,
    overwrite: bool = False,
    allow_pickle: bool = False,
    progress: ProgressFn | None = None,
    warn: Callable[[str], None] | None = None,
    max_shard_size: str | int = "2GB",
    evaluate: bool = False,
    checkpoint_dir: str | Path | None = None,
    resume: str | Path | None = None,
    keep_checkpoint: bool = False,
) -> FactorizeResult:
    """Factorize the model at `model_path` to `settings.budget` and write it to `out` atomically.

    The returned result's `settings` are the ones applied (a policy the model cannot use is replaced, with a warning).
    evaluate: also measure the written model against the source (`evaluate_models` defaults: held-out perplexity of the
    built-in text, prefill and decode speed) before the output is moved into place; the figures go into report.json
    and the model card.
    Pass 1's progress and then its results are saved in `checkpoint_dir` (default OUT.checkpoint), or in the
    checkpoint resumed from, and removed once OUT is in place (unless `keep_checkpoint`); `resume`: a checkpoint to
    take pass 1's results from, or to go on with its unfinished pass 1 (pass1_checkpoint.py).
    """
    from lowrank_compress.format import check_output_dir
    from lowrank_compress.loading import resolve
    from lowrank_compress.outdir import remove_ours
    from lowrank_compress.pass1_checkpoint import Recorder
    from lowrank_compress.resume import checkpoint_dir_for

    source = resolve(model_path)
    inputs = named_inputs(source, settings)
    check_output_dir(Path(out), overwrite, inputs=list(inputs.values()))
    ckpt_dir = checkpoint_dir_for(out, checkpoint_dir, inputs, resume, overwrite, warn)
    recorder = Recorder(Path(resume) if resume is not None else ckpt_dir, owned=resume is None, warn=warn)
    with _naming_checkpoint(recorder.kept, recorder, out, pass1=True):
        prepared = Prepared.load(
            model_path, settings, allow_pickle=allow_pickle, progress=progress, warn=warn, resume=resume,
            budgets=[settings.budget], recorder=recorder,
        )  # fmt: skip
    finished = prepared.pass1_finished_in_checkpoint or prepared.save_pass1()
    kept = recorder.directory if finished else None
    if kept is None and keep_checkpoint and warn is not None:
        warn(
            "--keep-checkpoint: data-free uniform ranks measure nothing in pass 1, so no checkpoint is saved"
        )
    what = "pass 1's results and pass 2's finished blocks are"
    with _naming_checkpoint(lambda: kept and what, recorder, out):
        result = prepared.write(
            out, settings.budget, overwrite=overwrite, max_shard_size=max_shard_size, evaluate=evaluate,
            checkpoint=kept,
        )  # fmt: skip
    if kept is not None and not keep_checkpoint:
        if prepared.pass2_held:
            remove_ours(kept, kinds=("checkpoint",), warn=warn)
        elif warn is not None:  # another run records in it: its shards are there
            warn(f"{kept} is left in place: this run did not record pass 2 in it")
    return result


@contextlib.contextmanager
def _naming_checkpoint(
    kept: Callable[[], str | None], recorder: Recorder, out: str | Path, pass1: bool = False
) -> Iterator[None]:
    """A stop or an error says what is kept in the checkpoint (`kept()`: in words, with its verb; None while
    nothing is) and how to go on; an error in `pass1` on the input (not on writing the checkpoint) removes the
    progress this run recorded: a resumed run would meet it again."""
    try:
        yield
    except BaseException as e:
        what, where = kept(), recorder.directory
        if not what:
            raise
        if (
            isinstance(e, KeyboardInterrupt) or signal_received()
        ):  # a signal's interrupt may surface as another error
            raise InterruptedWithCheckpoint(
                f"{interrupt_message()} to {out}; {what} in {where}: run the same command with --resume {where}"
            ) from None
        if not isinstance(e, LowrankError):
            raise
        if pass1 and recorder.owned and not (recorder.write_failed or recorder.gave_up):
            from lowrank_compress.outdir import remove_ours

            remove_ours(where, kinds=("checkpoint",))
            raise
        e.args = (f"{e}; {what} kept in {where}: run the command again with --resume {where}",)
        raise


def named_inputs(source: Any, settings: FactorizeSettings) -> dict[str, Path]:
    """What a factorize output or checkpoint may neither be, sit inside, nor contain, by name: the model (and its
    directory) and the calibration text."""
    from lowrank_compress.outdir import data_files

    files = {f"the calibration text {p}": p for p in data_files(settings.calibration)}
    return {"MODEL": Path(source.path), "the model's directory": Path(source.directory), **files}


def protected_inputs(source: Any, settings: FactorizeSettings) -> list[Path]:
    return list(named_inputs(source, settings).values())


BATCH = 4
"""Calibration windows per block call: the batch size of the statistics pass, as `collect_stats` uses."""


class Prepared:
    """Everything factorize computes before the budget matters, from one block-by-block pass over the checkpoint:
    the calibration windows, each target's spectrum (what the allocator reads) and sensitivity. `write` then
    allocates ranks for one budget and streams an output, as often as wanted (a budget sweep calibrates once).

    Memory holds one block, the calibration hidden states and one block's statistics, whatever the depth: the
    model is a `StreamedModel` over the checkpoint (see sequential.py).
    """

    def __init__(self) -> None:  # built by `load`
        self.model_path: str | Path = ""
        self.settings = FactorizeSettings()
        self.allow_pickle = False
        self.streamed: Any = None
        self.tokenizer: Any = None
        self.source: Any = None
        self.targets: list[Target] = []
        self._targets_by_name: dict[str, Target] = {}
        self.candidates: list[Any] = []
        self.calibration_info: dict[str, Any] = {"source": None}
        # the calibration windows by part ("text", "self"), kept so a caller can see exactly what was measured
        self.calibration_batches: dict[str, torch.Tensor] = {}
        self.part_weights: dict[str, float] = {}
        self.grad_rows: dict[str, list[int]] = {}
        # --grad-source answers: the gradient windows (token ids, loss labels), sampled besides the calibration
        self.answer_windows: tuple[torch.Tensor, torch.Tensor] | None = None
        # pass 1's pooled statistics per layer, only with keep_stats (tests, small models)
        self.stats: dict[str, Any] = {}
        self.total_before = 0
        self.report: ProgressFn = lambda *a: None
        self.warn: Callable[[str], None] = lambda m: None
        self.tick = _Stopwatch()
        self.block_peaks: list[float] = []
        self._text: str | None = None  # the calibration text, when there is one
        self._notes: list[str] = []  # warnings about the calibration windows
        # how the self-generated windows were drawn: "resident (float32)" (or at the stored half precision when
        # float32 does not fit), or "streamed" (each block read per token)
        self._sampling: str | None = None
        self._sampling_peak_mb: float | None = (
            None  # the memory held while sampling (RSS, or the GPU allocator's)
        )
        self._chat = False  # some calibration windows were conversations (--chat with a chat template)
        self._chat_text = False  # the text windows were wrapped as turns (--chat-text)
        # pass 1's gradient statistics per target: (fisher_rows, out_grad_sq, out_grad_channels)
        self._gradients: dict[str, tuple[Any, float | None, Any]] = {}
        # the report's spectra: layer -> singular values, from pass 1, or from pass 2 where pass 1 measured none
        self._report_spectra: dict[str, torch.Tensor] = {}
        # the settings as applied to the model before the calibration is drawn: what a resumed run must repeat
        self._requested = FactorizeSettings()
        self.resumed_from: Path | None = None  # the checkpoint pass 1's results came from
        self._recorder: Recorder | None = None  # where pass 1 records its progress; None: nowhere
        self.pass2_held = False  # this run held its checkpoint's pass-2 lock: it removes the checkpoint
        # what pass 1 has measured so far, per target: spectrum (None where the policy reads none), stable rank
        self._measured_spectra: dict[str, Any] = {}
        self._measured_stable: dict[str, float] = {}
        # an unfinished pass 1 this run went on with: after what ("the gradients", "3 blocks"); None: none
        self.pass1_resumed_after: str | None = None

    @property
    def needs_data(self) -> bool:
        return self.settings.method != "svd" or self.settings.policy == "sensitivity"

    @property
    def model(self) -> nn.Module:
        """The architecture (on the meta device outside a block pass)."""
        return self.streamed.model

    @classmethod
    def load(
        cls,
        model_path: str | Path,
        settings: FactorizeSettings,
        *,
        allow_pickle: bool = False,
        progress: ProgressFn | None = None,
        warn: Callable[[str], None] | None = None,
        keep_stats: bool = False,
        resume: str | Path | None = None,
        budgets: Sequence[float] = (),
        recorder: Recorder | None = None,
    ) -> Prepared:
        """Open the checkpoint, pick targets, draw the calibration windows and run pass 1 (statistics, spectra,
        sensitivities, block by block), or take pass 1's results from the checkpoint `resume` (or go on with the
        unfinished pass 1 there). `budgets`: those the run will write, refused before any work when no allocation
        can meet them. `recorder`: where pass 1 records its progress as it goes."""
        from lowrank_compress.checkpoint import Checkpoint
        from lowrank_compress.loading import is_causal_lm, load_tokenizer, resolve
        from lowrank_compress.sequential import StreamedModel

        self = cls()
        self.model_path, self.allow_pickle = model_path, allow_pickle
        self._recorder = recorder
        self.report = progress or (lambda *a: None)
        self.warn = warn or (lambda m: None)
        settings.validate()
        self.source = source = resolve(model_path)
        ckpt = Checkpoint.open(
            source.path if source.gguf_file else source.directory, allow_pickle=allow_pickle
        )
        quant = (ckpt.config or {}).get("quantization_config") or {}
        if quant.get("quant_method") == "lowrank":
            raise LowrankError(
                f"{model_path} is already factorized (a lowrank-compress output); factorize its dense source "
                "instead (finetune and evaluate take this one)"
            )
        self.streamed = StreamedModel(ckpt, device=settings.device)
        model = self.streamed.model
        causal = is_causal_lm(model.config)
        self.settings = settings = self._applicable(settings, causal)
        if self.needs_data:
            self.settings = settings = self._fit_lengths(settings)
        self.tokenizer = load_tokenizer(source, required=self.needs_data)
        self.targets = find_targets(model, settings.target, settings.ignore)
        self._targets_by_name = {t.name: t for t in self.targets}
        outside = [t.name for t in self.targets if self.streamed.block_of(t.name) is None]
        if outside:
            raise LowrankError(
                f"{outside[0]} is outside the repeated blocks; factorize compresses the Linear layers inside the "
                "blocks, one block at a time; drop it from --target"
            )
        self._check_budgets(budgets)
        tied = self.streamed.tied
        self.total_before = sum(
            p.numel() for n, p in model.named_parameters(remove_duplicate=False) if n not in tied
        )
        self.tick("load")
        self._requested = settings
        if resume is not None:
            self._resume(Path(resume), keep_stats)
            return self
        if self.needs_data:
            self._draw_calibration(causal)
            if self._sampling is not None:  # (drawing from a text alone takes seconds: nothing to keep)
                self._record_pass1({"phase": "sampling"})
        self._pass1(keep_stats)
        return self

    def _check_budgets(self, budgets: Sequence[float]) -> None:
        from lowrank_compress.allocate import LayerCandidate, check_reachable

        settings = self.settings
        if settings.policy == "energy" and settings.energy is not None:  # the energy sets the ranks
            return
        shapes = [LayerCandidate(t.name, t.out_features, t.in_features, None) for t in self.targets]
        for budget in budgets:
            check_reachable(shapes, budget, settings.policy, multiple=settings.rank_multiple)

    def _applicable(self, settings: FactorizeSettings, causal: bool) -> FactorizeSettings:
        """The settings this model can run: encoders get the next best policy and no self-generated samples,
        said out loud."""
        from lowrank_compress.calibration import SELF

        name = type(self.streamed.model).__name__
        if settings.method == "fisher" and not causal:
            raise LowrankError(
                f"{name} has no language-model loss, which the fisher method needs; use --method whiten, asvd or svd"
            )
        if settings.policy == "sensitivity" and not causal:
            settings = dataclasses.replace(settings, policy="uniform")
            self.warn(f"{name} has no language-model loss for the sensitivity policy; using --policy uniform")
        if settings.loss_weighted is None:  # the default: wherever it can run
            settings = dataclasses.replace(settings, loss_weighted=causal and settings.method == "whiten")
        if settings.loss_weighted and not causal:
            settings = dataclasses.replace(settings, loss_weighted=False)
            self.warn(
                f"{name} has no language-model loss to weight the fit by; fitting without (--no-loss-weighted)"
            )
        if settings.loss_weighted and settings.method != "whiten":
            settings = dataclasses.replace(settings, loss_weighted=False)
            self.warn(f"--loss-weighted is for --method whiten; fitting {settings.method} without it")
        data = settings.method != "svd" or settings.policy == "sensitivity"
        if settings.self_mix > 0 and not causal and settings.calibration != SELF and data:
            settings = dataclasses.replace(settings, self_mix=0.0)
            self.warn(f"{name} cannot generate its own samples; calibrating on the text alone (--self-mix 0)")
        return settings

    def _fit_lengths(self, settings: FactorizeSettings) -> FactorizeSettings:
        """The calibration windows within the model's context (see `fit_sequence_length`)."""
        from lowrank_compress.evaluate import fit_sequence_length

        seq_len = fit_sequence_length(
            self.model, settings.seq_len, "--seq-len", FactorizeSettings.seq_len, self.warn
        )
        self_seq_len = settings.self_seq_len
        if self_seq_len is not None and settings.self_mix > 0:
            self_seq_len = fit_sequence_length(self.model, self_seq_len, "--self-seq-len", -1, self.warn)
        return dataclasses.replace(settings, seq_len=seq_len, self_seq_len=self_seq_len)

    # -- calibration windows --

    def _draw_calibration(self, causal: bool) -> None:
        """The calibration windows (from the text, sampled from the model, or both), their weights, the gradient
        windows of each part, and the warnings about size and repetitiveness."""
        from lowrank_compress.calibration import (
            SELF,
            _spread,
            calibration_warnings,
            has_chat_template,
            make_batches,
            make_chat_batches,
        )
        from lowrank_compress.text import load_text

        settings, streamed = self.settings, self.streamed
        self_generated = settings.calibration == SELF
        if self_generated and not causal:
            raise LowrankError(f"{type(streamed.model).__name__} cannot generate; pass a calibration text")
        chat = settings.chat is not False and has_chat_template(self.tokenizer)
        for flag, option in (
            (settings.self_answer_tokens, "--self-answer-tokens"),
            (settings.chat_text, "--chat-text"),
            (settings.chat_share != 1.0, "--chat-share"),
        ):
            if flag and not chat:
                self.warn(f"{option} applies to chat calibration only; ignored")
        if settings.chat is True and not chat:
            self.warn(
                "--chat: the tokenizer has no chat template; calibrating on plain text and free samples"
            )
        mix = 1.0 if self_generated else settings.self_mix
        self._chat_text = chat and settings.chat_text and mix < 1.0
        self._chat = chat and (mix > 0.0 or self._chat_text)
        batches: dict[str, torch.Tensor] = {}
        if mix < 1.0:
            text = load_text(settings.calibration, split="calibration")
            self._text = text
            batches["text"] = (make_chat_batches if self._chat_text else make_batches)(
                self.tokenizer, text, samples=settings.samples, seq_len=settings.seq_len, seed=settings.seed
            )
        gradients = settings.method == "fisher" or settings.policy == "sensitivity" or settings.loss_weighted
        answers = gradients and settings.grad_source == "answers"
        if answers and not chat:  # (encoders measure no gradients: see _applicable)
            self.warn(
                "--grad-source answers needs a chat model (a tokenizer with a chat template, and not --no-chat); "
                "the gradients come from the calibration windows (--grad-source mix)"
            )
            self.settings = settings = dataclasses.replace(settings, grad_source="mix")
            answers = False
        if mix > 0.0 or answers:
            sampled = self._sample(chat, settings.seq_len if self_generated else None, mix > 0.0, answers)
            if "self" in sampled:
                batches["self"] = sampled["self"]
            self.answer_windows = sampled.get("answers")
            self.tick("sampling")
        self.calibration_batches = batches
        self.part_weights = {part: (mix if part == "self" else 1.0 - mix) for part in batches}
        grad_n = min(settings.grad_samples, settings.samples) if gradients and not answers else 0
        for part, rows in batches.items():
            n = 0 if part == "text" and settings.grad_source == "self" and "self" in batches else grad_n
            self.grad_rows[part] = _spread(rows.shape[0], n) if n else []
        own = batches.get("text", batches.get("self"))
        assert own is not None
        self._notes = calibration_warnings(
            own, max(t.in_features for t in self.targets), getattr(streamed.model.config, "vocab_size", None),
            extra_tokens=sum(int(b.numel()) for b in batches.values()) - int(own.numel()),
        )  # fmt: skip
        for note in self._notes:
            self.warn(note)

    def _sample(self, chat: bool, seq_len: int | None, self_part: bool, answers: bool) -> dict[str, Any]:
        """What calibration samples from the model, in one load of it: the self-generated windows ("self": of
        `seq_len` tokens, or --self-seq-len) and the answer windows for the gradients ("answers": token ids and
        loss labels, `sample_chat_answers`). The model is held whole in memory when it fits there with its
        sampling cache, else streamed block by block for every token (with a warning)."""
        settings, streamed = self.settings, self.streamed
        length = seq_len or settings.self_seq_len or settings.seq_len
        tokens = max(length, settings.seq_len) if answers else length  # the answer windows are seq_len long
        dtype = streamed.resident_dtype(rows=settings.samples, tokens=tokens)
        resident = dtype is not None
        if resident and dtype != streamed.dtype:
            self.warn(
                "the model and its sampling cache do not fit in memory at float32: sampling at "
                f"{_dtype_name(dtype)}, the dtype its checkpoint stores"
            )
        out: dict[str, Any] = {}
        with streamed.whole(resident=resident, dtype=dtype) as model, PeakMemory(settings.device) as peak:
            if self_part:
                out["self"] = self._sample_self(model, chat, length)
            if answers:
                from lowrank_compress.calibration import ANSWER_TOKENS, sample_chat_answers

                out["answers"] = sample_chat_answers(
                    model, self.tokenizer, samples=min(settings.grad_samples, settings.samples),
                    seq_len=settings.seq_len, answer_tokens=ANSWER_TOKENS, seed=settings.seed,
                    device=settings.device,
                )  # fmt: skip
        self._sampling = "streamed" if dtype is None else f"resident ({_dtype_name(dtype)})"
        self._sampling_peak_mb = round(peak.mb, 1)
        if not resident:
            self.warn(
                "the model and its sampling cache do not fit in memory: sampling reads each block from the "
                "checkpoint for every token (slow; --self-mix 0 skips the sampling)"
            )
        return out

    def _sample_self(self, model: nn.Module, chat: bool, length: int) -> torch.Tensor:
        """The self-generated calibration windows: conversations for a chat model (--chat-share of them), else
        free text."""
        from lowrank_compress.calibration import sample_batches, sample_chat_batches, sample_chat_exchanges

        settings = self.settings
        sampling: dict[str, Any] = dict(
            samples=settings.samples, seq_len=length, seed=settings.seed, temperature=settings.self_temperature,
            device=settings.device, progress=lambda d, t: self.report("sampling calibration", d, t),
        )  # fmt: skip
        whole = {"batch_size": settings.samples}  # every window in one batch
        random_start = settings.self_start == "random"
        if not chat:
            return sample_batches(model, self.tokenizer, random_start=random_start, **whole, **sampling)
        free = self._free_windows()
        if not settings.self_answer_tokens:
            return sample_chat_batches(
                model, self.tokenizer, free=free, random_start=random_start, **whole, **sampling
            )  # fmt: skip
        parts = []  # exchanges sample one batch per turn; the free-text windows, if any, after them
        if free < settings.samples:
            talks = {
                **sampling,
                "samples": settings.samples - free,
                "answer_tokens": settings.self_answer_tokens,
            }
            parts.append(sample_chat_exchanges(model, self.tokenizer, **talks))
        if free:
            rest = {**sampling, "samples": free, "batch_size": free}
            parts.append(sample_batches(model, self.tokenizer, random_start=random_start, **rest))
        return torch.cat(parts)

    def _free_windows(self) -> int:
        """How many self-generated windows are free text: all of them but for chat calibration, where --chat-share
        of them are conversations."""
        settings = self.settings
        return (
            settings.samples - round(settings.samples * settings.chat_share)
            if self._chat
            else settings.samples
        )

    # -- pass 1 --

    def _pass1(
        self, keep_stats: bool, progress: dict[str, Any] | None = None,
        hidden: dict[str, list[torch.Tensor]] | None = None,
    ) -> None:  # fmt: skip
        """Block by block: each target's spectrum under the method (from the pooled input statistics), its stable
        rank, and, through a block-wise backward pass, its sensitivity (and Fisher rows). Where the spectra read the
        gradients (the fisher method, the loss-weighted fit), or the gradient windows are not calibration windows (the
        answer windows), the gradients come first, from a forward pass of the gradient windows alone; else the
        statistics pass stashes those windows' inputs for the backward pass. `progress` and `hidden`: where an
        unfinished pass 1 stopped (`_resume`), and the hidden states entering its next block."""
        spectra, stable, grads = self._measured_spectra, self._measured_stable, self._gradients
        if self.needs_data:
            answers = self.answer_windows is not None
            measured = answers or any(self.grad_rows.values())
            first = measured and (answers or self.settings.method == "fisher" or self.settings.loss_weighted)
            if first and (progress is None or progress["phase"] == "sampling"):
                windows = _Flow(self, windows=self._gradient_windows())
                self._forward(windows)
                grads.update(self._gradient_pass(windows))
                del windows
                self._record_pass1({"phase": "gradients"})
            flow = _Flow(self, stash=measured and not first)
            start = progress["blocks_done"] if progress and progress["phase"] == "blocks" else 0
            if hidden is not None:
                flow.hidden = {part: [h.to(flow.store) for h in hs] for part, hs in hidden.items()}
            # (the stashed inputs of the gradient windows are not kept: such a pass is recorded up to its start)
            record = not keep_stats and not (measured and not first)
            self._forward(flow, spectra, stable, keep_stats, start=start, record=record)
            self._record_calibration(flow)
            self.tick("calibration")
            if measured and not first:
                grads.update(self._gradient_pass(flow))
            for name, st in self.stats.items():  # keep_stats: the statistics with their gradients
                st.fisher_rows, st.out_grad_sq, st.out_grad_channels = grads.get(name, (None, None, None))
        for i, names in self._blocks_with_targets():
            if all(n in spectra for n in names) or not self._reads_weights_in_pass1:
                continue
            with self.streamed.block(i):
                self._spectra(names, spectra, stable, stats={})
            if self._recorder is not None and self._recorder.due():
                self._record_pass1({"phase": "blocks", "blocks_done": i + 1}, running="spectra")
            self.report("pass 1: spectra, block", i + 1, len(self.streamed.blocks))
        self._set_candidates(spectra, stable)
        self.tick("spectra")

    def _record_pass1(
        self, progress: dict[str, Any], hidden: dict[str, list[torch.Tensor]] | None = None,
        running: str | None = None,
    ) -> None:  # fmt: skip
        """Record the unfinished pass 1 in the checkpoint (where this run records one): what it has measured, and
        `hidden`, the hidden states entering the next block; `running`: the phase under way, whose time so far is
        kept for the report."""
        if self._recorder is None:
            return
        state, tensors = self._pass1_state()
        for part, batches in (hidden or {}).items():
            tensors.update({f"hidden.{part}.{b}": h for b, h in enumerate(batches)})
        if self.answer_windows is not None:
            tensors["answers.ids"], tensors["answers.labels"] = self.answer_windows
        state.update(notes=self._notes, sampling=[self._sampling, self._sampling_peak_mb], running=running and [
            running, self.tick.running(running)
        ])  # fmt: skip
        self._recorder.record(state, tensors, progress)

    def _set_candidates(self, spectra: dict[str, Any], stable: dict[str, float]) -> None:
        """What the allocator reads of each target: its spectrum, stable rank and sensitivity."""
        from lowrank_compress.allocate import LayerCandidate

        self._measured_spectra, self._measured_stable = spectra, stable
        self.candidates = [
            LayerCandidate(
                name=t.name, out_features=t.out_features, in_features=t.in_features,
                decomposition=spectra.get(t.name), stable_rank=stable.get(t.name),
                sensitivity=self._sensitivity(t.name),
            )
            for t in self.targets
        ]  # fmt: skip

    # -- pass 1's checkpoint (pass1_checkpoint.py) --

    @property
    def pass1_finished_in_checkpoint(self) -> bool:
        """Pass 1's results came whole from the checkpoint resumed (nothing of pass 1 ran here)."""
        return self.resumed_from is not None and self.pass1_resumed_after is None

    def save_pass1(self) -> bool:
        """What pass 2 and the report read of pass 1, saved where this run records (`recorder`) so that a run can
        resume at pass 2; whether the checkpoint holds pass 1's results now: False when pass 1 measured nothing
        (data-free uniform ranks) or has no recorder, True where another run resuming the same checkpoint saved
        its (equal) results first."""
        from lowrank_compress.pass1_checkpoint import finished

        if not self._reads_weights_in_pass1 or self._recorder is None:
            return False
        state, tensors = self._pass1_state()
        saved = self._recorder.save(state, tensors, None) or finished(self._recorder.directory)
        self.tick("checkpoint")
        return saved

    def _pass1_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """pass1_checkpoint's state and tensors: what pass 1 has measured so far (all of it once it ends)."""
        from lowrank_compress import pass1_checkpoint
        from lowrank_compress.text import text_fingerprint

        tensors = {f"calibration.{part}": ids for part, ids in self.calibration_batches.items()}
        spectra = {}
        for name, dec in self._measured_spectra.items():
            if dec is not None:
                tensors[f"s.{name}"] = dec.s
                spectra[name] = {"method": dec.method, "ridge": dec.ridge, "dtype": _dtype_name(dec.u.dtype)}
        for name, (rows, _, channels) in self._gradients.items():
            for key, t in (("fisher_rows", rows), ("channels", channels)):
                if t is not None:
                    tensors[f"{key}.{name}"] = t
        state = {
            "model": str(Path(self.model_path).resolve()),
            "files": pass1_checkpoint.fingerprint(self._model_files()),
            "requested": dataclasses.asdict(self._requested),
            "settings": dataclasses.asdict(self.settings),
            "spectra": spectra,
            "mean_grad_sq": {name: g[1] for name, g in self._gradients.items()},
            "stable_ranks": dict(self._measured_stable),
            "part_weights": self.part_weights,
            "grad_rows": self.grad_rows,
            "chat": [self._chat, self._chat_text],
            "calibration": self.calibration_info,
            "text_sha256": text_fingerprint(self._text) if self._text is not None else None,
            "timings": dict(self.tick.laps),
            "block_peaks": self.block_peaks,
        }
        return state, tensors

    def _resume(self, directory: Path, keep_stats: bool) -> None:
        """Pass 1's results from the checkpoint in `directory` instead of measuring them (its timings and block
        peaks become this run's, with the time to load the model and read them as "resume"); an unfinished pass 1
        there goes on where it stopped."""
        from lowrank_compress import pass1_checkpoint

        state, tensors = pass1_checkpoint.read(directory, self.model_path, self.settings, self._model_files())
        progress = state.get("progress")
        try:
            hidden = self._restore(state, tensors)
        except (KeyError, TypeError, ValueError) as e:  # (what the checks before could not see)
            raise LowrankError(f"{directory}: the checkpoint is damaged ({type(e).__name__}: {e})") from None
        self._check_same_text(directory, state)
        self.tick("resume")
        self.tick.laps = {
            **state.get("timings", {}),
            "resume": self.tick.laps.get("load", 0.0) + self.tick.laps["resume"],
        }
        self.resumed_from = directory
        if progress:
            self.tick.carried = dict([state["running"]]) if state.get("running") else {}
            self.pass1_resumed_after = pass1_checkpoint.describe(progress)
            if self._recorder is not None:
                self._recorder.recorded = self.pass1_resumed_after
            self._pass1(keep_stats, progress, hidden)

    def _restore(
        self, state: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> dict[str, list[torch.Tensor]] | None:
        """Pass 1's results, or an unfinished pass 1's progress, from a checkpoint's state and tensors; the hidden
        states entering the next block where the progress has them."""
        from lowrank_compress import pass1_checkpoint

        self.settings = settings = pass1_checkpoint.applied(state, self.settings)
        # in pass 1's order (the statistics are summed part by part: another order rounds differently)
        self.calibration_batches = {part: tensors[f"calibration.{part}"] for part in state["part_weights"]}
        self.part_weights, self.grad_rows = state["part_weights"], state["grad_rows"]
        self._chat, self._chat_text = state["chat"]
        self._gradients = {
            name: (tensors.get(f"fisher_rows.{name}"), sq, tensors.get(f"channels.{name}"))
            for name, sq in state["mean_grad_sq"].items()
        }
        spectra = {
            name: self._spectrum(name, tensors[f"s.{name}"], **how) for name, how in state["spectra"].items()
        }
        self.block_peaks = list(state["block_peaks"])
        if not state.get("progress"):
            self.calibration_info = {**state["calibration"], **{
                k: getattr(settings, k) for k in ("error_aware", "loss_weighted", "refine_steps")
            }}  # fmt: skip
            self._set_candidates(spectra, state["stable_ranks"])
            return None
        self._notes, (self._sampling, self._sampling_peak_mb) = list(state["notes"]), state["sampling"]
        if "answers.ids" in tensors:
            self.answer_windows = (tensors["answers.ids"], tensors["answers.labels"])
        self._measured_stable = dict(state["stable_ranks"])
        self._measured_spectra = {name: spectra.get(name) for name in self._measured_stable}
        parts = {
            part: sorted(k for k in tensors if k.startswith(f"hidden.{part}."))
            for part in state["part_weights"]
        }
        if not any(parts.values()):
            return None
        return {
            part: [tensors[f"hidden.{part}.{b}"] for b in range(len(keys))] for part, keys in parts.items()
        }

    def _model_files(self) -> list[Path]:
        """The files a checkpoint's fingerprint covers: the weights, and config.json where there is one."""
        config = Path(self.source.directory) / "config.json"
        return [
            *self.streamed.ckpt.files,
            *([config] if config.is_file() and not self.source.gguf_file else []),
        ]

    def _check_same_text(self, directory: Path, state: dict[str, Any]) -> None:
        """A resumed run's calibration text must read as it did (pass 2 reads the saved token ids)."""
        from lowrank_compress.text import load_text, text_fingerprint

        if "text" not in self.calibration_batches:
            return
        saved = state.get("text_sha256") or state["calibration"]["parts"]["text"]["sha256"]
        self._text = load_text(self.settings.calibration, split="calibration")
        if text_fingerprint(self._text) != saved:
            raise LowrankError(
                f"{directory}: the calibration text {self.settings.calibration} changed since the checkpoint was "
                "made; start afresh (without --resume, with --overwrite)"
            )

    def _spectrum(self, name: str, s: torch.Tensor, method: str, ridge: float, dtype: str) -> Decomposition:
        """A saved spectrum as the spectrum-only decomposition pass 1 made (no factors)."""
        from lowrank_compress.factorize import Decomposition

        t, kind = self._target(name), getattr(torch, dtype)
        empty_u, empty_v = (
            torch.empty(t.out_features, 0, dtype=kind),
            torch.empty(0, t.in_features, dtype=kind),
        )
        return Decomposition(empty_u, s, empty_v, method, ridge)

    def _gradient_windows(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The windows the loss gradients come from, per part: (token ids, loss labels)."""
        if self.answer_windows is not None:
            return {"answers": self.answer_windows}
        chosen = {part: self.calibration_batches[part][rows] for part, rows in self.grad_rows.items() if rows}
        return {part: (ids, ids) for part, ids in chosen.items()}

    def _grad_source(self) -> dict[str, Any] | None:
        """report.json's record of the gradient windows' source: the setting, and the answer windows' size."""
        if self.answer_windows is not None:
            ids, labels = self.answer_windows
            return {
                "source": "answers",
                "samples": ids.shape[0],
                "answer_tokens": int((labels != -100).sum()),
            }
        if any(self.grad_rows.values()):
            return {"source": self.settings.grad_source}
        return None

    def _sensitivity(self, name: str) -> float | None:
        """What the allocator multiplies a layer's truncation error by to read it as loss: the mean squared loss
        gradient at its output; for loss-weighted spectra, already in units of the per-channel gradients scaled
        to their largest (`factorize._whiten`), that largest one."""
        if name not in self._gradients:
            return None
        _, mean_sq, channels = self._gradients[name]
        if self.settings.loss_weighted and channels is not None:  # (_applicable keeps it to whiten)
            return float(channels.max())
        return mean_sq

    def _block_sums(self, modules: dict[str, nn.Module]) -> Any:
        """Input statistics of these targets, summed in the precision the fit reads them in (`factorize.fit_dtype`),
        with the sums of |x| where the method reads them (asvd)."""
        from lowrank_compress.calibration import BlockStatistics
        from lowrank_compress.factorize import fit_dtype

        dtype = fit_dtype(self.settings.method, self.settings.damping)
        return BlockStatistics(modules, dtype, abs_sums=self.settings.method == "asvd")

    @property
    def _reads_weights_in_pass1(self) -> bool:
        """Data-free uniform ranks need the layer shapes alone: pass 1 then reads no weight, and each layer's stable
        rank comes from pass 2's exact spectrum of W."""
        return self.needs_data or self.settings.policy != "uniform"

    def _blocks_with_targets(self) -> list[tuple[int, list[str]]]:
        by_block: dict[int, list[str]] = {}
        for t in self.targets:
            by_block.setdefault(self.streamed.block_of(t.name), []).append(t.name)
        return sorted(by_block.items())

    def _target(self, name: str) -> Target:
        return self._targets_by_name[name]

    def _spectra(
        self, names: list[str], spectra: dict[str, Any], stable: dict[str, float], stats: dict,
        free: bool = False,
    ) -> None:  # fmt: skip
        """Spectrum (singular values only) and stable rank of each named target of the loaded block. `free`: each
        layer's statistics leave `stats` once used, a shared Gram and its Cholesky factor with their last layer."""
        from lowrank_compress.choices import SPECTRUM_POLICIES

        cache: dict[int, Any] = {}
        users = Counter(id(st.gram) for st in stats.values())
        for name in names:
            t = self._target(name)
            _check_finite(t)
            if self.settings.policy in SPECTRUM_POLICIES:
                spectra[name] = self._decompose(t, stats.get(name), cache, spectrum_only=True, consume=free)
            else:  # the report's spectra come from pass 2's decompositions
                spectra[name] = None
            stable[name] = _estimated_stable_rank(t.weight())
            if free:
                _release_stats(stats, name, users, cache)

    def _decompose(
        self, t: Target, stats: Any, cache: dict[int, Any], spectrum_only: bool = False, consume: bool = False
    ) -> Decomposition:
        """`consume`: the statistics are not read again (their Gram may become its Cholesky factor)."""
        from lowrank_compress.factorize import decompose

        # the loss-weighted fit and spectra (pass 1 measures the gradients before the spectra then)
        rows = self._gradients.get(t.name, (None, None, None))[2] if self.settings.loss_weighted else None
        return decompose(
            t.weight(), self.settings.method, stats, damping=self.settings.damping, cholesky_cache=cache,
            spectrum_only=spectrum_only, consume_stats=consume, row_weights=rows,
        )  # fmt: skip

    def _block_targets(self, i: int) -> dict[str, nn.Module]:
        return {t.name: t.module for t in self.targets if self.streamed.block_of(t.name) == i}

    def _forward(
        self, flow: _Flow, spectra: dict[str, Any] | None = None, stable: dict[str, float] | None = None,
        keep_stats: bool = False, start: int = 0, record: bool = False,
    ) -> None:  # fmt: skip
        """The calibration windows through the dense blocks from block `start` on (the flow holds its inputs),
        stashing the gradient windows' inputs when the flow does; with `spectra`, each block's pooled input
        statistics give its targets' spectra and stable ranks. `record`: pass 1's progress after a block, when due."""
        n = len(self.streamed.blocks)
        scales = self._part_scales()
        label = "pass 1" if spectra is not None else "gradient windows"
        for i in range(start, n):
            modules = self._block_targets(i) if spectra is not None else {}
            with self.streamed.block(i) as block, PeakMemory(self.streamed.device) as peak:
                sums = self._block_sums(modules)
                for part in flow.ids:
                    flow.stash_inputs(part, i)
                    for b in range(len(flow.hidden[part])):
                        with sums.record() as seen:
                            flow.hidden[part][b] = flow.run(block, part, b, flow.hidden[part][b])
                        if modules and scales[part]:
                            sums.add(seen, weight=scales[part])
                        del seen
                if modules:
                    assert spectra is not None and stable is not None
                    stats = sums.stats()
                    del sums
                    if keep_stats:
                        self.stats.update(stats)
                    if self.settings.method == "fisher":
                        self._spectra(list(modules), spectra, stable, self._fisher_stats(modules))
                    else:
                        self._spectra(list(modules), spectra, stable, stats, free=not keep_stats)
                    del stats
            self.block_peaks.append(peak.mb)
            if record and self._recorder is not None and self._recorder.due():
                self._record_pass1(
                    {"phase": "blocks", "blocks_done": i + 1}, flow.hidden, running="calibration"
                )
            self.report(f"{label}, block {i + 1}/{n} (peak {peak.mb:,.0f} MB)", i + 1, n)

    def _gradient_pass(
        self, flow: _Flow
    ) -> dict[str, tuple[torch.Tensor | None, float | None, torch.Tensor | None]]:
        """Loss gradients of the flow's gradient windows (`_forward` has run them through every block) through the
        blocks in reverse, one block in memory, recomputing each block's forward from its stashed input (one
        window at a time, as `collect_stats` does): per target the mean squared gradient of its output (the
        sensitivity), per output channel (the loss-weighted fit's row weights) and, for fisher, the squared
        weight gradient per output row."""
        from lowrank_compress.calibration import blend_gradients

        fisher = self.settings.method == "fisher"
        streamed = self.streamed
        upstream = {part: [] for part in flow.ids}
        with streamed.outer(embeddings=False):
            for part, rows in flow.grad_rows.items():
                for r in rows:
                    final = flow.row(part, r).to(streamed.device).requires_grad_(True)
                    with torch.enable_grad():
                        loss = streamed.head_loss(final, flow.labels[part][r : r + 1])
                        upstream[part].append(torch.autograd.grad(loss, final)[0].detach())
        n = len(streamed.blocks)
        out: dict[str, tuple[torch.Tensor | None, float | None, torch.Tensor | None]] = {}
        for i in reversed(range(n)):
            modules = self._block_targets(i)
            with streamed.block(i) as block:
                parts = []
                for part, rows in flow.grad_rows.items():
                    if rows:
                        measured = self._block_gradients(
                            block, modules, flow, part, i, upstream[part], fisher
                        )
                        parts.append((measured, self.part_weights.get(part, 1.0)))
                for name in modules:
                    out[name] = blend_gradients([(m[name], w) for m, w in parts])
            for part in flow.grad_rows:
                flow.drop_stash(part, i)
            self.report(f"gradients, block {n - i}/{n}", n - i, n)
        self.tick("gradients")
        return out

    def _block_gradients(
        self, block: nn.Module, modules: dict[str, nn.Module], flow: _Flow, part: str, i: int,
        upstream: list[torch.Tensor], fisher: bool,
    ) -> dict[str, Any]:  # fmt: skip
        """One part's gradient statistics of block i's targets; `upstream` (the loss gradients at the block's
        output, one per gradient window) is replaced by the gradients at its input."""
        from lowrank_compress.calibration import LayerStats, OutputGrads

        grads = {n: OutputGrads() for n in modules}
        rows: dict[str, torch.Tensor] = {}

        def hook(name: str) -> Callable[..., None]:
            def fn(module: nn.Module, args: Any, output: torch.Tensor) -> None:
                output.register_hook(grads[name].add)

            return fn

        weights = [m.weight for m in modules.values()] if fisher else []
        handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
        try:
            for w in weights:
                w.requires_grad_(True)
            for k, h in enumerate(flow.stashed(part, i)):
                h = h.to(self.streamed.device).requires_grad_(True)
                with torch.enable_grad():
                    out = self.streamed.run_block(block, h, flow.grad_ctx[part][k])
                    got = torch.autograd.grad(out, [h, *weights], grad_outputs=upstream[k])
                upstream[k] = got[0].detach()
                for (name, m), g in zip(modules.items(), got[1:], strict=False):  # empty without fisher
                    r = g.detach().double().pow(2).sum(dim=0 if is_conv1d(m) else 1)
                    rows[name] = r if name not in rows else rows[name] + r
        finally:
            for w in weights:
                w.requires_grad_(False)
            for h in handles:
                h.remove()
        tokens = int(flow.ids[part].numel())
        return {
            n: LayerStats(torch.empty(0), torch.empty(0), tokens, rows.get(n), g.mean(), g.channels())
            for n, g in grads.items()
        }

    def _mean_loss(self, flow: _Flow, part: str) -> float:
        """The source model's mean next-token loss on one calibration part, from the last block's outputs (call it
        inside `streamed.outer()`, which holds the head)."""
        with torch.no_grad():
            losses = [
                self.streamed.head_loss(
                    h.to(self.streamed.device), flow.ids[part][b * BATCH : (b + 1) * BATCH], per_row=True
                )
                for b, h in enumerate(flow.hidden[part])
            ]
        return float(torch.cat(losses).mean())

    def _record_calibration(self, flow: _Flow) -> None:
        """calibration_info for report.json, with the narrow-text check (the model's loss on each part, from the
        last block's outputs) when both parts are there."""
        from lowrank_compress.calibration import narrow_calibration_warning
        from lowrank_compress.text import text_fingerprint

        settings, batches = self.settings, self.calibration_batches
        notes = list(self._notes)
        perplexity = None
        if len(batches) == 2:
            with self.streamed.outer(embeddings=False):  # the head read once for both parts
                mean_loss = {part: self._mean_loss(flow, part) for part in batches}
            perplexity = {part: math.exp(v) for part, v in mean_loss.items()}
            narrow = narrow_calibration_warning(
                mean_loss["text"], mean_loss["self"], self.part_weights["self"]
            )
            if narrow:
                notes.append(narrow)
                self.warn(narrow)
        sha = {}
        if "text" in batches:
            sha["text"] = text_fingerprint(self._text or "")
        if "self" in batches:
            sha["self"] = hashlib.sha256(batches["self"].numpy().tobytes()).hexdigest()  # of the token ids
        grads = {part: len(self.grad_rows.get(part, [])) for part in ("text", "self")}
        self.calibration_info = {
            "source": settings.calibration,
            "split": "calibration" if "text" in batches else None,
            "samples": settings.samples,
            "seq_len": settings.seq_len,
            "tokens": sum(int(b.numel()) for b in batches.values()),
            "text_sha256": sha.get("text", sha.get("self")),
            "seed": settings.seed,
            "grad_samples": sum(grads.values()),
            # where the loss gradients came from (None: none measured); "answers": the model's greedy answers
            "grad_source": self._grad_source(),
            "self_mix": self.part_weights.get("self", 0.0),
            "self_start": settings.self_start if "self" in batches and self._free_windows() else None,
            "self_temperature": settings.self_temperature if "self" in batches else None,
            # chat samples: answers end at their end of turn (or this many tokens), several to a window
            "self_answer_tokens": settings.self_answer_tokens if "self" in batches and self._chat else None,
            # chat samples: the share of the sampled windows that were conversations (the rest free text)
            "chat_share": settings.chat_share if "self" in batches and self._chat else None,
            # windows were conversations through the tokenizer's chat template (--chat, and it has one): the samples,
            # and with chat_text the text windows too
            "chat": self._chat,
            "chat_text": self._chat_text,
            "parts": {
                part: {
                    "samples": batches[part].shape[0],
                    "seq_len": batches[part].shape[1],
                    "tokens": int(batches[part].numel()),
                    "sha256": sha[part],
                    "grad_samples": grads[part],
                }
                if part in batches
                else None
                for part in ("text", "self")
            },  # fmt: skip
            "perplexity": perplexity,  # the source model's on each part: the narrow-text check
            "warnings": notes,
            # how the self-generated windows were sampled: every block in memory, or each read per token
            "self_sampling": self._sampling,
            "self_sampling_peak_mb": self._sampling_peak_mb,
            "error_aware": settings.error_aware,
            "loss_weighted": settings.loss_weighted,
            "refine_steps": settings.refine_steps,
        }

    # -- pass 2 --

    def write(
        self,
        out: str | Path,
        budget: float,
        *,
        overwrite: bool = False,
        max_shard_size: str | int = "2GB",
        evaluate: bool = False,
        checkpoint: Path | None = None,
    ) -> FactorizeResult:
        """Allocate ranks for `budget`, then stream the output block by block (pass 2), atomically. `checkpoint`:
        pass 1's checkpoint, where pass 2 records its progress block by block and takes up a progress recorded
        there at the same budget and settings (pass2_progress.py; one run at a time records there)."""
        from lowrank_compress.format import atomic_output_dir
        from lowrank_compress.pass2_progress import claimed
        from lowrank_compress.writer import ShardWriter

        result, ranks = self._allocated(Path(out), budget)
        settings = result.settings
        progress = self._pass2_progress(checkpoint, settings, ranks, max_shard_size)
        with (
            claimed(progress, self.warn) as progress,
            atomic_output_dir(out, overwrite, protected_inputs(self.source, settings)) as tmp,
        ):
            self.pass2_held = progress is not None
            writer, resumed = (
                progress.writer(max_shard_size, self.warn)
                if progress is not None
                else (ShardWriter(tmp, max_shard_size), None)
            )
            result.layers, dtype = self._stream_factors(ranks, writer, progress, resumed)
            result.pass2_resumed_at = resumed[0]["blocks_done"] + 1 if resumed is not None else None
            # the recorded shards stay until OUT is in place: a stop while it is completed loses no block
            self._complete(tmp, writer.finalize(into=tmp, keep=progress is not None), result, dtype, evaluate)
        if progress is not None:
            progress.remove()
        return result

    def _allocated(self, out: Path, budget: float) -> tuple[FactorizeResult, dict[str, int | None]]:
        """The ranks for `budget`, and the result they start (its settings at that budget)."""
        from lowrank_compress.allocate import allocate

        settings = dataclasses.replace(self.settings, budget=budget).validate()
        ranks = allocate(
            self.candidates, budget, settings.policy, energy=settings.energy, multiple=settings.rank_multiple
        )
        self.tick("allocate")
        result = FactorizeResult(
            output=out, settings=settings, layers=[], total_params_before=self.total_before, total_params_after=0,
            target_params_before=0, target_params_after=0, calibration=self.calibration_info, timings={},
        )  # fmt: skip
        self._report_spectra = {
            c.name: c.decomposition.s for c in self.candidates if c.decomposition is not None
        }
        return result, ranks

    def _complete(
        self, tmp: Path, written: list[Path], result: FactorizeResult, dtype: torch.dtype, evaluate: bool
    ) -> None:
        """After pass 2's shards (`written`): the model's other files, the counts from what was written, the
        evaluation if asked, and the report and recipe, all into `tmp`."""
        from lowrank_compress.format import quantization_config, write_model_files

        settings, tick = result.settings, self.tick
        result.spectra = _extreme_spectra(result.layers, self._report_spectra)
        kept = {x.name: x.rank for x in result.layers if x.rank is not None}
        quant = {"method": settings.method, "policy": settings.policy, "budget": settings.budget}
        if self.needs_data:
            quant["error_aware"] = settings.error_aware
        written += write_model_files(
            tmp, self.streamed.model, quantization_config(kept, quant), dtype=dtype, tokenizer=self.tokenizer,
            source_dir=self.source.directory,
        )  # fmt: skip
        shapes = written_shapes(tmp)
        result.total_params_after = sum(math.prod(s) for s in shapes.values())
        result.target_params_before = sum(x.params_before for x in result.layers)
        result.target_params_after = sum(_written_target_params(shapes, x) for x in result.layers)
        tick("factors and write")
        if evaluate:
            result.evaluation = self._evaluate(tmp, result.output)
            tick("evaluate")
        result.timings = dict(tick.laps)
        result.peak_block_mb = max(self.block_peaks, default=0.0)
        result.resumed_from = str(self.resumed_from) if self.resumed_from else None
        result.pass1_resumed_after = self.pass1_resumed_after
        result.files = sorted({p.name for p in written} | {"recipe.yaml", "report.json", "README.md"})
        _write_sidecars(tmp, result, self.model_path)

    def _pass2_progress(
        self, checkpoint: Path | None, settings: FactorizeSettings, ranks: dict[str, int | None],
        max_shard_size: str | int,
    ) -> Pass2Progress | None:  # fmt: skip
        """Where pass 2 records its progress (None without a checkpoint), keyed by what its output depends on."""
        from lowrank_compress.pass2_progress import Pass2Progress
        from lowrank_compress.writer import parse_size

        if checkpoint is None:
            return None
        key = {
            "settings": dataclasses.asdict(settings),
            "ranks": ranks,
            "shard_size": parse_size(max_shard_size),
        }
        return Pass2Progress(checkpoint, key)

    def _evaluate(self, written: Path, out: Path) -> dict[str, Any]:
        """`factorize --evaluate`: the written model against the source, as `evaluate` reports it (under OUT's name,
        not the temporary directory's)."""
        from lowrank_compress.evaluate import evaluate_models

        evaluation = evaluate_models(
            written,
            self.model_path,
            device=self.settings.device,
            allow_pickle=self.allow_pickle,
            progress=self.report,
        ).to_dict()
        evaluation["models"][0]["path"] = str(out)
        return evaluation

    def _stream_factors(
        self, ranks: dict[str, int | None], writer: Any, progress: Any = None,
        resumed: tuple[dict[str, Any], dict[str, torch.Tensor]] | None = None,
    ) -> tuple[list[LayerResult], torch.dtype]:  # fmt: skip
        """Pass 2: the outer tensors copied as stored; then per block, its targets factorized at their ranks (fitted
        to the dense block's inputs, or error-aware to the compressed prefix's), refined if asked, and written with
        the block's other tensors as stored; recorded in `progress` when given (after the last block, and after others
        at most once a minute), and pass 2 taken up after the blocks `resumed` records. Returns each target's result and the factors' dtype."""
        streamed, ckpt = self.streamed, self.streamed.ckpt
        fit_needs_data = self.settings.method in ("whiten", "asvd") or self.settings.refine_steps > 0
        flow = _Flow(self) if fit_needs_data else None
        layers: dict[str, LayerResult] = {}
        dtype = torch.float32
        measured = set(self._report_spectra)  # pass 1's; pass 2 adds the others
        start = 0
        if resumed is not None:
            start, dtype = self._take_up_pass2(resumed, flow, layers)
        else:
            for name in streamed.outer_tensors():
                writer.add(name, ckpt.read_stored(name))
        n = len(streamed.blocks)
        for i in range(start, n):
            with streamed.block(i) as block, PeakMemory(streamed.device) as peak:
                dtype = self._pass2_block(i, block, ranks, flow, layers, writer) or dtype
            self.block_peaks.append(peak.mb)
            if progress is not None and (progress.due() or i + 1 == n):  # (the last: a stop after loses none)
                self._record_pass2(progress, i + 1, writer, flow, layers, dtype, measured)
            self.report(f"pass 2, block {i + 1}/{n} (peak {peak.mb:,.0f} MB)", i + 1, n)
        return [layers[t.name] for t in self.targets], dtype

    def _pass2_block(
        self, i: int, block: nn.Module, ranks: dict[str, int | None], flow: _Flow | None,
        layers: dict[str, LayerResult], writer: Any,
    ) -> torch.dtype | None:  # fmt: skip
        """Block i (loaded): its targets factorized and written with its other tensors, the flow advanced past
        it; returns the factors' dtype (None where it has none)."""
        streamed, modules = self.streamed, self._block_targets(i)
        outputs = None  # the compressed block's outputs, where the fit already ran it
        if flow is not None and self.settings.error_aware:
            swapped, outputs = self._fit_in_order(block, modules, ranks, flow, layers)
        else:
            stats = (
                self._pass2_stats(block, modules, flow) if flow is not None else self._fisher_stats(modules)
            )
            swapped = self._fit_group(list(modules), ranks, stats, layers)
        if flow is not None:
            if swapped and self.settings.refine_steps:
                _refine(streamed, block, swapped, flow, self.settings.refine_steps)
                outputs = None
            # the compressed prefix's hidden states are needed by the error-aware fit and the refinement
            track = self.settings.error_aware or self.settings.refine_steps > 0
            flow.advance(block, compressed=track and (bool(swapped) or flow.shifted), outputs=outputs)
        dtype = self._write_block(i, swapped, writer)
        for name in swapped:
            streamed.set_block_module(name, modules[name])
        return dtype

    def _record_pass2(
        self, progress: Any, done: int, writer: Any, flow: _Flow | None, layers: dict[str, LayerResult],
        dtype: torch.dtype, measured: set[str],
    ) -> None:  # fmt: skip
        """What the block after the first `done` starts from (see pass2_progress.py)."""
        tensors = {f"spectrum.{n}": s for n, s in self._report_spectra.items() if n not in measured}
        if flow is not None:
            kinds = {"hidden": flow.hidden, **({"compressed": flow.compressed} if flow.shifted else {})}
            for kind, parts in kinds.items():
                tensors.update(
                    {f"{kind}.{part}.{b}": h for part, hs in parts.items() for b, h in enumerate(hs)}
                )
        state = {
            "writer": writer.state(), "layers": [dataclasses.asdict(x) for x in layers.values()],
            "dtype": _dtype_name(dtype), "shifted": flow is not None and flow.shifted, "block_peaks": self.block_peaks,
        }  # fmt: skip
        progress.record(done, state, tensors)

    def _take_up_pass2(
        self, resumed: tuple[dict[str, Any], dict[str, torch.Tensor]], flow: _Flow | None,
        layers: dict[str, LayerResult],
    ) -> tuple[int, torch.dtype]:  # fmt: skip
        """Restore a recorded pass 2 (the flow's hidden states, the layers done, the spectra pass 2 measured, the
        block peaks); returns the first block to run and the factors' dtype so far."""
        state, tensors = resumed
        for x in state["layers"]:
            layers[x["name"]] = LayerResult(**{**x, "shape": tuple(x["shape"])})
        for key, t in tensors.items():
            kind, _, rest = key.partition(".")
            if kind == "spectrum":
                self._report_spectra[rest] = t
            elif flow is not None:
                part, _, b = rest.rpartition(".")
                getattr(flow, kind)[part][int(b)] = t.to(flow.store)
        if flow is not None:
            flow.shifted = bool(state["shifted"])
            if not flow.shifted:
                flow.compressed = {part: list(h) for part, h in flow.hidden.items()}
        self.block_peaks = list(state["block_peaks"])
        return int(state["blocks_done"]), getattr(torch, state["dtype"])

    def _fit_group(
        self,
        names: list[str],
        ranks: dict[str, int | None],
        stats: dict[str, Any],
        layers: dict[str, LayerResult],
    ) -> dict[str, nn.Module]:
        """Factorize these targets of the loaded block from their statistics and swap the factors in; each layer's
        statistics (a shared Gram with its last layer) are released as soon as it is done."""
        swapped = {}
        cache: dict[int, Any] = {}
        users = Counter(id(st.gram) for st in stats.values())
        for name in names:
            layer, factors = self._factorize(self._target(name), ranks[name], stats.get(name), cache)
            layers[name] = layer
            if factors is not None:
                swapped[name] = factors
                self.streamed.set_block_module(name, factors)
            _release_stats(stats, name, users, cache)
        return swapped

    def _fit_in_order(
        self, block: nn.Module, modules: dict[str, nn.Module], ranks: dict[str, int | None], flow: _Flow,
        layers: dict[str, LayerResult],
    ) -> tuple[dict[str, nn.Module], dict[str, list[torch.Tensor]] | None]:  # fmt: skip
        """The error-aware fit inside the block as well as across blocks: the targets in the order they run, one
        group of layers reading the same input at a time (q/k/v, o, gate/up, down), each fitted to its dense inputs X
        and to the inputs X' it sees when the block is fed the compressed prefix with the groups before it already
        factorized. So o_proj corrects what factorizing q/k/v changed, down_proj what gate/up changed.

        The dense inputs X of every group come from the one dense pass that also gives the block's outputs; the
        inputs X' from one compressed pass per batch, all run in lockstep and paused at each group until it is
        fitted (a pass per group cost about as much as the rest of pass 2). Returns the factors and the compressed
        block's outputs per part and batch (None where the block stays dense behind a dense prefix: they are the
        dense outputs)."""
        from lowrank_compress.lockstep import Lockstep

        scales = self._part_scales()
        dense_inputs = self._dense_pass(block, modules, flow, scales)
        if not flow.shifted and all(ranks[n] is None for n in modules):
            return self._fit_group(list(modules), ranks, {}, layers), None
        group_of = {n: group for group in _groups_in_order(modules, dense_inputs) for n in group}
        batches = [(part, b) for part in flow.ids for b in range(len(flow.compressed[part]))]
        jobs = [functools.partial(flow.run, block, part, b, flow.compressed[part][b]) for part, b in batches]
        fitted: dict[str, nn.Module] = {}  # what each target is once its group is fitted: factors, or itself
        with (
            Lockstep(jobs) as lockstep,
            _gated(modules, lambda name, x: _wait_for_fit(lockstep, name, x, fitted)),
        ):
            for name, parked in lockstep.pauses():
                group = group_of[name]
                moved = {batches[j]: x for j, x in parked}
                shifted = flow.shifted or any(fitted[n] is not modules[n] for n in fitted)
                sums = self._group_sums({n: modules[n] for n in group}, moved, dense_inputs, scales, shifted)
                moved = parked = None
                factors = self._fit_group(group, ranks, sums, layers)
                fitted.update({n: factors.get(n, modules[n]) for n in group})
        outputs: dict[str, list[torch.Tensor]] = {part: [] for part in flow.ids}
        for (part, _), out in zip(batches, lockstep.results, strict=True):
            outputs[part].append(out)
        return {n: m for n, m in fitted.items() if m is not modules[n]}, outputs

    def _dense_pass(
        self, block: nn.Module, modules: dict[str, nn.Module], flow: _Flow, scales: dict[str, float]
    ) -> dict[str, list[dict[str, torch.Tensor]]]:
        """The dense block on the dense hidden states: its outputs (the targets of the fit, and the next block's
        dense inputs) and, per part and batch, every target's input (kept where the flow keeps hidden states)."""
        from lowrank_compress.calibration import BlockStatistics

        kept: dict[str, list[dict[str, torch.Tensor]]] = {part: [] for part in flow.ids}
        for part in flow.ids:
            for b in range(len(flow.hidden[part])):
                with BlockStatistics(modules if scales[part] else {}).record() as seen:
                    flow.dense_out[part][b] = flow.run(block, part, b, flow.hidden[part][b])
                stored: dict[int, torch.Tensor] = {}  # layers reading one tensor keep sharing it
                kept[part].append({n: stored.setdefault(id(x), x.to(flow.store)) for n, x in seen.items()})
        return kept

    def _group_sums(
        self, group: dict[str, nn.Module], moved: dict[tuple[str, int], torch.Tensor],
        dense_inputs: dict[str, list[dict[str, torch.Tensor]]], scales: dict[str, float], shifted: bool,
    ) -> dict[str, Any]:  # fmt: skip
        """One group's error-aware sums: its kept dense inputs (taken out of `dense_inputs`) paired, batch by batch,
        with the inputs X' it saw in the compressed pass (`moved`, by part and batch; the same as the dense ones
        while nothing before the group differs, then only X^T X is summed)."""
        sums = self._block_sums(group)
        device = self.streamed.device
        for (part, b), x_moved in moved.items():
            if not scales[part]:
                continue
            kept = {n: dense_inputs[part][b].pop(n) for n in group}  # used once: they leave the store here
            on_device: dict[int, torch.Tensor] = {}  # layers reading one tensor share their sums by it
            dense = {n: on_device.setdefault(id(x), x.to(device)) for n, x in kept.items()}
            sums.add(dense, dict.fromkeys(group, x_moved) if shifted else None, weight=scales[part])
            kept = dense = None
        return sums.stats()

    def _pass2_stats(self, block: nn.Module, modules: dict[str, nn.Module], flow: _Flow) -> dict[str, Any]:
        """The block's pooled statistics of its dense inputs X for the fit (the fit to the dense model's inputs,
        `--no-error-aware`). Also computes the dense block's outputs."""
        scales = self._part_scales()
        sums = self._block_sums(modules)
        for part in flow.ids:
            for b in range(len(flow.hidden[part])):
                with sums.record() as dense:
                    flow.dense_out[part][b] = flow.run(block, part, b, flow.hidden[part][b])
                if modules and scales[part]:
                    sums.add(dense, weight=scales[part])
                dense = None
        return sums.stats() if modules else {}

    def _part_scales(self) -> dict[str, float]:
        """The factor on each calibration part's sums that pools the parts by their weights (`part_scales`)."""
        from lowrank_compress.calibration import part_scales

        tokens = {part: int(ids.numel()) for part, ids in self.calibration_batches.items()}
        return part_scales(self.part_weights, tokens)

    def _fisher_stats(self, modules: dict[str, nn.Module]) -> dict[str, Any]:
        """The Fisher rows pass 1 measured, as the statistics the fisher method reads (empty for other methods)."""
        from lowrank_compress.calibration import LayerStats

        if self.settings.method != "fisher":
            return {}
        tokens = sum(int(b.numel()) for b in self.calibration_batches.values())
        return {n: LayerStats(torch.empty(0), torch.empty(0), tokens, self._gradients[n][0]) for n in modules}

    def _factorize(
        self, t: Target, rank: int | None, stats: Any, cache: dict[int, Any]
    ) -> tuple[LayerResult, nn.Module | None]:
        from lowrank_compress.modules import LowRankLinear

        shape = (t.out_features, t.in_features)
        dense = t.out_features * t.in_features
        if rank is None:
            return LayerResult(t.name, shape, None, dense, dense, 0.0, self._stable_rank(t, None)), None
        if not self._reads_weights_in_pass1:  # else pass 1 checked it
            _check_finite(t)
        dec = self._decompose(t, stats, cache, consume=True)  # pass 2 drops each layer's statistics after it
        stable = self._stable_rank(t, dec)
        self._report_spectra.setdefault(t.name, dec.s.float().cpu())  # where pass 1 measured none
        err = dec.truncation_error()
        rel = math.sqrt(float(err[rank]) / float(err[0])) if float(err[0]) > 0 else 0.0
        up, down = dec.factors(rank, dtype=torch.float32)
        bias = t.module.bias.detach() if t.module.bias is not None else None
        device = t.module.weight.device
        module = LowRankLinear.from_factors(up.to(device), down.to(device), bias)
        module.requires_grad_(False)
        return LayerResult(t.name, shape, rank, dense, rank * sum(shape), rel, stable), module

    def _stable_rank(self, t: Target, dec: Decomposition | None) -> float:
        """Pass 1's estimate; else exact from pass 2's spectrum of W (method svd); else measured now."""
        from lowrank_compress.spectrum import stable_rank

        if t.name in self._measured_stable:
            return self._measured_stable[t.name]
        if dec is not None and dec.method == "svd":
            return stable_rank(dec.s)
        return _estimated_stable_rank(t.weight())

    def _write_block(self, i: int, swapped: dict[str, nn.Module], writer: Any) -> torch.dtype | None:
        """Block i's tensors: factors in the stored dtype of the weight they replace, the rest as stored."""
        streamed, ckpt = self.streamed, self.streamed.ckpt
        factor_of = {streamed.ckpt_name[f"{name}.weight"]: (name, m) for name, m in swapped.items()}
        dtype = None
        for stored in streamed.block_tensors(i):
            if stored not in factor_of:
                writer.add(stored, ckpt.read_stored(stored))
                continue
            _, module = factor_of[stored]
            dtype = ckpt.stored_dtype(stored)
            base = stored.removesuffix(".weight")
            writer.add(f"{base}.down.weight", module.down.weight.to(dtype))
            writer.add(f"{base}.up.weight", module.up.weight.to(dtype))
        return dtype


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _release_stats(stats: dict[str, Any], name: str, users: Counter, cache: dict[int, Any]) -> None:
    """A layer's statistics leave `stats`; a shared Gram and its Cholesky factor go with their last layer."""
    used = stats.pop(name, None)
    if used is not None:
        users[id(used.gram)] -= 1
        if not users[id(used.gram)]:
            cache.pop(id(used.gram), None)


class _Flow:
    """The calibration windows' hidden states on their way through the blocks, per part ("text", "self"), or the
    gradient windows' alone (`windows`: some of the calibration windows, or the answer windows).

    `hidden` are the dense model's (the inputs of the block about to run); in pass 2 `compressed` are the
    compressed prefix's (the same tensors until a block is factorized: `shifted` says when they part) and
    `dense_out` the dense block's outputs, the targets of the fit. The inputs of the gradient windows are stashed on
    disk for the block-wise backward pass. With --offload they live on the CPU and visit the device per batch.
    """

    def __init__(
        self, prepared: Prepared, *, stash: bool = False,
        windows: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:  # fmt: skip
        """`stash`: the gradient windows among the calibration windows keep their inputs of every block for a
        backward pass; `windows`: the flow holds these gradient windows alone (token ids, loss labels) and stashes
        them."""
        streamed, settings = prepared.streamed, prepared.settings
        self.streamed = streamed
        self.store = torch.device("cpu") if settings.offload else streamed.device
        self.ids = prepared.calibration_batches
        self.labels = self.ids
        self.grad_rows = {part: rows for part, rows in prepared.grad_rows.items() if rows} if stash else {}
        if windows is not None:
            self.ids = {part: ids for part, (ids, _) in windows.items()}
            self.labels = {part: labels for part, (_, labels) in windows.items()}
            self.grad_rows = {part: list(range(len(ids))) for part, ids in self.ids.items()}
        with streamed.outer():
            self.ctx = {part: streamed.capture(rows, BATCH) for part, rows in self.ids.items()}
            self.grad_ctx = {
                part: streamed.capture(self.ids[part][rows], 1) for part, rows in self.grad_rows.items()
            }
        self.hidden = {part: [c.hidden.to(self.store) for c in ctx] for part, ctx in self.ctx.items()}
        self.compressed = {part: list(h) for part, h in self.hidden.items()}
        self.dense_out: dict[str, list[Any]] = {part: [None] * len(h) for part, h in self.hidden.items()}
        # the gradient windows' inputs of every block, spilled to disk so that memory does not grow with depth
        from lowrank_compress.outdir import scratch_dir

        self._spill = scratch_dir("stash", prepared.warn) if self.grad_rows else None
        self.shifted = False

    def run(self, block: nn.Module, part: str, b: int, hidden: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = self.streamed.run_block(block, hidden.to(self.streamed.device), self.ctx[part][b])
        return out.to(self.store)

    def row(self, part: str, r: int) -> torch.Tensor:
        """Window r's current hidden states (1 x seq x hidden)."""
        return self.hidden[part][r // BATCH][r % BATCH : r % BATCH + 1]

    def stash_inputs(self, part: str, i: int) -> None:
        """Keep block i's inputs of the gradient windows for the backward pass (on disk)."""
        from safetensors.torch import save_file

        rows = self.grad_rows.get(part)
        if rows:
            tensors = {str(k): self.row(part, r).to("cpu").contiguous() for k, r in enumerate(rows)}
            save_file(tensors, self._stash_path(part, i))

    def stashed(self, part: str, i: int) -> list[torch.Tensor]:
        from safetensors.torch import load_file

        tensors = load_file(self._stash_path(part, i))
        return [tensors[str(k)] for k in range(len(tensors))]

    def drop_stash(self, part: str, i: int) -> None:
        Path(self._stash_path(part, i)).unlink(missing_ok=True)

    def _stash_path(self, part: str, i: int) -> str:
        assert self._spill is not None
        return str(Path(self._spill.name) / f"{part}-{i}.safetensors")

    def advance(
        self, block: nn.Module, compressed: bool, outputs: dict[str, list[torch.Tensor]] | None = None
    ) -> None:
        """After block i of pass 2: the dense hidden states become the dense block's outputs; the compressed ones
        go through the (factorized) block when the prefix differs from the dense model (or are its `outputs`, where
        the fit already ran it), else follow the dense."""
        for part in self.ids:
            if compressed and outputs is not None:
                self.compressed[part] = outputs[part]
            elif compressed:
                self.compressed[part] = [
                    self.run(block, part, b, h) for b, h in enumerate(self.compressed[part])
                ]
            else:
                self.compressed[part] = list(self.dense_out[part])
            self.hidden[part] = self.dense_out[part]
            self.dense_out[part] = [None] * len(self.hidden[part])
        self.shifted = self.shifted or compressed


def _groups_in_order(
    modules: dict[str, nn.Module], dense_inputs: dict[str, list[dict[str, torch.Tensor]]]
) -> list[list[str]]:
    """The targets in the order the block called them in the dense pass, grouped by the input they read."""
    seen = next((batches[0] for batches in dense_inputs.values() if batches and batches[0]), {})
    missing = [n for n in modules if n not in seen]
    if missing:
        raise LowrankError(
            f"calibration target {missing[0]} was never called during the block's forward pass"
        )
    groups: dict[int, list[str]] = {}
    for name, x in seen.items():
        groups.setdefault(id(x), []).append(name)
    return list(groups.values())


@contextlib.contextmanager
def _gated(modules: dict[str, nn.Module], wait: Callable[[str, torch.Tensor], nn.Module]) -> Iterator[None]:
    """While inside, calling one of `modules` first asks `wait(name, input)` what it is now (it may pause there until
    its group is fitted) and runs that: its factors, or itself. Patches the instances' forward, as accelerate's
    hooks do, so every attribute the model code reads on the layer stays."""

    def gate(name: str, module: nn.Module, forward: Callable[..., Any]) -> Callable[..., Any]:
        def gated_forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            now = wait(name, x)
            return forward(x, *args, **kwargs) if now is module else now(x, *args, **kwargs)

        return gated_forward

    # an earlier patch of an instance's forward, if any, comes back afterwards
    own = {name: module.__dict__.get("forward") for name, module in modules.items()}
    for name, module in modules.items():
        module.forward = gate(name, module, module.forward)
    try:
        yield
    finally:
        for name, module in modules.items():
            if own[name] is None:
                del module.forward
            else:
                module.forward = own[name]


def _wait_for_fit(lockstep: Any, name: str, x: torch.Tensor, fitted: dict[str, nn.Module]) -> nn.Module:
    """In a compressed pass of the in-order fit: pause at the first layer of a group not yet fitted."""
    if name not in fitted:
        lockstep.pause(name, x)
    return fitted[name]


def _refine(streamed: Any, block: nn.Module, swapped: dict[str, nn.Module], flow: _Flow, steps: int) -> None:
    """A few Adam steps on the block's factors so that the compressed block, fed the compressed prefix's hidden
    states, reproduces the dense block's outputs (AA-SVD's block-wise refinement); relative mean squared error."""
    params = [p for m in swapped.values() for p in (m.up.weight, m.down.weight)]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=REFINE_LR)
    batches = [(part, b) for part in flow.ids for b in range(len(flow.hidden[part]))]
    device = streamed.device
    try:
        for step in range(steps):
            part, b = batches[step % len(batches)]
            target = flow.dense_out[part][b].to(device)
            with torch.enable_grad():
                out = streamed.run_block(block, flow.compressed[part][b].to(device), flow.ctx[part][b])
                loss = (out - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-30)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None


REFINE_LR = 1e-4
"""Adam's step for --refine-steps: factors are balanced (entries of order 1e-2), so 1e-4 moves them by about 1%."""


def _write_sidecars(directory: Path, result: FactorizeResult, model_path: str | Path) -> None:
    from lowrank_compress.report import factorize_model_card, write_json

    header = f"# lowrank-compress {__version__} factorize recipe for {model_path}\n# reuse: lowrank-compress factorize MODEL -o OUT --recipe recipe.yaml"
    (directory / "recipe.yaml").write_text(result.settings.to_yaml(header))
    write_json(directory / "report.json", result.to_dict())
    (directory / "README.md").write_text(factorize_model_card(result.to_dict(), str(model_path)))


def _check_finite(t: Target) -> None:
    if not bool(torch.isfinite(t.weight()).all()):
        raise LowrankError(
            f"{t.name} has NaN or Inf weights; fix the checkpoint or keep the layer dense with --ignore '{t.name}'"
        )


def _estimated_stable_rank(w: torch.Tensor) -> float:
    """The stable rank with the spectral norm by at most 20 block power steps: reported, and read by the
    stable-rank policy, where a few parts in a thousand do not matter. Trained weights converge in a few steps;
    random ones (scale benchmarks) do not: on a random 11008 x 4096 matrix 60 steps took 12.7 s for a 2e-3 error in
    the stable rank, 20 steps 4.4 s for 2e-2, against 10 s for LAPACK's exact norm (2 cores)."""
    from lowrank_compress.spectrum import spectrum_stats

    return spectrum_stats(w, fast=True, tol=1e-4, iters=20).stable_rank


def _extreme_spectra(
    layers: list[LayerResult], spectra: dict[str, torch.Tensor], n: int = 3
) -> dict[str, list[float]]:
    """s / s_max (five digits) of the n most and n least compressible factorized layers (stable rank over
    break-even rank), for reports."""
    from lowrank_compress.spectrum import break_even_rank

    measured = [x for x in layers if x.name in spectra]
    ranked = sorted(measured, key=lambda x: x.stable_rank / break_even_rank(*x.shape))
    out = {}
    for x in ranked[:n] + ranked[max(n, len(ranked) - n) :]:
        s = spectra[x.name]
        top = float(s[0]) if s.numel() and float(s[0]) > 0 else 1.0
        out[x.name] = [float(f"{float(v) / top:.5g}") for v in s]
    return out


def written_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor in the written safetensors files with its shape, read from the headers (what a user would count)."""
    import json
    import struct

    shapes: dict[str, tuple[int, ...]] = {}
    for f in sorted(directory.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        shapes.update({k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"})
    return shapes


def _written_target_params(shapes: dict[str, tuple[int, ...]], layer: LayerResult) -> int:
    """A target's weight parameters as written: both factors, or the dense weight (biases are not counted)."""
    names = (
        [f"{layer.name}.weight"]
        if layer.rank is None
        else [f"{layer.name}.down.weight", f"{layer.name}.up.weight"]
    )
    missing = [n for n in names if n not in shapes]
    if missing:
        raise LowrankError(f"internal: the written model lacks {missing[0]}")
    return sum(math.prod(shapes[n]) for n in names)


class _Stopwatch:
    def __init__(self) -> None:
        self.t = time.perf_counter()
        self.laps: dict[str, float] = {}
        # the time a stopped run spent on the phase it stopped in: added to that phase's lap here
        self.carried: dict[str, float] = {}

    def __call__(self, phase: str) -> None:
        now = time.perf_counter()
        self.laps[phase] = round(now - self.t + self.carried.pop(phase, 0.0), 3)
        self.t = now

    def running(self, phase: str) -> float:
        """The time spent so far on `phase`, under way (not yet lapped)."""
        return round(time.perf_counter() - self.t + self.carried.get(phase, 0.0), 3)
