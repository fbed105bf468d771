"""`factorize_model`: the whole factorize job, from a checkpoint to a written lowrank output.

load -> pick targets -> calibration statistics -> one SVD per layer -> ranks under the budget -> LowRankLinear
-> atomic write (weights, config, recipe.yaml, report.json, model card).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lowrank_compress import __version__
from lowrank_compress.errors import LowrankError
from lowrank_compress.modules import is_conv1d
from lowrank_compress.recipe import FactorizeSettings

if TYPE_CHECKING:
    from lowrank_compress.factorize import Decomposition

ProgressFn = Callable[[str, int, int], None]  # (phase, done, total)


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


def factorize_model(
    model_path: str | Path,
    out: str | Path,
    settings: FactorizeSettings,
    *,
    overwrite: bool = False,
    allow_pickle: bool = False,
    progress: ProgressFn | None = None,
    warn: Callable[[str], None] | None = None,
    max_shard_size: str | int = "2GB",
    evaluate: bool = False,
) -> FactorizeResult:
    """Factorize the model at `model_path` to `settings.budget` and write it to `out` atomically.

    The returned result's `settings` are the ones applied (a policy the model cannot use is replaced, with a warning).
    evaluate: also measure the written model against the source (`evaluate_models` defaults: held-out perplexity of the
    built-in text, prefill and decode speed) before the output is moved into place; the figures go into report.json
    and the model card.
    """
    from lowrank_compress.format import check_output_dir
    from lowrank_compress.loading import resolve

    source = resolve(model_path)
    check_output_dir(Path(out), overwrite, inputs=[source.path, source.directory])
    prepared = Prepared.load(model_path, settings, allow_pickle=allow_pickle, progress=progress, warn=warn)
    return prepared.write(
        out, settings.budget, overwrite=overwrite, max_shard_size=max_shard_size, evaluate=evaluate
    )


class Prepared:
    """Everything factorize computes before the budget matters: the loaded model, its targets, calibration
    statistics and each layer's spectrum. `write` then allocates ranks for one budget and writes an output, as often
    as wanted (a budget sweep calibrates once)."""

    def __init__(self) -> None:  # built by `load`
        self.model_path: str | Path = ""
        self.settings = FactorizeSettings()
        self.allow_pickle = False
        self.model: Any = None
        self.tokenizer: Any = None
        self.source: Any = None
        self.targets: list[Target] = []
        self.stats: dict[str, Any] = {}
        self.candidates: list[Any] = []
        self.calibration_info: dict[str, Any] = {"source": None}
        # the calibration windows by part ("text", "self"), kept so a caller can see exactly what was measured
        self.calibration_batches: dict[str, torch.Tensor] = {}
        self.total_before = 0
        self.report: ProgressFn = lambda *a: None
        self.tick = _Stopwatch()
        self._cholesky_cache: dict[int, Any] = {}

    @classmethod
    def load(
        cls,
        model_path: str | Path,
        settings: FactorizeSettings,
        *,
        allow_pickle: bool = False,
        progress: ProgressFn | None = None,
        warn: Callable[[str], None] | None = None,
    ) -> Prepared:
        """Load, pick targets, calibrate, and compute every target's spectrum under `settings.method`."""
        from lowrank_compress.allocate import LayerCandidate
        from lowrank_compress.calibration import SELF
        from lowrank_compress.loading import is_causal_lm, load_model
        from lowrank_compress.spectrum import spectrum_stats
        from lowrank_compress.text import load_text

        self = cls()
        self.model_path, self.allow_pickle = model_path, allow_pickle
        self.report = report = progress or (lambda *a: None)
        settings.validate()
        needs_data = settings.method != "svd" or settings.policy == "sensitivity"
        self_generated = settings.calibration == SELF
        text = (
            load_text(settings.calibration, split="calibration")
            if needs_data and not self_generated
            else None
        )
        model, self.tokenizer, self.source = load_model(
            model_path, device=settings.device, allow_pickle=allow_pickle
        )
        self.tick("load")
        causal = is_causal_lm(model.config)
        if settings.method == "fisher" and not causal:
            raise LowrankError(
                f"{type(model).__name__} has no language-model loss, which the fisher method needs; "
                "use --method whiten, asvd or svd"
            )
        if settings.policy == "sensitivity" and not causal:
            # The sensitivity estimate needs a language-model loss; encoders get the next best policy, said out loud.
            settings = dataclasses.replace(settings, policy="uniform")
            (warn or (lambda m: None))(
                f"{type(model).__name__} has no language-model loss for the sensitivity policy; using --policy uniform"
            )
            if settings.method == "svd":
                text, needs_data = None, False
        if settings.self_mix > 0 and not causal and not self_generated and needs_data:
            settings = dataclasses.replace(settings, self_mix=0.0)
            (warn or (lambda m: None))(
                f"{type(model).__name__} cannot generate its own samples; calibrating on the text alone (--self-mix 0)"
            )
        self.settings, self.model = settings, model
        self.targets = targets = find_targets(model, settings.target, settings.ignore)
        for t in targets:
            if not bool(torch.isfinite(t.module.weight).all()):
                raise LowrankError(
                    f"{t.name} has NaN or Inf weights; fix the checkpoint or keep the layer dense with --ignore '{t.name}'"
                )
        self.total_before = sum(p.numel() for p in model.parameters())  # tied tensors are yielded once

        if needs_data:
            self._calibrate(text, causal, warn or (lambda m: None))
            self.tick("calibration")

        # Spectra only (what the allocator reads), so memory never holds every layer's factors at once; `write`
        # recomputes the factors of the layers it factorizes.
        for i, t in enumerate(targets):
            st = self.stats.get(t.name)
            self.candidates.append(
                LayerCandidate(
                    name=t.name,
                    out_features=t.out_features,
                    in_features=t.in_features,
                    decomposition=self._decompose(t, spectrum_only=True),
                    # reported, and read by the stable-rank policy: five digits are plenty, twice as fast as 1e-7
                    stable_rank=spectrum_stats(t.weight(), fast=True, tol=1e-5).stable_rank,
                    sensitivity=st.out_grad_sq if st is not None else None,
                )
            )
            report("spectra", i + 1, len(targets))
        self.tick("spectra")
        return self

    def _calibrate(self, text: str | None, causal: bool, warn: Callable[[str], None]) -> None:
        """Calibration windows (from the text, sampled from the model, or a mix of both), their warnings, and the
        per-layer statistics pooled over them: `self.stats`, `self.calibration_batches`, `self.calibration_info`."""
        from lowrank_compress.calibration import (
            SELF,
            blend_stats,
            calibration_warnings,
            collect_stats,
            make_batches,
            narrow_calibration_warning,
            sample_batches,
        )
        from lowrank_compress.text import text_fingerprint

        settings, model, report = self.settings, self.model, self.report
        self_generated = settings.calibration == SELF
        if self_generated and not causal:
            raise LowrankError(f"{type(model).__name__} cannot generate; pass a calibration text")
        mix = 1.0 if self_generated else settings.self_mix
        # each part has `samples` windows (and up to `grad_samples` gradient windows); `mix` weighs their statistics
        n_text = settings.samples if mix < 1.0 else 0
        n_self = settings.samples if mix > 0.0 else 0
        gradients = settings.method == "fisher" or settings.policy == "sensitivity"
        grad_n = min(settings.grad_samples, settings.samples) if gradients else 0
        grads = {
            "text": 0 if settings.grad_source == "self" and n_self else min(grad_n, n_text),
            "self": min(grad_n, n_self),
        }

        batches: dict[str, torch.Tensor] = {}
        if n_text:
            assert text is not None
            batches["text"] = make_batches(
                self.tokenizer, text, samples=n_text, seq_len=settings.seq_len, seed=settings.seed
            )
        if n_self:
            length = settings.seq_len if self_generated else (settings.self_seq_len or settings.seq_len)
            batches["self"] = sample_batches(
                model, self.tokenizer, samples=n_self, seq_len=length, seed=settings.seed, batch_size=n_self,
                random_start=settings.self_start == "random", device=settings.device,
                progress=lambda done, total: report("sampling calibration", done, total),
            )  # fmt: skip
            self.tick("sampling")
        self.calibration_batches = batches
        # size and repetitiveness of the user's text (of the samples when there is no text); the size counts all
        own = batches.get("text", batches.get("self"))
        assert own is not None
        notes = calibration_warnings(
            own, max(t.in_features for t in self.targets), getattr(model.config, "vocab_size", None),
            extra_tokens=sum(int(b.numel()) for b in batches.values()) - int(own.numel()),
        )  # fmt: skip
        for note in notes:
            warn(note)

        check = len(batches) == 2  # the narrow-text check compares the two parts
        losses: dict[str, list[float]] = {part: [] for part in batches}
        parts = []
        for part, rows in batches.items():
            stats = collect_stats(
                model, rows, [t.name for t in self.targets], fisher=settings.method == "fisher" and grads[part] > 0,
                sensitivity=settings.policy == "sensitivity" and grads[part] > 0, grad_samples=max(grads[part], 1),
                device=settings.device, losses=losses[part] if check else None,
                progress=lambda d, total, part=part: report(f"calibration ({part})", d, total),
            )  # fmt: skip
            parts.append((stats, mix if part == "self" else 1.0 - mix))
        self.stats = parts[0][0] if len(parts) == 1 else blend_stats(parts)

        perplexity = None
        if check:
            mean_loss = {part: sum(v) / len(v) for part, v in losses.items()}
            perplexity = {part: math.exp(v) for part, v in mean_loss.items()}
            narrow = narrow_calibration_warning(mean_loss["text"], mean_loss["self"], mix)
            if narrow:
                notes.append(narrow)
                warn(narrow)

        sha = {}
        if "text" in batches:
            assert text is not None
            sha["text"] = text_fingerprint(text)
        if "self" in batches:
            sha["self"] = hashlib.sha256(batches["self"].numpy().tobytes()).hexdigest()  # of the token ids
        self.calibration_info = {
            "source": settings.calibration,
            "split": "calibration" if "text" in batches else None,
            "samples": settings.samples,
            "seq_len": settings.seq_len,
            "tokens": sum(int(b.numel()) for b in batches.values()),
            "text_sha256": sha.get("text", sha.get("self")),
            "seed": settings.seed,
            "grad_samples": sum(grads.values()),
            "self_mix": mix,
            "self_start": settings.self_start if "self" in batches else None,
            "parts": {
                part: {
                    "samples": batches[part].shape[0],
                    "seq_len": batches[part].shape[1],
                    "tokens": int(batches[part].numel()),
                    "sha256": sha[part],
                    "grad_samples": grads[part],
                }
                if part in batches
                else None
                for part in ("text", "self")
            },
            "perplexity": perplexity,  # the source model's on each part: the narrow-text check
            "warnings": notes,
        }

    def _decompose(self, t: Target, spectrum_only: bool = False) -> Decomposition:
        from lowrank_compress.factorize import decompose

        return decompose(
            t.weight(),
            self.settings.method,
            self.stats.get(t.name),
            damping=self.settings.damping,
            cholesky_cache=self._cholesky_cache,
            spectrum_only=spectrum_only,
        )

    def write(
        self,
        out: str | Path,
        budget: float,
        *,
        overwrite: bool = False,
        max_shard_size: str | int = "2GB",
        evaluate: bool = False,
    ) -> FactorizeResult:
        """Allocate ranks for `budget`, factorize, and write the output atomically. The model is left dense again."""
        from lowrank_compress.allocate import allocate
        from lowrank_compress.format import atomic_output_dir, save_compressed
        from lowrank_compress.modules import LowRankLinear

        settings = dataclasses.replace(self.settings, budget=budget).validate()
        out, model, targets, tick, report = Path(out), self.model, self.targets, self.tick, self.report
        ranks = allocate(
            self.candidates, budget, settings.policy, energy=settings.energy, multiple=settings.rank_multiple
        )
        tick("allocate")

        layers: list[LayerResult] = []
        kept_ranks: dict[str, int] = {}
        for i, (t, cand) in enumerate(zip(targets, self.candidates, strict=True)):
            rank = ranks[t.name]
            err = cand.decomposition.truncation_error()
            total_err = float(err[0])
            shape = (t.out_features, t.in_features)
            dense_params = t.out_features * t.in_features
            if rank is None:
                layers.append(
                    LayerResult(t.name, shape, None, dense_params, dense_params, 0.0, cand.stable_rank)
                )
                continue
            up, down = self._decompose(t).factors(rank, dtype=t.module.weight.dtype)
            bias = t.module.bias.detach() if t.module.bias is not None else None
            device = t.module.weight.device
            _set_module(model, t.name, LowRankLinear.from_factors(up.to(device), down.to(device), bias))
            kept_ranks[t.name] = rank
            rel = math.sqrt(float(err[rank]) / total_err) if total_err > 0 else 0.0
            layers.append(
                LayerResult(t.name, shape, rank, dense_params, rank * sum(shape), rel, cand.stable_rank)
            )
            report("factors", i + 1, len(targets))
        work_dtype = model.dtype
        source_dtype = _source_dtype(self.source)
        if source_dtype is not None:
            model.to(
                source_dtype
            )  # calibration ran in float32; untouched tensors go back to the source's dtype
        tick("factors")

        result = FactorizeResult(
            output=out,
            settings=settings,
            layers=layers,
            total_params_before=self.total_before,
            total_params_after=0,
            target_params_before=sum(x.params_before for x in layers),
            target_params_after=sum(x.params_after for x in layers),
            calibration=self.calibration_info,
            timings={},
            spectra=_extreme_spectra(self.candidates),
        )
        quant_info = {"method": settings.method, "policy": settings.policy, "budget": budget}
        try:
            with atomic_output_dir(out, overwrite) as tmp:
                written = save_compressed(
                    model,
                    tmp,
                    ranks=kept_ranks,
                    quant_info=quant_info,
                    tokenizer=self.tokenizer,
                    source_dir=self.source.directory,
                    max_shard_size=max_shard_size,
                )
                shapes = written_shapes(tmp)
                result.total_params_after = sum(math.prod(s) for s in shapes.values())
                result.target_params_after = sum(_written_target_params(shapes, x) for x in layers)
                tick("write")
                if evaluate:
                    from lowrank_compress.evaluate import evaluate_models

                    evaluation = evaluate_models(
                        tmp,
                        self.model_path,
                        device=settings.device,
                        allow_pickle=self.allow_pickle,
                        progress=report,
                    ).to_dict()
                    evaluation["models"][0]["path"] = str(out)
                    result.evaluation = evaluation
                    tick("evaluate")
                result.timings = dict(tick.laps)
                result.files = sorted({p.name for p in written} | {"recipe.yaml", "report.json", "README.md"})
                _write_sidecars(tmp, result, self.model_path)
        finally:  # dense again, in the working dtype, for the next budget
            model.to(work_dtype)
            for t in targets:
                _set_module(model, t.name, t.module)
        return result


