"""Adapters on factorized models: peft LoRA / DoRA around each `LowRankLinear` as a whole, and merging them back.

A LoRA around the whole layer adds s B A to W = up down, so the update spans the full weight space instead of the
factors' subspace. Merging keeps the layer factorized:

    grow        up' = [up, s B],  down' = [down; A]                rank r + r_a, exact
    keep        the best rank-r approximation of up' down'         one SVD of the merged weight; whitened by the
                                                                   calibration inputs when their statistics are given
    break-even  grow while r + r_a stays below the break-even      exact for every adapter; a full-rank update
                rank mn / (m + n), else the layer stored dense     (C3A, SURM) makes its layers dense
DoRA rescales rows: W' = diag(m / ||W + s B A||_row) (W + s B A), which is a row scaling of up' (exact as well).

`register_peft()` (run by `import lowrank_compress`, or when peft is imported after it: see plugins.py) registers
the methods of `peft_methods` with peft, so adapters saved in PEFT's format load with plain
`PeftModel.from_pretrained` on a factorized model.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from lowrank_compress.adapter_kinds import AdapterDelta, AdapterOptions, delta_of, peft_config
from lowrank_compress.choices import ADAPTERS, MERGE_RANKS
from lowrank_compress.errors import LowrankError
from lowrank_compress.modules import LowRankLinear, is_conv1d
from lowrank_compress.plugins import quiet_bitsandbytes

_REGISTERED = False


def register_peft() -> None:
    """Teach peft to wrap LowRankLinear and add our methods to its registries (idempotent; see peft_methods)."""
    global _REGISTERED
    if _REGISTERED:
        return
    quiet_bitsandbytes()  # peft imports it when installed
    try:
        import peft  # noqa: F401
    except ImportError:  # peft is a dependency; without it there is nothing to register
        return
    from lowrank_compress.peft_methods import register

    _REGISTERED = True  # before registering: peft's imports below may re-enter through the import hook
    register()


# --------------------------------------------------------------------------------------------------- attaching


def adapter_targets(model: nn.Module) -> list[str]:
    """Modules an adapter wraps: every LowRankLinear as a whole, and every other Linear (or 4-bit Linear, GPT-2
    Conv1D) that is neither part of a LowRankLinear nor the output head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inside = {
        f"{n}.{c}" for n, m in model.named_modules() if isinstance(m, LowRankLinear) for c in ("up", "down")
    }
    names = []
    for name, module in model.named_modules():
        if not name or module is head or name in inside:
            continue
        if isinstance(module, (LowRankLinear, nn.Linear)) or is_conv1d(module):
            names.append(name)
    return names


def attach(
    model: nn.Module, kind: str, rank: int, alpha: float, targets: Iterable[str], *,
    block_size: int | None = None, blocks: int = 2, ramp_steps: int = 100, seed: int = 0,
    rank_pattern: dict[str, int] | None = None, alpha_pattern: dict[str, float] | None = None,
    adalora: dict[str, Any] | None = None,
) -> Any:  # fmt: skip
    """A peft model with fresh adapters of `kind` on `targets`, each starting at a zero update (LoRA's B = 0, C3A's
    kernels, GraLoRA's B blocks and MiSS's block all zero; SingLoRA's ramp at u(0) = 0), so the model starts exactly
    where it was."""
    from peft import get_peft_model

    if kind not in ADAPTERS:
        raise LowrankError(f"unknown adapter {kind!r}; choose one of {', '.join(ADAPTERS)}")
    if rank < 1:
        raise LowrankError(f"adapter rank must be at least 1, got {rank}")
    names = list(targets)
    if not names:
        raise LowrankError("the model has no Linear layers to put adapters on")
    register_peft()
    options = AdapterOptions(rank=rank, alpha=alpha, block_size=block_size, blocks=blocks, ramp_steps=ramp_steps,
                             seed=seed, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                             adalora=adalora)  # fmt: skip
    config = peft_config(kind, model, names, options)
    with warnings.catch_warnings():  # peft calls a transformers property deprecated in v5; not ours to fix
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(model, config)


