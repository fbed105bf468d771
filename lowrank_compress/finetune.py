"""`finetune`: win quality back after compression, QLoRA style, and keep the model factorized.

load MODEL -> pack the text into sequences -> held-out perplexity before -> (NF4-quantize the frozen base) -> the
training methods' setup (training/methods.py) -> peft adapters around each layer, or the factors themselves
trainable -> AdamW, cosine schedule with warmup, gradient accumulation, bf16 autocast where the device supports it, on
accelerate (training/loop.py), the methods called at fixed points of each step -> checkpoints every N steps (and on
Ctrl-C) through accelerate's save_state (training/state.py) -> perplexity after -> write OUT atomically: the adapters
in PEFT's format, or the merged model in the lowrank format.

Data order is a pure function of (seed, step), so a resumed run sees exactly the batches the uninterrupted run would
have seen, and its loss curve continues the same one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank_compress.answers import optional_answer_set
from lowrank_compress.errors import InterruptedWithCheckpoint, LowrankError
from lowrank_compress.memory import PeakMemory
from lowrank_compress.outdir import (
    atomic_output_dir,
    check_output_dir,
    data_files,
    remove_ours,
)
from lowrank_compress.recipe import FinetuneSettings
from lowrank_compress.resume import checkpoint_dir_for, default_checkpoint_dir
from lowrank_compress.training import state as checkpoints
from lowrank_compress.training.data import batch_rows, pack, texts
from lowrank_compress.training.loop import Run, train
from lowrank_compress.training.methods import build_methods

__all__ = ["FinetuneResult", "FinetuneSettings", "batch_rows", "default_checkpoint_dir", "finetune", "pack",
           "resolve_precision"]  # fmt: skip

ProgressFn = Callable[[str, int, int, str], None]


@dataclass
class FinetuneResult:
    settings: FinetuneSettings
    model: str
    out: str
    kind: (
        str  # "adapters" (PEFT format), "lowrank" (merged / trained factors) or "dense" (merged dense model)
    )
    data: dict[str, Any]
    steps: int
    losses: list[float]
    perplexity: dict[str, float | None]
    trainable_params: int
    params_before: int
    params_after: int
    precision: str
    device: str
    processes: int
    step_seconds: float
    tokens_per_s: float
    peak_memory_mb: float | None
    timings: dict[str, float]
    quantize: dict[str, Any] | None = None
    merge: dict[str, Any] | None = None
    resumed_from_step: int = 0
    warnings: list[str] = field(default_factory=list)
    methods: dict[str, Any] = field(default_factory=dict)  # what each training method did (methods.py)
    # the answer check (answers.AnswerCheck.to_dict()): "baseline" is MODEL before training, "model" after it
    answers: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["settings"] = dataclasses.asdict(self.settings)
        return d


def resolve_precision(precision: str, device: torch.device) -> str:
    """bf16 where the device multiplies it faster than fp32 (CUDA with bf16, a CPU with AMX tiles), else fp32.
    AVX512-BF16 alone is not enough: on such a CPU a bf16 matmul took 1.8x an fp32 one and a distillation step
    1.9x (7.98 s against 4.19 s)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
        return "bf16" if amx is not None and amx() else "fp32"
    return "fp32"


@dataclass
class _Loaded:
    """MODEL as loaded, with what finetune learned about it."""

    model: nn.Module
    tokenizer: Any
    source: Any
    factorized: bool
    quant_config: dict[str, Any] | None


