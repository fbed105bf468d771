"""On-disk format of a compressed model, and loading it back through plain transformers.

An output directory is an ordinary Hugging Face model directory: safetensors shards (plus an index when sharded),
`config.json` with a `quantization_config` of quant_method "lowrank", tokenizer and generation files, and the
caller's recipe, report and model card. A factorized module `M` is stored as `M.down.weight` (r x in),
`M.up.weight` (out x r) and, when the dense layer had one, `M.bias`; every other tensor keeps its name and bytes.

Loading needs no remote code: `register()` adds a quantization config and an `HfQuantizer` to transformers'
registry (it runs when this module is imported, and `import lowrank_compress` imports it as soon as transformers'
quantizer registry is imported: see plugins.py), so `AutoModelForCausalLM.from_pretrained(OUT)` swaps the named modules for
`LowRankLinear` on the meta device before the weights are read. Before any weight is read the quantizer checks
the checkpoint headers for every factor tensor, by name and shape, so a missing or misshapen factor is an error
naming the tensor instead of transformers' silent random initialization of missing keys.

Without the package, transformers skips an unknown quant_method with a warning and would initialize the factorized
layers at random. So config.json also carries a load guard (format version 2): `transformers_weights`, the key
naming the weight file that transformers reads, set to a sentence that is not a file name. transformers validates
that key before it reads or initializes any weight and raises a ValueError quoting it, which tells the user to
install and import lowrank_compress. The quantizer lifts the guard before that check (see `_lift_load_guard`).
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from lowrank_compress.errors import CheckpointError, FormatError, LowrankError
from lowrank_compress.modules import LowRankLinear
from lowrank_compress.outdir import atomic_output_dir, check_output_dir  # noqa: F401
from lowrank_compress.writer import WEIGHTS_INDEX_NAME, ShardWriter

if TYPE_CHECKING:
    from transformers import PreTrainedModel

QUANT_METHOD = "lowrank"
# 1: factors + quantization_config. 2: config.json also carries the load guard, which a version-1 reader cannot
# lift; the version check makes such a reader say "upgrade" instead of failing on the guard.
FORMAT_VERSION = 2

# The config.json key transformers reads as the name of the weight file (`_get_resolved_checkpoint_files`), and
# our value for it: not a *.safetensors name, so transformers refuses it, quoting it, before touching any weight.
LOAD_GUARD_KEY = "transformers_weights"
_LOAD_GUARD_PREFIX = "lowrank-compress output:"
LOAD_GUARD = (
    f"{_LOAD_GUARD_PREFIX} run `pip install lowrank-compress` and `import lowrank_compress` before "
    "from_pretrained; without it the factorized layers would load as random weights"
)

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
# Tokenizer files copied verbatim from a source directory when no tokenizer object is given.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
)
_RESERVED_KEYS = ("quant_method", "version", "ranks")
# Keys that would make transformers reach for remote code; a lowrank output never carries them.
_REMOTE_CODE_KEYS = ("auto_map", "trust_remote_code", "custom_pipelines")


# --------------------------------------------------------------------------------------------------------------
# quantization_config: validation, config class, quantizer
# --------------------------------------------------------------------------------------------------------------


def _validate_quant_dict(qc: Any, where: str) -> dict[str, Any]:
    """Check a quantization_config mapping; FormatError (what, where, what to do) when it is malformed."""
    if not isinstance(qc, Mapping):
        raise FormatError(
            f"{where}: quantization_config is not a JSON object; re-run `lowrank-compress factorize`"
        )
    method = qc.get("quant_method")
    if method != QUANT_METHOD:
        raise FormatError(
            f"{where}: quantization_config.quant_method is {method!r}, not {QUANT_METHOD!r}; "
            "this is not a lowrank-compress output"
        )
    version = qc.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise FormatError(
            f"{where}: quantization_config.version is {version!r}, expected a positive integer; "
            "re-run `lowrank-compress factorize`"
        )
    if version > FORMAT_VERSION:
        raise FormatError(
            f"{where}: written in lowrank format version {version}, this lowrank-compress reads up to "
            f"{FORMAT_VERSION}; upgrade lowrank-compress"
        )
    ranks = qc.get("ranks")
    if not isinstance(ranks, Mapping):
        raise FormatError(
            f"{where}: quantization_config.ranks is missing or not an object of module name -> rank; "
            "re-run `lowrank-compress factorize`"
        )
    for name, rank in ranks.items():
        if not isinstance(name, str) or not name:
            raise FormatError(f"{where}: quantization_config.ranks has an empty or non-string module name")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise FormatError(
                f"{where}: quantization_config.ranks[{name!r}] is {rank!r}, expected a positive integer; "
                "re-run `lowrank-compress factorize`"
            )
    return dict(qc)


class LowrankConfig(QuantizationConfigMixin):
    """transformers' view of `quantization_config` for quant_method "lowrank".

    Extra keys (method, budget, ...) are kept as attributes so that `to_dict()` and hence `save_pretrained`
    write them back unchanged.
    """

    def __init__(
        self,
        ranks: Mapping[str, int] | None = None,
        version: int = FORMAT_VERSION,
        quant_method: str = QUANT_METHOD,
        **kwargs: Any,
    ) -> None:
        qc = _validate_quant_dict(
            {"quant_method": quant_method, "version": version, "ranks": dict(ranks or {}), **kwargs},
            "quantization_config",
        )
        self.quant_method = QUANT_METHOD
        self.version = qc["version"]
        self.ranks = dict(qc["ranks"])
        for key, value in kwargs.items():
            setattr(self, key, copy.deepcopy(value))

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.__dict__)


def _header_shapes(files: list[str]) -> dict[str, tuple[int, ...]] | None:
    """Tensor name -> shape from the safetensors headers (reads a few kilobytes, no tensor data).

    None when a file is not safetensors, so the caller can fall back to the check after loading.
    """
    from lowrank_compress.checkpoint import read_safetensors_header

    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        if not str(file).endswith(".safetensors"):
            return None
        try:
            infos = read_safetensors_header(Path(file))
        except (OSError, CheckpointError) as e:
            raise FormatError(
                f"{file}: unreadable safetensors header ({e}); the output is damaged, re-create it"
            ) from e
        shapes.update({name: info.shape for name, info in infos.items()})
    return shapes


def _resolve_name(model: nn.Module, name: str) -> str | None:
    """Map a module name as saved to the name in `model`, which may add or drop the base-model prefix.

    Loading a CausalLM output with `AutoModel` drops `model.`; loading a BertModel output with BertForMaskedLM
    adds `bert.`. None when the module lives in a head that this model class does not have (e.g. `lm_head`).
    """
    modules = dict(model.named_modules())
    if name in modules:
        return name
    prefix = getattr(model, "base_model_prefix", "") or ""
    if prefix:
        if name.startswith(prefix + ".") and name[len(prefix) + 1 :] in modules:
            return name[len(prefix) + 1 :]
        if f"{prefix}.{name}" in modules:
            return f"{prefix}.{name}"
        # A head of the saved class that this base class lacks (lm_head under AutoModel): its tensors are
        # unexpected keys that transformers ignores, so there is nothing to replace.
        if not hasattr(model, prefix) and not name.startswith(prefix + "."):
            return None
    raise FormatError(
        f"quantization_config.ranks names module {name!r}, which {type(model).__name__} does not have; "
        "load the output with the model class it was written from"
    )


def _dense_shape(module: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, has_bias) of a Linear, a GPT-2 Conv1D or a LowRankLinear."""
    if isinstance(module, LowRankLinear):
        return module.in_features, module.out_features, module.bias is not None
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, module.bias is not None
    if isinstance(module, Conv1D):
        nx, nf = module.weight.shape  # Conv1D stores its weight as in x out
        return int(nx), int(nf), module.bias is not None
    raise FormatError(
        f"module of type {type(module).__name__} cannot be factorized (only Linear and GPT-2 Conv1D can)"
    )


