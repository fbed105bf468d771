"""`CalibrationFlow`: the hidden states factorize carries block by block through both of its passes."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from lowrank_compress.pipeline import Prepared
    from lowrank_compress.sequential import BlockInput

BATCH = 4
"""Calibration windows per block call: the batch size of the statistics pass, as `collect_stats` uses."""


class CalibrationFlow:
    """The calibration windows' hidden states on their way through the blocks, per part ("text", "self"), or the
    gradient windows' alone (`windows`: some of the calibration windows, or the answer windows).

    `hidden` are the dense model's (the inputs of the block about to run); in pass 2 `compressed` are the
    compressed prefix's (the same tensors until a block is factorized: `shifted` says when they part) and
    `dense_out` the dense block's outputs, the targets of the fit. The inputs of the gradient windows are stashed on
    disk for the block-wise backward pass. With --offload they live on the CPU and visit the device per batch.
    """

    def __init__(
        self, prepared: Prepared, *, stash: bool = False,
        windows: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None, single: bool = False,
    ) -> None:  # fmt: skip
        """`stash`: the gradient windows among the calibration windows keep their inputs of every block for a
        backward pass; `windows`: the flow holds these gradient windows alone (token ids, loss labels) and stashes
        them; `single`: each window's own block arguments are kept too (`window_ctx`), for steps on one window."""
        streamed, settings = prepared.streamed, prepared.settings
        self.streamed = streamed
        self.store = torch.device("cpu") if settings.offload else streamed.device
        self.ids = prepared.calibration_batches
        self.labels = self.ids
        self.grad_rows = {part: rows for part, rows in prepared.grad_rows.items() if rows} if stash else {}
        if windows is not None:
            self.ids = {part: ids for part, (ids, _) in windows.items()}
            self.labels = {part: labels for part, (_, labels) in windows.items()}
            self.grad_rows = {part: list(range(len(ids))) for part, ids in self.ids.items()}
        with streamed.outer():
            self.ctx = {part: streamed.capture(rows, BATCH) for part, rows in self.ids.items()}
            self.grad_ctx = {
                part: _alone(streamed, self.ids[part][rows]) for part, rows in self.grad_rows.items()
            }
            self.window_ctx = {
                part: _alone(streamed, rows) for part, rows in (self.ids.items() if single else ())
            }
        self.hidden = {part: [c.hidden.to(self.store) for c in ctx] for part, ctx in self.ctx.items()}
        self.compressed = {part: list(h) for part, h in self.hidden.items()}
        self.dense_out: dict[str, list[Any]] = {part: [None] * len(h) for part, h in self.hidden.items()}
        # the gradient windows' inputs of every block, spilled to disk so that memory does not grow with depth
        from lowrank_compress.outdir import scratch_dir

        self._spill = scratch_dir("stash", prepared.warn) if self.grad_rows else None
        self.shifted = False

    def run(self, block: nn.Module, part: str, b: int, hidden: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = self.streamed.run_block(block, hidden.to(self.streamed.device), self.ctx[part][b])
        return out.to(self.store)

    def run_dense(self, block: nn.Module) -> None:
        """The dense block's outputs on the dense inputs, for a fit that reads none of them but a refinement."""
        for part, hs in self.hidden.items():
            self.dense_out[part] = [self.run(block, part, b, h) for b, h in enumerate(hs)]

    def row(self, part: str, r: int, states: dict[str, list[Any]] | None = None) -> torch.Tensor:
        """Window r's current hidden states (1 x seq x hidden): the dense inputs, or those of `states`
        (`compressed`, `dense_out`)."""
        return (self.hidden if states is None else states)[part][r // BATCH][r % BATCH : r % BATCH + 1]

    def stash_inputs(self, part: str, i: int) -> None:
        """Keep block i's inputs of the gradient windows for the backward pass (on disk)."""
        from safetensors.torch import save_file

        rows = self.grad_rows.get(part)
        if rows:
            tensors = {str(k): self.row(part, r).to("cpu").contiguous() for k, r in enumerate(rows)}
            save_file(tensors, self._stash_path(part, i))

    def stashed(self, part: str, i: int) -> list[torch.Tensor]:
        from safetensors.torch import load_file

        tensors = load_file(self._stash_path(part, i))
        return [tensors[str(k)] for k in range(len(tensors))]

    def drop_stash(self, part: str, i: int) -> None:
        Path(self._stash_path(part, i)).unlink(missing_ok=True)

    def _stash_path(self, part: str, i: int) -> str:
        assert self._spill is not None
        return str(Path(self._spill.name) / f"{part}-{i}.safetensors")

    def advance(
        self, block: nn.Module, compressed: bool, outputs: dict[str, list[torch.Tensor]] | None = None
    ) -> None:
        """After block i of pass 2: the dense hidden states become the dense block's outputs; the compressed ones
        go through the (factorized) block when the prefix differs from the dense model (or are its `outputs`, where
        the fit already ran it), else follow the dense."""
        for part in self.ids:
            if compressed and outputs is not None:
                self.compressed[part] = outputs[part]
            elif compressed:
                self.compressed[part] = [
                    self.run(block, part, b, h) for b, h in enumerate(self.compressed[part])
                ]
            else:
                self.compressed[part] = list(self.dense_out[part])
            self.hidden[part] = self.dense_out[part]
            self.dense_out[part] = [None] * len(self.hidden[part])
        self.shifted = self.shifted or compressed


def _alone(streamed: Any, ids: torch.Tensor) -> list[BlockInput]:
    """Each row's own block arguments (masks, positions) for a pass of that window alone; the hidden states captured
    with them are dropped (the flow holds the windows' hidden states in its batches, or stashed)."""
    return [dataclasses.replace(c, hidden=c.hidden[:0]) for c in streamed.capture(ids, 1)]


def windows_in_turn(ids: dict[str, torch.Tensor]) -> list[tuple[str, int]]:
    """Every window of the parts' token rows as (part, row), the parts taking turns: a run of consecutive windows
    samples them all."""
    turns = itertools.zip_longest(*([(part, r) for r in range(len(rows))] for part, rows in ids.items()))
    return [w for turn in turns for w in turn if w is not None]