# --------------------------------------------------------------------------------------------------- merging


def extract_adapters(peft_model: Any, adapter: str = "default") -> tuple[nn.Module, dict[str, AdapterDelta]]:
    """The base model with its adapters taken off (not merged), and each adapter's delta by module name."""
    deltas: dict[str, AdapterDelta] = {}
    prefix = "base_model.model."
    for name, module in peft_model.named_modules():
        delta = delta_of(module, adapter)
        if delta is not None:
            deltas[name.removeprefix(prefix)] = delta
    return peft_model.unload(), deltas


def grow(up: torch.Tensor, down: torch.Tensor, delta: AdapterDelta) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of a low-rank adapter into factors: rank r + r_a, product W + b a, its rows scaled (DoRA, BoRA)
    into up' and its columns (BoRA) into down'."""
    here = {"device": up.device, "dtype": torch.float64}  # the deltas were taken off to the CPU
    up2 = torch.cat([up.to(**here), delta.b.to(**here)], dim=1)
    down2 = torch.cat([down.to(**here), delta.a.to(**here)], dim=0)
    if delta.magnitude is not None:
        up2 = up2 * _dora_scale(up2 @ down2, delta.magnitude.to(**here))[:, None]
    if delta.row_scale is not None:
        up2 = up2 * delta.row_scale.to(**here)[:, None]
    if delta.col_scale is not None:
        down2 = down2 * delta.col_scale.to(**here)[None, :]
    return up2, down2


GROW_REFUSAL = (
    "{name}: the {kind} update is not low-rank, so it cannot grow the factors exactly; merge with --merge-rank "
    "keep (re-truncated to the layer's rank) or break-even (exact: such layers stored dense)"
)


def truncate(
    up: torch.Tensor, down: torch.Tensor, rank: int, stats: Any = None
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """`truncate_weight` of W = up @ down."""
    return truncate_weight(up.double() @ down.double(), rank, stats)


def truncate_weight(
    w: torch.Tensor, rank: int, stats: Any = None
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Factors of the best rank-`rank` approximation of W, the squared error it leaves, and ||W||^2 in the same
    measure.

    Without statistics the error is ||W - W_r||_F^2 (Eckart-Young: the sum of the dropped squared singular values);
    with calibration statistics it is the whitened objective ||(W - W_r) X^T||_F^2 that factorize minimizes.
    """
    from lowrank_compress.factorize import decompose

    dec = decompose(w.double(), "whiten" if stats is not None else "svd", stats)
    rank = min(rank, dec.stored_rank)
    u, d = dec.factors(rank, dtype=torch.float64)
    errors = dec.truncation_error()
    return u, d, float(errors[rank]), float(errors[0])


