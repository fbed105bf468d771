"""LoLDU's layer: the LDU factors of the frozen weight, of which only the diagonal (and a scale) train."""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from torch import nn

from lowrank_compress.peft_methods.common import MethodLayer


class LoLduLayer(MethodLayer):
    """ΔW = P L_r (sigma diag(z) - D_r) U_r, computed as ((x U_r^T) * (sigma z - d)) (P L_r)^T: r + 1 trainable
    numbers per layer. P L_r and U_r are buffers saved with the adapter (an LU of the reloaded weight could pivot
    differently after NF4 rounding, so the saved ones are the truth)."""

    adapter_layer_names = ("loldu_z", "loldu_scale")
    other_param_names = ("loldu_PL", "loldu_U", "loldu_d")

    def update_layer(self, adapter_name: str, config: Any) -> None:
        if not hasattr(self, "loldu_z"):
            self.loldu_z = nn.ParameterDict({})
            self.loldu_scale = nn.ParameterDict({})
            self.loldu_PL = BufferDict({}, persistent=True)
            self.loldu_U = BufferDict({}, persistent=True)
            self.loldu_d = BufferDict({}, persistent=True)
        w = self.base_weight()
        device = w.device
        pl, u, d = ldu(w.double().cpu(), config.r)
        self.loldu_PL[adapter_name] = pl.float().to(device)
        self.loldu_U[adapter_name] = u.float().to(device)
        self.loldu_d[adapter_name] = d.float().to(device)
        self.loldu_z[adapter_name] = nn.Parameter(d.float().clone().to(device))
        self.loldu_scale[adapter_name] = nn.Parameter(torch.ones((), device=device))
        self.set_adapter(self.active_adapters)

    def coefficients(self, adapter: str) -> torch.Tensor:
        """sigma z - d: the update's weight on each of the r components (zero at the start)."""
        return self.loldu_scale[adapter] * self.loldu_z[adapter] - self.loldu_d[adapter]

    def update(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        u, pl = self.loldu_U[adapter], self.loldu_PL[adapter]
        return ((x.to(u.dtype) @ u.T) * self.coefficients(adapter)) @ pl.T

    def adapter_delta(self, adapter: str) -> Any:
        from lowrank_compress.adapter_kinds import AdapterDelta

        c = self.coefficients(adapter).detach().float().cpu()
        pl = self.loldu_PL[adapter].detach().float().cpu()
        return AdapterDelta(self.loldu_U[adapter].detach().float().cpu().clone(), pl * c[None, :])


def ldu(w: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W = P L D U (LU with partial pivoting; L unit lower, U unit upper, D diagonal); returns P L's first r columns,
    U's first r rows and D's first r entries. A zero pivot among them (a weight of rank below r) is an error."""
    p, lower, upper = torch.linalg.lu(w)
    d = torch.diagonal(upper)[:r]
    if d.numel() < r or bool((d.abs() <= 1e-12 * upper.abs().max()).any()):
        raise ValueError(f"LoLDU rank {r} exceeds the weight's rank (a zero pivot in its LU decomposition)")
    return (p @ lower)[:, :r], upper[:r] / d[:, None], d
