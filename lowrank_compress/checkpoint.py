"""Lazy checkpoint reader: a model directory, sharded or single safetensors, GGUF, or (opt-in) pickled PyTorch files.

Every command stands on this module. It lists tensors from file headers without loading them, reads one tensor at a
time as float32 on the CPU, and decides which tensors are the weights of `nn.Linear` layers (the compression
targets) by building the architecture on the meta device from the config, so no guesswork is needed when a config
is available. Problems with the input become one-line `CheckpointError`s before any heavy work starts.

Formats:

- safetensors: the JSON header is parsed and checked here (sizes, offsets, dtypes) before `safe_open` is trusted
  with the file, so a truncated or lying file gives a clear message instead of a crash or garbage.
- GGUF: read with `gguf.GGUFReader` (memory-mapped) and dequantized tensor by tensor with `gguf.quants.dequantize`.
  Config and GGUF -> Hugging Face names come from transformers' own GGUF loader (`load_gguf_checkpoint`,
  `get_gguf_hf_weights_map`), and each tensor goes through the same per-architecture tensor processor transformers
  uses, so `read()` returns Hugging Face layout: for Llama the q/k row permutation llama.cpp applies is undone (the
  spectrum would not change either way, but factors written back must match the HF layout), for GPT-2 the weights are
  transposed back to Conv1D layout.
- pickle (`.bin`, `.pt`, `.pth`): only with `allow_pickle=True`, through `torch.load(weights_only=True, mmap=True)`.

Targets: with a config, the model class (from `config.architectures`, else AutoModel; the candidate that holds every
stored tensor wins) is built on the meta device; the weights of its `nn.Linear` and GPT-2 `Conv1D` modules are
targets, matched to stored tensors with or without the base-model prefix ("model.", "transformer.", "bert.").
Embeddings, norms and heads tied to the embeddings (as transformers would tie them on load) are reported as
`Skipped` with a reason. Without a config (a bare file), 2-D `*.weight` tensors that are not embeddings or norms by
name are targets, all taken as (out x in), and a head stored identical to an embedding counts as tied.
"""

from __future__ import annotations

import abc
import contextlib
import difflib
import fnmatch
import json
import math
import re
import weakref
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lowrank_compress.errors import CheckpointError, LowrankError

__all__ = ["Checkpoint", "LinearTarget", "Skipped", "TensorInfo", "match_pattern"]

