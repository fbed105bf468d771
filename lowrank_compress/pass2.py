"""Pass 2 of factorize: ranks for the budget, then block by block the factors fitted to the dense block's outputs
from the compressed prefix's inputs (the error-aware fit, in the order the layers run), streamed into shards, then
the sidecars. Methods of `pipeline.Prepared`, whose state they read."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lowrank_compress import __version__
from lowrank_compress.errors import LowrankError
from lowrank_compress.factorize import release_stats
from lowrank_compress.flow import CalibrationFlow, windows_in_turn
from lowrank_compress.memory import PeakMemory
from lowrank_compress.recipe import FactorizeSettings
from lowrank_compress.results import (
    FactorizeResult,
    LayerResult,
    Target,
    check_finite,
    written_shapes,
    written_target_params,
)
from lowrank_compress.sequential import dtype_name
from lowrank_compress.spectrum import estimated_stable_rank

if TYPE_CHECKING:
    from lowrank_compress.factorize import Decomposition
    from lowrank_compress.pass2_progress import Pass2Progress


class Pass2:
    """`Prepared`'s pass 2 (see pipeline.py for its state)."""

    def write(
        self,
        out: str | Path,
        budget: float,
        *,
        overwrite: bool = False,
        max_shard_size: str | int = "2GB",
        evaluate: bool = False,
        checkpoint: Path | None = None,
    ) -> FactorizeResult:
        """Allocate ranks for `budget`, then stream the output block by block (pass 2), atomically. `checkpoint`:
        pass 1's checkpoint, where pass 2 records its progress block by block and takes up a progress recorded
        there at the same budget and settings (pass2_progress.py; one run at a time records there)."""
        from lowrank_compress.format import atomic_output_dir
        from lowrank_compress.outdir import protected_inputs
        from lowrank_compress.pass2_progress import claimed
        from lowrank_compress.writer import ShardWriter

        result, ranks = self._allocated(Path(out), budget)
        settings = result.settings
        progress = self._pass2_progress(checkpoint, settings, ranks, max_shard_size)
        with (
            claimed(progress, self.warn) as progress,
            atomic_output_dir(out, overwrite, protected_inputs(self.source, settings)) as tmp,
        ):
            self.pass2_held = progress is not None
            writer, resumed = (
                progress.writer(max_shard_size, self.warn)
                if progress is not None
                else (ShardWriter(tmp, max_shard_size), None)
            )
            result.layers, dtype = self._stream_factors(ranks, writer, progress, resumed)
            result.pass2_resumed_at = resumed[0]["blocks_done"] + 1 if resumed is not None else None
            # the recorded shards stay until OUT is in place: a stop while it is completed loses no block
            self._complete(tmp, writer.finalize(into=tmp, keep=progress is not None), result, dtype, evaluate)
        if progress is not None:
            progress.remove()
        return result

    def _allocated(self, out: Path, budget: float) -> tuple[FactorizeResult, dict[str, int | None]]:
        """The ranks for `budget`, and the result they start (its settings at that budget)."""
        from lowrank_compress.allocate import allocate

        settings = dataclasses.replace(self.settings, budget=budget).validate()
        ranks = allocate(
            self.candidates, budget, settings.policy, energy=settings.energy, multiple=settings.rank_multiple
        )
        self.tick("allocate")
        result = FactorizeResult(
            output=out, settings=settings, layers=[], total_params_before=self.total_before, total_params_after=0,
            target_params_before=0, target_params_after=0, calibration=self.calibration_info, timings={},
        )  # fmt: skip
        self._report_spectra = {
            c.name: c.decomposition.s for c in self.candidates if c.decomposition is not None
        }
        return result, ranks

    def _complete(
        self, tmp: Path, written: list[Path], result: FactorizeResult, dtype: torch.dtype, evaluate: bool
    ) -> None:
        """After pass 2's shards (`written`): the model's other files, the counts from what was written, the
        evaluation if asked, and the report and recipe, all into `tmp`."""
        from lowrank_compress.format import quantization_config, write_model_files

        settings, tick = result.settings, self.tick
        result.spectra = _extreme_spectra(result.layers, self._report_spectra)
        kept = {x.name: x.rank for x in result.layers if x.rank is not None}
        quant = {"method": settings.method, "policy": settings.policy, "budget": settings.budget}
        if self.needs_data:
            quant["error_aware"] = settings.error_aware
        written += write_model_files(
            tmp, self.streamed.model, quantization_config(kept, quant), dtype=dtype, tokenizer=self.tokenizer,
            source_dir=self.source.directory,
        )  # fmt: skip
        shapes = written_shapes(tmp)
        result.total_params_after = sum(math.prod(s) for s in shapes.values())
        result.target_params_before = sum(x.params_before for x in result.layers)
        result.target_params_after = sum(written_target_params(shapes, x) for x in result.layers)
        tick("factors and write")
        if evaluate:
            result.evaluation = self._evaluate(tmp, result.output)
            tick("evaluate")
        result.timings = dict(tick.laps)
        result.peak_block_mb = max(self.block_peaks, default=0.0)
        result.resumed_from = str(self.resumed_from) if self.resumed_from else None
        result.pass1_resumed_after = self.pass1_resumed_after
        result.files = sorted({p.name for p in written} | {"recipe.yaml", "report.json", "README.md"})
        _write_sidecars(tmp, result, self.model_path)

    def _pass2_progress(
        self, checkpoint: Path | None, settings: FactorizeSettings, ranks: dict[str, int | None],
        max_shard_size: str | int,
    ) -> Pass2Progress | None:  # fmt: skip
        """Where pass 2 records its progress (None without a checkpoint), keyed by what its output depends on."""
        from lowrank_compress.pass2_progress import Pass2Progress
        from lowrank_compress.writer import parse_size

        if checkpoint is None:
            return None
        key = {
            "settings": dataclasses.asdict(settings),
            "ranks": ranks,
            "shard_size": parse_size(max_shard_size),
        }
        return Pass2Progress(checkpoint, key)

    def _evaluate(self, written: Path, out: Path) -> dict[str, Any]:
        """`factorize --evaluate`: the written model against the source, as `evaluate` reports it (under OUT's name,
        not the temporary directory's)."""
        from lowrank_compress.evaluate import evaluate_models

        evaluation = evaluate_models(
            written,
            self.model_path,
            device=self.settings.device,
            allow_pickle=self.allow_pickle,
            progress=self.report,
        ).to_dict()
        evaluation["models"][0]["path"] = str(out)
        return evaluation

    def _stream_factors(
        self, ranks: dict[str, int | None], writer: Any, progress: Any = None,
        resumed: tuple[dict[str, Any], dict[str, torch.Tensor]] | None = None,
    ) -> tuple[list[LayerResult], torch.dtype]:  # fmt: skip
        """Pass 2: the outer tensors copied as stored; then per block, its targets factorized at their ranks (fitted
        to the dense block's inputs, or error-aware to the compressed prefix's), refined if asked, and written with
        the block's other tensors as stored; recorded in `progress` when given (after the last block, and after others
        at most once a minute), and pass 2 taken up after the blocks `resumed` records. Returns each target's result and the factors' dtype."""
        streamed, ckpt = self.streamed, self.streamed.ckpt
        flow_needed = self._fits_data or self.settings.refine_steps > 0
        flow = CalibrationFlow(self, single=self.settings.refine_steps > 0) if flow_needed else None
        layers: dict[str, LayerResult] = {}
        dtype = torch.float32
        measured = set(self._report_spectra)  # pass 1's; pass 2 adds the others
        start = 0
        if resumed is not None:
            start, dtype = self._take_up_pass2(resumed, flow, layers)
        else:
            for name in streamed.outer_tensors():
                writer.add(name, ckpt.read_stored(name))
        n = len(streamed.blocks)
        for i in range(start, n):
            with streamed.block(i) as block, PeakMemory(streamed.device) as peak:
                dtype = self._pass2_block(i, block, ranks, flow, layers, writer) or dtype
            self.block_peaks.append(peak.mb)
            if progress is not None and (progress.due() or i + 1 == n):  # (the last: a stop after loses none)
                self._record_pass2(progress, i + 1, writer, flow, layers, dtype, measured)
            self.report(f"pass 2, block {i + 1}/{n} (peak {peak.mb:,.0f} MB)", i + 1, n)
        return [layers[t.name] for t in self.targets], dtype

    @property
    def _fits_data(self) -> bool:
        """Whether the method fits each layer to the calibration inputs pass 2 carries (whiten, asvd)."""
        return self.settings.method in ("whiten", "asvd")

    def _pass2_block(
        self, i: int, block: nn.Module, ranks: dict[str, int | None], flow: CalibrationFlow | None,
        layers: dict[str, LayerResult], writer: Any,
    ) -> torch.dtype | None:  # fmt: skip
        """Block i (loaded): its targets factorized and written with its other tensors, the flow advanced past
        it; returns the factors' dtype (None where it has none)."""
        streamed, modules = self.streamed, self._block_targets(i)
        outputs = None  # the compressed block's outputs, where the fit already ran it
        if flow is not None and self._fits_data and self.settings.error_aware:
            swapped, outputs = self._fit_in_order(block, modules, ranks, flow, layers)
        else:
            if self._fits_data:
                stats = self._pass2_stats(block, modules, flow)
            else:  # svd and fisher read pass 1's statistics; a refinement still needs the dense block's outputs
                stats = self._fisher_stats(modules)
                if flow is not None:
                    flow.run_dense(block)
            swapped = self._fit_group(list(modules), ranks, stats, layers)
        if flow is not None:
            refined = self.settings.refine_steps and i >= self.settings.refine_from * len(streamed.blocks)
            if swapped and refined:
                _refine(streamed, block, swapped, flow, self.settings.refine_steps, i)
                outputs = None
            # the compressed prefix's hidden states are needed by the error-aware fit and the refinement
            track = self.settings.error_aware or self.settings.refine_steps > 0
            flow.advance(block, compressed=track and (bool(swapped) or flow.shifted), outputs=outputs)
        dtype = self._write_block(i, swapped, writer)
        for name in swapped:
            streamed.set_block_module(name, modules[name])
        return dtype

    def _record_pass2(
        self, progress: Any, done: int, writer: Any, flow: CalibrationFlow | None, layers: dict[str, LayerResult],
        dtype: torch.dtype, measured: set[str],
    ) -> None:  # fmt: skip
        """What the block after the first `done` starts from (see pass2_progress.py)."""
        tensors = {f"spectrum.{n}": s for n, s in self._report_spectra.items() if n not in measured}
        if flow is not None:
            kinds = {"hidden": flow.hidden, **({"compressed": flow.compressed} if flow.shifted else {})}
            for kind, parts in kinds.items():
                tensors.update(
                    {f"{kind}.{part}.{b}": h for part, hs in parts.items() for b, h in enumerate(hs)}
                )
        state = {
            "writer": writer.state(), "layers": [dataclasses.asdict(x) for x in layers.values()],
            "dtype": dtype_name(dtype), "shifted": flow is not None and flow.shifted, "block_peaks": self.block_peaks,
        }  # fmt: skip
        progress.record(done, state, tensors)

    def _take_up_pass2(
        self, resumed: tuple[dict[str, Any], dict[str, torch.Tensor]], flow: CalibrationFlow | None,
        layers: dict[str, LayerResult],
    ) -> tuple[int, torch.dtype]:  # fmt: skip
        """Restore a recorded pass 2 (the flow's hidden states, the layers done, the spectra pass 2 measured, the
        block peaks); returns the first block to run and the factors' dtype so far."""
        state, tensors = resumed
        for x in state["layers"]:
            layers[x["name"]] = LayerResult(**{**x, "shape": tuple(x["shape"])})
        for key, t in tensors.items():
            kind, _, rest = key.partition(".")
            if kind == "spectrum":
                self._report_spectra[rest] = t
            elif flow is not None:
                part, _, b = rest.rpartition(".")
                getattr(flow, kind)[part][int(b)] = t.to(flow.store)
        if flow is not None:
            flow.shifted = bool(state["shifted"])
            if not flow.shifted:
                flow.compressed = {part: list(h) for part, h in flow.hidden.items()}
        self.block_peaks = list(state["block_peaks"])
        return int(state["blocks_done"]), getattr(torch, state["dtype"])

    def _fit_group(
        self,
        names: list[str],
        ranks: dict[str, int | None],
        stats: dict[str, Any],
        layers: dict[str, LayerResult],
    ) -> dict[str, nn.Module]:
        """Factorize these targets of the loaded block from their statistics and swap the factors in; each layer's
        statistics (a shared Gram with its last layer) are released as soon as it is done."""
        swapped = {}
        cache: dict[int, Any] = {}
        users = Counter(id(st.gram) for st in stats.values())
        for name in names:
            layer, factors = self._factorize(self._target(name), ranks[name], stats.get(name), cache)
            layers[name] = layer
            if factors is not None:
                swapped[name] = factors
                self.streamed.set_block_module(name, factors)
            release_stats(stats, name, users, cache)
        return swapped

    def _fit_in_order(
        self, block: nn.Module, modules: dict[str, nn.Module], ranks: dict[str, int | None], flow: CalibrationFlow,
        layers: dict[str, LayerResult],
    ) -> tuple[dict[str, nn.Module], dict[str, list[torch.Tensor]] | None]:  # fmt: skip
        """The error-aware fit inside the block as well as across blocks: the targets in the order they run, one
        group of layers reading the same input at a time (q/k/v, o, gate/up, down), each fitted to its dense inputs X
        and to the inputs X' it sees when the block is fed the compressed prefix with the groups before it already
        factorized. So o_proj corrects what factorizing q/k/v changed, down_proj what gate/up changed.

        The dense inputs X of every group come from the one dense pass that also gives the block's outputs; the
        inputs X' from one compressed pass per batch, all run in lockstep and paused at each group until it is
        fitted (a pass per group cost about as much as the rest of pass 2). Returns the factors and the compressed
        block's outputs per part and batch (None where the block stays dense behind a dense prefix: they are the
        dense outputs)."""
        from lowrank_compress.lockstep import Lockstep

        scales = self._part_scales()
        dense_inputs = self._dense_pass(block, modules, flow, scales)
        if not flow.shifted and all(ranks[n] is None for n in modules):
            return self._fit_group(list(modules), ranks, {}, layers), None
        group_of = {n: group for group in _groups_in_order(modules, dense_inputs) for n in group}
        batches = [(part, b) for part in flow.ids for b in range(len(flow.compressed[part]))]
        jobs = [functools.partial(flow.run, block, part, b, flow.compressed[part][b]) for part, b in batches]
        fitted: dict[str, nn.Module] = {}  # what each target is once its group is fitted: factors, or itself
        with (
            Lockstep(jobs) as lockstep,
            _gated(modules, lambda name, x: _wait_for_fit(lockstep, name, x, fitted)),
        ):
            for name, parked in lockstep.pauses():
                group = group_of[name]
                moved = {batches[j]: x for j, x in parked}
                shifted = flow.shifted or any(fitted[n] is not modules[n] for n in fitted)
                sums = self._group_sums({n: modules[n] for n in group}, moved, dense_inputs, scales, shifted)
                moved = parked = None
                factors = self._fit_group(group, ranks, sums, layers)
                fitted.update({n: factors.get(n, modules[n]) for n in group})
        outputs: dict[str, list[torch.Tensor]] = {part: [] for part in flow.ids}
        for (part, _), out in zip(batches, lockstep.results, strict=True):
            outputs[part].append(out)
        return {n: m for n, m in fitted.items() if m is not modules[n]}, outputs

    def _dense_pass(
        self, block: nn.Module, modules: dict[str, nn.Module], flow: CalibrationFlow, scales: dict[str, float]
    ) -> dict[str, list[dict[str, torch.Tensor]]]:
        """The dense block on the dense hidden states: its outputs (the targets of the fit, and the next block's
        dense inputs) and, per part and batch, every target's input (kept where the flow keeps hidden states)."""
        from lowrank_compress.calibration import BlockStatistics

        kept: dict[str, list[dict[str, torch.Tensor]]] = {part: [] for part in flow.ids}
        for part in flow.ids:
            for b in range(len(flow.hidden[part])):
                with BlockStatistics(modules if scales[part] else {}).record() as seen:
                    flow.dense_out[part][b] = flow.run(block, part, b, flow.hidden[part][b])
                stored: dict[int, torch.Tensor] = {}  # layers reading one tensor keep sharing it
                kept[part].append({n: stored.setdefault(id(x), x.to(flow.store)) for n, x in seen.items()})
        return kept

    def _group_sums(
        self, group: dict[str, nn.Module], moved: dict[tuple[str, int], torch.Tensor],
        dense_inputs: dict[str, list[dict[str, torch.Tensor]]], scales: dict[str, float], shifted: bool,
    ) -> dict[str, Any]:  # fmt: skip
        """One group's error-aware sums: its kept dense inputs (taken out of `dense_inputs`) paired, batch by batch,
        with the inputs X' it saw in the compressed pass (`moved`, by part and batch; the same as the dense ones
        while nothing before the group differs, then only X^T X is summed)."""
        sums = self._block_sums(group)
        device = self.streamed.device
        for (part, b), x_moved in moved.items():
            if not scales[part]:
                continue
            kept = {n: dense_inputs[part][b].pop(n) for n in group}  # used once: they leave the store here
            on_device: dict[int, torch.Tensor] = {}  # layers reading one tensor share their sums by it
            dense = {n: on_device.setdefault(id(x), x.to(device)) for n, x in kept.items()}
            sums.add(dense, dict.fromkeys(group, x_moved) if shifted else None, weight=scales[part])
            kept = dense = None
        return sums.stats()

    def _pass2_stats(
        self, block: nn.Module, modules: dict[str, nn.Module], flow: CalibrationFlow
    ) -> dict[str, Any]:
        """The block's pooled statistics of its dense inputs X for the fit (the fit to the dense model's inputs,
        `--no-error-aware`). Also computes the dense block's outputs."""
        scales = self._part_scales()
        sums = self._block_sums(modules)
        for part in flow.ids:
            for b in range(len(flow.hidden[part])):
                with sums.record() as dense:
                    flow.dense_out[part][b] = flow.run(block, part, b, flow.hidden[part][b])
                if modules and scales[part]:
                    sums.add(dense, weight=scales[part])
                dense = None
        return sums.stats() if modules else {}

    def _part_scales(self) -> dict[str, float]:
        """The factor on each calibration part's sums that pools the parts by their weights (`part_scales`)."""
        from lowrank_compress.calibration import part_scales

        tokens = {part: int(ids.numel()) for part, ids in self.calibration_batches.items()}
        return part_scales(self.part_weights, tokens)

    def _fisher_stats(self, modules: dict[str, nn.Module]) -> dict[str, Any]:
        """The Fisher rows pass 1 measured, as the statistics the fisher method reads (empty for other methods)."""
        from lowrank_compress.calibration import LayerStats

        if self.settings.method != "fisher":
            return {}
        tokens = sum(int(b.numel()) for b in self.calibration_batches.values())
        return {n: LayerStats(torch.empty(0), torch.empty(0), tokens, self._gradients[n][0]) for n in modules}

    def _factorize(
        self, t: Target, rank: int | None, stats: Any, cache: dict[int, Any]
    ) -> tuple[LayerResult, nn.Module | None]:
        from lowrank_compress.modules import LowRankLinear

        shape = (t.out_features, t.in_features)
        dense = t.out_features * t.in_features
        if rank is None:
            return LayerResult(t.name, shape, None, dense, dense, 0.0, self._stable_rank(t, None)), None
        if not self._reads_weights_in_pass1:  # else pass 1 checked it
            check_finite(t)
        dec = self._decompose(t, stats, cache, consume=True)  # pass 2 drops each layer's statistics after it
        stable = self._stable_rank(t, dec)
        self._report_spectra.setdefault(t.name, dec.s.float().cpu())  # where pass 1 measured none
        err = dec.truncation_error()
        rel = math.sqrt(float(err[rank]) / float(err[0])) if float(err[0]) > 0 else 0.0
        up, down = dec.factors(rank, dtype=torch.float32)
        bias = t.module.bias.detach() if t.module.bias is not None else None
        device = t.module.weight.device
        module = LowRankLinear.from_factors(up.to(device), down.to(device), bias)
        module.requires_grad_(False)
        return LayerResult(t.name, shape, rank, dense, rank * sum(shape), rel, stable), module

    def _stable_rank(self, t: Target, dec: Decomposition | None) -> float:
        """Pass 1's estimate; else exact from pass 2's spectrum of W (method svd); else measured now."""
        from lowrank_compress.spectrum import stable_rank

        if t.name in self._measured_stable:
            return self._measured_stable[t.name]
        if dec is not None and dec.method == "svd":
            return stable_rank(dec.s)
        return estimated_stable_rank(t.weight())

    def _write_block(self, i: int, swapped: dict[str, nn.Module], writer: Any) -> torch.dtype | None:
        """Block i's tensors: factors in the stored dtype of the weight they replace, the rest as stored."""
        streamed, ckpt = self.streamed, self.streamed.ckpt
        factor_of = {streamed.ckpt_name[f"{name}.weight"]: (name, m) for name, m in swapped.items()}
        dtype = None
        for stored in streamed.block_tensors(i):
            if stored not in factor_of:
                writer.add(stored, ckpt.read_stored(stored))
                continue
            _, module = factor_of[stored]
            dtype = ckpt.stored_dtype(stored)
            base = stored.removesuffix(".weight")
            writer.add(f"{base}.down.weight", module.down.weight.to(dtype))
            writer.add(f"{base}.up.weight", module.up.weight.to(dtype))
        return dtype