def finetune(
    model_path: str | Path,
    out: str | Path,
    settings: FinetuneSettings,
    *,
    resume: str | Path | None = None,
    checkpoint_dir: str | Path | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    progress: ProgressFn | None = None,
    warn: Callable[[str], None] | None = None,
    stop_after: int | None = None,
) -> FinetuneResult:
    """Train, evaluate and write OUT (see the module docstring). `stop_after` simulates Ctrl-C after that many
    optimizer steps (for tests): a checkpoint is written and `InterruptedWithCheckpoint` raised."""
    from accelerate.utils import set_seed

    settings.validate()
    out = Path(out)
    report = progress or (lambda phase, done, total, label: None)
    say = warn or (lambda message: None)
    ckpt_dir = _check_dirs(model_path, settings, out, checkpoint_dir, resume, overwrite, warn)
    saved = checkpoints.read(Path(resume), settings, model_path) if resume else None
    answer_set = optional_answer_set(settings.answers)  # a bad file fails before any model is read
    answer_set = answer_set if settings.eval_tokens else None  # --eval-tokens 0: no evaluation at all

    timings: dict[str, float] = {}
    clock = time.perf_counter()
    accelerator = _accelerator()
    precision = resolve_precision(settings.precision, accelerator.device)
    set_seed(settings.seed)
    report("loading", 0, 1, "")
    loaded, settings = _load(model_path, settings, allow_pickle, say)
    teacher = _load_teacher(settings, loaded.model, allow_pickle, accelerator.device, precision)
    rows, eval_text, data_info = _data(loaded.tokenizer, settings, saved, resume, teacher, report)
    timings["load"] = time.perf_counter() - clock

    params_before = _count(loaded.model)
    loaded.model.to(accelerator.device)
    judge = _Judge(loaded, eval_text, answer_set, settings, report)
    judge.measure("before", loaded.model, "fp32")
    timings["eval_before"] = time.perf_counter() - clock - sum(timings.values())

    run = Run(settings=settings, accelerator=accelerator, model=loaded.model, rows=rows,
              total=_total_steps(settings, rows, accelerator.num_processes), precision=precision,
              methods=build_methods(settings), out=str(out), teacher=teacher)  # fmt: skip
    qreport, warnings = _trainable(run, loaded, saved)
    for w in warnings:
        say(w)
    _start(run, saved, resume)
    memory = _train(run, ckpt_dir, model_path, data_info, report, stop_after, timings)
    trainer = accelerator.unwrap_model(run.model)
    trainer.eval()
    judge.measure("after", trainer, precision)
    ppl = judge.perplexity
    result = _result(
        run, model_path, out, loaded, data_info, ppl, params_before, memory, timings, qreport, warnings
    )
    result.answers = judge.answers()
    if accelerator.is_main_process:  # one writer; the other processes wait
        _write(result, trainer, run, loaded, eval_text, model_path, allow_pickle, overwrite, report, warn)
        remove_ours(ckpt_dir, kinds=("checkpoint",), warn=warn)  # OUT holds the result now
    accelerator.wait_for_everyone()
    # several processes (torchrun, accelerate launch): destroy the process group while the interpreter is whole; left
    # to the exit, gloo's threads sometimes abort the process (SIGABRT) after the work is done. Only on success: a
    # process that failed must not wait in a collective for the others.
    accelerator.end_training()
    return result


class _Judge:
    """Held-out perplexity and the answer check, measured before and after training."""

    def __init__(self, loaded: _Loaded, text: str | None, answer_set: Any, settings: FinetuneSettings,
                 report: ProgressFn) -> None:  # fmt: skip
        self.loaded, self.text, self.answer_set = loaded, text, answer_set
        self.settings, self.report = settings, report
        self.perplexity: dict[str, float | None] = {"before": None, "after": None, "merged": None}
        self.asked: dict[str, list[str]] = {}  # "baseline" before training, "model" after

    def measure(self, phase: str, model: nn.Module, precision: str) -> None:
        device = next(model.parameters()).device
        if self.text is not None:
            self.report(f"perplexity {phase}", 0, 1, "")
            self.perplexity[phase] = _perplexity(
                model, self.loaded.tokenizer, self.text, self.settings, device, precision
            )
        if self.answer_set is not None:
            from lowrank_compress.answers import generate_answers

            self.asked["baseline" if phase == "before" else "model"] = generate_answers(
                model, self.loaded.tokenizer, [item.prompt for item in self.answer_set.items], device=str(device),
                progress=lambda done, total: self.report(f"answers {phase}", done, total, ""),
            )  # fmt: skip

    def answers(self) -> dict[str, Any] | None:
        """Both sets of answers judged: right before and after training, and the ones training kept."""
        if self.answer_set is None:
            return None
        from lowrank_compress.answers import MAX_NEW_TOKENS, AnswerCheck
        from lowrank_compress.calibration import has_chat_template

        s = self.answer_set
        outputs = {"model": self.asked["model"], "baseline": self.asked["baseline"]}
        chat = has_chat_template(self.loaded.tokenizer)
        return AnswerCheck(s.source, s.sha256, s.items, outputs, chat, MAX_NEW_TOKENS).to_dict()


