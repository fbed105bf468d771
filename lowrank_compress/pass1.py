"""Pass 1 of factorize: block by block, each target's input statistics, spectrum and stable rank, and through a
block-wise backward pass its sensitivity (the loss gradients at its output). Methods of `pipeline.Prepared`, whose
state they read and fill."""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lowrank_compress.factorize import release_stats
from lowrank_compress.flow import BATCH, CalibrationFlow
from lowrank_compress.memory import PeakMemory
from lowrank_compress.modules import is_conv1d
from lowrank_compress.results import Target, check_finite
from lowrank_compress.spectrum import estimated_stable_rank

if TYPE_CHECKING:
    from lowrank_compress.factorize import Decomposition
    from lowrank_compress.recipe import FactorizeSettings


class Pass1:
    """`Prepared`'s pass 1 (see pipeline.py for its state)."""

    def _pass1(
        self, keep_stats: bool, progress: dict[str, Any] | None = None,
        hidden: dict[str, list[torch.Tensor]] | None = None,
    ) -> None:  # fmt: skip
        """Block by block: each target's spectrum under the method (from the pooled input statistics), its stable
        rank, and, through a block-wise backward pass, its sensitivity (and Fisher rows). Where the spectra read the
        gradients (the fisher method, the loss-weighted fit), or the gradient windows are not calibration windows (the
        answer windows), the gradients come first, from a forward pass of the gradient windows alone; else the
        statistics pass stashes those windows' inputs for the backward pass. `progress` and `hidden`: where an
        unfinished pass 1 stopped (`_resume`), and the hidden states entering its next block."""
        spectra, stable, grads = self._measured_spectra, self._measured_stable, self._gradients
        if self.needs_data:
            answers = self.answer_windows is not None
            measured = answers or any(self.grad_rows.values())
            first = measured and (answers or self.settings.method == "fisher" or self.settings.loss_weighted)
            if first and (progress is None or progress["phase"] == "sampling"):
                windows = CalibrationFlow(self, windows=self._gradient_windows())
                self._forward(windows)
                grads.update(self._gradient_pass(windows))
                del windows
                self._record_pass1({"phase": "gradients"})
            flow = CalibrationFlow(self, stash=measured and not first)
            start = progress["blocks_done"] if progress and progress["phase"] == "blocks" else 0
            if hidden is not None:
                flow.hidden = {part: [h.to(flow.store) for h in hs] for part, hs in hidden.items()}
            # (the stashed inputs of the gradient windows are not kept: such a pass is recorded up to its start)
            record = not keep_stats and not (measured and not first)
            self._forward(flow, spectra, stable, keep_stats, start=start, record=record)
            self._record_calibration(flow)
            self.tick("calibration")
            if measured and not first:
                grads.update(self._gradient_pass(flow))
            for name, st in self.stats.items():  # keep_stats: the statistics with their gradients
                st.fisher_rows, st.out_grad_sq, st.out_grad_channels = grads.get(name, (None, None, None))
        for i, names in self._blocks_with_targets():
            if all(n in spectra for n in names) or not self._reads_weights_in_pass1:
                continue
            with self.streamed.block(i):
                self._spectra(names, spectra, stable, stats={})
            if self._recorder is not None and self._recorder.due():
                self._record_pass1({"phase": "blocks", "blocks_done": i + 1}, running="spectra")
            self.report("pass 1: spectra, block", i + 1, len(self.streamed.blocks))
        self._set_candidates(spectra, stable)
        self.tick("spectra")

    def _record_pass1(
        self, progress: dict[str, Any], hidden: dict[str, list[torch.Tensor]] | None = None,
        running: str | None = None,
    ) -> None:  # fmt: skip
        """Record the unfinished pass 1 in the checkpoint (where this run records one): what it has measured, and
        `hidden`, the hidden states entering the next block; `running`: the phase under way, whose time so far is
        kept for the report."""
        if self._recorder is None:
            return
        state, tensors = self._pass1_state()
        for part, batches in (hidden or {}).items():
            tensors.update({f"hidden.{part}.{b}": h for b, h in enumerate(batches)})
        if self.answer_windows is not None:
            tensors["answers.ids"], tensors["answers.labels"] = self.answer_windows
        state.update(notes=self._notes, sampling=[self._sampling, self._sampling_peak_mb], running=running and [
            running, self.tick.running(running)
        ])  # fmt: skip
        self._recorder.record(state, tensors, progress)

    def _set_candidates(self, spectra: dict[str, Any], stable: dict[str, float]) -> None:
        """What the allocator reads of each target: its spectrum, stable rank and sensitivity."""
        from lowrank_compress.allocate import LayerCandidate

        self._measured_spectra, self._measured_stable = spectra, stable
        self.candidates = [
            LayerCandidate(
                name=t.name, out_features=t.out_features, in_features=t.in_features,
                decomposition=spectra.get(t.name), stable_rank=stable.get(t.name),
                sensitivity=self._sensitivity(t.name),
            )
            for t in self.targets
        ]  # fmt: skip

    def _gradient_windows(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The windows the loss gradients come from, per part: (token ids, loss labels)."""
        if self.answer_windows is not None:
            return {"answers": self.answer_windows}
        chosen = {part: self.calibration_batches[part][rows] for part, rows in self.grad_rows.items() if rows}
        return {part: (ids, ids) for part, ids in chosen.items()}

    def _grad_source(self) -> dict[str, Any] | None:
        """report.json's record of the gradient windows' source: the setting, and the answer windows' size."""
        if self.answer_windows is not None:
            ids, labels = self.answer_windows
            return {
                "source": "answers",
                "samples": ids.shape[0],
                "answer_tokens": int((labels != -100).sum()),
            }
        if any(self.grad_rows.values()):
            return {"source": self.settings.grad_source}
        return None

    def _sensitivity(self, name: str) -> float | None:
        """What the allocator multiplies a layer's truncation error by to read it as loss: the mean squared loss
        gradient at its output; for loss-weighted spectra, already in units of the per-channel gradients scaled
        to their largest (`factorize._whiten`), that largest one."""
        if name not in self._gradients:
            return None
        _, mean_sq, channels = self._gradients[name]
        if self.settings.loss_weighted and channels is not None:  # (_applicable keeps it to whiten)
            return float(channels.max())
        return mean_sq

    def _block_sums(self, modules: dict[str, nn.Module]) -> Any:
        """Input statistics of these targets, summed in the precision the fit reads them in (`factorize.fit_dtype`),
        with the sums of |x| where the method reads them (asvd)."""
        from lowrank_compress.calibration import BlockStatistics
        from lowrank_compress.factorize import fit_dtype

        dtype = fit_dtype(self.settings.method, self.settings.damping)
        return BlockStatistics(modules, dtype, abs_sums=self.settings.method == "asvd")

    @property
    def _reads_weights_in_pass1(self) -> bool:
        """Data-free uniform ranks need the layer shapes alone: pass 1 then reads no weight, and each layer's stable
        rank comes from pass 2's exact spectrum of W."""
        return self.needs_data or self.settings.policy != "uniform"

    def _blocks_with_targets(self) -> list[tuple[int, list[str]]]:
        by_block: dict[int, list[str]] = {}
        for t in self.targets:
            by_block.setdefault(self.streamed.block_of(t.name), []).append(t.name)
        return sorted(by_block.items())

    def _target(self, name: str) -> Target:
        return self._targets_by_name[name]

    def _spectra(
        self, names: list[str], spectra: dict[str, Any], stable: dict[str, float], stats: dict,
        free: bool = False,
    ) -> None:  # fmt: skip
        """Spectrum (singular values only) and stable rank of each named target of the loaded block. `free`: each
        layer's statistics leave `stats` once used, a shared Gram and its Cholesky factor with their last layer."""
        from lowrank_compress.choices import SPECTRUM_POLICIES

        cache: dict[int, Any] = {}
        users = Counter(id(st.gram) for st in stats.values())
        for name in names:
            t = self._target(name)
            check_finite(t)
            if self.settings.policy in SPECTRUM_POLICIES:
                spectra[name] = self._decompose(t, stats.get(name), cache, spectrum_only=True, consume=free)
            else:  # the report's spectra come from pass 2's decompositions
                spectra[name] = None
            stable[name] = estimated_stable_rank(t.weight())
            if free:
                release_stats(stats, name, users, cache)

    def _decompose(
        self, t: Target, stats: Any, cache: dict[int, Any], spectrum_only: bool = False, consume: bool = False
    ) -> Decomposition:
        """`consume`: the statistics are not read again (their Gram may become its Cholesky factor)."""
        from lowrank_compress.factorize import decompose

        # the loss-weighted fit and spectra (pass 1 measures the gradients before the spectra then)
        rows = self._gradients.get(t.name, (None, None, None))[2] if self.settings.loss_weighted else None
        return decompose(
            t.weight(), self.settings.method, stats, damping=self.settings.damping, cholesky_cache=cache,
            spectrum_only=spectrum_only, consume_stats=consume, row_weights=rows,
        )  # fmt: skip

    def _block_targets(self, i: int) -> dict[str, nn.Module]:
        return {t.name: t.module for t in self.targets if self.streamed.block_of(t.name) == i}

    def _forward(
        self, flow: CalibrationFlow, spectra: dict[str, Any] | None = None, stable: dict[str, float] | None = None,
        keep_stats: bool = False, start: int = 0, record: bool = False,
    ) -> None:  # fmt: skip
        """The calibration windows through the dense blocks from block `start` on (the flow holds its inputs),
        stashing the gradient windows' inputs when the flow does; with `spectra`, each block's pooled input
        statistics give its targets' spectra and stable ranks. `record`: pass 1's progress after a block, when due."""
        n = len(self.streamed.blocks)
        scales = self._part_scales()
        label = "pass 1" if spectra is not None else "gradient windows"
        for i in range(start, n):
            modules = self._block_targets(i) if spectra is not None else {}
            with self.streamed.block(i) as block, PeakMemory(self.streamed.device) as peak:
                sums = self._block_sums(modules)
                for part in flow.ids:
                    flow.stash_inputs(part, i)
                    for b in range(len(flow.hidden[part])):
                        with sums.record() as seen:
                            flow.hidden[part][b] = flow.run(block, part, b, flow.hidden[part][b])
                        if modules and scales[part]:
                            sums.add(seen, weight=scales[part])
                        del seen
                if modules:
                    assert spectra is not None and stable is not None
                    stats = sums.stats()
                    del sums
                    if keep_stats:
                        self.stats.update(stats)
                    if self.settings.method == "fisher":
                        self._spectra(list(modules), spectra, stable, self._fisher_stats(modules))
                    else:
                        self._spectra(list(modules), spectra, stable, stats, free=not keep_stats)
                    del stats
            self.block_peaks.append(peak.mb)
            if record and self._recorder is not None and self._recorder.due():
                self._record_pass1(
                    {"phase": "blocks", "blocks_done": i + 1}, flow.hidden, running="calibration"
                )
            self.report(f"{label}, block {i + 1}/{n} (peak {peak.mb:,.0f} MB)", i + 1, n)

    def _gradient_pass(
        self, flow: CalibrationFlow
    ) -> dict[str, tuple[torch.Tensor | None, float | None, torch.Tensor | None]]:
        """Loss gradients of the flow's gradient windows (`_forward` has run them through every block) through the
        blocks in reverse, one block in memory, recomputing each block's forward from its stashed input (one
        window at a time, as `collect_stats` does): per target the mean squared gradient of its output (the
        sensitivity), per output channel (the loss-weighted fit's row weights) and, for fisher, the squared
        weight gradient per output row."""
        from lowrank_compress.calibration import blend_gradients

        fisher = self.settings.method == "fisher"
        streamed = self.streamed
        upstream = {part: [] for part in flow.ids}
        with streamed.outer(embeddings=False):
            for part, rows in flow.grad_rows.items():
                for r in rows:
                    final = flow.row(part, r).to(streamed.device).requires_grad_(True)
                    with torch.enable_grad():
                        loss = streamed.head_loss(final, flow.labels[part][r : r + 1])
                        upstream[part].append(torch.autograd.grad(loss, final)[0].detach())
        n = len(streamed.blocks)
        out: dict[str, tuple[torch.Tensor | None, float | None, torch.Tensor | None]] = {}
        for i in reversed(range(n)):
            modules = self._block_targets(i)
            with streamed.block(i) as block:
                parts = []
                for part, rows in flow.grad_rows.items():
                    if rows:
                        measured = self._block_gradients(
                            block, modules, flow, part, i, upstream[part], fisher
                        )
                        parts.append((measured, self.part_weights.get(part, 1.0)))
                for name in modules:
                    out[name] = blend_gradients([(m[name], w) for m, w in parts])
            for part in flow.grad_rows:
                flow.drop_stash(part, i)
            self.report(f"gradients, block {n - i}/{n}", n - i, n)
        self.tick("gradients")
        return out

    def _block_gradients(
        self, block: nn.Module, modules: dict[str, nn.Module], flow: CalibrationFlow, part: str, i: int,
        upstream: list[torch.Tensor], fisher: bool,
    ) -> dict[str, Any]:  # fmt: skip
        """One part's gradient statistics of block i's targets; `upstream` (the loss gradients at the block's
        output, one per gradient window) is replaced by the gradients at its input."""
        from lowrank_compress.calibration import LayerStats, OutputGrads

        grads = {n: OutputGrads() for n in modules}
        rows: dict[str, torch.Tensor] = {}

        def hook(name: str) -> Callable[..., None]:
            def fn(module: nn.Module, args: Any, output: torch.Tensor) -> None:
                output.register_hook(grads[name].add)

            return fn

        weights = [m.weight for m in modules.values()] if fisher else []
        handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
        try:
            for w in weights:
                w.requires_grad_(True)
            for k, h in enumerate(flow.stashed(part, i)):
                h = h.to(self.streamed.device).requires_grad_(True)
                with torch.enable_grad():
                    out = self.streamed.run_block(block, h, flow.grad_ctx[part][k])
                    got = torch.autograd.grad(out, [h, *weights], grad_outputs=upstream[k])
                upstream[k] = got[0].detach()
                for (name, m), g in zip(modules.items(), got[1:], strict=False):  # empty without fisher
                    r = g.detach().double().pow(2).sum(dim=0 if is_conv1d(m) else 1)
                    rows[name] = r if name not in rows else rows[name] + r
        finally:
            for w in weights:
                w.requires_grad_(False)
            for h in handles:
                h.remove()
        tokens = int(flow.ids[part].numel())
        return {
            n: LayerStats(torch.empty(0), torch.empty(0), tokens, rows.get(n), g.mean(), g.channels())
            for n, g in grads.items()
        }

    def _mean_loss(self, flow: CalibrationFlow, part: str) -> float:
        """The source model's mean next-token loss on one calibration part, from the last block's outputs (call it
        inside `streamed.outer()`, which holds the head)."""
        with torch.no_grad():
            losses = [
                self.streamed.head_loss(
                    h.to(self.streamed.device), flow.ids[part][b * BATCH : (b + 1) * BATCH], per_row=True
                )
                for b, h in enumerate(flow.hidden[part])
            ]
        return float(torch.cat(losses).mean())

    def _record_calibration(self, flow: CalibrationFlow) -> None:
        """calibration_info for report.json, with the narrow-text check (the model's loss on each part, from the
        last block's outputs) when both parts are there."""
        from lowrank_compress.calibration import narrow_calibration_warning
        from lowrank_compress.text import text_fingerprint

        settings, batches = self.settings, self.calibration_batches
        notes = list(self._notes)
        perplexity = None
        if len(batches) == 2:
            with self.streamed.outer(embeddings=False):  # the head read once for both parts
                mean_loss = {part: self._mean_loss(flow, part) for part in batches}
            perplexity = {part: math.exp(v) for part, v in mean_loss.items()}
            narrow = narrow_calibration_warning(
                mean_loss["text"], mean_loss["self"], self.part_weights["self"]
            )
            if narrow:
                notes.append(narrow)
                self.warn(narrow)
        sha = {}
        if "text" in batches:
            sha["text"] = text_fingerprint(self._text or "")
        if "self" in batches:
            sha["self"] = hashlib.sha256(batches["self"].numpy().tobytes()).hexdigest()  # of the token ids
        grads = {part: len(self.grad_rows.get(part, [])) for part in ("text", "self")}
        self.calibration_info = {
            "source": settings.calibration,
            "split": "calibration" if "text" in batches else None,
            "samples": settings.samples,
            "seq_len": settings.seq_len,
            "tokens": sum(int(b.numel()) for b in batches.values()),
            "text_sha256": sha.get("text", sha.get("self")),
            "seed": settings.seed,
            "grad_samples": sum(grads.values()),
            # where the loss gradients came from (None: none measured); "answers": the model's greedy answers
            "grad_source": self._grad_source(),
            "self_mix": self.part_weights.get("self", 0.0),
            "self_start": settings.self_start if "self" in batches and self._free_windows() else None,
            "self_temperature": settings.self_temperature if "self" in batches else None,
            # chat samples: answers end at their end of turn (or this many tokens), several to a window
            "self_answer_tokens": settings.self_answer_tokens if "self" in batches and self._chat else None,
            # chat samples: the share of the sampled windows that were conversations (the rest free text)
            "chat_share": settings.chat_share if "self" in batches and self._chat else None,
            # windows were conversations through the tokenizer's chat template (--chat, and it has one): the samples,
            # and with chat_text the text windows too
            "chat": self._chat,
            "chat_text": self._chat_text,
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
            },  # fmt: skip
            "perplexity": perplexity,  # the source model's on each part: the narrow-text check
            "warnings": notes,
            # how the self-generated windows were sampled: every block in memory, or each read per token
            "self_sampling": self._sampling,
            "self_sampling_peak_mb": self._sampling_peak_mb,
            **fit_settings(settings),
        }


def fit_settings(settings: FactorizeSettings) -> dict[str, Any]:
    """The settings of pass 2's fit that calibration_info records beside the calibration (pass 2 alone reads them,
    so a run resumed from pass 1's checkpoint records its own)."""
    return {k: getattr(settings, k) for k in ("error_aware", "loss_weighted", "refine_steps", "refine_from")}
