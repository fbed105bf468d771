"""LoRA-Pro (Wang et al. 2024, "LoRA-Pro: Are Low-Rank Adapters Properly Optimized?"): a LoRA step with gradients
g_A, g_B moves W by s (B g_A + g_B A) to first order (s = alpha / r): an "equivalent gradient" confined to updates
reachable through A and B. LoRA-Pro replaces g_A, g_B by the pair whose equivalent gradient is the closest to the
full gradient G, which it never forms: g_A = s B^T G and g_B = s G A^T hold all it needs. The closed form (their
Theorem 2 and 3):

    g_A' = (1/s^2) (B^T B)^-1 g_A + X A
    g_B' = (1/s^2) [I - B (B^T B)^-1 B^T] g_B (A A^T)^-1 - B X

gives s (B g_A' + g_B' A) = P_B G + (I - P_B) G P_A, the orthogonal projection of G onto {B dA + dB A}, for every
r x r matrix X; X is chosen to keep (g_A', g_B') closest to (g_A, g_B), which is the Sylvester equation

    B^T B X + X A A^T = -(1/s^2) (B^T B)^-1 g_A A^T.

As in the authors' memory-efficient AdamW variant, the adjusted gradients then go through plain AdamW (their full
variant keeps Adam moments of the m x n equivalent gradient, as large as full fine-tuning's)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from lowrank_compress.training.methods import TrainingMethod

if TYPE_CHECKING:
    from lowrank_compress.training.loop import Run


def _pinv_sym(m: torch.Tensor) -> torch.Tensor:
    """Pseudo-inverse of a symmetric positive semi-definite r x r matrix (B = 0 at LoRA's start: then 0)."""
    return torch.linalg.pinv(m, hermitian=True, rtol=1e-10)


def solve_sylvester_sym(p: torch.Tensor, q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """X with P X + X Q = C for symmetric positive semi-definite P, Q: in their eigenbases the equation is
    elementwise, X~_ij = C~_ij / (lambda_i + mu_j); where lambda_i + mu_j = 0 the least-norm X~_ij = 0."""
    lam, u = torch.linalg.eigh(p)
    mu, v = torch.linalg.eigh(q)
    den = lam[:, None] + mu[None, :]
    tol = 1e-12 * max(float(den.abs().max()), 1e-300)
    ct = u.T @ c @ v
    xt = torch.where(den.abs() > tol, ct / torch.where(den.abs() > tol, den, 1.0), 0.0)
    return u @ xt @ v.T


def adjust(a: torch.Tensor, b: torch.Tensor, grad_a: torch.Tensor, grad_b: torch.Tensor,
           s: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """LoRA-Pro's gradients of A (r x in) and B (out x r) from LoRA's, in float64 (module docstring)."""
    a, b, ga, gb = (t.double() for t in (a, b, grad_a, grad_b))
    btb, aat = b.T @ b, a @ a.T
    btb_inv, aat_inv = _pinv_sym(btb), _pinv_sym(aat)
    x = solve_sylvester_sym(btb, aat, -(btb_inv @ ga @ a.T) / s**2)
    new_a = btb_inv @ ga / s**2 + x @ a
    new_b = (gb - b @ (btb_inv @ (b.T @ gb))) @ aat_inv / s**2 - b @ x
    return new_a, new_b


def lora_pairs(model: Any, adapter: str = "default") -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """(A, B, s) of every peft LoRA layer of `model`."""
    pairs = []
    for module in model.modules():
        lora_a = getattr(module, "lora_A", None)
        if lora_a is not None and adapter in lora_a and hasattr(module, "scaling"):
            pairs.append(
                (lora_a[adapter].weight, module.lora_B[adapter].weight, float(module.scaling[adapter]))
            )
    return pairs


class LoraPro(TrainingMethod):
    """`--optimizer lora-pro`: every step's LoRA gradients replaced by LoRA-Pro's before clipping and AdamW."""

    name = "lora_pro"

    def __init__(self) -> None:
        self.layers = 0

    def on_gradients(self, run: Run) -> None:
        pairs = lora_pairs(run.accelerator.unwrap_model(run.model))
        self.layers = len(pairs)
        for a, b, s in pairs:
            if a.grad is None or b.grad is None:
                continue
            new_a, new_b = adjust(a.detach(), b.detach(), a.grad, b.grad, s)
            a.grad.copy_(new_a.to(a.grad.dtype))
            b.grad.copy_(new_b.to(b.grad.dtype))

    def record(self, run: Run) -> dict[str, Any]:
        return {
            "layers": self.layers,
            "x": "sylvester",
            "moments": "per factor (memory-efficient AdamW variant)",
        }