def _total_steps(settings: FinetuneSettings, rows: torch.Tensor, world: int) -> int:
    """--steps, or the optimizer steps that --epochs (default one) passes over the rows take."""
    per_step = settings.batch_size * settings.grad_accum * world
    return settings.steps or max(1, math.ceil((settings.epochs or 1.0) * rows.shape[0] / per_step))


def _train(run: Run, ckpt_dir: Path, model_path: str | Path, data: dict[str, Any], report: ProgressFn,
           stop_after: int | None, timings: dict[str, float]) -> PeakMemory:  # fmt: skip
    """The loop, its peak memory measured; Ctrl-C leaves a checkpoint and says how to resume."""
    clock = time.perf_counter()
    memory = PeakMemory(run.device)
    with memory:
        try:
            train(run, report, lambda step: _save(run, ckpt_dir, step, model_path, data), stop_after)
        except KeyboardInterrupt:
            raise InterruptedWithCheckpoint(
                f"interrupted at step {len(run.losses)} of {run.total}; nothing was written to {run.out}; a "
                f"checkpoint is in {ckpt_dir}: run the same command with --resume {ckpt_dir}"
            ) from None
    timings["train"] = time.perf_counter() - clock
    return memory


def _inputs(model_path: str | Path, settings: FinetuneSettings) -> dict[str, Path]:
    """What OUT and the checkpoint directory may neither be, sit inside, nor contain: MODEL, the teacher, and the
    files of --data, --eval-data and --answers."""
    named = {"MODEL": model_path, "--teacher": settings.teacher}
    files = {"--data": settings.data, "--eval-data": settings.eval_data, "--answers": settings.answers}
    return {
        **{what: Path(value) for what, value in named.items() if value},
        **{what: found[0] for what, value in files.items() if (found := data_files(value))},
    }


def _check_dirs(model_path: str | Path, settings: FinetuneSettings, out: Path, checkpoint_dir: str | Path | None,
                resume: str | Path | None, overwrite: bool, warn: Callable[[str], None] | None) -> Path:  # fmt: skip
    """OUT may be written (apart from the inputs, `_inputs`), and the checkpoint directory is apart from OUT and the
    inputs and a checkpoint of ours (or empty): the finished run deletes it. An earlier run's checkpoint
    is not thrown away without --overwrite."""
    inputs = _inputs(model_path, settings)
    check_output_dir(out, overwrite, inputs=list(inputs.values()), warn=warn)
    return checkpoint_dir_for(out, checkpoint_dir, inputs, resume, overwrite, warn)


def _load(model_path: str | Path, settings: FinetuneSettings, allow_pickle: bool,
          say: Callable[[str], None]) -> tuple[_Loaded, FinetuneSettings]:  # fmt: skip
    """MODEL, after the checks that need it (an LM head, settings that fit a dense or factorized model), and the
    settings with --seq-len fitted to the model's context."""
    from lowrank_compress.evaluate import fit_sequence_length
    from lowrank_compress.format import read_quant_config
    from lowrank_compress.loading import load_model

    model, tokenizer, source = load_model(model_path, allow_pickle=allow_pickle)
    factorized = source.is_compressed
    _lm_head(model, f"{model_path}: finetune needs a causal language model (a model with an LM head)")
    _check_model(settings, factorized)
    if settings.quantize == "nf4":
        from lowrank_compress.quantize import require_bitsandbytes

        require_bitsandbytes()
    quant_config = read_quant_config(source.directory) if factorized else None
    seq_len = fit_sequence_length(model, settings.seq_len, "--seq-len", FinetuneSettings.seq_len, say)
    settings = dataclasses.replace(settings, seq_len=seq_len)
    return _Loaded(model, tokenizer, source, factorized, quant_config), settings