def _groups_in_order(
    modules: dict[str, nn.Module], dense_inputs: dict[str, list[dict[str, torch.Tensor]]]
) -> list[list[str]]:
    """The targets in the order the block called them in the dense pass, grouped by the input they read."""
    seen = next((batches[0] for batches in dense_inputs.values() if batches and batches[0]), {})
    missing = [n for n in modules if n not in seen]
    if missing:
        raise LowrankError(
            f"calibration target {missing[0]} was never called during the block's forward pass"
        )
    groups: dict[int, list[str]] = {}
    for name, x in seen.items():
        groups.setdefault(id(x), []).append(name)
    return list(groups.values())


@contextlib.contextmanager
def _gated(modules: dict[str, nn.Module], wait: Callable[[str, torch.Tensor], nn.Module]) -> Iterator[None]:
    """While inside, calling one of `modules` first asks `wait(name, input)` what it is now (it may pause there until
    its group is fitted) and runs that: its factors, or itself. Patches the instances' forward, as accelerate's
    hooks do, so every attribute the model code reads on the layer stays."""

    def gate(name: str, module: nn.Module, forward: Callable[..., Any]) -> Callable[..., Any]:
        def gated_forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            now = wait(name, x)
            return forward(x, *args, **kwargs) if now is module else now(x, *args, **kwargs)

        return gated_forward

    # an earlier patch of an instance's forward, if any, comes back afterwards
    own = {name: module.__dict__.get("forward") for name, module in modules.items()}
    for name, module in modules.items():
        module.forward = gate(name, module, module.forward)
    try:
        yield
    finally:
        for name, module in modules.items():
            if own[name] is None:
                del module.forward
            else:
                module.forward = own[name]


