"""`TrainingMethod`: a method that changes how training runs rather than what the adapter is (TRP's regularizer and
truncation, LoRA-Pro's gradients, GoRA's ranks and init, rank schedules). The loop calls every method at the same
fixed points, the way transformers' TrainerCallback or llm-compressor's modifiers are called, so a method is one
small object and the loop knows none of them by name.

Order of the calls in a run:

    setup(run, saved)            before adapters are attached and the optimizer exists; `saved` is what
                                 checkpoint_info returned when the checkpoint being resumed was written (else None)
    on_train_begin(run, resumed) the optimizer exists; a resumed run's trained state is loaded right after
    regularizer(run)             per micro-batch, inside autocast: a term added to the loss (or None)
    on_gradients(run)            once per step, after the last micro-batch's backward, before clipping
    on_optimizer_step(run, step) after optimizer.step, gradients still there
    on_step_end(run, step)       after the step's loss is recorded
    on_train_end(run)            after the last step, before evaluation and writing (finalize: fold, resize)
    checkpoint_info(run)         JSON written with each checkpoint (what setup needs to rebuild the shapes)
    record(run)                  JSON for finetune.json: what the method did
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from lowrank_compress.recipe import FinetuneSettings
    from lowrank_compress.training.loop import Run


class TrainingMethod:
    """A plug-in of the finetune loop; every hook does nothing unless overridden."""

    name = "method"

    def setup(self, run: Run, saved: dict[str, Any] | None) -> None:
        pass

    def on_train_begin(self, run: Run, resumed: bool) -> None:
        pass

    def regularizer(self, run: Run) -> torch.Tensor | None:
        return None

    def on_gradients(self, run: Run) -> None:
        pass

    def on_optimizer_step(self, run: Run, step: int) -> None:
        pass

    def on_step_end(self, run: Run, step: int) -> None:
        pass

    def on_train_end(self, run: Run) -> None:
        pass

    def checkpoint_info(self, run: Run) -> dict[str, Any] | None:
        return None

    def record(self, run: Run) -> dict[str, Any] | None:
        return None


class AdapterSchedule(TrainingMethod):
    """Adapters that follow the optimizer step (SingLoRA's ramp u(t)): advanced after each step, and put back at
    the checkpoint's step on resume (the step is a buffer, not a trained parameter)."""

    name = "adapter_schedule"

    def on_train_begin(self, run: Run, resumed: bool) -> None:
        from lowrank_compress.peft_methods import set_step

        if resumed:
            set_step(run.model, run.start)

    def on_optimizer_step(self, run: Run, step: int) -> None:
        from lowrank_compress.peft_methods import advance

        advance(run.model)


def spread(ranks: dict[str, int]) -> dict[str, float]:
    """min / max / mean of a rank pattern: how far a method moved away from one rank for every layer."""
    values = list(ranks.values()) or [0]
    return {"min": min(values), "max": max(values), "mean": sum(values) / len(values)}


def build_methods(settings: FinetuneSettings) -> list[TrainingMethod]:
    """The methods a run's settings ask for, in the order the loop calls them."""
    from lowrank_compress.training import trp

    methods: list[TrainingMethod] = []
    if settings.train == "factors":
        methods.append(trp.FactorRanks())
        if settings.nuclear:
            methods.append(trp.NuclearNorm(settings.nuclear))
        if settings.truncate_every:
            methods.append(trp.EnergyTruncation(settings.truncate_every, settings.truncate_energy))
    else:
        methods.append(AdapterSchedule())
    if settings.low_rank_reg:
        from lowrank_compress.training.lorae import LowRankReg

        methods.append(LowRankReg(settings.low_rank_reg))
    if settings.init == "gora":
        from lowrank_compress.training.gora import Gora

        methods.append(Gora(settings))
    if settings.rank_schedule in ("adalora", "elalora"):
        from lowrank_compress.training.rank_schedule import AdaLora, ElaLora

        methods.append((AdaLora if settings.rank_schedule == "adalora" else ElaLora)(settings))
    if settings.rank_schedule == "ard":
        from lowrank_compress.training.ard import ArdLora

        methods.append(ArdLora(settings))
    if settings.optimizer == "lora-pro":
        from lowrank_compress.training.lora_pro import LoraPro

        methods.append(LoraPro())
    return methods
