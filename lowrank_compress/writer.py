"""Streaming sharded safetensors writer: each tensor goes to disk as it is produced; none is held in memory.

The pattern of mergekit's TensorWriter (fill a shard up to the size limit, start the next, and at `finalize` give
the shards their final `model-0000k-of-0000n.safetensors` names, or `model.safetensors` when one suffices, and
write the index that transformers reads), with one difference: a tensor's bytes are appended to the current
shard's data file at once, and the safetensors header (which must come first, and lists every tensor) is put in
front when the shard is closed. So memory never holds a shard (2 GB by default): the full state dict, or a
checkpoint's mapped pages behind the tensors, never pile up.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any

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
    """Write tensors into `directory` as safetensors shards of at most `max_shard_size` bytes of data each.

    A tensor larger than the limit gets a shard of its own. `add` returns once the tensor's bytes are written:
    the writer keeps only names, dtypes, shapes and offsets.
    """

    def __init__(self, directory: Path, max_shard_size: str | int = "2GB") -> None:
        self.directory = Path(directory)
        self.limit = parse_size(max_shard_size)
        self._entries: dict[str, dict] = {}  # the open shard's header entries
        self._data: Any = None  # the open shard's data file
        self._offset = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self._names: set[str] = set()
        self.total_bytes = 0
        self.total_params = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append one tensor to the open shard (closing it first when the tensor would overflow it)."""
        from lowrank_compress.checkpoint import TORCH_DTYPE_NAMES

        if name in self._names:
            raise LowrankError(f"internal: tensor {name} written twice")
        if tensor.dtype not in TORCH_DTYPE_NAMES:
            raise LowrankError(
                f"internal: tensor {name} has dtype {tensor.dtype}, which safetensors cannot store"
            )
        t = tensor.detach().to("cpu").contiguous()
        size = t.numel() * t.element_size()
        if self._entries and self._offset + size > self.limit:
            self.flush()
        if self._data is None:
            self._data = open(self._path(".data"), "wb")  # noqa: SIM115 - closed by flush
        self._data.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self._entries[name] = {
            "dtype": TORCH_DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [self._offset, self._offset + size],
        }  # fmt: skip
        self._offset += size
        self._names.add(name)
        self.total_bytes += size
        self.total_params += t.numel()

    def flush(self) -> None:
        """Close the open shard: header, then its data, into a provisionally named file."""
        if self._data is None:
            return
        self._data.close()
        header = json.dumps(
            {"__metadata__": {"format": "pt"}, **self._entries}, separators=(",", ":")
        ).encode()
        header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        data = self._path(".data")
        path = self._path(".safetensors")
        with open(path, "wb") as out, open(data, "rb") as src:
            out.write(struct.pack("<Q", len(header)))
            out.write(header)
            shutil.copyfileobj(src, out, 16 * 2**20)
        data.unlink()
        self._shards.append((path, list(self._entries)))
        self._entries, self._data, self._offset = {}, None, 0

    def _path(self, suffix: str) -> Path:
        return self.directory / f".shard-{len(self._shards):05d}{suffix}"

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