def _wait_for_fit(lockstep: Any, name: str, x: torch.Tensor, fitted: dict[str, nn.Module]) -> nn.Module:
    """In a compressed pass of the in-order fit: pause at the first layer of a group not yet fitted."""
    if name not in fitted:
        lockstep.pause(name, x)
    return fitted[name]


def _refine(
    streamed: Any, block: nn.Module, swapped: dict[str, nn.Module], flow: CalibrationFlow, steps: int, i: int
) -> None:
    """A few Adam steps on block i's factors so that the compressed block, fed the compressed prefix's hidden
    states, reproduces the dense block's outputs (AA-SVD's block-wise refinement); relative mean squared error.
    Each step takes one calibration window, the blocks taking the windows in turn (block i the `steps` after block
    i - 1's), so that together they see them all: on a SmolLM2 block a step on one window took 100 ms against 337
    on a batch of four, and 8 such steps per block did about as well as 8 on batches (benchmarks/README.md,
    "Refinement steps on one window each")."""
    params = [p for m in swapped.values() for p in (m.up.weight, m.down.weight)]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=REFINE_LR)
    windows = windows_in_turn(flow.ids)
    device = streamed.device
    try:
        for step in range(steps):
            part, r = windows[(i * steps + step) % len(windows)]
            target = flow.row(part, r, flow.dense_out).to(device)
            with torch.enable_grad():
                out = streamed.run_block(
                    block, flow.row(part, r, flow.compressed).to(device), flow.window_ctx[part][r]
                )
                loss = (out - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-30)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None