def _dora_scale(weight: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA's per-output-row factor m / ||W + s B A||_row (peft normalizes each row of the out x in weight)."""
    norm = torch.linalg.vector_norm(weight, dim=1)
    return magnitude.double() / norm.clamp_min(torch.finfo(torch.float64).tiny)


def merged_weight(w: torch.Tensor, delta: AdapterDelta) -> torch.Tensor:
    """W' as a dense float64 matrix (out x in), for a dense W or one given as the product of factors."""
    here = {"device": w.device, "dtype": torch.float64}
    w = w.to(**here) + delta.b.to(**here) @ delta.a.to(**here)
    if delta.dense is not None:
        w = w + delta.dense.to(**here)
    if delta.magnitude is not None:
        w = w * _dora_scale(w, delta.magnitude.to(**here))[:, None]
    if delta.row_scale is not None:
        w = w * delta.row_scale.to(**here)[:, None]
    if delta.col_scale is not None:
        w = w * delta.col_scale.to(**here)[None, :]
    return w


def merge_adapters(
    model: nn.Module,
    deltas: Mapping[str, AdapterDelta],
    *,
    merge_rank: str = "grow",
    stats: Mapping[str, Any] | None = None,
    kind: str = "adapter",
) -> dict[str, dict[str, float]]:
    """Fold `deltas` into `model` in place (weights must be plain floating point: dequantize first).

    LowRankLinear layers: `grow` concatenates the factors (low-rank updates only; otherwise a LowrankError naming
    the other two), `keep` re-truncates to the original rank (whitened by `stats[name]` when given), `break-even`
    grows where the grown rank stays below break-even and otherwise replaces the layer by a dense Linear holding W'
    (exact either way, no larger than dense). Dense layers get the update added. Returns, per factorized layer,
    the rank before and after (None: stored dense) and the truncation error relative to the merged weight, in the
    truncation's measure (0 for the exact merges).
    """
    if merge_rank not in MERGE_RANKS:
        raise LowrankError(f"unknown merge rank {merge_rank!r}; choose one of {', '.join(MERGE_RANKS)}")
    if merge_rank == "grow":  # refuse before changing anything, not half way through
        for name, delta in deltas.items():
            if not delta.low_rank and isinstance(model.get_submodule(name), LowRankLinear):
                raise LowrankError(GROW_REFUSAL.format(name=name, kind=kind))
    report: dict[str, dict[str, float]] = {}
    for name, delta in deltas.items():
        module = model.get_submodule(name)
        if isinstance(module, LowRankLinear):
            if merge_rank == "break-even" and not _grows_below_break_even(module, delta):
                _set_module(
                    model, name, _dense_linear(module, merged_weight(module.dense_weight().detach(), delta))
                )
                report[name] = {"rank_before": module.rank, "rank_after": None, "relative_error": 0.0}
                continue
            report[name] = _merge_factorized(model, name, module, delta, merge_rank, stats)
        elif isinstance(module, nn.Linear) or is_conv1d(module):
            conv = is_conv1d(module)
            with torch.no_grad():
                w = module.weight.detach()
                w = merged_weight(w.T if conv else w, delta)
                module.weight.copy_((w.T if conv else w).to(module.weight.dtype))
        else:
            raise LowrankError(f"{name}: cannot merge an adapter into a {type(module).__name__}")
    return report


def _merge_factorized(model: nn.Module, name: str, module: LowRankLinear, delta: AdapterDelta, merge_rank: str,
                      stats: Mapping[str, Any] | None) -> dict[str, float]:  # fmt: skip
    """Replace a LowRankLinear by its merge: grown factors (grow, break-even), or W' re-truncated to the layer's
    rank (keep)."""
    up, down = module.up.weight.detach(), module.down.weight.detach()
    error = norm = 0.0
    if merge_rank == "keep":
        w = merged_weight(up.double() @ down.double(), delta)
        up, down, error, norm = truncate_weight(w, module.rank, stats.get(name) if stats else None)
    else:
        up, down = grow(up, down, delta)
    dtype = module.up.weight.dtype
    bias = module.bias.detach() if module.bias is not None else None
    new = LowRankLinear.from_factors(up.to(dtype), down.to(dtype), bias)
    new.to(module.up.weight.device)
    _set_module(model, name, new)
    return {
        "rank_before": module.rank,
        "rank_after": new.rank,
        "relative_error": error / norm if norm > 0 else 0.0,
    }


def _grows_below_break_even(module: LowRankLinear, delta: AdapterDelta) -> bool:
    """Whether the exactly grown layer still has fewer parameters than the dense one: (r + r_a)(m + n) < m n."""
    if not delta.low_rank:
        return False
    rank = module.rank + delta.b.shape[1]
    return rank * (module.in_features + module.out_features) < module.in_features * module.out_features


def _dense_linear(module: LowRankLinear, w: torch.Tensor) -> nn.Linear:
    dtype, device = module.up.weight.dtype, module.up.weight.device
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device=device,
                       dtype=dtype)  # fmt: skip
    with torch.no_grad():
        linear.weight.copy_(w.to(dtype))
        if module.bias is not None:
            linear.bias.copy_(module.bias.detach())
    return linear


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
