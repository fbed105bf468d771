"""ARD-LoRA (Shinwari and Usama 2025, "ARD-LoRA: Dynamic Rank Allocation for Parameter-Efficient Fine-Tuning of
Foundation Models with Heterogeneous Adaptation Needs"), per layer: a learnable scale alpha_l >= 0 sets the layer's
rank r_l = max(1, round(r0 alpha_l)) (r0 = --rank), and the meta-objective adds an l1 term lambda sum_l |alpha_l|
(fewer ranks) and a total-variation term beta sum |alpha_l+1 - alpha_l| between the same projection of consecutive
blocks (smooth rank changes across depth). This is our reading of the abstract and a summary (the paper's text was
not available to us): per layer rather than per head, and alpha reaches the task loss by scaling the layer's update,
s alpha_l B_:r A_r: (components beyond r_l masked), which is how the rounding gets a gradient here. Each layer holds
a pool of 2 r0 components; after every optimizer step alpha >= 0 and the total rank is held at most r0 per layer
(plain LoRA's budget) by scaling the alphas down. At the end alpha and the mask are folded into A, the components
beyond r_l dropped, and the ranks saved as peft's rank_pattern (with alpha_pattern keeping the scale)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lowrank_compress.training.methods import TrainingMethod, spread

if TYPE_CHECKING:
    from lowrank_compress.recipe import FinetuneSettings
    from lowrank_compress.training.loop import Run

PREFIX = "base_model.model."


def rank_of(alpha: torch.Tensor, r0: int, r_max: int) -> int:
    """r = max(1, round(r0 alpha)), at most the pool."""
    return min(max(1, int(torch.round(alpha.detach() * r0))), r_max)


def gate(alpha: torch.Tensor, r0: int, r_max: int) -> torch.Tensor:
    """alpha on the first r components, 0 beyond: multiplies A x (differentiable in alpha)."""
    mask = (torch.arange(r_max, device=alpha.device) < rank_of(alpha, r0, r_max)).to(alpha.dtype)
    return alpha * mask


def tv_pairs(names: list[str]) -> list[tuple[str, str]]:
    """(layer, the same projection one block deeper): model.layers.3.mlp.up_proj -> model.layers.4.mlp.up_proj."""
    index = {}
    for n in names:
        m = re.match(r"(.*\.)(\d+)(\..*)$", n)
        if m:
            index[(m[1], int(m[2]), m[3])] = n
    return [(n, index[(p, i + 1, s)]) for (p, i, s), n in index.items() if (p, i + 1, s) in index]


def fit_budget(alphas: dict[str, torch.Tensor], r0: int, r_max: int) -> None:
    """alpha >= 0, then scaled down (in place) until sum_l r_l <= r0 per layer on average."""
    with torch.no_grad():
        for a in alphas.values():
            a.clamp_(min=0.0)
        budget = r0 * len(alphas)
        for _ in range(50):
            total = sum(rank_of(a, r0, r_max) for a in alphas.values())
            if total <= budget:
                return
            for a in alphas.values():
                a.mul_(budget / total * 0.999)
        while sum(rank_of(a, r0, r_max) for a in alphas.values()) > budget:  # ties at the rounding edge
            top = max(alphas.values(), key=lambda a: float(a))
            top.sub_(1.0 / r0)


class ArdLora(TrainingMethod):
    """`--rank-schedule ard` (module docstring)."""

    name = "ard"

    def __init__(self, settings: FinetuneSettings) -> None:
        self.settings = settings
        self.r0, self.r_max = settings.rank, 2 * settings.rank
        self.l1, self.tv = settings.ard_l1, settings.ard_tv
        self.alphas: dict[str, nn.Parameter] = {}
        self.handles: list[Any] = []
        self.ranks: dict[str, int] = {}
        self.last: float | None = None
        self.trainable_start = 0

    def setup(self, run: Run, saved: dict[str, Any] | None) -> None:
        from lowrank_compress.adapters import adapter_targets

        names = adapter_targets(run.model)
        scale = self.settings.lora_alpha / self.r0  # s = alpha / r0, as plain LoRA at --rank
        run.adapter_options["rank_pattern"] = dict.fromkeys(names, self.r_max)
        run.adapter_options["alpha_pattern"] = dict.fromkeys(names, scale * self.r_max)

    def on_train_begin(self, run: Run, resumed: bool) -> None:
        """A scale alpha = 1 (rank r0) on every LoRA layer, registered as its parameter (so it trains and is in
        the checkpoint), and a hook gating A x by it."""
        for name, module in run.model.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                lin = module.lora_A["default"]
                module.ard_alpha = nn.Parameter(torch.ones((), device=lin.weight.device))
                self.alphas[name.removeprefix(PREFIX)] = module.ard_alpha
                self.handles.append(lin.register_forward_hook(self._hook(module)))
                self.trainable_start += self.r0 * (lin.in_features + module.lora_B["default"].out_features)

    def _hook(self, module: nn.Module) -> Any:
        def forward(_: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
            return out * gate(module.ard_alpha, self.r0, self.r_max).to(out.dtype)

        return forward

    def regularizer(self, run: Run) -> torch.Tensor | None:
        if not self.alphas:
            return None
        a = self.alphas
        value = self.l1 * torch.stack([v.abs() for v in a.values()]).sum()
        pairs = tv_pairs(list(a))
        if pairs:
            value = value + self.tv * torch.stack([(a[x] - a[y]).abs() for x, y in pairs]).sum()
        self.last = float(value.detach())
        return value

    def on_optimizer_step(self, run: Run, step: int) -> None:
        fit_budget(self.alphas, self.r0, self.r_max)

    def on_train_end(self, run: Run) -> None:
        """Fold alpha and the mask into A, drop the components beyond each rank, and say so in peft's config."""
        model = run.accelerator.unwrap_model(run.model)
        config = model.peft_config["default"]
        for h in self.handles:
            h.remove()
        for name, module in model.named_modules():
            key = name.removeprefix(PREFIX)
            if key in self.alphas:
                self.ranks[key] = fold(module, self.r0, self.r_max)
                config.rank_pattern[key] = self.ranks[key]
                config.alpha_pattern[key] = float(module.scaling["default"]) * self.ranks[key]

    def record(self, run: Run) -> dict[str, Any]:
        widths = {n: 0 for n in self.ranks}
        model = run.accelerator.unwrap_model(run.model)
        for name, module in model.named_modules():
            key = name.removeprefix(PREFIX)
            if key in widths:
                widths[key] = module.lora_A["default"].in_features + module.lora_B["default"].out_features
        return {"ranks": self.ranks, "spread": spread(self.ranks), "pool_r": self.r_max, "l1": self.l1, "tv": self.tv,
                "last_value": self.last, "trainable_start": self.trainable_start,
                "trainable_end": sum(r * widths[n] for n, r in self.ranks.items())}  # fmt: skip


def fold(module: nn.Module, r0: int, r_max: int) -> int:
    """Replace the layer's A (r_max x in) by alpha A[:r] and B by B[:, :r]; the update is unchanged."""
    alpha = module.ard_alpha.detach()
    r = rank_of(alpha, r0, r_max)
    a, b = module.lora_A["default"], module.lora_B["default"]
    new_a = nn.Linear(a.in_features, r, bias=False, device=a.weight.device, dtype=a.weight.dtype)
    new_b = nn.Linear(r, b.out_features, bias=False, device=b.weight.device, dtype=b.weight.dtype)
    with torch.no_grad():
        new_a.weight.copy_(alpha.to(a.weight.dtype) * a.weight[:r])
        new_b.weight.copy_(b.weight[:, :r])
    module.lora_A["default"], module.lora_B["default"] = new_a, new_b
    module.r["default"] = r
    del module.ard_alpha
    return r
