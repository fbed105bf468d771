"""What factorize works on and returns: the target layers, each layer's result, the whole result, and the count of
what was written (the parameters a user would count, read from the output's headers)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank_compress import __version__
from lowrank_compress.errors import LowrankError
from lowrank_compress.modules import is_conv1d
from lowrank_compress.recipe import FactorizeSettings


@dataclass
class Target:
    """A Linear (or GPT-2 Conv1D) module of the loaded model that may be factorized."""

    name: str
    module: nn.Module
    out_features: int
    in_features: int

    def weight(self) -> torch.Tensor:
        """The weight as (out x in), whatever the module's storage layout."""
        w = self.module.weight.detach()
        return w.T if is_conv1d(self.module) else w


def find_targets(model: nn.Module, target: list[str], ignore: list[str]) -> list[Target]:
    """Linear layers of the model to factorize.

    By default, the Linear layers inside the repeated blocks (names with a block index): embeddings, output heads
    and poolers stay dense. --target patterns replace that default; --ignore patterns remove modules.
    """
    from lowrank_compress.checkpoint import match_pattern, module_depth

    found = []
    for name, module in model.named_modules():
        if not (isinstance(module, nn.Linear) or is_conv1d(module)):
            continue
        chosen = any(match_pattern(name, p) for p in target) if target else module_depth(name) is not None
        if not chosen or any(match_pattern(name, p) for p in ignore):
            continue
        if is_conv1d(module):
            in_f, out_f = module.weight.shape
        else:
            out_f, in_f = module.weight.shape
        found.append(Target(name, module, out_f, in_f))
    if not found:
        what = (
            f"--target {' '.join(target)}" if target else "the default (Linear layers inside repeated blocks)"
        )
        raise LowrankError(
            f"no Linear layers to factorize match {what}; check the patterns with `lowrank-compress analyze`"
        )
    return found


@dataclass
class LayerResult:
    name: str
    shape: tuple[int, int]
    rank: int | None  # None: kept dense
    params_before: int
    params_after: int
    relative_error: (
        float  # sqrt(discarded / total) of the method's objective (whitened output error for whiten)
    )
    stable_rank: float


@dataclass
class FactorizeResult:
    """What factorize did; `to_dict()` is report.json's core and the `--json` output."""

    output: Path
    settings: FactorizeSettings
    layers: list[LayerResult]
    total_params_before: int
    total_params_after: int
    target_params_before: int
    target_params_after: int
    calibration: dict[str, Any]
    timings: dict[str, float]
    files: list[str] = field(default_factory=list)
    evaluation: dict[str, Any] | None = None  # evaluate_models(OUT, baseline=MODEL).to_dict() with --evaluate
    # normalized spectra (of the method's transformed weight) of the most and least compressible layers
    spectra: dict[str, list[float]] = field(default_factory=dict)
    # the largest memory held while one block was processed (process RSS on CPU, allocator peak on CUDA)
    peak_block_mb: float = 0.0
    # the checkpoint whose pass 1 this run resumed from (its timings are that run's), or None
    resumed_from: str | None = None
    # where the unfinished pass 1 this run went on with had stopped ("the sampling", "3 blocks"), or None
    pass1_resumed_after: str | None = None
    # the block (from 1) a resumed pass 2 went on at, the blocks before it written by the stopped run; or None
    pass2_resumed_at: int | None = None

    @property
    def kept_fraction_targets(self) -> float:
        return self.target_params_after / self.target_params_before

    @property
    def kept_fraction_model(self) -> float:
        return self.total_params_after / self.total_params_before

    def to_dict(self) -> dict[str, Any]:
        return {
            "tool": {"name": "lowrank-compress", "version": __version__},
            "output": str(self.output),
            "settings": self.settings.__dict__,
            "summary": {
                "budget": self.settings.budget,
                "kept_fraction_targets": self.kept_fraction_targets,
                "kept_fraction_model": self.kept_fraction_model,
                "target_params_before": self.target_params_before,
                "target_params_after": self.target_params_after,
                "total_params_before": self.total_params_before,
                "total_params_after": self.total_params_after,
                "layers_factorized": sum(1 for x in self.layers if x.rank is not None),
                "layers_dense": sum(1 for x in self.layers if x.rank is None),
            },
            "calibration": self.calibration,
            "timings_s": self.timings,
            "peak_block_mb": self.peak_block_mb,
            "resumed_from": self.resumed_from,
            "pass1_resumed_after": self.pass1_resumed_after,
            "pass2_resumed_at": self.pass2_resumed_at,
            "layers": [
                {
                    "module": x.name,
                    "shape": list(x.shape),
                    "rank": x.rank,
                    "params_before": x.params_before,
                    "params_after": x.params_after,
                    "relative_error": x.relative_error,
                    "stable_rank": x.stable_rank,
                }
                for x in self.layers
            ],
            "files": self.files,
            "evaluation": self.evaluation,
            "spectra": self.spectra,
        }


def check_finite(t: Target) -> None:
    if not bool(torch.isfinite(t.weight()).all()):
        raise LowrankError(
            f"{t.name} has NaN or Inf weights; fix the checkpoint or keep the layer dense with --ignore '{t.name}'"
        )


def written_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor in the written safetensors files with its shape, read from the headers (what a user would count)."""
    from lowrank_compress.checkpoint import read_safetensors_header

    shapes: dict[str, tuple[int, ...]] = {}
    for f in sorted(directory.glob("*.safetensors")):
        shapes.update({name: info.shape for name, info in read_safetensors_header(f).items()})
    return shapes


def written_target_params(shapes: dict[str, tuple[int, ...]], layer: LayerResult) -> int:
    """A target's weight parameters as written: both factors, or the dense weight (biases are not counted)."""
    names = (
        [f"{layer.name}.weight"]
        if layer.rank is None
        else [f"{layer.name}.down.weight", f"{layer.name}.up.weight"]
    )
    missing = [n for n in names if n not in shapes]
    if missing:
        raise LowrankError(f"internal: the written model lacks {missing[0]}")
    return sum(math.prod(shapes[n]) for n in names)