class LowrankHfQuantizer(HfQuantizer):
    """Builds the factorized skeleton before transformers reads the weights; the weights are plain floats.

    Nothing is quantized in the numeric sense, so the loaded model trains, casts (`.to(dtype)`, `.half()`),
    compiles and saves like a dense one; `dequantize()` multiplies the factors back into dense layers.
    """

    requires_calibration = False
    quantization_config: LowrankConfig

    def __init__(self, quantization_config: LowrankConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self._validated = False
        self._dense_kinds: dict[str, type[nn.Module]] = {}

    def update_attn_implementation(self, config: Any) -> Any:
        """Lift the load guard: transformers reads `config.transformers_weights` right after building the quantizer
        (`get_hf_quantizer`, then `_get_resolved_checkpoint_files`), and this is the quantizer hook that runs in
        between with the model config. It gets a copy of the user's config, so nothing outside the load changes."""
        _lift_load_guard(config)
        return super().update_attn_implementation(config)

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        if not self.pre_quantized:
            raise FormatError(
                "a LowrankConfig cannot factorize a dense model while loading; "
                "run `lowrank-compress factorize MODEL -o OUT` and load OUT"
            )

    def _process_model_before_weight_loading(self, model: PreTrainedModel, **kwargs: Any) -> PreTrainedModel:
        saved_ranks = dict(self.quantization_config.ranks)
        resolved: dict[str, int] = {}
        saved_name: dict[str, str] = {}
        for name, rank in saved_ranks.items():
            target = _resolve_name(model, name)
            if target is None:
                continue
            resolved[target] = rank
            saved_name[target] = name
        modules = dict(model.named_modules())
        self._dense_kinds = {name: type(modules[name]) for name in resolved}

        files = kwargs.get("checkpoint_files")
        shapes = _header_shapes(list(files)) if files else None
        if shapes is not None:
            for target, rank in resolved.items():
                in_f, out_f, has_bias = _dense_shape(modules[target])
                _check_factor_tensors(shapes, saved_name[target], rank, in_f, out_f, has_bias)
            self._validated = True

        replace_with_lowrank(model, resolved, device="meta")
        _shield_parents_from_dense_init(model, resolved)
        # Names as they are in this model, so that save_pretrained of the loaded model writes a coherent config.
        self.quantization_config.ranks = resolved
        return model

    def _process_model_after_weight_loading(self, model: PreTrainedModel, **kwargs: Any) -> PreTrainedModel:
        for name, module in model.named_modules():
            if not isinstance(module, LowRankLinear):
                continue
            for pname, param in module.named_parameters():
                loaded = getattr(param, "_is_hf_initialized", False) or self._validated
                if param.device.type == "meta" or not loaded:
                    raise FormatError(
                        f"tensor {name}.{pname} was not in the checkpoint; the lowrank output is incomplete, "
                        "re-create it with `lowrank-compress factorize`"
                    )
        # The weights are ordinary floats. With is_quantized set, transformers refuses .half()/.float() and
        # Trainer refuses full finetuning, and PEFT skips its input-grad hook for gradient checkpointing.
        model.is_quantized = False
        return model

    def _dequantize(self, model: PreTrainedModel, dtype: torch.dtype | None = None) -> PreTrainedModel:
        for name, module in list(model.named_modules()):
            if not isinstance(module, LowRankLinear):
                continue
            kind = self._dense_kinds.get(name, nn.Linear)
            _set_submodule(model, name, _dense_from_lowrank(module, conv1d=kind is Conv1D))
        return model

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return True

    def is_serializable(self, safe_serialization: Any = None) -> bool:
        return True


def is_load_guard(value: Any) -> bool:
    """True for a load guard written by any lowrank-compress version (they share the prefix, not the wording)."""
    return isinstance(value, str) and value.startswith(_LOAD_GUARD_PREFIX)


def _lift_load_guard(config: Any) -> None:
    """Drop our guard from a loaded config, so that transformers loads the default weight files and the loaded
    model's config (saved again, or dequantized into a dense model) does not carry it. A `transformers_weights`
    that names a real file is left alone."""
    if is_load_guard(getattr(config, LOAD_GUARD_KEY, None)):
        delattr(config, LOAD_GUARD_KEY)


def _check_factor_tensors(
    shapes: Mapping[str, tuple[int, ...]], name: str, rank: int, in_f: int, out_f: int, has_bias: bool
) -> None:
    """FormatError naming the first factor tensor that is missing or has the wrong shape."""
    expected = {f"{name}.down.weight": (rank, in_f), f"{name}.up.weight": (out_f, rank)}
    if has_bias:
        expected[f"{name}.bias"] = (out_f,)
    for key, shape in expected.items():
        if key not in shapes:
            raise FormatError(
                f"tensor {key} (rank {rank} factor of {name}) is missing from the checkpoint; the lowrank output "
                "is incomplete, re-create it with `lowrank-compress factorize`"
            )
        if tuple(shapes[key]) != shape:
            raise FormatError(
                f"tensor {key} has shape {list(shapes[key])}, expected {list(shape)} for rank {rank} of {name}; "
                "the checkpoint and its quantization_config.ranks disagree, re-create the output"
            )


def _shield_parents_from_dense_init(model: nn.Module, names: Mapping[str, int]) -> None:
    """Some `_init_weights` reach into a child's `.weight` (GPT-2: `module.c_proj.weight`), which a
    LowRankLinear lacks. A parent with no tensors of its own has nothing to initialize, so mark it done."""
    for name in names:
        parent_name = name.rpartition(".")[0]
        parent = model.get_submodule(parent_name) if parent_name else model
        if parent is model:
            continue
        own = list(parent.parameters(recurse=False)) + list(parent.buffers(recurse=False))
        if not own:
            parent._is_hf_initialized = True


def register() -> None:
    """Register quant_method "lowrank" with transformers (idempotent; re-registers after a module reload)."""
    from transformers.quantizers import auto

    for mapping, cls in (
        (auto.AUTO_QUANTIZATION_CONFIG_MAPPING, LowrankConfig),
        (auto.AUTO_QUANTIZER_MAPPING, LowrankHfQuantizer),
    ):
        if mapping.get(QUANT_METHOD) is cls:
            continue
        if QUANT_METHOD in mapping:
            mapping[QUANT_METHOD] = cls  # a stale class from before importlib.reload
        elif cls is LowrankConfig:
            auto.register_quantization_config(QUANT_METHOD)(cls)
        else:
            auto.register_quantizer(QUANT_METHOD)(cls)


# --------------------------------------------------------------------------------------------------------------
# module surgery
# --------------------------------------------------------------------------------------------------------------


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _tied_names(model: nn.Module) -> set[str]:
    """Parameter names tied together according to the config as it is now (what a reload will tie)."""
    expand = getattr(model, "get_expanded_tied_weights_keys", None)
    tied = expand(all_submodels=True) if expand is not None else getattr(model, "all_tied_weights_keys", None)
    tied = tied or {}
    return set(tied.keys()) | set(tied.values())


def replace_with_lowrank(
    model: nn.Module, ranks: Mapping[str, int], device: torch.device | str | None = "meta"
) -> None:
    """Swap each named nn.Linear / Conv1D for an empty LowRankLinear of that rank (bias presence and dtype kept).

    `device=None` puts each new module where the replaced weight was. A module that already is a LowRankLinear of
    that rank is left alone. Tied weights (a tied lm_head) cannot be factorized: FormatError.
    """
    modules = dict(model.named_modules())
    tied = _tied_names(model)
    for name, rank in ranks.items():
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise FormatError(f"rank for {name} is {rank!r}; ranks must be positive integers")
        module = modules.get(name)
        if module is None or not name:
            raise FormatError(f"no module named {name!r} in {type(model).__name__}; check the module names")
        if isinstance(module, LowRankLinear):
            if module.rank != rank:
                raise FormatError(f"{name} is already factorized with rank {module.rank}, not {rank}")
            continue
        in_f, out_f, has_bias = _dense_shape(module)
        if f"{name}.weight" in tied:
            raise FormatError(_tied_message(name))
        weight = module.weight
        new = LowRankLinear(
            in_f,
            out_f,
            rank,
            bias=has_bias,
            device=weight.device if device is None else device,
            dtype=weight.dtype,
        )
        _set_submodule(model, name, new)


def _tied_message(name: str) -> str:
    return (
        f"{name}.weight is tied to another weight (tied embeddings); keep {name} dense, or set "
        "config.tie_word_embeddings = False to factorize it on its own"
    )


def _dense_from_lowrank(module: LowRankLinear, conv1d: bool = False) -> nn.Module:
    """The dense layer equal to `module` (a Conv1D when the original was one, so checkpoints stay compatible)."""
    with torch.no_grad():
        w = (module.up.weight.double() @ module.down.weight.double()).to(module.up.weight.dtype)
        if conv1d:
            dense: nn.Module = Conv1D(module.out_features, module.in_features).to(w)
            dense.weight.copy_(w.T)
            if module.bias is None:
                dense.bias = None
        else:
            dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None).to(w)
            dense.weight.copy_(w)
        if module.bias is not None:
            dense.bias.copy_(module.bias)
    return dense