SAFETENSORS_SUFFIXES = (".safetensors",)
GGUF_SUFFIXES = (".gguf",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
SUPPORTED = ".safetensors, .gguf, or (with --allow-pickle) .bin/.pt/.pth, or a model directory"

# Bytes per element of every safetensors dtype this reader accepts.
SAFETENSORS_DTYPE_SIZES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit

TORCH_DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
_DTYPE_OF_NAME = {name: dtype for dtype, name in TORCH_DTYPE_NAMES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as stored, known from the header alone."""

    name: str  # tensor name in HF convention (GGUF names already mapped)
    shape: tuple[int, ...]
    dtype: str  # e.g. "F32", "BF16", "Q4_1"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class LinearTarget:
    """A Linear (or GPT-2 Conv1D) layer whose weight can be factorized.

    `module` is in the checkpoint's naming: the weight tensor's name without ".weight". It equals the model's
    module name whenever the checkpoint was saved by the class in `config.architectures`.
    """

    module: str
    weight: str
    bias: str | None
    out_features: int
    in_features: int
    kind: str  # "linear" or "conv1d" (GPT-2 Conv1D, stored transposed: in x out)
    layer_type: str  # grouping key: last name component, e.g. "q_proj"
    depth: int | None  # first integer component of the module name, None if none

    @property
    def num_params(self) -> int:
        """Dense parameters of the layer (weight, plus bias when present)."""
        return self.out_features * self.in_features + (self.out_features if self.bias else 0)


@dataclass(frozen=True)
class Skipped:
    """A tensor or module that is not a compression target, and why."""

    name: str
    shape: tuple[int, ...]
    reason: str


def match_pattern(name: str, pattern: str) -> bool:
    """`re:<regex>` is searched in the name; anything else is a glob matched against the whole name."""
    if pattern.startswith("re:"):
        return _compile_regex(pattern).search(name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def _compile_regex(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern[3:])
    except re.error as e:
        raise LowrankError(
            f"invalid regular expression in pattern {pattern!r}: {e}; fix the regex after 're:' or use a glob"
        ) from None


def module_depth(module: str) -> int | None:
    """The block index of a module: its first integer name component (None outside the repeated blocks)."""
    for part in module.split("."):
        if part.isdigit():
            return int(part)
    return None


# --- name heuristics, used only when no architecture can be built ----------------------------------------------------

_EMBED_RE = re.compile(r"embed|(^|\.)(wte|wpe|shared|token_embd)(\.|$)", re.IGNORECASE)
_NORM_RE = re.compile(r"norm|(^|\.)ln(_\w+|\d*)(\.|$)", re.IGNORECASE)


def _is_embedding_name(name: str) -> bool:
    # GPT-NeoX calls its (untied) output head "embed_out": a Linear, not an embedding.
    return bool(_EMBED_RE.search(name)) and "embed_out" not in name


def _is_norm_name(name: str) -> bool:
    return bool(_NORM_RE.search(name))


# --- safetensors header validation ------------------------------------------------------------------------------------


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header against the file size; return the tensors it declares.

    Done by hand so that a truncated file or a header that lies about sizes is caught with a clear message before
    the file is memory-mapped.
    """
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(
            f"{path} is truncated ({size} bytes, too short for a safetensors header); re-download or re-save it"
        )
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > size - 8 or n > MAX_HEADER_BYTES:
            raise CheckpointError(
                f"{path} is truncated or not a safetensors file: its header claims {n} bytes but only {size - 8} "
                "follow; re-download or re-save it"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"{path} has a corrupt safetensors header ({e}); re-download or re-save it"
        ) from None
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{path} has a corrupt safetensors header (not a JSON object); re-download or re-save it"
        )

    data_len = size - 8 - n
    infos: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        info, begin, end = _check_header_entry(path, name, entry, data_len)
        infos[name] = info
        spans.append((begin, end, name))
    spans.sort()
    for (_b0, e0, n0), (b1, _e1, n1) in zip(spans, spans[1:], strict=False):
        if b1 < e0:
            raise CheckpointError(
                f"{path} has a corrupt safetensors header: tensors {n0!r} and {n1!r} overlap; re-download or re-save it"
            )
    return infos


def _check_header_entry(path: Path, name: str, entry: Any, data_len: int) -> tuple[TensorInfo, int, int]:
    bad = f"{path} has a corrupt safetensors header: tensor {name!r}"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{bad} has no dtype/shape/data_offsets entry; re-download or re-save it")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in SAFETENSORS_DTYPE_SIZES:
        raise CheckpointError(
            f"{bad} has unsupported dtype {dtype!r}; convert the checkpoint to F32, F16 or BF16"
        )
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise CheckpointError(f"{bad} has an invalid shape {shape!r}; re-download or re-save it")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise CheckpointError(f"{bad} has invalid data_offsets {offsets!r}; re-download or re-save it")
    begin, end = offsets
    expected = math.prod(shape) * SAFETENSORS_DTYPE_SIZES[dtype]
    if end - begin != expected:
        raise CheckpointError(
            f"{bad} is declared {dtype} {tuple(shape)} ({expected} bytes) but its data_offsets span {end - begin} "
            "bytes; the header lies about sizes, re-download or re-save it"
        )
    if end > data_len:
        raise CheckpointError(
            f"{path} is truncated: tensor {name!r} ends at byte {end} of the data but only {data_len} bytes follow "
            "the header; re-download or re-save it"
        )
    return TensorInfo(name, tuple(shape), dtype), begin, end


# --- backends: one per format, each lists tensors and reads one at a time --------------------------------------------


class _Backend(abc.ABC):
    infos: dict[str, TensorInfo]

    @abc.abstractmethod
    def read(self, name: str) -> torch.Tensor:
        """The tensor `name`, read from disk now."""

    def close(self) -> None:  # noqa: B027 - optional hook: most backends hold nothing to release
        """Release open files (nothing by default)."""

    def release(self) -> None:  # noqa: B027 - optional hook
        """Drop what a later read can recreate (a mapped shard's pages), keeping the backend usable."""


class _SafetensorsBackend(_Backend):
    """Tensors spread over one or more files; one `safe_open` handle is kept, for the file read last."""

    def __init__(self, files: Sequence[Path]) -> None:
        self.infos = {}
        self.file_of: dict[str, Path] = {}
        for f in files:
            for name, info in read_safetensors_header(f).items():
                if name in self.file_of:
                    raise CheckpointError(
                        f"tensor {name!r} is stored twice, in {self.file_of[name]} and {f}; "
                        "remove the stray file or pass the file to use"
                    )
                self.infos[name] = info
                self.file_of[name] = f
        self._open_path: Path | None = None
        self._handle: Any = None

    def read(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        path = self.file_of[name]
        if path != self._open_path:
            self._handle = None
            try:
                self._handle = safe_open(str(path), framework="pt", device="cpu")
            except Exception as e:
                raise CheckpointError(
                    f"cannot open {path} as safetensors ({e}); re-download or re-save it"
                ) from None
            self._open_path = path
        try:
            return self._handle.get_tensor(name)
        except Exception as e:
            raise CheckpointError(
                f"cannot read tensor {name!r} from {path} ({e}); re-download or re-save it"
            ) from None

    def close(self) -> None:
        self._handle = None
        self._open_path = None

    def release(self) -> None:
        self.close()  # reopened on the next read; the mapped pages are not counted meanwhile


class _PickleBackend(_Backend):
    """Pickled state dicts, loaded with `weights_only=True` and memory-mapped; one file's dict is kept at a time."""

    def __init__(self, files: Sequence[Path]) -> None:
        self.infos = {}
        self.file_of: dict[str, Path] = {}
        # (storage pointer, offset) pairs seen: tensors saved sharing storage (tied heads) count once
        self._shared: set[tuple[int, int]] = set()
        self.duplicate_numel = 0
        self._loaded_path: Path | None = None
        self._loaded: dict[str, torch.Tensor] = {}
        for f in files:
            state = self._load(f)
            for name, t in state.items():
                if name in self.file_of:
                    raise CheckpointError(
                        f"tensor {name!r} is stored twice, in {self.file_of[name]} and {f}; pass the file to use"
                    )
                self.infos[name] = TensorInfo(
                    name, tuple(t.shape), TORCH_DTYPE_NAMES.get(t.dtype, str(t.dtype))
                )
                self.file_of[name] = f
                key = (t.untyped_storage().data_ptr(), t.storage_offset())
                if t.numel() and key in self._shared:
                    self.duplicate_numel += t.numel()
                self._shared.add(key)
            self._loaded_path, self._loaded = f, state

    @staticmethod
    def _load(path: Path) -> dict[str, torch.Tensor]:
        import pickle

        try:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                # the legacy (non-zip) format cannot be memory-mapped
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"{path} holds objects other than tensors, which weights_only=True refuses to unpickle ({first}); "
                "convert it to safetensors in a trusted environment"
            ) from None
        except Exception as e:
            raise CheckpointError(
                f"cannot load {path} as a PyTorch checkpoint ({e}); re-download or re-save it"
            ) from None
        if isinstance(obj, dict):
            for key in ("state_dict", "model"):
                if len(obj) == 1 and isinstance(obj.get(key), dict):
                    obj = obj[key]
        if not isinstance(obj, dict):
            raise CheckpointError(
                f"{path} does not hold a state dict (found {type(obj).__name__}); save model.state_dict()"
            )
        return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}

    def read(self, name: str) -> torch.Tensor:
        path = self.file_of[name]
        if path != self._loaded_path:
            self._loaded = {}
            self._loaded = self._load(path)
            self._loaded_path = path
        return self._loaded[name].clone()

    def close(self) -> None:
        self._loaded = {}
        self._loaded_path = None