def _write_sidecars(directory: Path, result: FactorizeResult, model_path: str | Path) -> None:
    from lowrank_compress.report import factorize_model_card, write_json

    header = f"# lowrank-compress {__version__} factorize recipe for {model_path}\n# reuse: lowrank-compress factorize MODEL -o OUT --recipe recipe.yaml"
    (directory / "recipe.yaml").write_text(result.settings.to_yaml(header))
    write_json(directory / "report.json", result.to_dict())
    (directory / "README.md").write_text(factorize_model_card(result.to_dict(), str(model_path)))


def _extreme_spectra(candidates: list[Any], n: int = 3) -> dict[str, list[float]]:
    """s / s_max of the n most and n least compressible layers (stable rank over break-even rank), for reports."""
    from lowrank_compress.spectrum import break_even_rank

    ranked = sorted(candidates, key=lambda c: c.stable_rank / break_even_rank(c.out_features, c.in_features))
    chosen = ranked[:n] + ranked[max(n, len(ranked) - n) :]
    out = {}
    for c in chosen:
        s = c.decomposition.s
        top = float(s[0]) if s.numel() and float(s[0]) > 0 else 1.0
        out[c.name] = [float(f"{float(v) / top:.5g}") for v in s]
    return out


def written_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor in the written safetensors files with its shape, read from the headers (what a user would count)."""
    import json
    import struct

    shapes: dict[str, tuple[int, ...]] = {}
    for f in sorted(directory.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        shapes.update({k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"})
    return shapes


def _written_target_params(shapes: dict[str, tuple[int, ...]], layer: LayerResult) -> int:
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


def _source_dtype(source: Any) -> torch.dtype | None:
    """The floating dtype the source checkpoint stores (None for GGUF, which is dequantized to float32)."""
    from lowrank_compress.loading import read_config

    config = read_config(source) or {}
    name = config.get("dtype") or config.get("torch_dtype")
    dtype = getattr(torch, str(name), None) if name else None
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


class _Stopwatch:
    def __init__(self) -> None:
        self.t = time.perf_counter()
        self.laps: dict[str, float] = {}

    def __call__(self, phase: str) -> None:
        now = time.perf_counter()
        self.laps[phase] = round(now - self.t, 3)
        self.t = now
