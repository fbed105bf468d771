"""Load a whole model (dense checkpoint, GGUF file, or a lowrank output) with its tokenizer, for the commands
that need the network itself: factorize (calibration), evaluate, finetune."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank_compress.calibration import quiet_transformers
from lowrank_compress.errors import CheckpointError, LowrankError


@dataclass
class ModelSource:
    """Where a model comes from: a directory and, for GGUF, the file inside it."""

    path: Path
    directory: Path
    gguf_file: str | None = None

    @property
    def is_compressed(self) -> bool:
        return (read_config(self) or {}).get("quantization_config", {}).get("quant_method") == "lowrank"


def resolve(path: str | Path) -> ModelSource:
    """Accept a model directory, a .gguf file, or a directory holding exactly one .gguf file."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    if p.is_file():
        if p.suffix == ".gguf":
            return ModelSource(p, p.parent, p.name)
        raise CheckpointError(
            f"{p}: a single weights file has no architecture to run; pass the model directory (with config.json) "
            "or a .gguf file"
        )
    if (p / "config.json").is_file():
        return ModelSource(p, p)
    ggufs = sorted(p.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSource(p, p, ggufs[0].name)
    if len(ggufs) > 1:
        raise CheckpointError(f"{p}: several .gguf files; pass the one to use")
    raise CheckpointError(
        f"{p}: no config.json or .gguf file; pass a Hugging Face model directory or a .gguf file"
    )


def read_config(source: ModelSource) -> dict[str, Any] | None:
    cfg = source.directory / "config.json"
    if source.gguf_file is not None or not cfg.is_file():
        return None
    try:
        return json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg}: not valid JSON ({e}); is the model directory complete?") from e


def require_language_model(config: Any, path: str | Path, command: str) -> None:
    """One line when `command` (which scores next-token perplexity) is given an encoder."""
    if not is_causal_lm(config):
        arch = (getattr(config, "architectures", None) or [getattr(config, "model_type", "this model")])[0]
        raise LowrankError(
            f"{path}: {arch} is not a causal language model; {command} scores next-token perplexity, which it "
            "cannot compute (factorize and analyze take encoders)"
        )


def require_finite(model: nn.Module, path: str | Path) -> None:
    """One line naming the first parameter with NaN or Inf values: every figure computed from it would be nan."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise LowrankError(f"{path}: {name} has NaN or Inf values; fix or re-create the checkpoint")


def is_causal_lm(config: Any) -> bool:
    """True when the config's architecture has a language-model head we can compute a loss with."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    archs = getattr(config, "architectures", None) or []
    if any(a in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for a in archs):
        return True
    return not archs and getattr(config, "model_type", None) in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def load_model(
    path: str | Path,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
    need_tokenizer: bool = True,
) -> tuple[nn.Module, Any, ModelSource]:
    """Load a dense or compressed model in eval mode, plus its tokenizer (None when not needed and absent)."""
    import lowrank_compress.format as fmt  # registers the lowrank quantizer

    fmt.register()
    source = resolve(path)
    kwargs: dict[str, Any] = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    if source.gguf_file is None:
        _check_weights_present(source.directory, allow_pickle)
        _check_guarded_output(source)
    try:
        with (
            _gguf_loading()
        ):  # one parse of a GGUF file for the check, the config, the weights and the tokenizer
            _require_sound_weights(source)
            return _load(source, kwargs, device, dtype, allow_pickle, need_tokenizer)
    except LowrankError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{source.path}: cannot load the model: {_first_line(e)}") from e


def _load(source: ModelSource, kwargs: dict[str, Any], device: str, dtype: torch.dtype, allow_pickle: bool,
          need_tokenizer: bool) -> tuple[nn.Module, Any, ModelSource]:  # fmt: skip
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source.directory, **kwargs)
    cls = AutoModelForCausalLM if is_causal_lm(config) else AutoModel
    with quiet_transformers():
        model = cls.from_pretrained(
            source.directory,
            dtype=dtype,
            use_safetensors=None if allow_pickle else True,
            use_kernels=False,  # see format.load: no kernels fetched from the Hub
            **kwargs,
        )
    if source.gguf_file:
        _drop_gguf_flag(model)
    model.to(device).eval()
    return model, load_tokenizer(source, required=need_tokenizer), source


def load_tokenizer(source: ModelSource, required: bool = True) -> Any:
    """The model's tokenizer (from its directory or GGUF file); None when absent and not `required`."""
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        with _gguf_loading(), quiet_transformers():
            return AutoTokenizer.from_pretrained(source.directory, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as e:
        if required:
            raise CheckpointError(f"{source.path}: no usable tokenizer ({_first_line(e)})") from e
    return None


@contextmanager
def _gguf_loading() -> Iterator[None]:
    """One parse of a GGUF file for the config, the weights and the tokenizer (`shared_gguf_readers`), and the
    loader's own tqdm bar silenced (it ignores transformers' progress-bar switch)."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    from lowrank_compress.checkpoint import shared_gguf_readers

    original_tqdm = gguf_utils.tqdm
    gguf_utils.tqdm = lambda iterable, **_kw: iterable
    try:
        with shared_gguf_readers():
            yield
    finally:
        gguf_utils.tqdm = original_tqdm


def _require_sound_weights(source: ModelSource) -> None:
    """Read every header with the checkpoint reader that analyze and factorize use (corrupt files, sizes that lie)
    and check that the weights are the config's architecture, before transformers would fill gaps at random.
    Pickled checkpoints are skipped: reading their names means unpickling them, which loading does anyway."""
    from lowrank_compress.checkpoint import Checkpoint

    path = source.directory / source.gguf_file if source.gguf_file else source.directory
    if source.gguf_file is None and not any(source.directory.glob("*.safetensors")):
        return
    with Checkpoint.open(path) as ckpt:
        ckpt.require_matches_config()


def _check_guarded_output(source: ModelSource) -> None:
    """A directory with lowrank-compress's load guard is an output: its quantization_config must be sound. Checked
    here because transformers, finding the guard but no quantization_config, would say to import this package."""
    from lowrank_compress.format import LOAD_GUARD_KEY, is_load_guard, read_quant_config

    if is_load_guard((read_config(source) or {}).get(LOAD_GUARD_KEY)):
        read_quant_config(source.directory)


def _check_weights_present(directory: Path, allow_pickle: bool) -> None:
    if any(directory.glob("*.safetensors")):
        return
    if any(directory.glob("*.bin")) or any(directory.glob("*.pt")):
        if not allow_pickle:
            raise CheckpointError(
                f"{directory}: only pickled weights (.bin/.pt); pass --allow-pickle to load them (weights_only=True)"
            )
        return
    raise CheckpointError(f"{directory}: no weights (*.safetensors) found")


def _drop_gguf_flag(model: nn.Module) -> None:
    """transformers marks GGUF-loaded models as gguf-quantized although the weights are dense float now."""
    cfg = model.config
    qc = getattr(cfg, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    if qc is not None and str(getattr(method, "value", method)) == "gguf":
        del cfg.quantization_config
        for attr in ("hf_quantizer", "quantization_method"):
            if hasattr(model, attr):
                delattr(model, attr)
        model.is_quantized = False


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
