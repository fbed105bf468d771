"""GoRA (He et al. 2025, "GoRA: Gradient-driven Adaptive Low Rank Adaptation"): before training, the gradients of
every adapted weight are accumulated over a few batches (G, the mean over them); each layer's importance is
I = mean |W * G| (elementwise), the ranks are shared out in proportion to it under the trainable-parameter budget
plain LoRA would have, sum_l r (in_l + out_l), and each adapter starts from the gradient: A random (peft's init),
B = -(gamma / alpha) G A^T (A A^T)^-1, the least-squares B for B A = -(gamma / alpha) G, so that the initial
update s B A = -(gamma / r) G A^+ A is a gradient-descent step projected on A's rows (s = alpha / r with r the
average rank, as GoRA's fixed scaling has it: each layer gets lora_alpha = alpha r_l / r in peft's alpha_pattern).
The initial update is not zero: GoRA starts one projected gradient step away from the model (the authors' code leaves
W as it is too). The descent sign is ours; the authors' code folds the sign into how it stores the gradient."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lowrank_compress.training.methods import TrainingMethod, spread

if TYPE_CHECKING:
    from lowrank_compress.recipe import FinetuneSettings
    from lowrank_compress.training.loop import Run


def allocate(importance: dict[str, float], widths: dict[str, int], rank: int, max_rank: int | dict[str, int],
             min_rank: int = 1) -> dict[str, int]:  # fmt: skip
    """Ranks in proportion to importance under the budget sum_l rank * widths[l] (widths: in + out), each in
    [min_rank, max_rank] (one cap, or one per layer): r_l* = budget a_l / widths[l] (a_l the normalized importance)
    rounded down, then the ranks left over given one at a time to the layers furthest below r_l*, while the budget
    allows."""
    cap = max_rank if isinstance(max_rank, dict) else dict.fromkeys(importance, max_rank)
    budget = rank * sum(widths.values())
    total = sum(importance.values())
    share = {n: (v / total if total > 0 else 1 / len(importance)) for n, v in importance.items()}
    ideal = {n: budget * share[n] / widths[n] for n in importance}
    ranks = {n: min(max(math.floor(ideal[n]), min_rank), cap[n]) for n in importance}
    used = sum(ranks[n] * widths[n] for n in ranks)
    while True:
        fits = [n for n in ranks if ranks[n] < cap[n] and used + widths[n] <= budget]
        if not fits:
            return ranks
        best = max(fits, key=lambda n: (ideal[n] - ranks[n], importance[n]))
        ranks[best] += 1
        used += widths[best]


def initial_b(a: torch.Tensor, grad: torch.Tensor, gamma: float, alpha: float) -> torch.Tensor:
    """B = -(gamma / alpha) G A^T (A A^T)^-1 (A r x in, G out x in), in float64."""
    a, g = a.double(), grad.double()
    return -(gamma / alpha) * g @ a.T @ torch.linalg.pinv(a @ a.T, hermitian=True)


def importance(weight: torch.Tensor, grad: torch.Tensor) -> float:
    """GoRA's I = mean |W * G|."""
    return float((weight.double() * grad.double()).abs().mean())


