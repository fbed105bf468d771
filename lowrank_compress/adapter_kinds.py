"""Per adapter: the peft config that builds it, the layer shapes it accepts, and its trained update as a matrix.

The update of every adapter is written here as a weight delta, so that merging (adapters.py) is one piece of code
for all of them: a low-rank delta is kept as factors b @ a, which merge exactly into a LowRankLinear by growing its
rank; a delta of high or full rank (C3A) is a dense matrix, which merges into a factorized layer only by
re-truncation (`--merge-rank keep`).

| kind    | update of an out x in layer                                    | trainable parameters   | rank of ΔW |
|---------|----------------------------------------------------------------|------------------------|------------|
| lora    | s B A                                                          | r (in + out)           | r          |
| dora    | W' = diag(m / ||W + s B A||_row) (W + s B A): a row scaling    | r (in + out) + out     | +r (grow)  |
| c3a     | blocks circ(w_ij) / in, b x b circulant blocks                 | in out / b             | full       |
| gralora | k x k blocks, block (j, n) = s B_jn A_jn of rank r / k         | r (in + out)           | k r        |
| bone    | MiSS: [D^T D^T ... D^T], one r x out block D tiled along in    | r out                  | r          |
| singlora| (alpha / r) u(t) A A*^T, one max(in, out) x r matrix A         | r max(in, out)         | r          |
| loldu   | P L_r (sigma diag(z) - D_r) U_r from W = P L D U, L, U frozen  | r + 1                  | r          |
| bora    | W' = diag(row) (W + s B A) diag(col), row / column magnitudes  | r (in + out) + out + in| +r (grow)  |
| surm    | sum_i C(g_i) S(h_i): circulant x skew-circulant, n = max(in,out)| 2 r n                 | full       |
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowrank_compress.errors import LowrankError
from lowrank_compress.modules import LowRankLinear, is_conv1d

# adapters whose update is not low-rank: they merge into factorized layers with --merge-rank keep only
FULL_RANK: tuple[str, ...] = ("c3a", "surm")
# adapters that are peft methods of ours (lowrank_compress/peft_methods/<name>/)
OURS: tuple[str, ...] = ("singlora", "loldu", "bora", "surm")


@dataclass
class AdapterOptions:
    """What shapes an adapter: `rank` for the low-rank kinds (r), `block_size` for C3A (None: per layer, the
    block size whose parameter count is nearest LoRA's at `rank`), `blocks` (k) for GraLoRA."""

    rank: int = 16
    alpha: float = 32.0
    block_size: int | None = None
    blocks: int = 2
    ramp_steps: int = 100  # singlora: T of the ramp u(t) = min(t / T, 1)
    seed: int = 0  # singlora: A's random init
    rank_pattern: dict[str, int] | None = None  # lora: a rank per module (GoRA), saved in the adapter config
    alpha_pattern: dict[str, float] | None = None  # lora: an alpha per module, with rank_pattern
    adalora: dict[str, Any] | None = None  # lora: peft's AdaLoRA instead (init_r, target_r, tinit, ...)


def widths(module: nn.Module) -> tuple[int, int]:
    """(in, out) of a Linear, LowRankLinear or GPT-2 Conv1D."""
    if is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def c3a_block_size(n_in: int, n_out: int, rank: int) -> int:
    """The C3A block size b (a divisor of both widths) whose in * out / b parameters come nearest LoRA's
    r (in + out): the default that gives C3A about the trainable parameters of LoRA at `--rank`."""
    g = math.gcd(n_in, n_out)
    divisors = [b for b in range(1, g + 1) if g % b == 0]
    target = rank * (n_in + n_out)
    return min(divisors, key=lambda b: (abs(n_in * n_out / b - target), -b))


def check_shapes(kind: str, shapes: dict[str, tuple[int, int]], options: AdapterOptions) -> None:
    """One LowrankError line when `kind` cannot wrap a layer of these (in, out) widths with these options."""
    r, k, b = options.rank, options.blocks, options.block_size
    if kind == "gralora":
        if k < 1 or r % k:
            raise LowrankError(f"--adapter gralora: --rank {r} must be a multiple of --blocks {k}")
        for name, (n_in, n_out) in shapes.items():
            if n_in % k or n_out % k:
                raise LowrankError(
                    f"--adapter gralora: {name} ({n_out} x {n_in}) does not split into {k} x {k} blocks"
                )
    elif kind == "c3a" and b is not None:
        for name, (n_in, n_out) in shapes.items():
            if b < 1 or n_in % b or n_out % b:
                raise LowrankError(
                    f"--adapter c3a: --block-size {b} does not divide {name} ({n_out} x {n_in})"
                )
    elif kind == "bone":
        for name, (n_in, _) in shapes.items():
            if r > n_in:
                raise LowrankError(f"--adapter bone: --rank {r} exceeds the input width {n_in} of {name}")
    elif kind in ("singlora", "loldu"):
        for name, (n_in, n_out) in shapes.items():
            if r > min(n_in, n_out):
                raise LowrankError(
                    f"--adapter singlora: --rank {r} exceeds the smaller width of {name} ({n_out} x {n_in})"
                )


def peft_config(kind: str, model: nn.Module, names: list[str], options: AdapterOptions) -> Any:
    """The peft config for `kind` on the modules `names` (full names: peft matches them exactly). On a factorized
    model, the LOWRANK_* config that wraps LowRankLinear layers (peft_methods/factorized.py)."""
    modules = {n: model.get_submodule(n) for n in names}
    shapes = {n: widths(m) for n, m in modules.items()}
    check_shapes(kind, shapes, options)
    conv1d = any(is_conv1d(m) for m in modules.values())
    if conv1d and (kind == "c3a" or kind in OURS):
        raise LowrankError(
            f"--adapter {kind} wraps Linear layers only, not GPT-2's Conv1D; use lora, dora, gralora or bone"
        )
    lowrank = any(isinstance(m, LowRankLinear) for m in modules.values())
    if kind == "loldu":  # a factorized layer's LU has only `rank` non-zero pivots
        for name, m in modules.items():
            if isinstance(m, LowRankLinear) and options.rank > m.rank:
                raise LowrankError(
                    f"--adapter loldu: --rank {options.rank} exceeds the rank {m.rank} of {name}"
                )
    if kind in OURS:
        return _our_config(kind, names, options)
    method = {"lora": "lora", "dora": "lora", "c3a": "c3a", "gralora": "gralora", "bone": "miss"}[kind]
    if options.adalora is not None:
        return _adalora_config(lowrank, names, options)
    cls = _config_class(method, lowrank)
    common = {"target_modules": names}
    if method == "lora":
        patterns = {"rank_pattern": options.rank_pattern or {}, "alpha_pattern": options.alpha_pattern or {}}
        return cls(r=options.rank, lora_alpha=options.alpha, lora_dropout=0.0, use_dora=kind == "dora", bias="none",
                   fan_in_fan_out=conv1d, **patterns, **common)  # fmt: skip
    if (
        method == "c3a"
    ):  # zero kernels (init_weights=True): the model starts where it was, as LoRA's B = 0 does
        sizes = {n: options.block_size or c3a_block_size(*s, options.rank) for n, s in shapes.items()}
        return cls(
            block_size=next(iter(sizes.values())), block_size_pattern=sizes, init_weights=True, **common
        )
    if method == "gralora":
        return cls(r=options.rank, alpha=options.alpha, gralora_k=options.blocks, hybrid_r=0, init_weights=True,
                   fan_in_fan_out=conv1d, **common)  # fmt: skip
    return cls(r=options.rank, init_weights=True, **common)  # MiSS's default ("balance") form, zero block


def _our_config(kind: str, names: list[str], options: AdapterOptions) -> Any:
    """The config of a method of ours (peft_methods/<kind>/): each wraps dense, NF4 and factorized layers alike."""
    if kind == "singlora":
        from lowrank_compress.peft_methods.singlora import SingLoraConfig

        return SingLoraConfig(r=options.rank, alpha=options.alpha, ramp_steps=options.ramp_steps,
                              init_seed=options.seed, target_modules=names)  # fmt: skip
    if kind == "loldu":
        from lowrank_compress.peft_methods.loldu import LoLduConfig

        return LoLduConfig(r=options.rank, target_modules=names)
    if kind == "bora":
        from lowrank_compress.peft_methods.bora import BoraConfig

        return BoraConfig(r=options.rank, alpha=options.alpha, init_seed=options.seed, target_modules=names)
    if kind == "surm":
        from lowrank_compress.peft_methods.surm import SurmConfig

        return SurmConfig(r=options.rank, init_seed=options.seed, target_modules=names)
    raise LowrankError(f"unknown adapter {kind!r}")


def _adalora_config(lowrank: bool, names: list[str], options: AdapterOptions) -> Any:
    """peft's AdaLoRA (LOWRANK_ADALORA on a factorized model): E starts at zero, so the update does. Its orthogonal
    regularizer is left to the finetune loop (training/rank_schedule.py), so the recorded loss is the LM loss."""
    import peft

    cls = _config_class("adalora", True) if lowrank else peft.AdaLoraConfig
    return cls(lora_alpha=options.alpha, lora_dropout=0.0, orth_reg_weight=0.0, target_modules=names,
               **options.adalora)  # fmt: skip


def _config_class(method: str, lowrank: bool) -> type:
    if lowrank:
        from lowrank_compress.peft_methods.factorized import config_class

        return config_class(method)
    import peft

    return {"lora": peft.LoraConfig, "c3a": peft.C3AConfig, "gralora": peft.GraloraConfig,
            "miss": peft.MissConfig}[method]  # fmt: skip


# --------------------------------------------------------------------------------------------------- deltas


@dataclass
class AdapterDelta:
    """One trained adapter's update of a layer: W' = diag(row) (W + b @ a + dense) diag(col). DoRA gives `magnitude`
    m, so row = m / ||W + b a||_row of the weight merged into; BoRA gives the row and column factors themselves
    (`row_scale`, `col_scale`, computed from the trained weight). Low-rank updates have `a` (r_a x in) and `b`
    (out x r_a, scaling folded in) and no `dense`; the others a dense (out x in) `dense` and empty factors."""

    a: torch.Tensor
    b: torch.Tensor
    magnitude: torch.Tensor | None = None
    dense: torch.Tensor | None = None
    row_scale: torch.Tensor | None = None
    col_scale: torch.Tensor | None = None

    @property
    def low_rank(self) -> bool:
        """Whether the update merges exactly into factors by growing them (DoRA's row scale included)."""
        return self.dense is None


def delta_of(module: nn.Module, adapter: str) -> AdapterDelta | None:
    """The update a peft adapter layer adds, in float32 on the CPU; None for modules that are no adapter layer."""
    from peft.tuners.c3a import C3ALayer
    from peft.tuners.gralora import GraloraLayer
    from peft.tuners.lora.layer import LoraLayer
    from peft.tuners.miss import MissLayer

    from lowrank_compress.peft_methods.common import MethodLayer

    if isinstance(module, MethodLayer):
        owned = getattr(module, module.adapter_layer_names[0])
        return module.adapter_delta(adapter) if adapter in owned else None
    from peft.tuners.adalora import AdaLoraLayer

    pairs = ((AdaLoraLayer, _adalora), (LoraLayer, _lora), (C3ALayer, _c3a), (GraloraLayer, _gralora),
             (MissLayer, _miss))  # fmt: skip
    for cls, fn in pairs:
        if isinstance(module, cls):
            return fn(module, adapter)
    return None


def _t(p: torch.Tensor) -> torch.Tensor:
    return p.detach().float().cpu().clone()


def _lora(module: Any, adapter: str) -> AdapterDelta | None:
    if adapter not in module.lora_A:
        return None
    a = _t(module.lora_A[adapter].weight)
    b = _t(module.lora_B[adapter].weight) * float(module.scaling[adapter])
    magnitude = None
    if adapter in module.lora_magnitude_vector:
        magnitude = _t(module.lora_magnitude_vector[adapter].weight)
    return AdapterDelta(a, b, magnitude)


def _adalora(module: Any, adapter: str) -> AdapterDelta | None:
    """AdaLoRA's P diag(E) Q scaled by alpha / (ranknum + 1e-5), as peft's SVDLinear computes it; pruned triplets
    (E = 0) add nothing."""
    if adapter not in module.lora_A:
        return None
    a = _t(module.lora_A[adapter]) * _t(module.lora_E[adapter])
    scale = float(module.scaling[adapter]) / (float(module.ranknum[adapter].detach()) + 1e-5)
    return AdapterDelta(a, _t(module.lora_B[adapter]) * scale)


def _empty(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(0, n_in), torch.zeros(n_out, 0)


def _c3a(module: Any, adapter: str) -> AdapterDelta | None:
    """peft's FFT product y_m = sum_n ifft-fft(x_n, w_mn) is x_n times the circulant whose first ROW is w_mn
    (tests/test_adapter_kinds.py checks it against scipy), divided by the input width."""
    if adapter not in module.c3a_kernel:
        return None
    w = _t(module.c3a_kernel[adapter]).double()  # (out / b, in / b, b)
    m, n, b = w.shape
    idx = (torch.arange(b)[None, :] - torch.arange(b)[:, None]) % b  # [i, j] -> (j - i) mod b
    blocks = w[:, :, idx]  # (m, n, b, b): block (i, j) = C with C[p, q] = w[(q - p) mod b]
    dense = blocks.permute(0, 2, 1, 3).reshape(m * b, n * b) / (n * b)
    return AdapterDelta(*_empty(n * b, m * b), dense=dense.float())


def _gralora(module: Any, adapter: str) -> AdapterDelta | None:
    """Block (j, n) of ΔW is s B_j[n-th rank chunk]^T A_n[:, j-th rank chunk]^T; stacked, factors of rank k r."""
    if adapter not in module.gralora_A:
        return None
    a_all, b_all = _t(module.gralora_A[adapter]), _t(module.gralora_B[adapter])  # (k, in/k, r), (k, r, out/k)
    k, n_in_k, r = a_all.shape
    n_out_k, s, scale = b_all.shape[2], r // k, float(module.scaling[adapter])
    a = torch.zeros(k * k * s, k * n_in_k)
    b = torch.zeros(k * n_out_k, k * k * s)
    for j in range(k):  # output block
        for n in range(k):  # input block
            c = (j * k + n) * s
            a[c : c + s, n * n_in_k : (n + 1) * n_in_k] = a_all[n][:, j * s : (j + 1) * s].T
            b[j * n_out_k : (j + 1) * n_out_k, c : c + s] = scale * b_all[j][n * s : (n + 1) * s, :].T
    return AdapterDelta(a, b)


def _miss(module: Any, adapter: str) -> AdapterDelta | None:
    """MiSS (balance form): the input summed over its r-wide chunks, times the r x out block D: ΔW = D^T T with
    T[t, c] = 1 where c mod r = t (a ragged last chunk is zero-padded, so T simply stops at the input width)."""
    if adapter not in module.miss_block:
        return None
    d = _t(module.miss_block[adapter])  # (r, out)
    r, n_in = d.shape[0], module.in_features
    t = (torch.arange(n_in)[None, :] % r == torch.arange(r)[:, None]).float()
    return AdapterDelta(t, d.T.contiguous())
