"""The training steps. Everything a method may change or read lives on `Run`; the loop itself knows no method by
name, it calls each at the fixed points listed in methods.py."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lowrank_compress.errors import LowrankError
from lowrank_compress.recipe import FinetuneSettings
from lowrank_compress.training.data import batch_rows
from lowrank_compress.training.methods import TrainingMethod


@dataclass
class Run:
    """One training run's state: the model being trained (wrapped by accelerate once prepared), its optimizer and
    schedule, the parameters that train, the packed rows and where the loop stands."""

    settings: FinetuneSettings
    accelerator: Any
    model: nn.Module
    rows: torch.Tensor
    total: int
    precision: str
    methods: list[TrainingMethod] = field(default_factory=list)
    optimizer: Any = None
    scheduler: Any = None
    params: list[nn.Parameter] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    start: int = 0
    trainable: int = 0  # parameters that train at the start (truncation may lower it later)
    adapter_options: dict[str, Any] = field(default_factory=dict)  # what setup() adds to the adapters' config
    out: str = ""  # named in errors: nothing was written there
    teacher: nn.Module | None = None  # --teacher: frozen, the loss is the KL to its next-token distribution

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def per_step(self) -> int:
        return self.settings.batch_size * self.settings.grad_accum * self.world

    def autocast(self) -> Any:
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def batch(self, step: int, micro: int) -> torch.Tensor:
        """This process's rows of micro-batch `micro` of optimizer step `step` (a pure function of the seed)."""
        s = self.settings
        position = (step * s.grad_accum + micro) * self.world + self.accelerator.process_index
        idx = batch_rows(self.rows.shape[0], s.seed, position * s.batch_size, s.batch_size)
        return self.rows[idx].to(self.device)

    def call(self, hook: str, *args: Any) -> None:
        for method in self.methods:
            getattr(method, hook)(self, *args)


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || model) of the next-token distributions, summed over the vocabulary and averaged over the
    positions: sum_v p_t(v) (log p_t(v) - log p(v)). Its gradient pulls the model's whole distribution towards the
    teacher's at every position, where the language-model loss sees one token of it."""
    target = torch.log_softmax(teacher_logits.float(), dim=-1)
    log_p = torch.log_softmax(logits.float(), dim=-1)
    return torch.nn.functional.kl_div(log_p, target, log_target=True, reduction="none").sum(-1).mean()


def batch_loss(run: Run, batch: torch.Tensor) -> torch.Tensor:
    """The language-model loss on the batch, or with a teacher the distillation loss against it."""
    if run.teacher is None:
        return run.model(input_ids=batch, labels=batch).loss
    with torch.no_grad():
        teacher_logits = run.teacher(input_ids=batch).logits
    return distillation_loss(run.model(input_ids=batch).logits, teacher_logits)


def step_loss(run: Run, step: int) -> float:
    """One optimizer step: the micro-batches' losses plus the methods' regularizers, backward (gradients synced
    on the last micro-batch only), the methods' gradient hooks, clipping, the optimizer and the schedule."""
    s, acc = run.settings, run.accelerator
    loss_sum = 0.0
    for micro in range(s.grad_accum):
        batch = run.batch(step, micro)
        sync = micro == s.grad_accum - 1
        with nullcontext() if sync else acc.no_sync(run.model), run.autocast():
            loss = batch_loss(run, batch)
            total = loss
            for method in run.methods:
                extra = method.regularizer(run)
                if extra is not None:
                    total = total + extra
        acc.backward(total / s.grad_accum)
        loss_sum += float(loss.detach())
    run.call("on_gradients")
    if s.max_grad_norm > 0:
        acc.clip_grad_norm_(run.params, s.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.call("on_optimizer_step", step)
    run.optimizer.zero_grad(set_to_none=True)
    mean = torch.tensor(loss_sum / s.grad_accum, device=run.device)
    return float(acc.reduce(mean, reduction="mean"))


def train(run: Run, report: Callable[[str, int, int, str], None], save: Callable[[int], None],
          stop_after: int | None = None) -> None:  # fmt: skip
    """Steps run.start .. run.total, a checkpoint every --save-every steps (not after the last). `stop_after`
    simulates Ctrl-C after that many steps (tests). A KeyboardInterrupt propagates after `save` is called."""
    s = run.settings
    tokens_per_step = run.per_step * s.seq_len
    try:
        for step in range(run.start, run.total):
            t0 = time.perf_counter()
            loss = step_loss(run, step)
            if not math.isfinite(loss):
                raise LowrankError(
                    f"the training loss is {loss} at step {step + 1}: MODEL has non-finite weights or --lr "
                    f"{s.lr:g} is too high; nothing was written to {run.out}"
                )
            run.losses.append(loss)
            run.call("on_step_end", step)
            run.step_times.append(time.perf_counter() - t0)
            report("training", step + 1, run.total,
                   f"loss {loss:.3f}  {tokens_per_step / run.step_times[-1]:,.0f} tok/s")  # fmt: skip
            if (step + 1) % s.save_every == 0 and step + 1 < run.total:
                save(step + 1)
            if stop_after is not None and step + 1 - run.start >= stop_after and step + 1 < run.total:
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        save(len(run.losses))
        raise
    run.call("on_train_end")