def _check_model(settings: FinetuneSettings, factorized: bool) -> None:
    """Settings that need a factorized (or a dense) MODEL."""
    if not factorized and settings.merge_rank == "keep":
        raise LowrankError(
            "--merge-rank keep re-truncates factorized layers to their rank, but MODEL is dense; "
            "use --merge-rank grow (plain merge) or pass a factorize output"
        )
    if factorized and settings.train == "adapters" and settings.merge and settings.merge_rank == "grow":
        from lowrank_compress.adapter_kinds import FULL_RANK

        if settings.adapter in FULL_RANK:
            raise LowrankError(
                f"--adapter {settings.adapter} trains a full-rank update, which cannot grow the factors exactly; "
                "use --merge-rank keep (re-truncated to each layer's rank), --merge-rank break-even (exact: its "
                "layers stored dense) or --no-merge"
            )
    if not factorized and settings.train == "factors":
        raise LowrankError("--train factors needs a factorized MODEL (a `lowrank-compress factorize` output)")


def _accelerator() -> Any:
    """One process per GPU; without a GPU a CPU run, where several processes under `accelerate launch` / torchrun
    become DDP over gloo. More processes on this machine than it has GPUs would share a card, which NCCL refuses
    deep inside the first collective: refused here in one line instead."""
    from accelerate import Accelerator

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # set by torchrun and accelerate launch
    if gpus and processes > gpus:
        raise LowrankError(
            f"{processes} training processes on this machine but {gpus} GPU(s): start at most {gpus} "
            f"(accelerate launch --num_processes {gpus}), or hide the GPUs (CUDA_VISIBLE_DEVICES=) to train on the CPU"
        )
    return Accelerator(mixed_precision="no", cpu=not gpus)


def _load_teacher(settings: FinetuneSettings, model: nn.Module, allow_pickle: bool, device: torch.device,
                  precision: str) -> nn.Module | None:  # fmt: skip
    """--teacher, frozen, on the training device (in bf16 when training is). The KL compares the two models'
    distributions token by token, so its vocabulary must be MODEL's: the model MODEL was compressed from."""
    if settings.teacher is None:
        return None
    from lowrank_compress.loading import load_model

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    teacher, _, _ = load_model(settings.teacher, device=str(device), dtype=dtype, allow_pickle=allow_pickle,
                               need_tokenizer=False)  # fmt: skip
    head = _lm_head(teacher, f"--teacher {settings.teacher}: not a causal language model (it has no LM head)")
    widths = [_lm_head(model, "").out_features, head.out_features]  # MODEL's head was checked when it loaded
    if widths[0] != widths[1]:
        raise LowrankError(
            f"--teacher {settings.teacher}: its vocabulary ({widths[1]} tokens) is not MODEL's ({widths[0]}); "
            "distill from the model MODEL was compressed from"
        )
    return teacher.requires_grad_(False)


