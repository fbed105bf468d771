"""Frozen 4-bit NF4 base weights (QLoRA) through bitsandbytes, with a guard against its CPU dequantization bug.

`quantize_nf4` swaps every Linear of the model (and both factors of every LowRankLinear) for a bitsandbytes
`Linear4bit` with NF4 codes and double quantization, leaving the output head (often tied to the embeddings) alone.
`dequantize` swaps them back to plain Linear layers holding the dequantized weights, which is what merging needs.

bitsandbytes 0.50.2 dequantizes wrongly on CPU for some widths of the last dimension (we measured: multiples of 16
that are not multiples of 64, with relative errors 0.16-0.28 instead of NF4's ~0.09). Factors often have such
shapes. Which widths are affected is probed, not assumed: `nf4_width_ok` quantizes a seeded Gaussian of that width on
the device and checks the round-trip error. A factor pair whose rank is affected is padded to a multiple of 64 with
zero rows and columns (the product is unchanged: a zero row of `down` feeds a zero column of `up`); a layer whose
input width is affected stays unquantized, and the report says so.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lowrank_compress.errors import LowrankError
from lowrank_compress.modules import LowRankLinear

NF4_BLOCK = 64
_MAX_NF4_ERROR = 0.13
"""Relative round-trip error above which a width counts as broken: NF4 gives ~0.09 on Gaussian data (we measured
0.087-0.093 across widths), the CPU bug 0.16-0.28."""


def require_bitsandbytes() -> Any:
    """The bitsandbytes module, or one clear error saying how to get it."""
    try:
        import bitsandbytes
    except ImportError:
        raise LowrankError(
            "--quantize nf4 needs bitsandbytes, an optional extra: pip install 'lowrank-compress[nf4]'"
        ) from None
    return bitsandbytes


def _quiet_import() -> Any:
    from lowrank_compress.adapters import quiet_bitsandbytes

    quiet_bitsandbytes()
    return require_bitsandbytes()


@functools.cache
def nf4_width_ok(width: int, device: str = "cpu") -> bool:
    """Whether NF4 quantization round-trips a (16 x width) seeded Gaussian on `device` within NF4's usual error."""
    _quiet_import()
    import bitsandbytes.functional as bnbf

    gen = torch.Generator().manual_seed(width)
    w = torch.randn(16, width, generator=gen).to(device)
    q, state = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True, blocksize=NF4_BLOCK)
    back = bnbf.dequantize_4bit(q, state).float()
    return float((back - w).norm() / w.norm()) <= _MAX_NF4_ERROR


@dataclass
class QuantizeReport:
    """What `quantize_nf4` did: counts, and the layers the CPU guard padded or left unquantized."""

    quantized: int = 0
    padded: list[str] = field(default_factory=list)
    unquantized: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "quantized_linears": self.quantized,
            "padded_ranks": self.padded,
            "left_unquantized": self.unquantized,
        }


def _to_4bit(
    weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype, device: str
) -> nn.Module:
    bnb = _quiet_import()
    out_f, in_f = weight.shape
    layer = bnb.nn.Linear4bit(
        in_f, out_f, bias=bias is not None, compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
        device="cpu",
    )  # fmt: skip
    layer.weight = bnb.nn.Params4bit(
        weight.detach().float().cpu().contiguous(), requires_grad=False, quant_type="nf4", compress_statistics=True,
        blocksize=NF4_BLOCK,
    )  # fmt: skip
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(compute_dtype).cpu(), requires_grad=False)
    # bitsandbytes' CPU inference path repacks the codes in place on the first no-grad forward and needs the output
    # width to be a multiple of 32; the generic path serves every shape and keeps the codes dequantizable
    layer.support_avx512bf16_for_cpu = False
    return layer.to(device)  # moving a Params4bit quantizes it


def quantize_nf4(
    model: nn.Module,
    *,
    compute_dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    skip: set[str] | None = None,
) -> QuantizeReport:
    """Replace the model's Linear layers and LowRankLinear factors by frozen NF4 `Linear4bit` layers, in place.

    The output head and modules named in `skip` stay as they are. GPT-2 Conv1D layers are not quantized.
    """
    _quiet_import()
    report = QuantizeReport()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip = skip or set()
    dev = torch.device(device).type
    for name, module in list(model.named_modules()):
        if not name or name in skip or module is head:
            continue
        if isinstance(module, LowRankLinear):
            up, down = module.up.weight.detach(), module.down.weight.detach()
            if not nf4_width_ok(module.in_features, dev):
                report.unquantized.append(name)
                continue
            rank = module.rank
            if not nf4_width_ok(rank, dev):
                padded = -(-rank // NF4_BLOCK) * NF4_BLOCK
                up = torch.cat([up, up.new_zeros(up.shape[0], padded - rank)], dim=1)
                down = torch.cat([down, down.new_zeros(padded - rank, down.shape[1])], dim=0)
                report.padded.append(name)
            module.down = _to_4bit(down, None, compute_dtype, device)
            module.up = _to_4bit(up, None, compute_dtype, device)
            if module.bias is not None:
                module.bias.data = module.bias.data.to(compute_dtype)
            report.quantized += 2
        elif type(module) is nn.Linear and not _inside_lowrank(model, name):
            if not nf4_width_ok(module.in_features, dev):
                report.unquantized.append(name)
                continue
            _set(model, name, _to_4bit(module.weight, module.bias, compute_dtype, device))
            report.quantized += 1
    return report


def _inside_lowrank(model: nn.Module, name: str) -> bool:
    parent, _, child = name.rpartition(".")
    return child in ("up", "down") and isinstance(
        model.get_submodule(parent) if parent else model, LowRankLinear
    )


def is_4bit(module: nn.Module) -> bool:
    return type(getattr(module, "weight", None)).__name__ == "Params4bit"


def dequantize(model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Replace every 4-bit Linear by a plain Linear with its dequantized weight (padding removed); returns how many."""
    from lowrank_compress.modules import linear_weight

    count = 0
    for name, module in list(model.named_modules()):
        if not is_4bit(module):
            continue
        w = linear_weight(module).detach().to(dtype)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(parent, LowRankLinear):  # drop the zero padding of a padded rank
            w = w[:, : parent.rank] if child == "up" else w[: parent.rank]
        linear = nn.Linear(w.shape[1], w.shape[0], bias=module.bias is not None, device=w.device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(w)
            if module.bias is not None:
                linear.bias.copy_(module.bias.detach().to(dtype))
        linear.requires_grad_(False)
        setattr(parent, child, linear)
        count += 1
    return count


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