class _GGUFBackend(_Backend):
    """A memory-mapped GGUF file; tensors renamed to Hugging Face names and dequantized on read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise CheckpointError(
                f"{path} is not a GGUF file (it does not start with b'GGUF'); pass a valid .gguf file"
            )
        try:
            self.reader = gguf_reader(path)
        except Exception as e:
            raise CheckpointError(
                f"{path} is a corrupt or truncated GGUF file (the reader failed: {_short(e)}); re-download or re-convert it"
            ) from None
        size = path.stat().st_size
        for t in self.reader.tensors:
            if t.data.nbytes != t.n_bytes or t.data_offset + t.n_bytes > size:
                raise CheckpointError(
                    f"{path} is truncated: GGUF tensor {t.name!r} needs {t.n_bytes} bytes at offset {t.data_offset} "
                    f"but the file has {size}; re-download or re-convert it"
                )
        self.config: dict[str, Any] | None = None
        self.processor: Any = None
        self.hf_to_gguf: dict[str, str] = {}
        self.gguf_key_mapping: dict[str, str] = {}
        self.meta_model: torch.nn.Module | None = None
        self.architecture: str | None = None
        self._by_gguf_name = {t.name: t for t in self.reader.tensors}
        self._map_names()
        self.infos = {}
        meta_shapes = dict(self.meta_model.state_dict()) if self.meta_model is not None else {}
        for t in self.reader.tensors:
            gguf_shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists dims fastest first
            hf = self.gguf_key_mapping.get(t.name, t.name)
            shape = gguf_shape
            meta = meta_shapes.get(hf)
            if meta is not None and tuple(meta.shape) != gguf_shape:
                shape = self._processed_shape(
                    t.name, gguf_shape
                )  # e.g. GPT-2 Conv1D, stored transposed in GGUF
            if hf in self.infos:
                raise CheckpointError(
                    f"{path} maps two GGUF tensors to {hf!r}; the file is not a supported GGUF model"
                )
            self.infos[hf] = TensorInfo(hf, shape, t.tensor_type.name)
            self.hf_to_gguf[hf] = t.name

    def _map_names(self) -> None:
        """Config and the GGUF -> HF name map from transformers; tensors keep GGUF names when that fails."""
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
            load_gguf_checkpoint,
        )

        try:
            with shared_gguf_readers():  # load_gguf_checkpoint's reader is ours, parsed once already
                parsed = load_gguf_checkpoint(str(self.path), return_tensors=False)
        except Exception:  # unsupported architecture: tensors stay readable under their GGUF names
            return
        config = dict(parsed.get("config") or {})
        built = _build_meta_model(config, prefer_causal_lm=True)
        if built is None:
            self.config = config
            return
        self.meta_model, self.architecture, full_config = built
        self.config = full_config
        arch = _gguf_field(self.reader, "general.architecture") or ""
        self.processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config)
        try:
            mapping = get_gguf_hf_weights_map(_ShallowModel(self.meta_model, depth=1), self.processor)
        except Exception:
            mapping = {}
        params = set(self.meta_model.state_dict())
        if (
            "output.weight" in self._by_gguf_name
            and "output.weight" not in mapping
            and "lm_head.weight" in params
        ):
            mapping["output.weight"] = "lm_head.weight"  # GPT-2's processor renames the head itself
        self.gguf_key_mapping = {g: h for g, h in mapping.items() if g in self._by_gguf_name}

    def _process(self, gname: str, arr: np.ndarray) -> np.ndarray | torch.Tensor:
        """Apply transformers' tensor processor for this architecture (HF layout: un-permute, transpose)."""
        if self.processor is None or gname not in self.gguf_key_mapping:
            return arr
        parsed: dict[str, dict] = {"tensors": {}}
        result = self.processor.process(
            weights=arr, name=gname, tensor_key_mapping=self.gguf_key_mapping, parsed_parameters=parsed
        )
        if result.name is not None:
            return result.weights
        if len(parsed["tensors"]) == 1:  # the processor stored the tensor itself (GPT-2's output head)
            return next(iter(parsed["tensors"].values()))
        raise CheckpointError(
            f"GGUF tensor {gname!r} in {self.path} expands into several tensors; this layout is not supported"
        )

    def _processed_shape(self, gname: str, gguf_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape read() will return, found by processing a zero-stride stand-in (no memory, no dequantizing)."""
        stand_in = np.broadcast_to(np.zeros((), dtype=np.float32), gguf_shape)
        try:
            return tuple(int(d) for d in self._process(gname, stand_in).shape)
        except Exception:
            return gguf_shape

    def read(self, name: str) -> torch.Tensor:
        from gguf.quants import dequantize

        gname = self.hf_to_gguf[name]
        t = self._by_gguf_name[gname]
        try:
            arr = dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise CheckpointError(
                f"cannot dequantize GGUF tensor {gname!r} ({t.tensor_type.name}) from {self.path} ({_short(e)}); "
                "convert the file with a supported quantization type"
            ) from None
        out = self._process(gname, np.asarray(arr, dtype=np.float32))
        if isinstance(out, torch.Tensor):
            return out.float().contiguous()
        return torch.from_numpy(np.array(out, dtype=np.float32, copy=True))

    def close(self) -> None:
        self._by_gguf_name = {}
        self.reader = None  # drops the memory map


_GGUF_READERS: weakref.WeakValueDictionary[tuple[str, int, int], Any] = weakref.WeakValueDictionary()
_HELD_READERS: list[list[Any]] = []  # one list per open `shared_gguf_readers`


def gguf_reader(path: str | Path) -> Any:
    """The file's parsed `gguf.GGUFReader`, one per file while anything holds it. Parsing the metadata (tens of
    thousands of tokenizer strings) is most of the time it takes to open a GGUF file, and transformers parses it
    anew for the config, the weights and the tokenizer. Keyed by path, size and mtime: a rewritten file is parsed
    again. Imports the class itself, not `gguf.GGUFReader`, which `shared_gguf_readers` replaces."""
    from gguf.gguf_reader import GGUFReader

    resolved = Path(path).resolve()
    st = resolved.stat()
    key = (str(resolved), st.st_size, st.st_mtime_ns)
    reader = _GGUF_READERS.get(key)
    if reader is None:
        reader = GGUFReader(str(resolved))
        _GGUF_READERS[key] = reader
    if _HELD_READERS:
        _HELD_READERS[-1].append(reader)
    return reader


@contextlib.contextmanager
def shared_gguf_readers() -> Iterator[None]:
    """While inside, `gguf.GGUFReader(path)` (as transformers' GGUF loader calls it) is `gguf_reader(path)`, and
    every reader it hands out is held to the end: a file's config, weights and tokenizer share one parse."""
    import gguf

    original = gguf.GGUFReader
    gguf.GGUFReader = lambda path, mode="r": gguf_reader(path) if mode == "r" else original(path, mode)
    _HELD_READERS.append([])
    try:
        yield
    finally:
        _HELD_READERS.pop()
        gguf.GGUFReader = original


class _ShallowModel:
    """What `get_gguf_hf_weights_map` needs of a model (config, state_dict, named_children), recursing only `depth`
    levels.

    transformers recurses into every submodule, rebuilding gguf's tensor-name table each time (about 5 s for a
    30-layer model); the top level maps standard checkpoints and one level down covers models converted from their
    base class (Bloom), which is all that recursion is for.
    """

    def __init__(self, module: torch.nn.Module, depth: int) -> None:
        self.config = getattr(module, "config", None)
        self._state = module.state_dict()
        self._children = (
            [(n, _ShallowModel(c, depth - 1)) for n, c in module.named_children()] if depth > 0 else []
        )

    def state_dict(self) -> dict[str, Any]:
        return self._state

    def named_children(self) -> Iterable[tuple[str, _ShallowModel]]:
        return iter(self._children)


def _gguf_field(reader: Any, key: str) -> Any:
    from transformers.modeling_gguf_pytorch_utils import read_field

    try:
        values = read_field(reader, key)
    except Exception:
        return None
    return values[0] if values else None


def _flat(e: BaseException) -> str:
    """An exception's whole message on one line (validation errors put the detail on the second)."""
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# --- architecture on the meta device -------------------------------------------------------------------------------


def _build_meta_model(
    config: dict[str, Any], prefer_causal_lm: bool = False, tensor_names: Collection[str] | None = None
) -> tuple[torch.nn.Module, str, dict[str, Any]] | None:
    """Instantiate the architecture without memory; None when transformers cannot build it from this config.

    Candidates: the classes in `config["architectures"]` that transformers knows, then AutoModelForCausalLM (when
    `prefer_causal_lm`, as for GGUF) and AutoModel. Remote code is never run. With `tensor_names`, the first
    candidate holding every stored tensor wins, else the one holding most: a BertModel checkpoint under a
    BertForMaskedLM config keeps its pooler that way.
    """
    from accelerate import init_empty_weights
    from huggingface_hub.errors import StrictDataclassError
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from lowrank_compress.calibration import quiet_transformers

    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        return None
    try:
        with quiet_transformers():
            cfg = CONFIG_MAPPING[model_type].from_dict(dict(config))
    except (TypeError, ValueError, StrictDataclassError) as e:  # a known architecture, values it cannot take
        raise CheckpointError(f"not a valid {model_type} config ({_flat(e)}); restore it") from None
    except Exception:
        return None

    best: tuple[int, torch.nn.Module] | None = None
    tried: set[type] = set()
    failure: Exception | None = None
    for arch, cls in _model_builders(config, prefer_causal_lm):
        try:
            with init_empty_weights(include_buffers=True), quiet_transformers():
                model = cls(cfg) if arch is not None else cls.from_config(cfg)
        except Exception as e:
            failure = failure or e
            continue
        if type(model) in tried:
            continue
        tried.add(type(model))
        if tensor_names is None:
            best = (0, model)
            break
        covered = _NameMap(model).coverage(tensor_names)
        if best is None or covered > best[0]:
            best = (covered, model)
        if covered == len(tensor_names):
            break
    if best is None:
        if isinstance(failure, (TypeError, ValueError, StrictDataclassError)):  # values it cannot take
            raise CheckpointError(f"not a valid {model_type} config ({_flat(failure)}); restore it")
        return None
    model = best[1]
    full = cfg.to_dict()
    full["architectures"] = [type(model).__name__]
    return model, type(model).__name__, full


def _model_builders(config: dict[str, Any], prefer_causal_lm: bool) -> list[tuple[str | None, Any]]:
    """(architecture name, class) for the config's architectures transformers knows, then (None, Auto class)."""
    import transformers
    from transformers import AutoModel, AutoModelForCausalLM

    builders: list[tuple[str | None, Any]] = []
    for arch in config.get("architectures") or []:
        cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
        if isinstance(cls, type) and issubclass(cls, torch.nn.Module):
            builders.append((arch, cls))
    autos = [AutoModelForCausalLM, AutoModel] if prefer_causal_lm else [AutoModel]
    return builders + [(None, auto) for auto in autos]


class _NameMap:
    """Checkpoint tensor names -> the model's parameter names, with or without the base-model prefix.

    Checkpoints saved from the base model ("layers.0...") and from a model with a head ("model.layers.0...") both
    occur for the same config; transformers accepts both, so must we.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.prefix = getattr(model, "base_model_prefix", "") or ""
        self.names = set(model.state_dict())

    def to_model(self, name: str) -> str | None:
        if name in self.names:
            return name
        p = self.prefix
        if p and name.startswith(p + ".") and name[len(p) + 1 :] in self.names:
            return name[len(p) + 1 :]
        if p and f"{p}.{name}" in self.names:
            return f"{p}.{name}"
        return None

    def coverage(self, names: Iterable[str]) -> int:
        return sum(self.to_model(n) is not None for n in names)


def _tied_map(model: torch.nn.Module) -> dict[str, str]:
    """Parameter name -> name of the parameter it is tied to, as transformers would tie them on load."""
    tied = getattr(model, "all_tied_weights_keys", None)
    if isinstance(tied, dict):
        return {str(k): str(v) for k, v in tied.items()}
    getter = getattr(model, "get_expanded_tied_weights_keys", None)
    if callable(getter):
        try:
            return dict(getter())
        except Exception:
            return {}
    return {}


def _parameter_roles(model: torch.nn.Module) -> dict[str, str]:
    """Every parameter name (tied copies included) -> the role of the module holding it (`_module_role`)."""
    owner = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        role = _module_role(module)
        for pname, _ in module.named_parameters(recurse=False, remove_duplicate=False):
            owner[f"{mname}.{pname}" if mname else pname] = role
    return owner


def _module_role(module: torch.nn.Module) -> str:
    from lowrank_compress.modules import is_conv1d

    if is_conv1d(module):
        return "conv1d"
    if isinstance(module, torch.nn.Linear):
        return "linear"
    cls = type(module).__name__
    if isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag)) or cls.endswith("Embedding"):
        return "embedding"
    if "norm" in cls.lower():
        return "norm"
    return "other"


# --- the checkpoint --------------------------------------------------------------------------------------------------


class Checkpoint:
    """A checkpoint opened for lazy, tensor-by-tensor reading.

    Attributes: `path` (what the user gave), `directory` (where config and tokenizer files live), `files` (the
    weight files), `format` ("safetensors" | "gguf" | "pickle"), `config` (config.json, or the config derived from
    GGUF metadata), `tensors` (name -> TensorInfo, from headers only).
    """

    def __init__(
        self,
        path: Path,
        format: str,
        files: list[Path],
        config: dict[str, Any] | None,
        backend: _Backend,
    ) -> None:
        self.path = path
        self.format = format
        self.files = files
        self.directory = path if path.is_dir() else path.parent
        self.config = config
        self._backend = backend
        self.tensors: dict[str, TensorInfo] = dict(backend.infos)
        self._meta: tuple[torch.nn.Module, str, dict[str, Any]] | None | bool = False  # False: not built yet
        self._classified: tuple[list[LinearTarget], list[Skipped]] | None = None
        if isinstance(backend, _GGUFBackend) and backend.meta_model is not None:
            self._meta = (backend.meta_model, backend.architecture or "", backend.config or {})

    # -- opening --

    @classmethod
    def open(cls, path: str | Path, allow_pickle: bool = False) -> Checkpoint:
        """Open a model directory or weight file; every problem is a one-line CheckpointError."""
        path = Path(path).expanduser()
        if not path.exists():
            raise CheckpointError(f"no such file or directory: {path}; check the model path")
        try:
            if path.is_dir():
                return cls._open_dir(path, allow_pickle)
            return cls._open_file(path, allow_pickle)
        except OSError as e:  # permissions, I/O errors: still one line, naming the file
            where = e.filename or path
            raise CheckpointError(
                f"cannot read {where}: {e.strerror or e}; check the file and its permissions"
            ) from None

    @classmethod
    def _open_dir(cls, d: Path, allow_pickle: bool) -> Checkpoint:
        config = _read_config(d / "config.json")
        index = d / "model.safetensors.index.json"
        if index.is_file():
            return _sharded(d, index, config, "safetensors")
        if (d / "model.safetensors").is_file():
            files = [d / "model.safetensors"]
            return cls(d, "safetensors", files, config, _SafetensorsBackend(files))
        files = sorted(p for p in d.glob("*.safetensors") if p.is_file())
        if files:
            return cls(d, "safetensors", files, config, _SafetensorsBackend(files))
        ggufs = sorted(p for p in d.glob("*.gguf") if p.is_file())
        if len(ggufs) == 1:
            return cls._open_gguf(ggufs[0], d)
        if len(ggufs) > 1:
            names = ", ".join(p.name for p in ggufs)
            raise CheckpointError(
                f"{d} holds {len(ggufs)} GGUF files ({names}); pass the path of the one to use"
            )
        pickle_index = d / "pytorch_model.bin.index.json"
        if pickle_index.is_file():
            _require_pickle(pickle_index, allow_pickle)
            return _sharded(d, pickle_index, config, "pickle")
        if (d / "pytorch_model.bin").is_file():
            files = [d / "pytorch_model.bin"]
        else:
            files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES)
        if files:
            _require_pickle(files[0], allow_pickle)
            return cls(d, "pickle", files, config, _PickleBackend(files))
        raise CheckpointError(
            f"no model weights in {d} (looked for {SUPPORTED.replace(', or a model directory', '')})"
        )

    @classmethod
    def _open_file(cls, f: Path, allow_pickle: bool) -> Checkpoint:
        name = f.name.lower()
        if name.endswith(".index.json"):  # a shard index: open the directory it describes
            config = _read_config(f.parent / "config.json")
            if name.endswith(".safetensors.index.json"):
                return _sharded(f.parent, f, config, "safetensors")
            _require_pickle(f, allow_pickle)
            return _sharded(f.parent, f, config, "pickle")
        if name.endswith(SAFETENSORS_SUFFIXES):
            config = _read_config(f.parent / "config.json")
            return cls(f, "safetensors", [f], config, _SafetensorsBackend([f]))
        if name.endswith(GGUF_SUFFIXES):
            return cls._open_gguf(f, f)
        if name.endswith(PICKLE_SUFFIXES):
            _require_pickle(f, allow_pickle)
            config = _read_config(f.parent / "config.json")
            return cls(f, "pickle", [f], config, _PickleBackend([f]))
        kind = f.suffix or "(no extension)"
        raise CheckpointError(f"unsupported file type {kind} for {f}; pass {SUPPORTED}")

    @classmethod
    def _open_gguf(cls, f: Path, path: Path) -> Checkpoint:
        backend = _GGUFBackend(f)
        return cls(path, "gguf", [f], backend.config, backend)

    # -- reading --

    def read(self, name: str) -> torch.Tensor:
        """One tensor, as stored (raw layout), float32 on the CPU when it is a float tensor."""
        t = self.read_stored(name)
        if t.is_floating_point() and t.dtype != torch.float32:
            t = t.to(torch.float32)
        return t

    def read_stored(self, name: str) -> torch.Tensor:
        """One tensor in the dtype it is stored in (GGUF: dequantized to float32), for copying it unchanged."""
        if name not in self.tensors:
            close = difflib.get_close_matches(name, list(self.tensors), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "; check the tensor name"
            raise CheckpointError(f"no tensor named {name!r} in {self.path}{hint}")
        return self._backend.read(name)

    def stored_dtype(self, name: str) -> torch.dtype:
        """The floating dtype a tensor is stored in; float32 for GGUF's quantized types (read dequantizes)."""
        dtype = _DTYPE_OF_NAME.get(self.tensors[name].dtype, torch.float32)
        return dtype if dtype.is_floating_point else torch.float32

    def read_weight(self, target: LinearTarget) -> torch.Tensor:
        """The weight of a target as (out x in) float32; GPT-2 Conv1D weights (in x out) are transposed."""
        w = self.read(target.weight)
        if target.kind == "conv1d":
            w = w.t().contiguous()
        if tuple(w.shape) != (target.out_features, target.in_features):
            raise CheckpointError(
                f"tensor {target.weight!r} has shape {tuple(w.shape)} but {target.module} expects "
                f"({target.out_features}, {target.in_features}); the checkpoint does not match its config"
            )
        return w

    @property
    def num_params(self) -> int:
        """Elements in all stored tensors (a tied head stored once counts once)."""
        total = sum(info.numel for info in self.tensors.values())
        return total - getattr(self._backend, "duplicate_numel", 0)

    # -- targets --

    def meta_model(self) -> torch.nn.Module | None:
        """The architecture on the meta device (built once from the config), or None without a usable config."""
        if self._meta is False:
            try:
                self._meta = (
                    _build_meta_model(self.config, tensor_names=list(self.tensors)) if self.config else None
                )
            except CheckpointError as e:
                raise CheckpointError(f"{self.directory / 'config.json'}: {e}") from None
        return self._meta[0] if self._meta else None

    @property
    def architecture(self) -> str | None:
        """The transformers class used to classify tensors, or None when name heuristics are used."""
        self.meta_model()
        return self._meta[1] if self._meta else None

    def linear_targets(
        self, target: Sequence[str] | None = None, ignore: Sequence[str] | None = None
    ) -> tuple[list[LinearTarget], list[Skipped]]:
        """Linear weights to compress, and every other stored tensor (or tied module) with the reason it is not.

        `target` patterns restrict targets to matching modules; `ignore` patterns skip modules ("ignored by pattern").
        Patterns are globs on the full module name or `re:<regex>` searched in it.
        """
        target = list(target or [])
        ignore = list(ignore or [])
        for p in (*target, *ignore):
            if p.startswith("re:"):
                _compile_regex(p)
        if self._classified is None:
            model = self.meta_model()
            self._classified = (
                self._classify_with_model(model) if model is not None else self._classify_by_name()
            )
        candidates, skipped = self._classified[0], list(self._classified[1])
        targets: list[LinearTarget] = []
        for t in candidates:
            shape = (t.out_features, t.in_features)
            if any(match_pattern(t.module, p) for p in ignore):
                skipped.append(Skipped(t.module, shape, "ignored by pattern"))
            elif target and not any(match_pattern(t.module, p) for p in target):
                skipped.append(Skipped(t.module, shape, "not matched by target patterns"))
            else:
                targets.append(t)
        return targets, skipped

    def _classify_with_model(self, model: torch.nn.Module) -> tuple[list[LinearTarget], list[Skipped]]:
        to_model = _NameMap(model).to_model
        tied = _tied_map(model)
        ckpt_of: dict[str, str] = {}
        for name in self.tensors:
            m = to_model(name)
            if m is not None and m not in ckpt_of:
                ckpt_of[m] = name
        owner = _parameter_roles(model)

        def tied_reason(param: str) -> str:
            source = tied[param]
            return "tied to embeddings" if owner.get(source) == "embedding" else f"tied to {source}"

        candidates: list[LinearTarget] = []
        skipped: list[Skipped] = []
        claimed: set[str] = set()
        for mname, module in model.named_modules():
            role = _module_role(module)
            if role not in ("linear", "conv1d"):
                continue
            w_model = f"{mname}.weight"
            w_name = ckpt_of.get(w_model)
            b_name = ckpt_of.get(f"{mname}.bias") if getattr(module, "bias", None) is not None else None
            claimed.update(n for n in (w_name, b_name) if n)
            if w_model in tied:
                shape = self.tensors[w_name].shape if w_name else tuple(module.weight.shape)
                skipped.append(Skipped(w_name or mname, shape, tied_reason(w_model)))
            elif w_name is None:
                skipped.append(Skipped(mname, tuple(module.weight.shape), "missing from checkpoint"))
            elif len(self.tensors[w_name].shape) != 2:
                skipped.append(Skipped(w_name, self.tensors[w_name].shape, "not a Linear weight"))
            else:
                candidates.append(self._linear_target(w_name, b_name, role))
        for name, info in self.tensors.items():
            if name in claimed:
                continue
            m = to_model(name)
            if m is None:
                reason = "not in the model architecture"
            elif m in tied:
                reason = tied_reason(m)
            elif owner.get(m) == "embedding" or (owner.get(m) is None and _is_embedding_name(m)):
                reason = "embedding"
            else:
                reason = "norm" if owner.get(m) == "norm" else "not a Linear weight"
            skipped.append(Skipped(name, info.shape, reason))
        return candidates, skipped

    def _linear_target(self, w_name: str, b_name: str | None, role: str) -> LinearTarget:
        """A Linear (or GPT-2 Conv1D, whose weight is stored in x out) weight as a factorization target."""
        shape = self.tensors[w_name].shape
        out_f, in_f = (shape[1], shape[0]) if role == "conv1d" else shape
        module_name = w_name[: -len(".weight")] if w_name.endswith(".weight") else w_name
        return LinearTarget(
            module=module_name, weight=w_name, bias=b_name, out_features=out_f, in_features=in_f, kind=role,
            layer_type=module_name.rsplit(".", 1)[-1], depth=module_depth(module_name),
        )  # fmt: skip

    def _classify_by_name(self) -> tuple[list[LinearTarget], list[Skipped]]:
        """Without an architecture: 2-D `*.weight` tensors that are neither embeddings nor norms by name."""
        embeddings = {n: i for n, i in self.tensors.items() if len(i.shape) == 2 and _is_embedding_name(n)}
        candidates: list[LinearTarget] = []
        skipped: list[Skipped] = []
        claimed: set[str] = set()
        for name, info in self.tensors.items():
            if (
                not (name.endswith(".weight") and len(info.shape) == 2)
                or name in embeddings
                or _is_norm_name(name)
            ):
                continue
            tied_to = self._identical_to(name, info, embeddings.values())
            if tied_to is not None:
                skipped.append(Skipped(name, info.shape, "tied to embeddings"))
                claimed.add(name)
                continue
            module = name[: -len(".weight")]
            bias = module + ".bias" if module + ".bias" in self.tensors else None
            claimed.update(n for n in (name, bias) if n)
            candidates.append(
                LinearTarget(
                    module=module,
                    weight=name,
                    bias=bias,
                    out_features=info.shape[0],
                    in_features=info.shape[1],
                    kind="linear",
                    layer_type=module.rsplit(".", 1)[-1],
                    depth=module_depth(module),
                )
            )
        for name, info in self.tensors.items():
            if name in claimed:
                continue
            if _is_norm_name(name):
                reason = "norm"
            elif _is_embedding_name(name):
                reason = "embedding"
            else:
                reason = "not a Linear weight"
            skipped.append(Skipped(name, info.shape, reason))
        return candidates, skipped

    # -- agreement with the config --

    def require_matches_config(self) -> None:
        """CheckpointError unless the weights are those of the config's architecture: every parameter stored (or tied
        to one that is) with its shape, a factorized layer as its two factors, and no stored tensor foreign to it.
        Loaders would otherwise initialize what is missing at random, and every figure would describe noise."""
        model = self.meta_model()
        if model is None:
            return
        names, tied = _NameMap(model), _tied_map(model)
        stored = {m: n for n in self.tensors if (m := names.to_model(n)) is not None}
        claimed = set(stored.values())
        modules = dict(model.named_modules())
        for name, p in model.named_parameters(remove_duplicate=False):
            if name in tied:
                continue
            if name in stored:
                self._require_shape(stored[name], tuple(p.shape))
                continue
            module, _, leaf = name.rpartition(".")
            factors = self._factors_of(module, names.prefix) if leaf == "weight" else None
            if factors is None:
                raise self._mismatch(
                    f"{self.path}: tensor {name} of {type(model).__name__} is missing from the checkpoint; the "
                    "weights do not match config.json"
                )
            if not self.is_lowrank_output:
                raise self._mismatch(
                    f"{self.path}: {module} is stored as lowrank factors but config.json has no lowrank "
                    "quantization_config; restore the output's original config.json or re-create the output"
                )
            self._require_factor_shapes(factors, modules[module], tuple(p.shape))
            claimed.update(factors)
        ignored = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()]
        for n in self.tensors:
            if n not in claimed and not any(r.search(n) for r in ignored):
                raise self._mismatch(
                    f"{self.path}: tensor {n} is not part of {type(model).__name__} as config.json describes it; "
                    "the weights do not match config.json"
                )

    def _mismatch(self, message: str) -> LowrankError:
        """The error for weights that do not match the config: a damaged output is a FormatError."""
        from lowrank_compress.errors import FormatError

        return FormatError(message) if self.is_lowrank_output else CheckpointError(message)

    @property
    def is_lowrank_output(self) -> bool:
        """Whether config.json declares this tool's format (factorized layers stored as up / down factors)."""
        qc = (self.config or {}).get("quantization_config")
        return isinstance(qc, dict) and qc.get("quant_method") == "lowrank"

    def _factors_of(self, module: str, prefix: str) -> tuple[str, str] | None:
        """The stored (up, down) factor names of a factorized module, under any base-model prefix; FormatError when
        only one of the two is stored (a damaged output)."""
        from lowrank_compress.errors import FormatError

        for m in (module, f"{prefix}.{module}", module.removeprefix(prefix + ".")):
            up, down = f"{m}.up.weight", f"{m}.down.weight"
            if up in self.tensors and down in self.tensors:
                return up, down
            if up in self.tensors or down in self.tensors:
                missing = down if up in self.tensors else up
                raise FormatError(
                    f"{self.path}: factor tensor {missing} is missing (its pair is stored); the output is damaged, "
                    "re-create it"
                )
        return None

    def _require_factor_shapes(
        self, factors: tuple[str, str], module: torch.nn.Module, dense: tuple[int, ...]
    ) -> None:
        from lowrank_compress.modules import is_conv1d

        out_f, in_f = (dense[1], dense[0]) if is_conv1d(module) else dense
        up, down = (self.tensors[f].shape for f in factors)
        if len(up) != 2 or len(down) != 2 or up[0] != out_f or down[1] != in_f or up[1] != down[0]:
            raise self._mismatch(
                f"{self.path}: factors {factors[0]} {list(up)} and {factors[1]} {list(down)} do not make the "
                f"{out_f} x {in_f} layer config.json describes; the weights do not match config.json"
            )

    def _require_shape(self, name: str, expected: tuple[int, ...]) -> None:
        shape = tuple(self.tensors[name].shape)
        if shape != expected:
            raise self._mismatch(
                f"{self.path}: tensor {name} has shape {list(shape)} but the config expects {list(expected)}; the "
                "weights do not match config.json"
            )

    def _identical_to(self, name: str, info: TensorInfo, embeddings: Iterable[TensorInfo]) -> str | None:
        """An embedding holding exactly the same values (a tied head saved twice), if any."""
        for emb in embeddings:
            if emb.shape == info.shape and torch.equal(self.read(name), self.read(emb.name)):
                return emb.name
        return None

    # -- lifetime --

    def close(self) -> None:
        self._backend.close()

    def release(self) -> None:
        """Unmap the shard read last (the next read maps it again): its pages then stop counting as memory."""
        self._backend.release()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, format={self.format!r}, tensors={len(self.tensors)})"


