"""TRP (Xu et al., "TRP: Trained Rank Pruning") on trained factors: a nuclear-norm regularizer in its factored form
and periodic truncation by energy. Both apply to `--train factors`, where the factors of every `LowRankLinear` are
the trained parameters."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lowrank_compress.modules import LowRankLinear
from lowrank_compress.training.methods import TrainingMethod

if TYPE_CHECKING:
    from lowrank_compress.training.loop import Run


def factored_nuclear(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """(||U||_F^2 + ||D||_F^2) / 2, an upper bound of ||U D||_* that equals it at the balanced factorization
    (U = P S^1/2, D = S^1/2 Q^T): ||U D||_* = min over U D = W of this (Srebro et al. 2005)."""
    return 0.5 * (up.float().pow(2).sum() + down.float().pow(2).sum())


def energy_rank(s: torch.Tensor, energy: float) -> int:
    """The least r whose r largest singular values hold `energy` of sum s_i^2 (TRP's truncation rule)."""
    kept = torch.cumsum(s**2, 0) / (s**2).sum().clamp_min(1e-300)
    return int(torch.searchsorted(kept, kept.new_tensor(energy))) + 1


def ranks(model: nn.Module) -> dict[str, int]:
    return {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


def replace_factors(m: LowRankLinear, up: torch.Tensor, down: torch.Tensor) -> None:
    """New factor parameters of another rank (the old ones, and their optimizer state, are dropped)."""
    rank = up.shape[1]
    m.up = nn.Linear(rank, m.out_features, bias=False, device=up.device, dtype=up.dtype)
    m.down = nn.Linear(m.in_features, rank, bias=False, device=up.device, dtype=up.dtype)
    with torch.no_grad():
        m.up.weight.copy_(up)
        m.down.weight.copy_(down)
    m.rank = rank


class FactorRanks(TrainingMethod):
    """`--train factors`: the factors of every factorized layer train, and a resumed run first gives them the ranks
    the checkpoint was written with (truncation may have changed them; the values come from the checkpoint)."""

    name = "factors"

    def setup(self, run: Run, saved: dict[str, Any] | None) -> None:
        model = run.model
        model.requires_grad_(False)
        modules = dict(model.named_modules())
        for name, rank in (saved or {}).get("ranks", {}).items():
            m = modules.get(name)
            if isinstance(m, LowRankLinear) and m.rank != rank:
                w = m.up.weight
                replace_factors(m, w.new_zeros(m.out_features, rank), w.new_zeros(rank, m.in_features))
        for m in model.modules():
            if isinstance(m, LowRankLinear):
                m.up.weight.requires_grad_(True)
                m.down.weight.requires_grad_(True)

    def checkpoint_info(self, run: Run) -> dict[str, Any]:
        return {"ranks": ranks(run.accelerator.unwrap_model(run.model))}

    def record(self, run: Run) -> dict[str, Any]:
        return {"ranks": ranks(run.accelerator.unwrap_model(run.model))}


class NuclearNorm(TrainingMethod):
    """`--nuclear W`: W times the factored nuclear-norm surrogate summed over the factorized layers, added to the
    loss; it pulls each product's singular values down, so that truncation can cut ranks."""

    name = "nuclear"

    def __init__(self, weight: float) -> None:
        self.weight = weight
        self.last: float | None = None

    def regularizer(self, run: Run) -> torch.Tensor | None:
        terms = [factored_nuclear(m.up.weight, m.down.weight) for m in run.model.modules()
                 if isinstance(m, LowRankLinear)]  # fmt: skip
        if not terms:
            return None
        value = self.weight * torch.stack(terms).sum()
        self.last = float(value.detach())
        return value

    def record(self, run: Run) -> dict[str, Any]:
        return {"weight": self.weight, "last_value": self.last}


class EnergyTruncation(TrainingMethod):
    """`--truncate-every N`: every N steps (not after the last) each factorized layer is cut to the least rank
    keeping `energy` of its squared singular values (never grown). Cut layers get fresh parameters, so their
    optimizer state is dropped and the loop's parameter list renewed."""

    name = "truncation"

    def __init__(self, every: int, energy: float) -> None:
        self.every, self.energy = every, energy
        self.cuts: list[dict[str, Any]] = []

    def on_step_end(self, run: Run, step: int) -> None:
        if (step + 1) % self.every == 0 and step + 1 < run.total:
            cut = truncate_by_energy(run.model, run.optimizer, self.energy)
            run.params = [p for p in run.model.parameters() if p.requires_grad]
            if cut:
                self.cuts.append({"step": step + 1, "ranks": cut})

    def record(self, run: Run) -> dict[str, Any]:
        return {"every": self.every, "energy": self.energy, "cuts": self.cuts}


def truncate_by_energy(model: nn.Module, optimizer: Any, energy: float) -> dict[str, int]:
    """Cut every factorized layer whose energy rank is below its rank; returns the new ranks of those cut."""
    from lowrank_compress.factorize import decompose

    inner = getattr(optimizer, "optimizer", optimizer)
    cut = {}
    for name, m in model.named_modules():
        if not isinstance(m, LowRankLinear):
            continue
        with torch.no_grad():
            dec = decompose(m.up.weight.double() @ m.down.weight.double(), "svd")
            rank = energy_rank(dec.s, energy)
            if rank >= m.rank:
                continue
            up, down = dec.factors(rank, dtype=m.up.weight.dtype)
        for old in (m.up.weight, m.down.weight):
            inner.state.pop(old, None)
        replace_factors(m, up, down)
        cut[name] = rank
    inner.param_groups[0]["params"] = [p for p in model.parameters() if p.requires_grad]
    return cut