# --------------------------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------------------------


def _factor_names(model: nn.Module) -> dict[str, int]:
    return {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


def _check_extra_name(name: str) -> None:
    reserved = {CONFIG_NAME, WEIGHTS_INDEX_NAME, GENERATION_CONFIG_NAME}
    if (
        not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or name in reserved
        or (name.startswith("model") and name.endswith(".safetensors"))
    ):
        raise ValueError(f"extra file name {name!r} is not a plain file name or clashes with the model files")


def _state_dict_to_write(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The tensors transformers' save_pretrained would write: tied copies dropped, runtime renames reverted."""
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    full = dict(model.state_dict())
    state_dict = remove_tied_weights_from_state_dict(dict(full), model)
    # A tensor shared with another that the config no longer ties (tie_word_embeddings set False without a
    # copy) would be missing on reload: write it on its own.
    tied_now = _tied_names(model)
    for key in full.keys() - state_dict.keys():
        if key not in tied_now:
            state_dict[key] = full[key].clone()
    state_dict = revert_weight_conversion(model, state_dict)
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for key, tensor in state_dict.items():
        if tensor.device.type == "meta":
            raise FormatError(f"tensor {key} is on the meta device (not loaded); cannot write it")
        t = tensor.detach().to("cpu").contiguous()
        ident = (t.untyped_storage().data_ptr(), t.storage_offset())
        # safetensors refuses aliases; an alias that is not a declared tie gets its own copy
        if ident in seen:
            t = t.clone()
        seen.add((t.untyped_storage().data_ptr(), t.storage_offset()))
        out[key] = t
    return out


def _clean_config_dict(config_dict: dict[str, Any]) -> dict[str, Any]:
    for key in _REMOTE_CODE_KEYS:
        config_dict.pop(key, None)
    return config_dict


def save_compressed(
    model: PreTrainedModel,
    out_dir: Path,
    *,
    ranks: Mapping[str, int],
    quant_info: Mapping[str, Any],
    tokenizer: Any = None,
    extra_files: Mapping[str, str | bytes] | None = None,
    max_shard_size: str | int = "2GB",
    source_dir: Path | None = None,
) -> list[Path]:
    """Write `model` (with its LowRankLinear modules) into `out_dir` in the lowrank format; returns files written.

    `out_dir` must exist (use `atomic_output_dir` for the temporary-directory-and-rename). `ranks` must name exactly
    the LowRankLinear modules of `model`. `quant_info` (method, budget, ...) is merged into quantization_config.
    Tokenizer files come from `tokenizer.save_pretrained`, else are copied from `source_dir`; generation_config is
    copied from `source_dir` when it has one, else written from the model.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise LowrankError(
            f"{out_dir}: output directory does not exist; create it (or use atomic_output_dir)"
        )
    if model.is_remote_code():
        raise FormatError(
            f"{type(model).__name__} is custom (remote) code; the lowrank format never uses trust_remote_code, "
            "so only architectures built into transformers can be written"
        )
    ranks = dict(ranks)
    _check_ranks_match(model, ranks)
    qc = quantization_config(ranks, quant_info)

    # --- weights
    state_dict = _state_dict_to_write(model)
    modules = dict(model.named_modules())
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    for name, rank in ranks.items():
        in_f, out_f, has_bias = _dense_shape(modules[name])
        _check_factor_tensors(shapes, name, rank, in_f, out_f, has_bias)

    for stale in list(out_dir.glob("model*.safetensors")) + [out_dir / WEIGHTS_INDEX_NAME]:
        if stale.is_file():
            stale.unlink()
    writer = ShardWriter(out_dir, max_shard_size)
    for name, tensor in state_dict.items():
        writer.add(name, tensor)
    written = writer.finalize()

    written += write_model_files(
        out_dir, model, qc, dtype=model.dtype, tokenizer=tokenizer, source_dir=source_dir
    )

    # the caller's recipe.yaml, report.json, README.md
    written += _write_extra_files(out_dir, extra_files or {})
    return sorted(set(written))


def _check_ranks_match(model: PreTrainedModel, ranks: dict[str, int]) -> None:
    """`ranks` must name exactly the model's LowRankLinear modules, none of them tied (a reload would tie, and so
    refuse, such a layer)."""
    actual = _factor_names(model)
    if actual != ranks:
        missing = sorted(set(ranks) - set(actual))
        extra = sorted(set(actual) - set(ranks))
        wrong = sorted(n for n in set(ranks) & set(actual) if ranks[n] != actual[n])
        raise FormatError(
            "ranks do not match the model's LowRankLinear modules "
            f"(named but not factorized: {missing[:3]}, factorized but not named: {extra[:3]}, "
            f"rank differs: {wrong[:3]}); pass the ranks the model was factorized with"
        )
    tied = _tied_names(model)
    for name in ranks:
        if f"{name}.weight" in tied:
            raise FormatError(_tied_message(name))


def _write_extra_files(out_dir: Path, files: Mapping[str, str | bytes]) -> list[Path]:
    """Files the caller adds beside the model, by plain name (text as UTF-8)."""
    written = []
    for name, content in files.items():
        _check_extra_name(name)
        path = out_dir / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        written.append(path)
    return written


def quantization_config(ranks: Mapping[str, int], quant_info: Mapping[str, Any]) -> dict[str, Any]:
    """The validated `quantization_config` of an output: quant_method, version, ranks, then the caller's keys."""
    clash = [k for k in quant_info if k in _RESERVED_KEYS]
    if clash:
        raise ValueError(f"quant_info may not set {clash}: the format writes them itself")
    qc = _validate_quant_dict(
        {"quant_method": QUANT_METHOD, "version": FORMAT_VERSION, "ranks": dict(ranks), **dict(quant_info)},
        "quantization_config",
    )
    try:
        json.dumps(qc)
    except TypeError as e:
        raise ValueError(f"quant_info is not JSON-serializable: {e}") from e
    return qc


def write_model_files(
    out_dir: Path,
    model: PreTrainedModel,
    quantization_config: Mapping[str, Any],
    *,
    dtype: torch.dtype,
    tokenizer: Any = None,
    source_dir: Path | None = None,
) -> list[Path]:
    """config.json (the model's config with `quantization_config` and the load guard, no GGUF flag, no remote-code
    keys), the generation config and the tokenizer files of an output; `model` may be a skeleton on the meta
    device."""
    written: list[Path] = []
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]
    config.dtype = str(dtype).removeprefix("torch.")
    config_dict = _clean_config_dict(config.to_diff_dict())
    config_dict["quantization_config"] = dict(quantization_config)
    # replaces any weight-file name of the source too: an output's weights always have the default names
    config_dict[LOAD_GUARD_KEY] = LOAD_GUARD
    path = out_dir / CONFIG_NAME
    path.write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    written.append(path)

    src_gen = Path(source_dir) / GENERATION_CONFIG_NAME if source_dir is not None else None
    if src_gen is not None and src_gen.is_file():
        shutil.copyfile(src_gen, out_dir / GENERATION_CONFIG_NAME)
        written.append(out_dir / GENERATION_CONFIG_NAME)
    elif model.can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)
        written.append(out_dir / GENERATION_CONFIG_NAME)
    if tokenizer is not None:
        for f in tokenizer.save_pretrained(str(out_dir)):
            p = Path(f)
            if p.is_file() and p not in written:
                written.append(p)
    elif source_dir is not None:
        for name in TOKENIZER_FILES:
            src = Path(source_dir) / name
            if src.is_file():
                shutil.copyfile(src, out_dir / name)
                written.append(out_dir / name)
    return written


