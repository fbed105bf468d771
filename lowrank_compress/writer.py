"""Streaming sharded safetensors writer: tensors go in as they are produced, one shard is held at a time.

The pattern of mergekit's TensorWriter: fill a shard up to the size limit, flush it to a provisionally named file,
and at `finalize` give the shards their final `model-0000k-of-0000n.safetensors` names (or `model.safetensors`
when one shard suffices) and write the index that transformers reads. The full state dict never exists in memory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from lowrank_compress.errors import LowrankError

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


def parse_size(size: str | int) -> int:
    """Bytes from an int or a string such as "2GB", "500MB", "40KB" (decimal units, as huggingface_hub uses)."""
    if isinstance(size, int):
        return size
    text = str(size).strip().upper()
    for unit, factor in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6),
                         ("KB", 10**3), ("B", 1)):  # fmt: skip
        if text.endswith(unit):
            number = text[: -len(unit)].strip()
            try:
                return int(float(number) * factor)
            except ValueError:
                break
    raise LowrankError(f"shard size {size!r} is not a size like 2GB or 500MB")


class ShardWriter:
    """Write tensors into `directory` as safetensors shards of at most `max_shard_size` bytes each.

    A tensor larger than the limit gets a shard of its own. `held_tensors` / `max_held_tensors` say how many tensors
    are in memory waiting for the current shard (tests check that it never exceeds one shard's worth).
    """

    def __init__(self, directory: Path, max_shard_size: str | int = "2GB") -> None:
        self.directory = Path(directory)
        self.limit = parse_size(max_shard_size)
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self._names: set[str] = set()
        self.total_bytes = 0
        self.total_params = 0
        self.max_held_tensors = 0
        self.max_held_bytes = 0

    @property
    def held_tensors(self) -> int:
        return len(self._pending)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one tensor (copied to contiguous CPU memory); flushes the current shard first when it is full."""
        if name in self._names:
            raise LowrankError(f"internal: tensor {name} written twice")
        t = tensor.detach().to("cpu").contiguous()
        size = t.numel() * t.element_size()
        if self._pending and self._pending_bytes + size > self.limit:
            self.flush()
        self._names.add(name)
        self._pending[name] = t
        self._pending_bytes += size
        self.total_bytes += size
        self.total_params += t.numel()
        self.max_held_tensors = max(self.max_held_tensors, len(self._pending))
        self.max_held_bytes = max(self.max_held_bytes, self._pending_bytes)

    def flush(self) -> None:
        """Write the pending tensors as the next shard (under a provisional name) and drop them from memory."""
        from safetensors.torch import save_file

        if not self._pending:
            return
        path = self.directory / f".shard-{len(self._shards):05d}.safetensors"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        self._shards.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def finalize(self) -> list[Path]:
        """Flush, rename the shards to their final names and write the index when sharded; returns the files."""
        self.flush()
        if not self._shards:
            raise LowrankError("internal: no tensors were written")
        n = len(self._shards)
        if n == 1:
            final = self.directory / WEIGHTS_NAME
            os.replace(self._shards[0][0], final)
            return [final]
        files, weight_map = [], {}
        for i, (path, names) in enumerate(self._shards, start=1):
            final = self.directory / f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(path, final)
            files.append(final)
            weight_map.update(dict.fromkeys(names, final.name))
        index = {
            "metadata": {"total_size": self.total_bytes, "total_parameters": self.total_params},
            "weight_map": dict(sorted(weight_map.items())),
        }
        path = self.directory / WEIGHTS_INDEX_NAME
        path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return [*files, path]