class Gora(TrainingMethod):
    """`--init gora`: gradients, importance and ranks in setup (before peft builds the adapters, which take the
    ranks as rank_pattern); the gradient init of B when training starts (not on a resume: the checkpoint holds B)."""

    name = "gora"

    def __init__(self, settings: FinetuneSettings) -> None:
        self.settings = settings
        self.ranks: dict[str, int] = {}
        self.importance: dict[str, float] = {}
        self.grads: dict[str, torch.Tensor] = {}
        self.initialized = 0  # layers whose B was set from the gradient
        self.widths: dict[str, int] = {}  # in + out per layer

    def setup(self, run: Run, saved: dict[str, Any] | None) -> None:
        from lowrank_compress.adapters import adapter_targets

        s = self.settings
        names = adapter_targets(run.model)
        if saved:  # resumed: the ranks the run started with (the checkpoint holds the trained values)
            self.ranks, self.importance = dict(saved["ranks"]), dict(saved["importance"])
            self.widths = dict(saved["widths"])
        else:
            self.grads = accumulate_gradients(run, names, s.init_batches)
            weights = {n: dense_weight(run.model.get_submodule(n)) for n in names}
            self.importance = {n: importance(weights[n], self.grads[n]) for n in names}
            self.widths = {n: sum(weights[n].shape) for n in names}
            caps = {n: min(4 * s.rank, *weights[n].shape) for n in names}  # beyond min(in, out) adds nothing
            self.ranks = allocate(self.importance, self.widths, s.rank, max_rank=caps)
        alpha = s.lora_alpha
        run.adapter_options["rank_pattern"] = dict(self.ranks)
        run.adapter_options["alpha_pattern"] = {n: alpha * r / s.rank for n, r in self.ranks.items()}

    def on_train_begin(self, run: Run, resumed: bool) -> None:
        if resumed:
            return
        prefix = "base_model.model."
        with torch.no_grad():
            for name, module in run.model.named_modules():
                key = name.removeprefix(prefix)
                if key in self.grads and hasattr(module, "lora_A"):
                    a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
                    b.copy_(initial_b(a, self.grads[key].to(a.device), self.settings.gora_gamma,
                                      self.settings.lora_alpha).to(b.dtype))  # fmt: skip
                    self.initialized += 1
        self.grads = {}  # out x in per layer: not kept through training

    def checkpoint_info(self, run: Run) -> dict[str, Any]:
        return {"ranks": self.ranks, "importance": self.importance, "widths": self.widths}

    def record(self, run: Run) -> dict[str, Any]:
        budget = self.settings.rank * len(self.ranks)
        return {"ranks": self.ranks, "spread": spread(self.ranks), "importance": self.importance,
                "rank_sum": sum(self.ranks.values()), "plain_rank_sum": budget, "batches": self.settings.init_batches,
                "initialized_layers": self.initialized, "gamma": self.settings.gora_gamma,
                "trainable": sum(r * self.widths[n] for n, r in self.ranks.items()),
                "plain_lora_trainable": self.settings.rank * sum(self.widths.values())}  # fmt: skip


def dense_weight(module: nn.Module) -> torch.Tensor:
    """W (out x in) of a Linear or a factorized layer (up @ down)."""
    from lowrank_compress.modules import LowRankLinear, is_conv1d

    if isinstance(module, LowRankLinear):
        return module.dense_weight().detach()
    return module.weight.detach().T if is_conv1d(module) else module.weight.detach()


def accumulate_gradients(run: Run, names: list[str], batches: int) -> dict[str, torch.Tensor]:
    """The mean over `batches` training batches of dL/dW (L the training loss: the distillation loss with a
    teacher) for each named layer, W (out x in) its whole weight: sum over tokens of (dL/dy) x^T, caught by hooks on
    each layer's input and output, so a factorized layer's gradient is its full weight's without forming W as a
    parameter (the model's parameters stay frozen)."""
    from lowrank_compress.training.loop import batch_loss

    grads: dict[str, torch.Tensor] = {}
    handles = [_hook(run.model.get_submodule(n), n, grads) for n in names]
    run.model.enable_input_require_grads()  # frozen parameters: the graph starts at the embeddings' output
    try:
        for i in range(batches):
            batch = run.batch(i, 0)
            with run.autocast():
                loss = batch_loss(run, batch)
            loss.backward()
    finally:
        for h in handles:
            h.remove()
        run.model.disable_input_require_grads()
    return {n: run.accelerator.reduce(g / batches, reduction="mean") for n, g in grads.items()}


def _hook(module: nn.Module, name: str, grads: dict[str, torch.Tensor]) -> Any:
    def forward(mod: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        x = args[0].detach()

        def backward(g: torch.Tensor) -> None:
            step = g.reshape(-1, g.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()
            grads[name] = grads[name] + step if name in grads else step

        if output.requires_grad:
            output.register_hook(backward)

    return module.register_forward_hook(forward)
