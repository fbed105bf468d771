"""`LowRankLinear`: a Linear layer stored as two factors, y = up(down(x)) + bias."""

from __future__ import annotations

import torch
from torch import nn


class LowRankLinear(nn.Module):
    """Drop-in replacement for `nn.Linear(in_features, out_features)` with weight `up.weight @ down.weight`.

    Tensors are named so the on-disk format is readable and adapters can address them:
    `down.weight` (rank x in), `up.weight` (out x rank) and, when present, `bias` (out) under the original
    name of the dense layer's bias, so untouched biases keep their names.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=False, device=device, dtype=dtype)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_factors(
        cls, up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None = None
    ) -> LowRankLinear:
        """Build from `up` (out x r) and `down` (r x in); dtype and device follow `up`."""
        out_features, rank = up.shape
        rank_d, in_features = down.shape
        if rank != rank_d:
            raise ValueError(f"factor ranks differ: up has {rank} columns, down has {rank_d} rows")
        module = cls(in_features, out_features, rank, bias=bias is not None, device=up.device, dtype=up.dtype)
        with torch.no_grad():
            module.up.weight.copy_(up)
            module.down.weight.copy_(down.to(up))
            if bias is not None:
                module.bias.copy_(bias.to(up))
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Call the sub-modules (not their weights) so that wrappers placed on `up` or `down`, such as peft adapters,
        # take part in the forward pass.
        y = self.up(self.down(x))
        return y if self.bias is None else y + self.bias

    def dense_weight(self) -> torch.Tensor:
        """The equivalent dense weight (out x in); 4-bit factors are dequantized."""
        return linear_weight(self.up) @ linear_weight(self.down)

    @property
    def weight(self) -> torch.Tensor:
        """`dense_weight()`, for code that reads a layer's `.weight` (peft's DoRA weight norms). Computed on each
        access; not a parameter, never saved."""
        return self.dense_weight()

    @property
    def num_params(self) -> int:
        n = self.rank * (self.in_features + self.out_features)
        return n + (self.out_features if self.bias is not None else 0)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.bias is not None}"
        )


def linear_weight(linear: nn.Module) -> torch.Tensor:
    """A Linear's weight as a float matrix, dequantizing a bitsandbytes 4-bit weight."""
    w = linear.weight
    if type(w).__name__ == "Params4bit":
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(w.data, w.quant_state).to(
            getattr(linear, "compute_dtype", None) or torch.float32
        )
    return w


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D: a Linear whose weight is stored transposed (in x out)."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)
