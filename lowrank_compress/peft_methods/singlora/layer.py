"""SingLoRA's layer: one matrix A, the update A A*^T (symmetric for square layers), scaled by a ramp."""

from __future__ import annotations

import math
from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from torch import nn

from lowrank_compress.peft_methods.common import MethodLayer


class SingLoraLayer(MethodLayer):
    """ΔW = (alpha / r) u(t) A A*^T for out >= in (A: out x r, A* its first `in` rows), and (alpha / r) u(t) A* A^T
    for out < in (A: in x r, A* its first `out` rows): the paper's rectangular case, which for out = in is
    A A^T. The step t lives in a buffer saved with the adapter, so a saved adapter keeps the ramp where training
    left it; finetune advances it once per optimizer step (`advance`)."""

    adapter_layer_names = ("singlora_A",)
    other_param_names = ("singlora_scale", "singlora_ramp", "singlora_step")

    def update_layer(self, adapter_name: str, config: Any) -> None:
        if not hasattr(self, "singlora_A"):
            self.singlora_A = nn.ParameterDict({})
            self.singlora_step = BufferDict({}, persistent=True)
            self.singlora_scale: dict[str, float] = {}
            self.singlora_ramp: dict[str, int] = {}
        if config.r > min(self.in_features, self.out_features):
            raise ValueError(f"SingLoRA rank {config.r} exceeds the layer's smaller width")
        n = max(self.in_features, self.out_features)
        a = torch.empty(n, config.r)
        gen = torch.Generator().manual_seed(config.init_seed) if config.init_seed is not None else None
        # Kaiming-uniform (a = sqrt(5)) with the layer's width n as fan-in, as LoRA's A: the ramp only delays the
        # update A A^T, whose diagonal is sum_k a_ik^2 > 0; with fan-in r (bound 1 / sqrt(r), as two unofficial
        # implementations read the paper's "Kaiming") it is about alpha / 3r at u = 1, far above the weights:
        # SmolLM2 at 0.8, r 32, alpha 64, u = 1 before any training: perplexity 5e7 against 11.86; with fan-in n, 12.28
        bound = 1.0 / math.sqrt(n)
        with torch.no_grad():
            a.uniform_(-bound, bound, generator=gen)
        self.singlora_A[adapter_name] = nn.Parameter(a)
        self.singlora_step[adapter_name] = torch.zeros((), dtype=torch.float32)
        self.singlora_scale[adapter_name] = config.alpha / config.r
        self.singlora_ramp[adapter_name] = config.ramp_steps
        self.set_adapter(self.active_adapters)

    def ramp(self, adapter: str) -> float:
        """u(t) = min(t / T, 1)."""
        return min(float(self.singlora_step[adapter]) / self.singlora_ramp[adapter], 1.0)

    def advance(self) -> None:
        """One optimizer step done: t += 1 for every adapter."""
        for step in self.singlora_step.values():
            step.add_(1)

    def factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(left, right) with ΔW = c left right^T, c = (alpha / r) u(t)."""
        a = self.singlora_A[adapter]
        if self.out_features >= self.in_features:
            return a, a[: self.in_features]
        return a[: self.out_features], a

    def update(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        c = self.singlora_scale[adapter] * self.ramp(adapter)
        left, right = self.factors(adapter)
        return c * ((x.to(left.dtype) @ right) @ left.T)

    def adapter_delta(self, adapter: str) -> Any:
        from lowrank_compress.adapter_kinds import AdapterDelta

        c = self.singlora_scale[adapter] * self.ramp(adapter)
        left, right = (t.detach().float().cpu() for t in self.factors(adapter))
        return AdapterDelta(right.T.contiguous(), c * left)
