"""`finetune`: win quality back after compression, QLoRA style, and keep the model factorized.

load MODEL -> pack the text into sequences -> held-out perplexity before -> (NF4-quantize the frozen base) -> peft
adapters around each layer, or the factors themselves trainable -> AdamW, cosine schedule with warmup, gradient
accumulation, bf16 autocast where the device supports it, on accelerate -> checkpoints every N steps (and on Ctrl-C)
-> perplexity after -> write OUT atomically: the adapters in PEFT's format, or the merged model in the lowrank format.

Data order is a pure function of (seed, step), so a resumed run sees exactly the batches the uninterrupted run would
have seen, and its loss curve continues the same one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank_compress.errors import CalibrationError, LowrankError, TrainingInterrupted
from lowrank_compress.memory import PeakMemory
from lowrank_compress.modules import LowRankLinear
from lowrank_compress.outdir import (
    atomic_output_dir,
    check_checkpoint_dir,
    check_output_dir,
    discard,
    new_temp_dir,
    ours,
    remove_ours,
    replace_dir,
    replaceable,
)
from lowrank_compress.peft_methods import advance, set_step
from lowrank_compress.recipe import FinetuneSettings

CHECKPOINT_VERSION = 1

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

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["settings"] = dataclasses.asdict(self.settings)
        return d


# --------------------------------------------------------------------------------------------------- data


def pack(tokenizer: Any, text: str, seq_len: int, what: str = "--data") -> torch.LongTensor:
    """The text cut into consecutive sequences of `seq_len` tokens, each framed by the tokenizer's special tokens
    (BOS) the way the model sees text in use; the tail shorter than a sequence is dropped."""
    from lowrank_compress.calibration import special_affixes, tokenize_text

    prefix, suffix = special_affixes(tokenizer)
    body = seq_len - len(prefix) - len(suffix)
    if body < 1:
        raise CalibrationError(f"--seq-len {seq_len} leaves no room for text after the special tokens")
    ids = tokenize_text(tokenizer, text)
    rows = len(ids) // body
    if rows < 1:
        raise CalibrationError(
            f"{what} has {len(ids)} tokens, shorter than one training sequence of {body} text tokens; "
            "pass more text or lower --seq-len"
        )
    t = torch.tensor(ids[: rows * body], dtype=torch.long).view(rows, body)
    parts = [torch.tensor(prefix, dtype=torch.long).expand(rows, -1), t,
             torch.tensor(suffix, dtype=torch.long).expand(rows, -1)]  # fmt: skip
    return torch.cat(parts, dim=1)


def batch_rows(n_rows: int, seed: int, position: int, count: int) -> list[int]:
    """Rows for global sample positions [position, position + count): epoch e = position // n_rows visits the rows
    in the order of a permutation seeded by (seed, e). A pure function, so a resumed run continues the same order."""
    out = []
    cache: dict[int, list[int]] = {}
    for p in range(position, position + count):
        epoch, i = divmod(p, n_rows)
        if epoch not in cache:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            cache[epoch] = torch.randperm(n_rows, generator=gen).tolist()
        out.append(cache[epoch][i])
    return out


def _texts(settings: FinetuneSettings) -> tuple[str, str | None, dict[str, Any]]:
    """Training and evaluation text. Without --eval-data: train on the first half of --data, score the second."""
    from lowrank_compress.text import load_text

    if settings.eval_data is None:
        train = load_text(settings.data, split="calibration")
        held = load_text(settings.data, split="heldout") if settings.eval_tokens else None
        return (
            train,
            held,
            {"train": f"{settings.data} (first half)", "eval": f"{settings.data} (second half)"},
        )
    train = load_text(settings.data)
    held = load_text(
        settings.eval_data
    )  # read even when unused (--eval-tokens 0): a wrong path is still an error
    held = held if settings.eval_tokens else None
    return train, held, {"train": settings.data, "eval": settings.eval_data}


# --------------------------------------------------------------------------------------------------- the run


def resolve_precision(precision: str, device: torch.device) -> str:
    """bf16 where the device computes it natively (CUDA with bf16, a CPU with AVX512-BF16 or AMX), else fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
        amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
        return "bf16" if (probe and probe()) or (amx and amx()) else "fp32"
    return "fp32"