REFINE_LR = 4e-4
"""Adam's step for --refine-steps: factors are balanced (entries of order 1e-2), so each step moves them by up to about
4%; on SmolLM2 at 0.8, 8 steps at 4e-4 (on batches of four windows) lowered both held-out perplexities more than 8
at 1e-4 (benchmarks/README.md, "Block refinement on today's default")."""


def _write_sidecars(directory: Path, result: FactorizeResult, model_path: str | Path) -> None:
    from lowrank_compress.report import factorize_model_card, write_json

    header = f"# lowrank-compress {__version__} factorize recipe for {model_path}\n# reuse: lowrank-compress factorize MODEL -o OUT --recipe recipe.yaml"
    (directory / "recipe.yaml").write_text(result.settings.to_yaml(header))
    write_json(directory / "report.json", result.to_dict())
    (directory / "README.md").write_text(factorize_model_card(result.to_dict(), str(model_path)))


def _extreme_spectra(
    layers: list[LayerResult], spectra: dict[str, torch.Tensor], n: int = 3
) -> dict[str, list[float]]:
    """s / s_max (five digits) of the n most and n least compressible factorized layers (stable rank over
    break-even rank), for reports."""
    from lowrank_compress.spectrum import break_even_rank

    measured = [x for x in layers if x.name in spectra]
    ranked = sorted(measured, key=lambda x: x.stable_rank / break_even_rank(*x.shape))
    out = {}
    for x in ranked[:n] + ranked[max(n, len(ranked) - n) :]:
        s = spectra[x.name]
        top = float(s[0]) if s.numel() and float(s[0]) > 0 else 1.0
        out[x.name] = [float(f"{float(v) / top:.5g}") for v in s]
    return out