# --------------------------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------------------------


def read_quant_config(path: str | Path) -> dict[str, Any]:
    """The validated quantization_config of an output directory (or of its config.json)."""
    p = Path(path)
    cfg_path = p / CONFIG_NAME if p.is_dir() else p
    if not cfg_path.is_file():
        raise FormatError(
            f"{cfg_path}: no config.json; pass a directory written by `lowrank-compress factorize`"
        )
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{cfg_path}: not readable JSON ({e}); the output is damaged, re-create it") from e
    if not isinstance(config, dict) or "quantization_config" not in config:
        raise FormatError(_no_quant_config_message(cfg_path, config))
    return _validate_quant_dict(config["quantization_config"], str(cfg_path))


def _no_quant_config_message(cfg_path: Path, config: Any) -> str:
    """A config.json with our load guard but no quantization_config is an output whose config was edited or
    replaced: say that, rather than "not an output", so the user restores it instead of loading it elsewhere."""
    if isinstance(config, dict) and is_load_guard(config.get(LOAD_GUARD_KEY)):
        return (
            f"{cfg_path}: has lowrank-compress's load guard but no quantization_config, so the factorized layers "
            "cannot be rebuilt; restore the output's original config.json or re-create the output"
        )
    return f"{cfg_path}: no quantization_config; this is not a lowrank-compress output"


