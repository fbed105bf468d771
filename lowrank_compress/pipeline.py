"""`factorize_model`: the whole factorize job, from a checkpoint to a written lowrank output, one block at a time.

open the checkpoint (a skeleton on the meta device) -> pick targets -> calibration windows -> pass 1, block by
block: statistics, spectra, then gradients backwards (the gradients first where the spectra read them) -> ranks for
the whole model under the budget -> pass 2, block by block: factors fitted to the dense block's outputs from the
compressed prefix's inputs, streamed into shards -> config, recipe.yaml, report.json, model card -> atomic rename.

Here: the job, `Prepared` (its state, the calibration windows and pass 1's checkpoint); pass1.py and pass2.py hold
the passes (methods of `Prepared`), flow.py the hidden states they carry, results.py what they return.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lowrank_compress.console import interrupt_message, signal_received
from lowrank_compress.errors import InterruptedWithCheckpoint, LowrankError
from lowrank_compress.memory import PeakMemory
from lowrank_compress.pass1 import Pass1, fit_settings
from lowrank_compress.pass2 import Pass2
from lowrank_compress.recipe import FactorizeSettings
from lowrank_compress.results import FactorizeResult, Target, find_targets
from lowrank_compress.sequential import dtype_name

if TYPE_CHECKING:
    from lowrank_compress.factorize import Decomposition
    from lowrank_compress.pass1_checkpoint import Recorder

ProgressFn = Callable[[str, int, int], None]  # (phase, done, total)


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
    from lowrank_compress.outdir import named_inputs, remove_ours
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


class Prepared(Pass1, Pass2):
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
        return self.settings.reads_calibration

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
        from lowrank_compress.recipe import REFINE_STEPS

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
        if settings.refine_steps is None:  # the default: with the fit it was measured on
            settings = dataclasses.replace(
                settings, refine_steps=REFINE_STEPS if settings.method == "whiten" else 0
            )
        if settings.loss_weighted and settings.method != "whiten":
            settings = dataclasses.replace(settings, loss_weighted=False)
            self.warn(f"--loss-weighted is for --method whiten; fitting {settings.method} without it")
        if (
            settings.self_mix > 0
            and not causal
            and settings.calibration != SELF
            and settings.reads_calibration
        ):
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
                f"{dtype_name(dtype)}, the dtype its checkpoint stores"
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
        self._sampling = "streamed" if dtype is None else f"resident ({dtype_name(dtype)})"
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
                spectra[name] = {"method": dec.method, "ridge": dec.ridge, "dtype": dtype_name(dec.u.dtype)}
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
            self.calibration_info = {**state["calibration"], **fit_settings(settings)}
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