def _lm_head(model: nn.Module, missing: str) -> nn.Module:
    """The model's output head (its out_features are the vocabulary the logits span); `missing` is the error without
    one."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise LowrankError(missing)
    return head


def _data(tokenizer: Any, settings: FinetuneSettings, saved: dict[str, Any] | None, resume: str | Path | None,
          teacher: nn.Module | None,
          report: ProgressFn) -> tuple[torch.Tensor, str | None, dict[str, Any]]:  # fmt: skip
    """The training rows (packed text, or --data chat's conversations), the evaluation text, and what
    finetune.json says of the data."""
    train_text, eval_text, names = texts(settings)
    if train_text is None:
        rows = _conversations(tokenizer, settings, teacher, report)
    else:
        rows = pack(tokenizer, train_text, settings.seq_len)
    info = {**names, "sequences": int(rows.shape[0]), "tokens": int(rows.numel()),
            "sha256": hashlib.sha256(rows.numpy().tobytes()).hexdigest()}  # fmt: skip
    if saved and saved["data"]["sha256"] != info["sha256"]:
        raise LowrankError(
            f"{resume}: the checkpoint was trained on other data (token hash differs); use the same --data"
        )
    return rows, eval_text, info


CHAT_ANSWER_TOKENS = 128
"""--data chat: the longest answer of each turn (the conversations of the distillation measured in the benchmarks)."""


def _conversations(tokenizer: Any, settings: FinetuneSettings, teacher: nn.Module | None,
                   report: ProgressFn) -> torch.Tensor:  # fmt: skip
    """--data chat: multi-turn conversations the teacher holds with the built-in chat prompts through MODEL's chat
    template (`sample_chat_exchanges`, calibration's sampler), one --seq-len row each, seeded by --seed."""
    from lowrank_compress.calibration import has_chat_template, sample_chat_exchanges

    assert teacher is not None  # FinetuneSettings.validate
    if not has_chat_template(tokenizer):
        raise LowrankError("--data chat needs a chat model: MODEL's tokenizer has no chat template")
    return sample_chat_exchanges(
        teacher, tokenizer, samples=settings.chat_samples, seq_len=settings.seq_len,
        answer_tokens=CHAT_ANSWER_TOKENS, seed=settings.seed, device=str(next(teacher.parameters()).device),
        progress=lambda done, total: report("sampling conversations", done, total, ""),
    )  # fmt: skip


def _trainable(run: Run, loaded: _Loaded, saved: dict[str, Any] | None) -> tuple[Any, list[str]]:
    """Make what trains: the frozen base (NF4 or bf16 where asked) with adapters attached, or the factors
    themselves; the methods' setup runs first (with what the checkpoint saved for them, on a resume)."""
    s, device = run.settings, run.device
    qreport, warnings = None, []
    compute_dtype = torch.bfloat16 if run.precision == "bf16" else torch.float32
    if s.train == "adapters":
        if s.quantize == "nf4":
            from lowrank_compress.quantize import quantize_nf4

            qreport = quantize_nf4(run.model, compute_dtype=compute_dtype, device=str(device))
            for name in qreport.unquantized:
                warnings.append(
                    f"{name} kept unquantized: bitsandbytes cannot round-trip its width on {device.type}"
                )
            _cast_floating(run.model, compute_dtype)
        elif run.precision == "bf16":
            run.model.to(torch.bfloat16)
        run.model.requires_grad_(False)
    methods_saved = (saved or {}).get("methods", {})
    for method in run.methods:
        method.setup(run, methods_saved.get(method.name) if saved else None)
    if s.train == "adapters":
        from lowrank_compress.adapters import adapter_targets, attach

        run.model = attach(run.model, s.adapter, s.rank, s.lora_alpha, adapter_targets(run.model),
                           block_size=s.block_size, blocks=s.blocks, seed=s.seed,
                           ramp_steps=max(1, round(s.warmup * run.total)), **run.adapter_options)  # fmt: skip
    return qreport, warnings


def _start(run: Run, saved: dict[str, Any] | None, resume: str | Path | None) -> None:
    """Optimizer and schedule, the methods' start, accelerate's wrapping; on a resume, the checkpoint's state
    through accelerate's load_state (trained parameters, optimizer, schedule, random states)."""
    s, acc = run.settings, run.accelerator
    if s.truncate_every and run.world > 1:
        raise LowrankError("--truncate-every changes parameter shapes; run it in a single process")
    if saved:
        run.start, run.losses = int(saved["step"]), list(saved["losses"])
        if run.start >= run.total:
            raise LowrankError(f"{resume}: the checkpoint already finished all {run.total} steps")
    run.call("on_train_begin", saved is not None)
    run.params = [p for p in run.model.parameters() if p.requires_grad]
    run.trainable = sum(p.numel() for p in run.params)
    optimizer = torch.optim.AdamW(run.params, lr=s.lr, weight_decay=s.weight_decay)
    run.scheduler = _cosine(optimizer, run.total, s.warmup)
    run.model, run.optimizer = acc.prepare(run.model, optimizer)
    acc.register_for_checkpointing(run.scheduler)  # not prepared: its step count stays one per optimizer step
    for method in run.methods:  # a method with state of its own (AdaLoRA's allocator) checkpoints it too
        if hasattr(method, "state_dict"):
            acc.register_for_checkpointing(method)
    checkpoints.attach_hooks(acc)
    if saved:
        acc.load_state(str(saved["dir"]))
    run.model.train()


def _save(run: Run, directory: Path, step: int, model_path: str | Path, data: dict[str, Any]) -> None:
    """A checkpoint at `step`: accelerate's state plus state.json (methods' info keyed by name)."""
    info = {m.name: m.checkpoint_info(run) for m in run.methods}
    state = {"step": step, "losses": run.losses, "settings": dataclasses.asdict(run.settings),
             "model": str(Path(model_path).resolve()), "data": data,
             "methods": {k: v for k, v in info.items() if v is not None}}  # fmt: skip
    checkpoints.write(directory, run.accelerator, state)


def _result(run: Run, model_path: str | Path, out: Path, loaded: _Loaded, data: dict[str, Any],
            ppl: dict[str, float | None], params_before: int, memory: PeakMemory, timings: dict[str, float],
            qreport: Any, warnings: list[str]) -> FinetuneResult:  # fmt: skip
    s = run.settings
    kind = (
        "adapters" if s.train == "adapters" and not s.merge else "lowrank" if loaded.factorized else "dense"
    )
    records = {m.name: m.record(run) for m in run.methods}
    times = run.step_times
    return FinetuneResult(
        settings=s, model=str(model_path), out=str(out), kind=kind, data=data, steps=len(run.losses),
        losses=run.losses, perplexity=ppl, trainable_params=run.trainable,
        params_before=params_before, params_after=params_before, precision=run.precision,
        device=str(run.device), processes=run.world,
        step_seconds=statistics.median(times) if times else 0.0,  # the first step warms up
        tokens_per_s=run.per_step * s.seq_len * len(times) / max(sum(times), 1e-9),
        peak_memory_mb=memory.mb, timings=timings, quantize=qreport.to_dict() if qreport else None,
        resumed_from_step=run.start, warnings=warnings,
        methods={k: v for k, v in records.items() if v is not None},
    )  # fmt: skip


def _write(result: FinetuneResult, trainer: nn.Module, run: Run, loaded: _Loaded, eval_text: str | None,
           model_path: str | Path, allow_pickle: bool, overwrite: bool, report: ProgressFn,
           warn: Callable[[str], None] | None) -> None:  # fmt: skip
    """OUT, atomically: adapters in PEFT's format, or the merged (or trained) model and its perplexity."""
    from lowrank_compress.training import outputs

    s, device, clock = run.settings, run.device, time.perf_counter()
    with atomic_output_dir(
        Path(result.out), overwrite, inputs=list(_inputs(model_path, s).values()), warn=warn
    ) as tmp:
        final = None
        if s.train == "factors":
            final = trainer.float()
        elif not s.merge:
            outputs.save_adapters(trainer, tmp, model_path)
        else:
            final, result.merge = outputs.merge(trainer, s, run.rows, device, model_path, allow_pickle)
        if final is not None:
            if result.kind == "lowrank":
                outputs.save_lowrank(final, tmp, loaded.tokenizer, loaded.source, loaded.quant_config, s)
            else:
                final.save_pretrained(str(tmp))
                loaded.tokenizer.save_pretrained(str(tmp))
            result.params_after = _count(final)
            if eval_text is not None:
                report("perplexity merged", 0, 1, "")
                result.perplexity["merged"] = _perplexity(
                    final, loaded.tokenizer, eval_text, s, device, "fp32"
                )
        result.timings["write"] = time.perf_counter() - clock
        (tmp / "finetune.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------------- pieces


def _count(model: nn.Module) -> int:
    seen: set[int] = set()
    n = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def _cast_floating(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the floating-point tensors that are not 4-bit (embeddings, norms) to the compute dtype."""
    for p in model.parameters():
        if p.is_floating_point() and type(p).__name__ != "Params4bit":
            p.data = p.data.to(dtype)


def _perplexity(model: nn.Module, tokenizer: Any, text: str, settings: FinetuneSettings, device: torch.device,
                precision: str) -> float:  # fmt: skip
    from lowrank_compress.evaluate import context_length, perplexity

    window = min(512, context_length(model) or 512)
    was_training = model.training
    model.eval()
    ctx = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        if precision == "bf16"
        else nullcontext()
    )
    with ctx:
        p = perplexity(model, tokenizer, text, window=window, stride=window, max_tokens=settings.eval_tokens,
                       device=str(device)).perplexity  # fmt: skip
    model.train(was_training)
    return float(p)


def _cosine(optimizer: torch.optim.Optimizer, total: int, warmup: float) -> Any:
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, int(round(warmup * total)), total)
