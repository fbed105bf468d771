"""BoRA's layer: LoRA's B A, then learned row and column magnitudes."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lowrank_compress.peft_methods.common import MethodLayer


class BoraLayer(MethodLayer):
    """W' = V_r diag(m_col / ||V_r||_col), V_r = diag(m_row / ||V||_row) V, V = W + s B A. At the start B = 0,
    m_row = ||W||_row and m_col = ||W||_col, so W' = W. The norms are those of the weight being trained
    (gradients flow through them, as in the paper); the update is computed as x (W' - W)^T next to the base's own
    output, so the base layer keeps its own kernel (factors, 4-bit)."""

    adapter_layer_names = ("bora_A", "bora_B", "bora_m_row", "bora_m_col")
    other_param_names = ("bora_scale",)

    def update_layer(self, adapter_name: str, config: Any) -> None:
        if not hasattr(self, "bora_A"):
            self.bora_A = nn.ParameterDict({})
            self.bora_B = nn.ParameterDict({})
            self.bora_m_row = nn.ParameterDict({})
            self.bora_m_col = nn.ParameterDict({})
            self.bora_scale: dict[str, float] = {}
        w = self.base_weight()
        gen = torch.Generator().manual_seed(config.init_seed) if config.init_seed is not None else None
        a = torch.empty(config.r, self.in_features)
        bound = 1.0 / math.sqrt(self.in_features)  # Kaiming-uniform (a = sqrt(5)), as LoRA's A
        with torch.no_grad():
            a.uniform_(-bound, bound, generator=gen)
        self.bora_A[adapter_name] = nn.Parameter(a.to(w.device))
        self.bora_B[adapter_name] = nn.Parameter(torch.zeros(self.out_features, config.r, device=w.device))
        self.bora_m_row[adapter_name] = nn.Parameter(torch.linalg.vector_norm(w, dim=1))
        self.bora_m_col[adapter_name] = nn.Parameter(torch.linalg.vector_norm(w, dim=0))
        self.bora_scale[adapter_name] = config.alpha / config.r
        self.set_adapter(self.active_adapters)

    def scales(self, adapter: str, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(V, row factor, column factor) with W' = diag(row) V diag(col), from the base weight `w`."""
        v = w + self.bora_scale[adapter] * (self.bora_B[adapter] @ self.bora_A[adapter])
        row = self.bora_m_row[adapter] / torch.linalg.vector_norm(v, dim=1).clamp_min(1e-12)
        col = self.bora_m_col[adapter] / torch.linalg.vector_norm(v * row[:, None], dim=0).clamp_min(1e-12)
        return v, row, col

    def update(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        w = self.base_weight()
        v, row, col = self.scales(adapter, w)
        delta = row[:, None] * v * col[None, :] - w
        return x.to(delta.dtype) @ delta.T

    def adapter_delta(self, adapter: str) -> Any:
        """Low-rank with both scalings: W' = diag(row) (W + b a) diag(col), which grows factors exactly."""
        from lowrank_compress.adapter_kinds import AdapterDelta

        with torch.no_grad():
            _, row, col = self.scales(adapter, self.base_weight())
            b = self.bora_scale[adapter] * self.bora_B[adapter]
        t = lambda p: p.detach().float().cpu().clone()  # noqa: E731
        return AdapterDelta(t(self.bora_A[adapter]), t(b), row_scale=t(row), col_scale=t(col))
