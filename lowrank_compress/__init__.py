"""lowrank-compress: post-training low-rank compression of transformer checkpoints.

`import lowrank_compress` is all a user needs before `AutoModelForCausalLM.from_pretrained(OUT)`, or before
`PeftModel.from_pretrained` on a factorized model. It is also cheap: the public names are imported on first use
(PEP 562), and the transformers quantizer and the peft plugin are registered when transformers' quantizer registry
and peft's LoRA are imported (plugins.py), so that `lowrank-compress --help` answers without importing torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from lowrank_compress import plugins as _plugins

if TYPE_CHECKING:  # what the lazy names are, for type checkers and editors
    from lowrank_compress.analyze import analyze
    from lowrank_compress.errors import LowrankError
    from lowrank_compress.evaluate import evaluate_models
    from lowrank_compress.finetune import finetune
    from lowrank_compress.format import load
    from lowrank_compress.modules import LowRankLinear
    from lowrank_compress.pipeline import factorize_model
    from lowrank_compress.recipe import FactorizeSettings, FinetuneSettings, build_settings
    from lowrank_compress.sweep import sweep

    __version__: str

# public name -> the module that defines it
_LAZY = {
    "FactorizeSettings": "lowrank_compress.recipe",
    "FinetuneSettings": "lowrank_compress.recipe",
    "LowRankLinear": "lowrank_compress.modules",
    "LowrankError": "lowrank_compress.errors",
    "analyze": "lowrank_compress.analyze",
    "build_settings": "lowrank_compress.recipe",
    "evaluate_models": "lowrank_compress.evaluate",
    "factorize_model": "lowrank_compress.pipeline",
    "finetune": "lowrank_compress.finetune",
    "load": "lowrank_compress.format",
    "sweep": "lowrank_compress.sweep",
}

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


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lowrank-compress")
    except PackageNotFoundError:  # running from a source tree that was not installed
        return "0+unknown"


def __getattr__(name: str) -> Any:
    """Import a public name on first use and keep it (PEP 562)."""
    if name == "__version__":
        value: Any = _version()
    elif name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """`lowrank_compress.analyze`, `.finetune` and `.sweep` are functions named like their modules. Importing such
    a module sets the package attribute to the module; this keeps the function there, as the eager imports did."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}" and name in _LAZY:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
_plugins.install()
