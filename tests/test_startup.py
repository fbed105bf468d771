"""Start-up: `import lowrank_compress` is light and still all a user needs before loading an output with plain
transformers or peft. Each check runs in a fresh interpreter, since this test process has long imported everything."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "numpy", "safetensors")


def python(code: str, *args: object, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter that imports this checkout."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def last_json(proc: subprocess.CompletedProcess[str]) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------- the package


def test_import_lowrank_compress_imports_no_heavy_dependency() -> None:
    code = (
        f"import sys, json, lowrank_compress; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    assert last_json(python(code)) == []


_NAMES = """
import json, lowrank_compress
import lowrank_compress.analyze, lowrank_compress.finetune, lowrank_compress.sweep  # modules named like functions
from lowrank_compress import *
names = {n: getattr(lowrank_compress, n) for n in lowrank_compress.__all__}
print(json.dumps({n: getattr(v, "__module__", type(v).__name__) for n, v in names.items()}))
"""


def test_every_public_name_imports_and_functions_stay_functions() -> None:
    """`lowrank_compress.analyze` is the function even after its module was imported (as with eager imports)."""
    import lowrank_compress

    modules = last_json(python(_NAMES))
    assert set(modules) == set(lowrank_compress.__all__)
    assert modules["__version__"] == "str" and modules["LowrankError"] == "lowrank_compress.errors"
    for name in ("analyze", "finetune", "sweep"):
        assert modules[name] == f"lowrank_compress.{name}"
        assert callable(getattr(lowrank_compress, name))


# A factorized output and PEFT adapters on it, loaded by a fresh process with nothing but plain transformers and peft
# after `import lowrank_compress` (first, or after transformers and peft are imported); its logits are printed.
_LOAD = """
import json, sys
if sys.argv[3] == "after":
    import peft, transformers.modeling_utils
import lowrank_compress
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
kinds = sorted({type(m).__name__ for m in model.modules()})
tuned = PeftModel.from_pretrained(model, sys.argv[2])
lora = sorted({type(m).__name__ for m in tuned.modules() if hasattr(m, "lora_A")})
with torch.no_grad():
    logits = tuned(input_ids=torch.arange(1, 17)[None]).logits
print(json.dumps({"kinds": kinds, "lora": lora, "logits": logits.flatten().tolist()}))
"""


@pytest.fixture(scope="module")
def adapters(factorized: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    """LoRA adapters with non-zero B on every factorized layer, saved in PEFT's format, and their logits."""
    import lowrank_compress
    from lowrank_compress.adapters import adapter_targets, attach

    model = lowrank_compress.load(factorized)
    tuned = attach(model, "lora", 2, 4.0, adapter_targets(model))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
        logits = tuned(input_ids=torch.arange(1, 17)[None]).logits
    out = tmp_path_factory.mktemp("adapters") / "lora"
    tuned.save_pretrained(out)
    return out, logits.flatten()


@pytest.mark.parametrize("order", ["first", "after"])
def test_a_fresh_import_loads_outputs_and_adapters_with_plain_transformers_and_peft(
    factorized: Path, adapters: tuple[Path, torch.Tensor], order: str
) -> None:
    path, expected = adapters
    doc = last_json(python(_LOAD, factorized, path, order))
    assert "LowRankLinear" in doc["kinds"] and doc["lora"] == ["LowRankLoraLinear"]
    torch.testing.assert_close(torch.tensor(doc["logits"]), expected, rtol=1e-4, atol=1e-5)