def default_checkpoint_dir(out: Path) -> Path:
    return Path(out).parent / f"{Path(out).name}.checkpoint"


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
    optimizer steps (for tests): a checkpoint is written and `TrainingInterrupted` raised."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from lowrank_compress.format import read_quant_config
    from lowrank_compress.loading import load_model

    settings.validate()
    out = Path(out)
    report = progress or (lambda phase, done, total, label: None)
    say = warn or (lambda message: None)
    check_output_dir(out, overwrite, inputs=[Path(model_path)], warn=warn)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir else default_checkpoint_dir(out)
    # apart from OUT and MODEL, and a checkpoint of ours (or empty): the finished run deletes it
    check_checkpoint_dir(ckpt_dir, {"the output": out, "MODEL": Path(model_path)}, warn=warn)
    resuming_here = resume is not None and Path(resume).resolve() == ckpt_dir.resolve()
    if ours(ckpt_dir) == "checkpoint" and not resuming_here and not overwrite:
        raise LowrankError(
            f"{ckpt_dir}: a checkpoint of an earlier run is there; continue it with --resume {ckpt_dir}, "
            "or pass --overwrite to start afresh"
        )
    resume_state = _read_checkpoint(Path(resume), settings, model_path) if resume else None

    timings: dict[str, float] = {}
    clock = time.perf_counter()
    # no GPU: a CPU run, and several processes under `accelerate launch` / torchrun become DDP over gloo
    accelerator = Accelerator(mixed_precision="no", cpu=not torch.cuda.is_available())
    device = accelerator.device
    precision = resolve_precision(settings.precision, device)
    set_seed(settings.seed)

    report("loading", 0, 1, "")
    model, tokenizer, source = load_model(model_path, allow_pickle=allow_pickle)
    factorized = source.is_compressed
    if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        raise LowrankError(f"{model_path}: finetune needs a causal language model (a model with an LM head)")
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
                "use --merge-rank keep (re-truncated to each layer's rank) or --no-merge"
            )
    if not factorized and settings.train == "factors":
        raise LowrankError("--train factors needs a factorized MODEL (a `lowrank-compress factorize` output)")
    if settings.quantize == "nf4":
        from lowrank_compress.quantize import require_bitsandbytes

        require_bitsandbytes()
    quant_config = read_quant_config(source.directory) if factorized else None

    from lowrank_compress.evaluate import fit_sequence_length

    seq_len = fit_sequence_length(model, settings.seq_len, "--seq-len", FinetuneSettings.seq_len, say)
    settings = dataclasses.replace(settings, seq_len=seq_len)
    train_text, eval_text, data_names = _texts(settings)
    rows = pack(tokenizer, train_text, settings.seq_len)
    data_info = {
        **data_names,
        "sequences": int(rows.shape[0]),
        "tokens": int(rows.numel()),
        "sha256": hashlib.sha256(rows.numpy().tobytes()).hexdigest(),
    }
    if resume_state and resume_state["data"]["sha256"] != data_info["sha256"]:
        raise LowrankError(
            f"{resume}: the checkpoint was trained on other data (token hash differs); use the same --data"
        )
    timings["load"] = time.perf_counter() - clock

    warnings: list[str] = []
    params_before = _count(model)
    model.to(device)
    ppl: dict[str, float | None] = {"before": None, "after": None, "merged": None}
    if eval_text is not None:
        report("perplexity before", 0, 1, "")
        ppl["before"] = _perplexity(model, tokenizer, eval_text, settings, device, precision="fp32")
    timings["eval_before"] = time.perf_counter() - clock - sum(timings.values())

    world = accelerator.num_processes
    per_step = settings.batch_size * settings.grad_accum * world
    total = settings.steps or max(1, math.ceil((settings.epochs or 1.0) * rows.shape[0] / per_step))

    # --- what trains
    qreport = None
    compute_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    if settings.train == "adapters":
        from lowrank_compress.adapters import adapter_targets, attach

        targets = adapter_targets(model)
        if settings.quantize == "nf4":
            from lowrank_compress.quantize import quantize_nf4

            qreport = quantize_nf4(model, compute_dtype=compute_dtype, device=str(device))
            for name in qreport.unquantized:
                warnings.append(
                    f"{name} kept unquantized: bitsandbytes cannot round-trip its width on {device.type}"
                )
            _cast_floating(model, compute_dtype)
        elif precision == "bf16":
            model.to(torch.bfloat16)
        model.requires_grad_(False)
        trainer = attach(model, settings.adapter, settings.rank, settings.lora_alpha, targets,
                         block_size=settings.block_size, blocks=settings.blocks, seed=settings.seed,
                         ramp_steps=max(1, round(settings.warmup * total)))  # fmt: skip
    else:
        model.requires_grad_(False)
        for m in model.modules():
            if isinstance(m, LowRankLinear):
                m.up.weight.requires_grad_(True)
                m.down.weight.requires_grad_(True)
        if resume_state and resume_state.get("ranks"):
            _set_ranks(model, resume_state["ranks"])
        trainer = model
    for w in warnings:
        say(w)

    if settings.truncate_every and world > 1:
        raise LowrankError("--truncate-every changes parameter shapes; run it in a single process")

    params = [p for p in trainer.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = _cosine(optimizer, total, settings.warmup)
    losses: list[float] = []
    start = 0
    if resume_state:
        _load_trainable(trainer, resume_state["dir"])
        optimizer.load_state_dict(torch.load(resume_state["dir"] / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(resume_state["scheduler"])
        losses = list(resume_state["losses"])
        start = int(resume_state["step"])
        set_step(trainer, start)  # SingLoRA's ramp where the checkpoint left it
        if start >= total:
            raise LowrankError(f"{resume}: the checkpoint already finished all {total} steps")
    trainer, optimizer = accelerator.prepare(trainer, optimizer)
    trainer.train()
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        if precision == "bf16"
        else nullcontext()
    )

    def save_checkpoint(step: int) -> None:
        if accelerator.is_main_process:
            _write_checkpoint(ckpt_dir, accelerator.unwrap_model(trainer), optimizer, scheduler, step, losses,
                              settings, model_path, data_info)  # fmt: skip
        accelerator.wait_for_everyone()

    train_clock = time.perf_counter()
    step_times: list[float] = []
    tokens_per_step = per_step * settings.seq_len
    step = start
    memory = PeakMemory(device)
    with memory:
        try:
            for step in range(start, total):
                t0 = time.perf_counter()
                loss_sum = 0.0
                for micro in range(settings.grad_accum):
                    position = (step * settings.grad_accum + micro) * world + accelerator.process_index
                    idx = batch_rows(
                        rows.shape[0], settings.seed, position * settings.batch_size, settings.batch_size
                    )
                    batch = rows[idx].to(device)
                    sync = micro == settings.grad_accum - 1
                    with nullcontext() if sync else accelerator.no_sync(trainer), autocast:
                        loss = trainer(input_ids=batch, labels=batch).loss
                        total_loss = loss + _nuclear(trainer, settings.nuclear) if settings.nuclear else loss
                    accelerator.backward(total_loss / settings.grad_accum)
                    loss_sum += float(loss.detach())
                if settings.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, settings.max_grad_norm)
                optimizer.step()
                scheduler.step()
                advance(trainer)  # SingLoRA's ramp
                optimizer.zero_grad(set_to_none=True)
                mean_loss = float(accelerator.reduce(torch.tensor(loss_sum / settings.grad_accum, device=device),
                                                     reduction="mean"))  # fmt: skip
                if not math.isfinite(mean_loss):
                    raise LowrankError(
                        f"the training loss is {mean_loss} at step {step + 1}: MODEL has non-finite weights or --lr "
                        f"{settings.lr:g} is too high; nothing was written to {out}"
                    )
                losses.append(mean_loss)
                if settings.truncate_every and (step + 1) % settings.truncate_every == 0 and step + 1 < total:
                    params = _truncate_factors(trainer, optimizer, settings.truncate_energy)
                step_times.append(time.perf_counter() - t0)
                report("training", step + 1, total,
                       f"loss {mean_loss:.3f}  {tokens_per_step / step_times[-1]:,.0f} tok/s")  # fmt: skip
                if (step + 1) % settings.save_every == 0 and step + 1 < total:
                    save_checkpoint(step + 1)
                if stop_after is not None and step + 1 - start >= stop_after and step + 1 < total:
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            done = len(losses)
            save_checkpoint(done)
            raise TrainingInterrupted(
                f"interrupted at step {done} of {total}; nothing was written to {out}; a checkpoint is in {ckpt_dir}: "
                f"run the same command with --resume {ckpt_dir}"
            ) from None
    timings["train"] = time.perf_counter() - train_clock
    trainer = accelerator.unwrap_model(trainer)
    trainer.eval()

    if eval_text is not None:
        report("perplexity after", 0, 1, "")
        ppl["after"] = _perplexity(trainer, tokenizer, eval_text, settings, device, precision=precision)

    # --- write OUT
    kind = (
        "adapters"
        if settings.train == "adapters" and not settings.merge
        else "lowrank"
        if factorized
        else "dense"
    )
    result = FinetuneResult(
        settings=settings, model=str(model_path), out=str(out), kind=kind, data=data_info, steps=len(losses),
        losses=losses, perplexity=ppl, trainable_params=trainable, params_before=params_before,
        params_after=params_before, precision=precision, device=str(device), processes=world,
        step_seconds=statistics.median(step_times) if step_times else 0.0,  # the first step warms up
        tokens_per_s=tokens_per_step * len(step_times) / max(sum(step_times), 1e-9),
        peak_memory_mb=memory.mb, timings=timings, quantize=qreport.to_dict() if qreport else None,
        resumed_from_step=start, warnings=warnings,
    )  # fmt: skip
    if accelerator.is_main_process:  # one writer; the other processes wait
        write_clock = time.perf_counter()
        with atomic_output_dir(out, overwrite, inputs=[Path(model_path)], warn=warn) as tmp:
            final = None
            if settings.train == "factors":
                final = trainer.float()
            elif not settings.merge:
                _save_adapters(trainer, tmp, model_path)
            else:
                final, result.merge = _merge(trainer, settings, rows, device, model_path, allow_pickle)
            if final is not None:
                if kind == "lowrank":
                    _save_lowrank(final, tmp, tokenizer, source, quant_config, settings)
                else:
                    final.save_pretrained(str(tmp))
                    tokenizer.save_pretrained(str(tmp))
                result.params_after = _count(final)
                if eval_text is not None:
                    report("perplexity merged", 0, 1, "")
                    ppl["merged"] = _perplexity(
                        final, tokenizer, eval_text, settings, device, precision="fp32"
                    )
            timings["write"] = time.perf_counter() - write_clock
            (tmp / "finetune.json").write_text(
                json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8"
            )
        remove_ours(ckpt_dir, kinds=("checkpoint",), warn=warn)  # OUT holds the result now
    accelerator.wait_for_everyone()
    return result


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


def _nuclear(model: nn.Module, weight: float) -> torch.Tensor:
    """TRP-style nuclear-norm penalty through its factored form: ||U D||_* = min over factorizations of
    (||U||_F^2 + ||D||_F^2) / 2, so half the squared factor norms bound it and pull the product's rank down."""
    terms = [0.5 * (m.up.weight.float().pow(2).sum() + m.down.weight.float().pow(2).sum())
             for m in model.modules() if isinstance(m, LowRankLinear)]  # fmt: skip
    return weight * torch.stack(terms).sum() if terms else torch.zeros(())


def _truncate_factors(model: nn.Module, optimizer: Any, energy: float) -> list[nn.Parameter]:
    """TRP's periodic truncation: each factorized layer is cut to the least rank keeping `energy` of its squared
    singular values (never grown). Truncated layers get fresh parameters, so their optimizer state is dropped."""
    from lowrank_compress.factorize import decompose

    inner = getattr(optimizer, "optimizer", optimizer)
    for m in model.modules():
        if not isinstance(m, LowRankLinear):
            continue
        with torch.no_grad():
            dec = decompose(m.up.weight.double() @ m.down.weight.double(), "svd")
            kept = torch.cumsum(dec.s**2, 0) / (dec.s**2).sum().clamp_min(1e-300)
            rank = int(torch.searchsorted(kept, kept.new_tensor(energy))) + 1  # on kept's device
            if rank >= m.rank:
                continue
            up, down = dec.factors(rank, dtype=m.up.weight.dtype)
        for old in (m.up.weight, m.down.weight):
            inner.state.pop(old, None)
        _replace_factors(m, up, down)
    params = [p for p in model.parameters() if p.requires_grad]
    inner.param_groups[0]["params"] = params
    return params


def _replace_factors(m: LowRankLinear, up: torch.Tensor, down: torch.Tensor) -> None:
    rank = up.shape[1]
    m.up = nn.Linear(rank, m.out_features, bias=False, device=up.device, dtype=up.dtype)
    m.down = nn.Linear(m.in_features, rank, bias=False, device=up.device, dtype=up.dtype)
    with torch.no_grad():
        m.up.weight.copy_(up)
        m.down.weight.copy_(down)
    m.rank = rank


def _set_ranks(model: nn.Module, ranks: dict[str, int]) -> None:
    """Give factorized layers the ranks a checkpoint was saved with (values follow from the checkpoint)."""
    modules = dict(model.named_modules())
    for name, rank in ranks.items():
        m = modules.get(name)
        if isinstance(m, LowRankLinear) and m.rank != rank:
            _replace_factors(
                m, m.up.weight.new_zeros(m.out_features, rank), m.down.weight.new_zeros(rank, m.in_features)
            )
            m.up.weight.requires_grad_(True)
            m.down.weight.requires_grad_(True)


def _ranks(model: nn.Module) -> dict[str, int]:
    return {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


# --------------------------------------------------------------------------------------------------- checkpoints


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _write_checkpoint(directory: Path, model: nn.Module, optimizer: Any, scheduler: Any, step: int,
                      losses: list[float], settings: FinetuneSettings, model_path: str | Path,
                      data: dict[str, Any]) -> None:  # fmt: skip
    """Everything a resume needs, written to a marked temporary directory and swapped into place (never
    half-written; a crash leaves this checkpoint or the previous one)."""
    from safetensors.torch import save_file

    tmp = None
    try:
        tmp = new_temp_dir(directory, "checkpoint")
        save_file(_trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        state = {
            "version": CHECKPOINT_VERSION, "step": step, "losses": losses, "settings": dataclasses.asdict(settings),
            "model": str(Path(model_path).resolve()), "data": data, "scheduler": scheduler.state_dict(),
            "ranks": _ranks(model) if settings.train == "factors" else None,
        }  # fmt: skip
        (tmp / "state.json").write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
        if not replaceable(directory, ("checkpoint",)):  # something else appeared there meanwhile
            raise LowrankError(f"{directory}: not a lowrank-compress checkpoint any more; not replacing it")
        replace_dir(tmp, directory)
    except OSError as e:
        discard(tmp)
        raise LowrankError(f"cannot write the checkpoint {directory}: {e.strerror or e}") from e
    except BaseException:
        discard(tmp)
        raise


def _read_checkpoint(directory: Path, settings: FinetuneSettings, model_path: str | Path) -> dict[str, Any]:
    """The checkpoint's state, after checking it was made by the same command on the same model."""
    state_file = directory / "state.json"
    if not state_file.is_file() or not (directory / "trainable.safetensors").is_file():
        raise LowrankError(f"{directory}: not a finetune checkpoint (no state.json / trainable.safetensors)")
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise LowrankError(f"{directory}: the checkpoint's state.json is damaged ({e})") from None
    if state.get("version") != CHECKPOINT_VERSION:
        raise LowrankError(
            f"{directory}: checkpoint version {state.get('version')} is not {CHECKPOINT_VERSION}"
        )
    if state["model"] != str(Path(model_path).resolve()):
        raise LowrankError(f"{directory}: the checkpoint was made from {state['model']}, not {model_path}")
    saved = state["settings"]
    mine = dataclasses.asdict(settings)
    differ = sorted(k for k in mine if saved.get(k) != mine[k])
    if differ:
        raise LowrankError(
            f"{directory}: the checkpoint was made with other settings ({', '.join(differ)}); "
            "resume with the same command"
        )
    state["dir"] = directory
    return state


def _load_trainable(model: nn.Module, directory: Path) -> None:
    from safetensors.torch import load_file

    saved = load_file(str(directory / "trainable.safetensors"))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(saved) != set(params):
        raise LowrankError(f"{directory}: the checkpoint's trainable tensors do not match this model")
    with torch.no_grad():
        for name, p in params.items():
            if saved[name].shape != p.shape:
                raise LowrankError(
                    f"{directory}: checkpoint tensor {name} has shape {tuple(saved[name].shape)}"
                )
            p.copy_(saved[name].to(p))


# --------------------------------------------------------------------------------------------------- outputs


def _save_adapters(peft_model: Any, directory: Path, model_path: str | Path) -> None:
    """PEFT's own format: adapter_config.json + adapter_model.safetensors, pointing at MODEL."""
    for config in peft_model.peft_config.values():
        config.base_model_name_or_path = str(Path(model_path).resolve())
    peft_model.save_pretrained(str(directory))


def _merge(peft_model: Any, settings: FinetuneSettings, rows: torch.Tensor, device: torch.device,
           model_path: str | Path, allow_pickle: bool) -> tuple[nn.Module, dict[str, Any]]:  # fmt: skip
    """Fold the adapters into MODEL's float32 weights (into the dequantized ones when trained on NF4: those are the
    weights the adapters learned to correct). `keep` is whitened by the inputs the exactly merged (grown) model sees
    on a few training sequences: the inputs the trained model sees."""
    import copy

    from lowrank_compress.adapters import extract_adapters, merge_adapters
    from lowrank_compress.quantize import dequantize

    base, deltas = extract_adapters(peft_model)
    if settings.quantize == "none":  # the frozen copy may be bf16: merge into the original float32 weights
        from lowrank_compress.loading import load_model

        del base
        base = load_model(model_path, allow_pickle=allow_pickle, need_tokenizer=False)[0].to(device)
    else:  # what the adapters were trained against
        dequantize(base)
    base.float()
    stats = None
    if settings.merge_rank == "keep":
        from lowrank_compress.calibration import collect_stats

        grown = copy.deepcopy(base)  # the trained model's weights: grown exactly, or dense where not low-rank
        merge_adapters(grown, deltas, merge_rank="grow", densify=True)
        names = [n for n, m in base.named_modules() if isinstance(m, LowRankLinear)]
        stats = collect_stats(grown, rows[: min(8, rows.shape[0])], names, device=str(device))
        del grown
    layers = merge_adapters(base, deltas, merge_rank=settings.merge_rank, stats=stats, kind=settings.adapter)
    errors = [v["relative_error"] for v in layers.values()]
    info = {"merge_rank": settings.merge_rank, "layers": len(deltas), "ranks": _ranks(base),
            "max_relative_error": max(errors, default=0.0), "whitened": stats is not None,
            "relative_errors": {n: v["relative_error"] for n, v in layers.items()}}  # fmt: skip
    return base, info


def _save_lowrank(model: nn.Module, directory: Path, tokenizer: Any, source: Any, quant_config: dict[str, Any] | None,
                  settings: FinetuneSettings) -> None:  # fmt: skip
    from lowrank_compress.format import save_compressed

    info = {k: v for k, v in (quant_config or {}).items() if k not in ("quant_method", "version", "ranks")}
    info["finetune"] = {"train": settings.train, "adapter": settings.adapter if settings.train == "adapters" else None,
                        "merge_rank": settings.merge_rank if settings.merge else None}  # fmt: skip
    model.requires_grad_(False)
    save_compressed(model, directory, ranks=_ranks(model), quant_info=info, tokenizer=tokenizer,
                    source_dir=source.directory)  # fmt: skip
