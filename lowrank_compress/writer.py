"""Streaming sharded safetensors writer: each tensor goes to disk as it is produced; none is held in memory.

The pattern of mergekit's TensorWriter (fill a shard up to the size limit, start the next, and at `finalize` give
the shards their final `model-0000k-of-0000n.safetensors` names, or `model.safetensors` when one suffices, and
write the index that transformers reads), with one difference: a tensor's bytes are appended to the current
shard's data file at once, and the safetensors header (which must come first, and lists every tensor) is put in
front when the shard is closed. So memory never holds a shard (2 GB by default): the full state dict, or a
checkpoint's mapped pages behind the tensors, never pile up.

A writer's `state()` after some tensors lets a later process go on from there (`ShardWriter.resume`): factorize
records it after each block of pass 2, so that a stopped run resumes at the block it stopped in.
"""

from __future__ import annotations

import errno
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

    def finalize(self, into: Path | None = None, keep: bool = False) -> list[Path]:
        """Flush, move the shards to their final names (in `into`, default the writer's directory) and write the
        index when sharded; returns the files. `keep`: the shards stay where they are as well (hard-linked, or
        copied across file systems), so that a stop before `into` is complete loses none of them."""
        self.flush()
        if not self._shards:
            raise LowrankError("internal: no tensors were written")
        into = Path(into) if into is not None else self.directory
        place = _link if keep else _move
        n = len(self._shards)
        if n == 1:
            final = into / WEIGHTS_NAME
            place(self._shards[0][0], final)
            return [final]
        files, weight_map = [], {}
        for i, (path, names) in enumerate(self._shards, start=1):
            final = into / f"model-{i:05d}-of-{n:05d}.safetensors"
            place(path, final)
            files.append(final)
            weight_map.update(dict.fromkeys(names, final.name))
        index = {
            "metadata": {"total_size": self.total_bytes, "total_parameters": self.total_params},
            "weight_map": dict(sorted(weight_map.items())),
        }
        path = into / WEIGHTS_INDEX_NAME
        path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return [*files, path]

    def state(self) -> dict[str, Any]:
        """What `resume` needs to go on after the tensors added so far (JSON-able); the open shard's data is
        flushed to disk first, so the state never names bytes a killed process had not written."""
        if self._data is not None:
            self._data.flush()
            os.fsync(self._data.fileno())
        return {
            "shards": [[path.name, names] for path, names in self._shards], "entries": self._entries,
            "offset": self._offset, "total_bytes": self.total_bytes, "total_params": self.total_params,
        }  # fmt: skip

    @classmethod
    def resume(cls, directory: Path, state: dict[str, Any], max_shard_size: str | int = "2GB") -> ShardWriter:
        """A writer over `directory` that goes on from `state` (a `state()` of an earlier writer there): what that
        writer wrote after the state was taken is cut off, in the open shard's data file or in a shard it closed
        since. Raises LowrankError when a file the state names is missing or short."""
        self = cls(directory, max_shard_size)
        self._shards = [(self.directory / name, list(names)) for name, names in state["shards"]]
        for path, _ in self._shards:
            if not path.is_file():
                raise LowrankError(f"{directory}: the shard {path.name} written before the stop is missing")
        self._entries, self._offset = dict(state["entries"]), int(state["offset"])
        self.total_bytes, self.total_params = int(state["total_bytes"]), int(state["total_params"])
        self._names = {n for _, names in self._shards for n in names} | set(self._entries)
        data, closed = self._path(".data"), self._path(".safetensors")
        if self._entries and not (data.is_file() and data.stat().st_size >= self._offset):
            if not closed.is_file():
                raise LowrankError(f"{directory}: the open shard's data written before the stop is missing")
            _data_of_shard(closed, data)  # the shard was closed after the state was taken
        for stray in list(self.directory.glob(".shard-*")):  # shards begun after the state was taken
            if stray != data and stray not in {p for p, _ in self._shards}:
                stray.unlink()
        if self._entries:
            with open(data, "r+b") as f:
                f.truncate(self._offset)
            self._data = open(data, "ab")  # noqa: SIM115 - closed by flush
        else:
            data.unlink(missing_ok=True)
        return self


def _data_of_shard(shard: Path, data: Path) -> None:
    """A closed shard's data (what follows its header) back into a data file."""
    with open(shard, "rb") as src, open(data, "wb") as out:
        (header_len,) = struct.unpack("<Q", src.read(8))
        src.seek(8 + header_len)
        shutil.copyfileobj(src, out, 16 * 2**20)


def _link(src: Path, dst: Path) -> None:
    """A second name for `src`, or a copy where the file system has no hard links or `dst` is on another."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _move(src: Path, dst: Path) -> None:
    """Rename, or copy and remove where `dst` is on another file system."""
    try:
        os.replace(src, dst)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        shutil.move(str(src), str(dst))
