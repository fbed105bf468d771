"""A model that lives in its checkpoint: a skeleton on the meta device whose decoder blocks are read, run and
released one at a time, so that memory holds one block whatever the depth.

This is how llm-compressor's sequential pipeline and mergekit's streaming merges keep 70B models within one device:

- `StreamedModel` builds the architecture from the config with parameters on the meta device (buffers such as rotary
  frequencies are real: they are computed, not stored), reads the "outer" tensors (embeddings, final norm, head)
  once, and materializes block i from the checkpoint on demand (`block(i)`), releasing it afterwards.
- `capture` runs the model up to the first block and keeps, per calibration batch, the block's input hidden states
  and the other arguments the model passes every block (attention mask, rotary embeddings, ...).
- `run_block` pushes hidden states through one block; `head_loss` runs the part after the blocks (final norm, head,
  loss) on given final hidden states, by feeding them in place of the blocks' output: no per-architecture code.
- `resident` / `streaming` make the whole model callable (sampling with `generate`) either by loading every block
  (when it fits in memory) or by loading each block just before it runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowrank_compress.calibration import no_cache_kwargs
from lowrank_compress.checkpoint import Checkpoint, _NameMap, _tied_map
from lowrank_compress.errors import LowrankError

CACHE_BYTES = 2 * 2**30
"""A model whose tensors at the working dtype take less than this (and less than a quarter of the available memory)
keeps them once read; larger models are read anew each time, so that memory holds one block."""


class _Stop(Exception):
    """Raised by the catcher in front of block 0 once it has the block's inputs."""


@dataclass
class BlockInput:
    """One calibration batch as block 0 receives it: hidden states and the arguments shared by every block."""

    hidden: torch.Tensor
    args: tuple[Any, ...]  # positional arguments after the hidden states
    kwargs: dict[str, Any]