def _read_config(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); fix or restore the config file") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is not a JSON object; fix or restore the config file")
    return config


def _files_from_index(index: Path) -> tuple[list[Path], dict[str, str]]:
    """The shard files an index names (checked to exist, in index order) and its weight map."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"{index} is not valid JSON ({e}); re-download or re-save the checkpoint"
        ) from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index} has no weight_map; re-download or re-save the checkpoint")
    files: list[Path] = []
    for shard in dict.fromkeys(weight_map.values()):
        if not isinstance(shard, str) or Path(shard).name != shard:
            raise CheckpointError(
                f"{index} names an invalid shard {shard!r}; re-download or re-save the checkpoint"
            )
        f = index.parent / shard
        if not f.is_file():
            raise CheckpointError(
                f"shard {shard} named in {index} is missing; download it or re-save the checkpoint"
            )
        files.append(f)
    return files, weight_map


def _check_index(
    index: Path, weight_map: dict[str, str], backend: _SafetensorsBackend | _PickleBackend
) -> None:
    """Every tensor the index names must be in the shard it names."""
    for name, shard in weight_map.items():
        found = backend.file_of.get(name)
        if found is None or found.name != shard:
            where = f"it is in {found.name}" if found is not None else "no shard has it"
            raise CheckpointError(
                f"{index} places tensor {name!r} in {shard} but {where}; re-download or re-save the checkpoint"
            )


def _sharded(path: Path, index: Path, config: dict[str, Any] | None, fmt: str) -> Checkpoint:
    files, weight_map = _files_from_index(index)
    backend: _SafetensorsBackend | _PickleBackend = (
        _SafetensorsBackend(files) if fmt == "safetensors" else _PickleBackend(files)
    )
    _check_index(index, weight_map, backend)
    return Checkpoint(path, fmt, files, config, backend)


def _require_pickle(path: Path, allow_pickle: bool) -> None:
    if not allow_pickle:
        raise CheckpointError(
            f"{path} is a pickled PyTorch checkpoint, which can run code when loaded; pass --allow-pickle to load "
            "it with weights_only=True (or convert it to safetensors)"
        )
