"""LoRAE's low-rank regularizer (Mazumder et al., "Learning Low-Rank Latent Spaces with Simple Deterministic
Autoencoder", WACV 2024), carried over to language models: LoRAE adds `lambda ||M||_*`, the exact nuclear norm of the
linear map that produces its latent, to the loss. Here the linear maps with a latent are each layer's low-rank
product: the factors U D of a factorized layer (`--train factors`) or the update s B A of a LoRA / DoRA adapter.

Unlike TRP's factored surrogate (`--nuclear`, (||U||^2 + ||D||^2) / 2), this is the norm of the product itself, so
moving scale between the two factors does not lower it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from lowrank_compress.modules import LowRankLinear
from lowrank_compress.training.methods import TrainingMethod

if TYPE_CHECKING:
    from lowrank_compress.training.loop import Run


class _ProductNuclear(torch.autograd.Function):
    """||U D||_* of U (m x r) and D (r x n) without forming U D: with U = Q1 R1 and D^T = Q2 R2 (thin QR), U D =
    Q1 (R1 R2^T) Q2^T has the singular values of the r x r core C = R1 R2^T = P S V^T. The gradient is the
    subgradient G = Q1 P V^T Q2^T of the directions with nonzero singular value, so dU = G D^T and dD = U^T G; a zero
    product (a LoRA B at its start) gets the zero subgradient instead of the NaN that the QR's backward would give."""

    @staticmethod
    def forward(ctx: Any, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        q1, r1 = torch.linalg.qr(up.double())
        q2, r2 = torch.linalg.qr(down.double().T)
        p, s, vt = torch.linalg.svd(r1 @ r2.T)
        live = s > s.max() * max(up.shape[0], down.shape[1]) * 1e-12  # round-off directions carry no gradient
        ctx.save_for_backward(up, down, q1 @ p[:, live], q2 @ vt[live].T)
        return s.sum().to(up.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        up, down, left, right = ctx.saved_tensors
        g = grad.double()
        d_up = g * left @ (right.T @ down.double().T)
        d_down = g * (up.double().T @ left) @ right.T
        return d_up.to(up.dtype), d_down.to(down.dtype)


def product_nuclear(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """The nuclear norm of `up @ down`, differentiable in both factors."""
    return _ProductNuclear.apply(up, down)


def low_rank_products(model: Any) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """(U, D, scale) of every trained low-rank product: a factorized layer's factors when they train, and every
    LoRA / DoRA adapter's B and A with its scaling (the pairs LoRA-Pro adjusts)."""
    from lowrank_compress.training.lora_pro import lora_pairs

    products = [(m.up.weight, m.down.weight, 1.0) for m in model.modules()
                if isinstance(m, LowRankLinear) and m.up.weight.requires_grad]  # fmt: skip
    return products + [(b, a, s) for a, b, s in lora_pairs(model) if a.requires_grad]


class LowRankReg(TrainingMethod):
    """`--low-rank-reg W`: W times the sum of the trained products' nuclear norms, added to the loss."""

    name = "low_rank_reg"

    def __init__(self, weight: float) -> None:
        self.weight = weight
        self.layers = 0
        self.last: float | None = None

    def regularizer(self, run: Run) -> torch.Tensor | None:
        products = low_rank_products(run.model)
        self.layers = len(products)
        if not products:
            return None
        value = self.weight * torch.stack([s * product_nuclear(u, d).float() for u, d, s in products]).sum()
        self.last = float(value.detach())
        return value

    def record(self, run: Run) -> dict[str, Any]:
        return {"weight": self.weight, "layers": self.layers, "last_value": self.last}