class StreamedModel:
    """A transformers model built on the meta device over a `Checkpoint`; see the module docstring."""

    def __init__(self, ckpt: Checkpoint, *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.ckpt, self.device, self.dtype = ckpt, torch.device(device), dtype
        self.model = _skeleton(ckpt)
        self.model.eval()
        names = _NameMap(self.model)
        self.ckpt_name: dict[str, str] = {}  # model parameter/buffer name -> checkpoint tensor name
        for name in ckpt.tensors:
            m = names.to_model(name)
            if m is not None:
                self.ckpt_name.setdefault(m, name)
        self._module_names = {c.rsplit(".", 1)[0]: m.rsplit(".", 1)[0] for m, c in self.ckpt_name.items()}
        self.tied = _tied_map(self.model)
        self.block_returns_tuple = False  # learnt from the first block that runs
        self.blocks_name, self.blocks = _find_blocks(self.model)
        ckpt.require_matches_config()
        self._outer_users = 0  # open `outer()` contexts
        self._outer_loaded: set[str] = set()
        self._params = {n for n, _ in self.model.named_parameters(remove_duplicate=False)}
        self._skeleton_dtype: dict[str, torch.dtype] = {}  # tensors read at a dtype not their placeholder's
        # A model far smaller than memory keeps its tensors once read (the passes read every block two or three
        # times; GGUF dequantization is slow); a large one is read anew each time, so memory stays one block.
        small = self.nbytes() < min(CACHE_BYTES, available_memory() // 4)
        self._cache: dict[str, torch.Tensor] | None = {} if small else None
        if not small:
            # memory must stay one block deep: what a block frees goes back to the system (see there)
            from lowrank_compress.memory import map_large_allocations

            map_large_allocations()

    # -- names --

    def block_of(self, model_name: str) -> int | None:
        """The index of the block holding this module or tensor (model naming), None outside the blocks."""
        prefix = self.blocks_name + "."
        if not model_name.startswith(prefix):
            return None
        head = model_name[len(prefix) :].split(".", 1)[0]
        return int(head) if head.isdigit() else None

    def to_model_name(self, ckpt_module: str) -> str | None:
        """A checkpoint module name (a weight's name without ".weight") in the model's naming."""
        return self._module_names.get(ckpt_module)

    def block_tensors(self, i: int) -> list[str]:
        """Checkpoint tensors that belong to block i."""
        return [c for m, c in self.ckpt_name.items() if self.block_of(m) == i]

    def outer_tensors(self) -> list[str]:
        """Checkpoint tensors outside the blocks (embeddings, final norm, head, ...)."""
        inside = {c for m, c in self.ckpt_name.items() if self.block_of(m) is not None}
        return [c for c in self.ckpt.tensors if c not in inside]

    # -- loading and releasing --

    def _materialize(self, params: Sequence[str], dtype: torch.dtype | None = None) -> None:
        """Read these parameters (at `dtype`, default the working dtype) onto the device. Never as inference
        tensors: a block read while the model samples (under inference mode) may be cached for the gradient pass."""
        from accelerate.utils import set_module_tensor_to_device

        dtype = dtype or self.dtype
        cache = self._cache if dtype == self.dtype else None
        with torch.inference_mode(False):
            for name in params:
                value = cache.get(name) if cache is not None else None
                if value is None:
                    value = self.ckpt.read(self.ckpt_name[name])
                    if value.is_floating_point():
                        value = value.to(dtype)
                    if cache is not None:
                        cache[name] = value
                # accelerate casts a value to the placeholder's dtype unless told one: without it a 7B model
                # read at bfloat16 to sample from became float32 again (27 GB) and ran out of memory
                explicit = None
                if dtype != self.dtype and value.is_floating_point():
                    self._skeleton_dtype.setdefault(name, _tensor(self.model, name).dtype)
                    explicit = dtype
                set_module_tensor_to_device(self.model, name, self.device, value=value, dtype=explicit)
                if name in self._params:
                    self.model.get_parameter(name).requires_grad_(False)

    @contextlib.contextmanager
    def outer(self, embeddings: bool = True, dtype: torch.dtype | None = None) -> Iterator[None]:
        """Everything outside the blocks (embeddings, final norm, head) read for the duration, tied as the config
        ties it, and released after: on a 7B model with a 49k vocabulary they take 1.6 GB at float32. Without
        `embeddings` the input embeddings stay unread (unless the head shares them): `head_loss` needs none.
        `dtype` (default the working dtype) applies to what this call reads."""
        wanted = [n for n in self._outer_params(embeddings) if n not in self._outer_loaded]
        if wanted:
            self._materialize(wanted, dtype)
            self._outer_loaded.update(wanted)
            self._materialize(
                [n for n, b in self.model.named_buffers() if b.device.type == "meta" and n in self.ckpt_name]
            )
            self.ckpt.release()  # the shard's mapped pages (the embedding table's and head's) go with it
            self._tie()
        self._outer_users += 1
        try:
            yield
        finally:
            self._outer_users -= 1
            if self._outer_users == 0:
                self._release(sorted(self._outer_loaded))
                self._outer_loaded.clear()
                self._tie()

    def _outer_params(self, embeddings: bool) -> list[str]:
        names = [n for n in self._params if self.block_of(n) is None and n not in self.tied]
        if embeddings:
            return names
        inputs = self.model.get_input_embeddings()
        skip = {
            f"{m}.{p}"
            for m, mod in self.model.named_modules()
            if mod is inputs
            for p, _ in mod.named_parameters()
        }
        return [n for n in names if n not in skip or n in self.tied.values()]

    def _tie(self) -> None:
        for target, source in self.tied.items():
            parent_name, _, leaf = target.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, leaf, self.model.get_parameter(source))

    def _release(self, names: Sequence[str]) -> None:
        """Parameters back to the meta device, and, where memory must stay one block deep (the tensors are not
        cached), the freed pages back to the system (20 ms a call: 3 s of a small model's factorize)."""
        from accelerate.utils import set_module_tensor_to_device

        from lowrank_compress.memory import return_free_memory

        for n in names:  # a placeholder read at another dtype gets its own back
            set_module_tensor_to_device(self.model, n, "meta", dtype=self._skeleton_dtype.pop(n, None))
        if self._cache is None:
            return_free_memory()

    def load_block(self, i: int, dtype: torch.dtype | None = None) -> nn.Module:
        block = self.blocks[i]
        prefix = f"{self.blocks_name}.{i}."
        self._materialize([prefix + n for n, _ in block.named_parameters()], dtype)
        self.ckpt.release()
        return block

    def release_block(self, i: int) -> None:
        prefix = f"{self.blocks_name}.{i}."
        self._release([prefix + n for n, _ in self.blocks[i].named_parameters()])

    @contextlib.contextmanager
    def block(self, i: int) -> Iterator[nn.Module]:
        """Block i with its weights read from the checkpoint; released (back on the meta device) afterwards."""
        try:
            yield self.load_block(i)
        finally:
            self.release_block(i)

    def set_block_module(self, name: str, module: nn.Module) -> None:
        """Swap a module inside the model (a factorized layer for a dense one)."""
        parent_name, _, leaf = name.rpartition(".")
        setattr(self.model.get_submodule(parent_name) if parent_name else self.model, leaf, module)

    # -- running --

    def capture(self, batches: torch.Tensor, batch_size: int) -> list[BlockInput]:
        """Block 0's inputs for each batch of `batches` (rows of token ids), computed by the outer modules only."""
        captured: list[BlockInput] = []
        first = self.blocks[0]

        def catch(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            kwargs = dict(kwargs)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            captured.append(BlockInput(hidden.detach(), tuple(args[1:]), kwargs))
            raise _Stop

        handle = first.register_forward_pre_hook(catch, with_kwargs=True)
        try:
            with torch.no_grad(), self.outer():
                for start in range(0, batches.shape[0], batch_size):
                    ids = batches[start : start + batch_size].to(self.device)
                    with contextlib.suppress(_Stop):
                        self.model(input_ids=ids, **no_cache_kwargs(self.model))
        finally:
            handle.remove()
        if len(captured) != -(-batches.shape[0] // batch_size):
            raise LowrankError(f"internal: {type(self.model).__name__} did not reach its first block")
        return captured

    def run_block(self, block: nn.Module, hidden: torch.Tensor, inp: BlockInput) -> torch.Tensor:
        out = block(hidden, *inp.args, **inp.kwargs)
        self.block_returns_tuple = isinstance(out, tuple)
        return out[0] if isinstance(out, tuple) else out

    def head_loss(self, final: torch.Tensor, ids: torch.Tensor, *, per_row: bool = False) -> torch.Tensor:
        """The language-model loss of the model whose last block output `final`: the mean over the target tokens
        (those of `ids` that are not -100, which cross_entropy ignores), per row with `per_row`. The blocks are
        bypassed: block 0 returns `final`, the others pass it through."""
        with self._bypass(final), self.outer(embeddings=False):
            # the bypassed blocks ignore the embeddings: zeros stand in for them, the table stays unread
            embeds = torch.zeros(*ids.shape, final.shape[-1], dtype=final.dtype, device=self.device)
            out = self.model(inputs_embeds=embeds, **no_cache_kwargs(self.model))
        logits = out.logits.float()
        labels = ids[:, 1:].to(logits.device)
        # rows of contiguous logits: 3-4x faster on CPU than cross_entropy over the (batch, vocab, seq) view
        vocab = logits.shape[-1]
        per_token = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, vocab), labels.reshape(-1), reduction="none"
        ).view(labels.shape)
        losses = per_token.sum(dim=1) / (labels != -100).sum(dim=1).clamp_min(1)
        return losses if per_row else losses.mean()

    @contextlib.contextmanager
    def _bypass(self, final: torch.Tensor) -> Iterator[None]:
        """Every block's computation replaced: block 0 returns `final`, the others pass their input through."""
        wrap = (lambda h: (h,)) if self.block_returns_tuple else (lambda h: h)

        def bypass(i: int) -> Any:
            def forward(hidden_states: Any = None, *args: Any, **kwargs: Any) -> Any:
                return wrap(final if i == 0 else hidden_states)

            return forward

        for i, b in enumerate(self.blocks):
            b.forward = bypass(i)  # type: ignore[method-assign]
        try:
            yield
        finally:
            for b in self.blocks:
                del b.forward  # back to the class's forward

    @contextlib.contextmanager
    def whole(self, resident: bool, dtype: torch.dtype | None = None) -> Iterator[nn.Module]:
        """The whole model, callable as usual (`generate` included): every block loaded for the duration
        (`resident`, at `dtype`: see `resident_dtype`), or each block loaded just before it runs and released right
        after."""
        handles = []
        try:
            with self.outer(dtype=dtype if resident else None):
                if resident:
                    for i in range(len(self.blocks)):
                        self.load_block(i, dtype)
                else:
                    for i, b in enumerate(self.blocks):
                        handles.append(b.register_forward_pre_hook(self._onload(i)))
                        handles.append(b.register_forward_hook(self._offload(i)))
                yield self.model
        finally:
            for h in handles:
                h.remove()
            for i in range(len(self.blocks)):
                self.release_block(i)

    def _onload(self, i: int) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            self.load_block(i)

        return hook

    def _offload(self, i: int) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self.release_block(i)

        return hook

    def nbytes(self, dtype: torch.dtype | None = None) -> int:
        """The model's parameters at `dtype` (default the working dtype)."""
        return sum(p.numel() for p in self.model.parameters()) * torch.finfo(dtype or self.dtype).bits // 8

    def resident_dtype(self, rows: int = 0, tokens: int = 0) -> torch.dtype | None:
        """The dtype at which the whole model can stay in memory while it generates `rows` x `tokens` (sampling):
        the working dtype when it fits, else the half-precision dtype the checkpoint stores (a 7B model: 27 GB at
        float32, 13.5 GB at bfloat16) when that fits, else None (stream it block by block). Fits: the weights and
        the key/value cache leave a tenth of the memory available now, and at least 1 GiB, free."""
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
        else:
            free = available_memory()
        room = free - max(free // 10, 2**30)
        stored = {self.ckpt.stored_dtype(c) for m, c in self.ckpt_name.items() if m in self._params}
        half = [d for d in (torch.bfloat16, torch.float16) if d in stored]
        for dtype in [self.dtype, *half[:1]]:
            if self.nbytes(dtype) + self.kv_cache_bytes(rows, tokens, dtype) <= room:
                return dtype
        return None

    def kv_cache_bytes(self, rows: int, tokens: int, dtype: torch.dtype) -> int:
        """The key/value cache of generating `rows` sequences of `tokens` at `dtype`: keys and values of every
        layer, num_key_value_heads x head_dim wide (the config's head_dim, else hidden / heads)."""
        config = self.model.config  # GPT-2's n_embd / n_head read as these names through its attribute map
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return rows * tokens * len(self.blocks) * 2 * kv_heads * head_dim * torch.finfo(dtype).bits // 8


def _tensor(model: nn.Module, name: str) -> torch.Tensor:
    """A parameter or buffer by its dotted name."""
    owner, _, leaf = name.rpartition(".")
    return getattr(model.get_submodule(owner) if owner else model, leaf)


def available_memory() -> int:
    """Bytes of memory available to a new allocation (Linux MemAvailable; a generous guess elsewhere)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def _skeleton(ckpt: Checkpoint) -> nn.Module:
    """The checkpoint's architecture with parameters on the meta device and real (computed) buffers."""
    import transformers
    from accelerate import init_empty_weights
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from lowrank_compress.calibration import quiet_transformers

    arch = ckpt.architecture
    if arch is None or ckpt.config is None:
        raise LowrankError(
            f"{ckpt.path}: no architecture transformers can build from its config; factorize needs a model "
            "directory with config.json (or a GGUF file of a supported architecture)"
        )
    cfg = CONFIG_MAPPING[ckpt.config["model_type"]].from_dict(dict(ckpt.config))
    cls = getattr(transformers, arch, None)
    with init_empty_weights(include_buffers=False), quiet_transformers():
        if isinstance(cls, type):
            return cls(cfg)
        return (AutoModelForCausalLM if arch.endswith("ForCausalLM") else AutoModel).from_config(cfg)


def _find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The repeated blocks: the ModuleList of same-class modules holding the most parameters."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        raise LowrankError(f"{type(model).__name__} has no repeated blocks to process one at a time")
    return best[1], best[2]


def dtype_name(dtype: torch.dtype) -> str:
    """A torch dtype as checkpoints and reports name it: "bfloat16"."""
    return str(dtype).removeprefix("torch.")
