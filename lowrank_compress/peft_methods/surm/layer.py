"""SURM's layer: a sum of circulant x skew-circulant products, built as a dense matrix from its diagonals."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lowrank_compress.peft_methods.common import MethodLayer


def _turn_rows(x: torch.Tensor) -> torch.Tensor:
    """Y[i, j] = X[i, (j - i) % n] for X of shape (m, n), m <= n: row i turned right by i. Done by reading [X X]
    with a row stride of 2n - 1 (a reshape, no index tensor), so its backward pass is as cheap as its forward."""
    m, n = x.shape
    flat = torch.cat([x, x], 1).flatten()
    if m < n:  # the last row reads n - m entries past the end; they fall in the columns cut off
        flat = torch.nn.functional.pad(flat, (0, n - m))
    return flat[n : n + m * (2 * n - 1)].view(m, 2 * n - 1)[:, :n]


def ldr_matrix_t(g: torch.Tensor, h: torch.Tensor, n_out: int, n_in: int) -> torch.Tensor:
    """The transpose of the top-left n_out x n_in corner of M = sum_i C(g_i) S(h_i) (C: circulant, S:
    skew-circulant, first columns g_i, h_i of length n), built without FFTs in O(n^2 r).

    Entry by entry, M[j, k] = sum_m T[(j - m) % n, (m - k) % n] sign(m - k) with T = G^T H (all r terms in one
    matmul) and sign -1 where m < k (S's wrapped entries). For fixed d = (j - k) % n the pairs (a, b) = ((j-m)%n,
    (m-k)%n) run over the wrapped diagonal a + b = d, and the ones with m < k are those with b >= n - k. So with Q
    the prefix sums down the columns of V[b, d] = T[(d - b) % n, b] (Q[0] = 0, Q[n] the diagonals' totals):
    M[j, k] = 2 Q[n - k, d] - Q[n, d] = F[k, (j - k) % n], F[k] = 2 Q[n - k] - Q[n]; both V and M^T are turned
    rows. Applying M as a dense matrix costs what the base layer costs; the FFT products it replaces (two transforms
    of every token per term) made a training step 16x slower than LoRA's."""
    n = g.shape[-1]
    with torch.autocast(g.device.type, enabled=False):  # prefix sums of n terms need float32, not bf16
        # V[b, d] = T[(d - b) % n, b], from T^T = H^T G (contiguous, no transpose copy)
        v = _turn_rows(h.T @ g)
        c = v.cumsum(0)  # C[c, d] = sum_{b <= c} V[b, d] = Q[c + 1, d]
        f = 2 * c[n - n_in :].flip(0) - c[-1]  # F[k, d] = 2 Q[n - k, d] - Q[n, d], k < n_in
        return _turn_rows(f)[:, :n_out]


def _ldr_apply(g: torch.Tensor, h: torch.Tensor, x: torch.Tensor, n_out: int) -> torch.Tensor:
    return x @ ldr_matrix_t(g, h, n_out, x.shape[-1])


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
            m_t = ldr_matrix_t(g, h, self.out_features, self.in_features)
            dense = self.surm_scale[adapter] * m_t.T.float().cpu()
        return AdapterDelta(torch.zeros(0, self.in_features), torch.zeros(self.out_features, 0), dense=dense)
