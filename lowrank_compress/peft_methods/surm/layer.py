"""SURM's layer: a sum of circulant x skew-circulant products, built as a dense matrix from its diagonals."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lowrank_compress.peft_methods.common import MethodLayer


def ldr_matrix(g: torch.Tensor, h: torch.Tensor, n_out: int, n_in: int) -> torch.Tensor:
    """The top-left n_out x n_in corner of M = sum_i C(g_i) S(h_i) (C: circulant, S: skew-circulant, first columns
    g_i, h_i of length n), built without FFTs in O(n^2 r).

    Entry by entry, M[j, k] = sum_m T[(j - m) % n, (m - k) % n] sign(m - k) with T = G^T H (all r terms in one
    matmul) and sign -1 where m < k (S's wrapped entries). For fixed d = (j - k) % n the pairs (a, b) = ((j-m)%n,
    (m-k)%n) run over the wrapped diagonal a + b = d, and the ones with m < k are those with b >= n - k. So with P the
    prefix sums along b of U[d, b] = T[(d - b) % n, b] (P[d, 0] = 0): M[j, k] = 2 P[d, n - k] - P[d, n].
    Applying M as a dense matrix costs what the base layer costs; the FFT products it replaces (two transforms of
    every token per term) made a training step 16x slower than LoRA's."""
    n = g.shape[-1]
    t = g.T @ h
    rows = torch.arange(n, device=g.device)
    u = torch.gather(t, 0, (rows[:, None] - rows[None, :]) % n)  # U[d, b] = T[(d - b) % n, b]
    p = torch.nn.functional.pad(u.cumsum(1), (1, 0))  # P[d, c] = sum_{b < c} U[d, b]
    j, k = rows[:n_out, None], rows[None, :n_in]
    d = (j - k) % n
    return 2 * p[d, n - k] - p[d, n]


def _ldr_apply(g: torch.Tensor, h: torch.Tensor, x: torch.Tensor, n_out: int) -> torch.Tensor:
    return x @ ldr_matrix(g, h, n_out, x.shape[-1]).T


class SurmLayer(MethodLayer):
    """ΔW x = scale sum_i C(g_i) S(h_i) x on x zero-padded to n = max(in, out), cut to the first `out` entries."""

    adapter_layer_names = ("surm_g", "surm_h")
    other_param_names = ("surm_scale",)

    def update_layer(self, adapter_name: str, config: Any) -> None:
        if not hasattr(self, "surm_g"):
            self.surm_g = nn.ParameterDict({})
            self.surm_h = nn.ParameterDict({})
            self.surm_scale: dict[str, float] = {}
        n = max(self.in_features, self.out_features)
        device = self.base_weight().device
        gen = torch.Generator().manual_seed(config.init_seed) if config.init_seed is not None else None
        self.surm_g[adapter_name] = nn.Parameter(torch.zeros(config.r, n, device=device))
        self.surm_h[adapter_name] = nn.Parameter((torch.randn(config.r, n, generator=gen) * 0.02).to(device))
        self.surm_scale[adapter_name] = config.scale if config.scale is not None else 1.0 / n
        self.set_adapter(self.active_adapters)

    def update(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        g, h = self.surm_g[adapter], self.surm_h[adapter]
        x = x.to(g.dtype)
        if torch.is_grad_enabled() and (g.requires_grad or x.requires_grad):
            # M recomputed in the backward pass: kept for it, every layer would hold an out x in float32 matrix
            # (the size of the model's own weights in float32)
            y = torch.utils.checkpoint.checkpoint(_ldr_apply, g, h, x, self.out_features, use_reentrant=False)
        else:
            y = _ldr_apply(g, h, x, self.out_features)
        return self.surm_scale[adapter] * y

    def adapter_delta(self, adapter: str) -> Any:
        """ΔW as a dense matrix (full rank in general)."""
        from lowrank_compress.adapter_kinds import AdapterDelta

        with torch.no_grad():
            g, h = self.surm_g[adapter], self.surm_h[adapter]
            dense = (
                self.surm_scale[adapter] * ldr_matrix(g, h, self.out_features, self.in_features).float().cpu()
            )
        return AdapterDelta(torch.zeros(0, self.in_features), torch.zeros(self.out_features, 0), dense=dense)
