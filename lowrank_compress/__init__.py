"""lowrank-compress: post-training low-rank compression of transformer checkpoints."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lowrank-compress")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"

from lowrank_compress import format as _format
from lowrank_compress.adapters import register_peft
from lowrank_compress.analyze import analyze
from lowrank_compress.errors import LowrankError
from lowrank_compress.evaluate import evaluate_models
from lowrank_compress.finetune import FinetuneSettings, finetune
from lowrank_compress.format import load
from lowrank_compress.modules import LowRankLinear
from lowrank_compress.pipeline import factorize_model
from lowrank_compress.recipe import FactorizeSettings, build_settings
from lowrank_compress.sweep import sweep

# `import lowrank_compress` is all a user needs before `AutoModelForCausalLM.from_pretrained(OUT)`, or before
# `PeftModel.from_pretrained` on a factorized model.
_format.register()
register_peft()

__all__ = [
    "FactorizeSettings",
    "FinetuneSettings",
    "LowRankLinear",
    "LowrankError",
    "__version__",
    "analyze",
    "build_settings",
    "evaluate_models",
    "factorize_model",
    "finetune",
    "load",
    "sweep",
]
