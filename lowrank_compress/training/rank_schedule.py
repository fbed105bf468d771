"""Rank schedules: ranks that move during training within a budget.

`adalora` is peft's AdaLoRA (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning"):
each layer's update is P diag(E) Q in SVD form, starting at init_r = ceil(1.5 r) triplets per layer (peft's
default ratio, 12 -> 8) with E = 0; the loop calls peft's `update_and_allocate` after every optimizer step, which
scores each triplet by its smoothed sensitivity |w * dL/dw| and its uncertainty, and masks (E_i = 0) the least
important ones until the total is r per layer on average (the budget of plain LoRA at --rank in triplets), along
peft's cubic schedule between tinit (the first tenth of the steps) and the last fifth (tfinal), where the final
pattern is fixed. AdaLoRA's orthogonality regularizer R = mean over P, Q of ||P P^T - I||_F (weight 0.5, peft's
default) is added here, so the recorded loss stays the LM loss. The saved adapter keeps only the triplets that
survived (peft resizes its state by the final rank pattern) and reloads with it."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from lowrank_compress.errors import LowrankError
from lowrank_compress.training.methods import TrainingMethod

if TYPE_CHECKING:
    from lowrank_compress.recipe import FinetuneSettings
    from lowrank_compress.training.loop import Run

ORTH_WEIGHT = 0.5
START_RATIO = 1.5


def schedule(total: int, rank: int) -> dict[str, int]:
    """peft AdaLoraConfig's schedule for `total` steps (it needs tinit < total - tfinal)."""
    tfinal, tinit = max(1, total // 5), total // 10
    if tinit >= total - tfinal:
        raise LowrankError(f"--rank-schedule adalora needs at least 2 optimizer steps, got {total}")
    return {"init_r": math.ceil(START_RATIO * rank), "target_r": rank, "tinit": tinit, "tfinal": tfinal,
            "deltaT": max(1, total // 20), "total_step": total}  # fmt: skip


class AdaLora(TrainingMethod):
    """`--rank-schedule adalora` (module docstring)."""

    name = "adalora"

    def __init__(self, settings: FinetuneSettings) -> None:
        self.settings = settings
        self.plan: dict[str, int] = {}
        self.last_regularizer: float | None = None

    def setup(self, run: Run, saved: dict[str, Any] | None) -> None:
        self.plan = schedule(run.total, self.settings.rank)
        run.adapter_options["adalora"] = dict(self.plan)

    def _tuner(self, run: Run) -> Any:
        return run.accelerator.unwrap_model(run.model).base_model

    def regularizer(self, run: Run) -> torch.Tensor | None:
        terms = []
        for name, p in run.model.named_parameters():
            if p.requires_grad and (".lora_A." in name or ".lora_B." in name):
                cov = p @ p.T if ".lora_A." in name else p.T @ p
                terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], device=cov.device)))
        if not terms:
            return None
        value = ORTH_WEIGHT * torch.stack(terms).mean()
        self.last_regularizer = float(value.detach())
        return value

    def on_optimizer_step(self, run: Run, step: int) -> None:
        self._tuner(run).update_and_allocate(step)

    def state_dict(self) -> dict[str, Any]:
        """The allocator's smoothed scores and the rank pattern, for accelerate's checkpoints (set by the loop)."""
        alloc = self._run_tuner.rankallocator
        config = self._run_tuner.peft_config[self._run_tuner.trainable_adapter_name]
        return {"ipt": alloc.ipt, "exp_avg_ipt": alloc.exp_avg_ipt, "exp_avg_unc": alloc.exp_avg_unc,
                "rank_pattern": config.rank_pattern}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        alloc = self._run_tuner.rankallocator
        alloc.ipt, alloc.exp_avg_ipt, alloc.exp_avg_unc = (
            state["ipt"],
            state["exp_avg_ipt"],
            state["exp_avg_unc"],
        )
        self._run_tuner.peft_config[self._run_tuner.trainable_adapter_name].rank_pattern = state[
            "rank_pattern"
        ]

    def on_train_begin(self, run: Run, resumed: bool) -> None:
        self._run_tuner = self._tuner(run)

    def record(self, run: Run) -> dict[str, Any]:
        tuner = self._tuner(run)
        return {**self.plan, "ranks": final_ranks(tuner), "orthogonality": self.last_regularizer,
                "trainable_start": _params(tuner, False), "trainable_end": _params(tuner, True),
                "pruned_max_abs_e": pruned_weight(tuner)}  # fmt: skip


def final_ranks(tuner: Any) -> dict[str, int]:
    """Triplets kept per layer: the final rank pattern (all init_r where no mask was ever applied)."""
    pattern = tuner.peft_config[tuner.trainable_adapter_name].rank_pattern or {}
    out = {}
    for name, module in tuner.model.named_modules():
        if hasattr(module, "lora_E") and "default" in module.lora_E:
            key = next((k for k in pattern if k.startswith(f"{name}.lora_E")), None)
            out[name] = int(sum(pattern[key])) if key else int(module.lora_E["default"].shape[0])
    return out


def _params(tuner: Any, final: bool | None) -> int:
    """Trainable parameters of the triplets, r (in + out + 1) per layer, at init_r or at the final ranks."""
    ranks = final_ranks(tuner)
    total = 0
    for name, module in tuner.model.named_modules():
        if name in ranks:
            r = ranks[name] if final else module.lora_E["default"].shape[0]
            total += r * (module.in_features + module.out_features + 1)
    return total


def pruned_weight(tuner: Any) -> float:
    """The largest |E_i| among the triplets the final pattern prunes (0 when pruning left them no weight)."""
    pattern = tuner.peft_config[tuner.trainable_adapter_name].rank_pattern or {}
    worst = 0.0
    for name, module in tuner.model.named_modules():
        key = (
            next((k for k in pattern if k.startswith(f"{name}.lora_E")), None)
            if hasattr(module, "lora_E")
            else None
        )
        if key:
            pruned = ~torch.tensor(pattern[key], dtype=torch.bool)
            e = module.lora_E["default"].detach().view(-1)
            worst = max(worst, float(e[pruned.to(e.device)].abs().max()) if pruned.any() else 0.0)
    return worst
