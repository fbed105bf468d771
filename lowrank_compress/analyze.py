"""`analyze`: per-layer spectra and compressibility of a checkpoint, read one tensor at a time."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lowrank_compress.checkpoint import Checkpoint, Skipped
from lowrank_compress.errors import LowrankError
from lowrank_compress.spectrum import ENERGIES, break_even_rank, factored_params, spectrum_stats

#: Above this many parameters analyze uses the fast path unless told otherwise.
FAST_THRESHOLD_PARAMS = 1_000_000_000

ProgressFn = Callable[[int, int, str], None]


@dataclass
class LayerAnalysis:
    """Spectral statistics of one targeted Linear layer (weight seen as out x in)."""

    module: str
    layer_type: str
    depth: int | None
    out_features: int
    in_features: int
    params: int
    finite: bool
    frobenius: float | None
    spectral: float | None
    stable_rank: float | None
    effective_rank: float | None
    energy_ranks: dict[float, int] | None
    break_even_rank: float
    params_at_energy: dict[float, int] | None
    singular_values: list[float] | None = field(default=None, repr=False)

    @property
    def compressibility(self) -> float:
        """Stable rank over break-even rank: lower means more of the layer can go. inf for non-finite weights."""
        if not self.finite or self.stable_rank is None:
            return math.inf
        return self.stable_rank / self.break_even_rank

    def to_dict(self, with_spectrum: bool = False) -> dict[str, Any]:
        d = {
            "module": self.module,
            "layer_type": self.layer_type,
            "depth": self.depth,
            "shape": [self.out_features, self.in_features],
            "params": self.params,
            "finite": self.finite,
            "frobenius_norm": self.frobenius,
            "spectral_norm": self.spectral,
            "stable_rank": self.stable_rank,
            "effective_rank": self.effective_rank,
            "energy_ranks": _energy_keys(self.energy_ranks),
            "break_even_rank": self.break_even_rank,
            "params_at_energy": _energy_keys(self.params_at_energy),
        }
        if with_spectrum:
            d["singular_values"] = self.singular_values
        return d


def _energy_keys(d: dict[float, int] | None) -> dict[str, int] | None:
    return None if d is None else {f"{e:g}": v for e, v in d.items()}


@dataclass
class AnalysisResult:
    """Everything `lowrank-compress analyze` shows; the CLI only renders it."""

    model: str
    format: str
    mode: str  # "exact" | "fast"
    total_params: int
    layers: list[LayerAnalysis]
    skipped: list[Skipped]
    seconds: float

    @property
    def targetable_params(self) -> int:
        return sum(layer.params for layer in self.layers)

    def kept_at_energy(self) -> dict[float, int] | None:
        """Target parameters kept if every finite layer is cut at each energy level (non-finite layers stay dense)."""
        if self.mode != "exact":
            return None
        return {
            e: sum(
                layer.params_at_energy[e] if layer.params_at_energy else layer.params for layer in self.layers
            )
            for e in ENERGIES
        }

    def summary(self) -> dict[str, Any]:
        kept = self.kept_at_energy()
        target = self.targetable_params
        non_target = self.total_params - target
        return {
            "total_params": self.total_params,
            "targetable_params": target,
            "targetable_fraction": target / self.total_params if self.total_params else 0.0,
            "layers": len(self.layers),
            "non_finite_layers": [layer.module for layer in self.layers if not layer.finite],
            "kept_at_energy": None
            if kept is None
            else {
                f"{e:g}": {
                    "target_params": k,
                    "target_fraction": k / target if target else 0.0,
                    "model_fraction": (k + non_target) / self.total_params if self.total_params else 0.0,
                }
                for e, k in kept.items()
            },
            "mean_stable_rank_over_break_even": _mean([x.compressibility for x in self.layers]),
        }

    def to_dict(self, with_spectra: bool = False) -> dict[str, Any]:
        """The documented JSON schema (README, "analyze --json")."""
        return {
            "model": self.model,
            "format": self.format,
            "mode": self.mode,
            "seconds": self.seconds,
            "summary": self.summary(),
            "layers": [layer.to_dict(with_spectra) for layer in self.sorted_layers()],
            "skipped": [{"name": s.name, "shape": list(s.shape), "reason": s.reason} for s in self.skipped],
        }

    def sorted_layers(self) -> list[LayerAnalysis]:
        """Most compressible first."""
        return sorted(self.layers, key=lambda x: (x.compressibility, x.module))


def _mean(xs: Sequence[float]) -> float | None:
    finite = [x for x in xs if math.isfinite(x)]
    return sum(finite) / len(finite) if finite else None


def analyze_weight(w: torch.Tensor, *, fast: bool) -> dict[str, Any]:
    """The statistics of one (out x in) weight; non-finite weights are reported, not analyzed."""
    out_features, in_features = w.shape
    be = break_even_rank(out_features, in_features)
    if not bool(torch.isfinite(w).all()):
        return dict(finite=False, frobenius=None, spectral=None, stable_rank=None, effective_rank=None,
                    energy_ranks=None, break_even_rank=be, params_at_energy=None, singular_values=None)  # fmt: skip
    st = spectrum_stats(w, fast=fast)
    kept = (
        None
        if st.energy_ranks is None
        else {e: factored_params(out_features, in_features, r) for e, r in st.energy_ranks.items()}
    )
    return dict(
        finite=True,
        frobenius=st.frobenius,
        spectral=st.spectral,
        stable_rank=st.stable_rank,
        effective_rank=st.effective_rank,
        energy_ranks=st.energy_ranks,
        break_even_rank=be,
        params_at_energy=kept,
        singular_values=None if st.singular_values is None else st.singular_values.tolist(),
    )


def analyze(
    model: str | Path,
    *,
    fast: bool | None = None,
    target: Sequence[str] | None = None,
    ignore: Sequence[str] | None = None,
    allow_pickle: bool = False,
    progress: ProgressFn | None = None,
) -> AnalysisResult:
    """Measure every targeted Linear layer of the checkpoint at `model`.

    fast=None picks the fast path for models over a billion parameters. `progress(done, total, name)` is called
    after each layer. Only one weight is in memory at a time.
    """
    start = time.perf_counter()
    with Checkpoint.open(model, allow_pickle=allow_pickle) as ckpt:
        ckpt.require_matches_config()
        targets, skipped = ckpt.linear_targets(target=target, ignore=ignore)
        if not targets and (target or ignore):
            given = " ".join(
                [*(f"--target {p}" for p in target or ()), *(f"--ignore {p}" for p in ignore or ())]
            )
            raise LowrankError(
                f"{model}: no Linear layer is left to analyze with {given}; check the patterns"
            )
        total = ckpt.num_params
        use_fast = total > FAST_THRESHOLD_PARAMS if fast is None else fast
        layers: list[LayerAnalysis] = []
        for i, t in enumerate(targets):
            stats = analyze_weight(ckpt.read_weight(t), fast=use_fast)
            layers.append(
                LayerAnalysis(
                    module=t.module,
                    layer_type=t.layer_type,
                    depth=t.depth,
                    out_features=t.out_features,
                    in_features=t.in_features,
                    params=t.out_features * t.in_features,
                    **stats,
                )
            )
            if progress is not None:
                progress(i + 1, len(targets), t.module)
        fmt = ckpt.format
    return AnalysisResult(
        model=str(model),
        format=fmt,
        mode="fast" if use_fast else "exact",
        total_params=total,
        layers=layers,
        skipped=skipped,
        seconds=time.perf_counter() - start,
    )