def _is_causal_lm(architecture: str) -> bool:
    """*ForCausalLM, or a causal-LM class with an older name (GPT2LMHeadModel)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return architecture.endswith("ForCausalLM") or architecture in set(
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
    )


def load(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    model_class: Any = None,
) -> PreTrainedModel:
    """Load a compressed output: plain `from_pretrained` after `register()`, with the Auto class picked from
    config.architectures (a causal LM gets AutoModelForCausalLM, anything else AutoModel) unless `model_class`
    is given. `dtype=None` keeps the dtype the output was written in."""
    from transformers import AutoModel, AutoModelForCausalLM

    from lowrank_compress.checkpoint import Checkpoint

    register()
    p = Path(path)
    read_quant_config(p)
    with Checkpoint.open(
        p
    ) as ckpt:  # the reader every command uses: headers, and weights that match the config
        ckpt.require_matches_config()
    if model_class is None:
        arch = json.loads((p / CONFIG_NAME).read_text(encoding="utf-8")).get("architectures") or []
        model_class = AutoModelForCausalLM if any(_is_causal_lm(str(a)) for a in arch) else AutoModel
    # transformers kernelizes a model by default when `kernels` is installed: trained or run on a GPU, it would
    # fetch and run kernel code from the Hub (and fail offline); the tool runs the model's own torch code
    kwargs: dict[str, Any] = {"dtype": dtype if dtype is not None else "auto", "use_kernels": False}
    if torch.device(device).type != "cpu":
        kwargs["device_map"] = {"": torch.device(device)}
    return model_class.from_pretrained(str(p), **kwargs)


# Importing this module registers: it is what the import hook in plugins.py calls, and when this module is the one
# importing transformers' registry (the hook then finds it half-initialized and leaves the call to this line).
register()
