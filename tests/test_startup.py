"""Start-up: `import lowrank_compress` is light and still all a user needs before loading an output with plain
transformers or peft. Each check runs in a fresh interpreter, since this test process has long imported everything."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.fixtures import tiny_llama

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "numpy", "safetensors")


def env() -> dict[str, str]:
    """The environment of a fresh interpreter that imports this checkout."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def python(code: str, *args: object, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True,
        text=True,
        env=env(),
        cwd=cwd,
        timeout=300,
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


@pytest.mark.parametrize(
    "first",
    [
        "lowrank_compress.peft_methods.common",  # imports peft, whose hook registers methods that import common
        pytest.param("lowrank_compress.peft_methods.bora.config", marks=pytest.mark.slow),  # as common's case
        pytest.param("lowrank_compress.adapters", marks=pytest.mark.slow),
        "peft; import lowrank_compress",
        "lowrank_compress; import peft",
    ],
)
def test_any_module_imported_first_registers_every_peft_method(first: str) -> None:
    """Whatever a user imports first, our peft methods end up registered, with no circular ImportError (importing
    peft_methods.common first used to fail: the registration peft's import hook ran imported common back while it
    was still incomplete)."""
    code = (
        f"import json; import {first}; import peft\n"
        "from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING as M\n"
        "print(json.dumps(sorted(str(k) for k in M if str(k) in ('BORA', 'LOLDU', 'SINGLORA', 'SURM'))))"
    )
    assert last_json(python(code)) == ["BORA", "LOLDU", "SINGLORA", "SURM"]


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


# --------------------------------------------------------------------------------------------------- the CLI

# Runs the console script's main() on each argument list in turn, in one fresh interpreter, and prints per list the
# exit code and which heavy modules were imported by then.
_CLI = """
import json, sys
from lowrank_compress.console import main
heavy, runs = json.loads(sys.argv[1]), []
for args in json.loads(sys.argv[2]):
    sys.argv = ["lowrank-compress", *args]
    try:
        main()
    except SystemExit as e:
        runs.append([e.code, [m for m in heavy if m in sys.modules]])
print(json.dumps(runs))
"""

COMMANDS = ["analyze", "factorize", "evaluate", "report", "sweep", "finetune"]
ANSWERS_WITHOUT_TORCH = [
    (["--help"], 0),
    (["--version"], 0),
    *[([command, "--help"], 0) for command in COMMANDS],
    (["factorize", "--bogus"], 2),
    (["factorize"], 2),  # no -o
    (["factorize", "-o", "out", "--budget", "nan"], 2),
    (["factorize", "-o", "out", "--budget", "1.5"], 1),
    (["sweep", "-o", "out", "--budgets", "0.9,2"], 1),
    (["finetune", "model", "-o", "out", "--rank", "0"], 1),
    (["factorize", "-o", "out", "--device", "meta"], 1),
    (["evaluate", "--device", "foo"], 1),
    (["nonsense"], 2),
]


def test_help_usage_errors_and_refused_settings_import_no_torch(tmp_path: Path) -> None:
    """What needs no model answers without importing torch, transformers or peft (that import took seconds)."""
    cases = [args for args, _ in ANSWERS_WITHOUT_TORCH]
    proc = python(_CLI, json.dumps(HEAVY), json.dumps(cases), cwd=tmp_path)
    runs = last_json(proc)
    assert [code for code, _ in runs] == [code for _, code in ANSWERS_WITHOUT_TORCH], proc.stderr
    assert all(imported == [] for _, imported in runs), runs
    assert "Traceback" not in proc.stderr and list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------- Ctrl-C, SIGTERM

# How the console script runs (`from lowrank_compress.console import main; sys.exit(main())`).
_SCRIPT = "import sys; from lowrank_compress.console import main; sys.argv[0] = 'lowrank-compress'; sys.exit(main())"


def _sigint_default() -> None:
    """In the child: Ctrl-C's default action, even when pytest runs as a background job (which inherits SIGINT
    ignored, and the CLI rightly keeps an ignored SIGINT ignored)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("model"))


@pytest.mark.parametrize(
    ("entry", "after", "signum"),
    [
        ("-m", "click", signal.SIGINT),  # start-up: the CLI's own imports and argument parsing are ahead
        ("script", "click", signal.SIGINT),
        ("-m", "torch.", signal.SIGINT),  # in the command, while it imports torch
        ("-m", "torch.", signal.SIGTERM),
    ],
)
def test_a_signal_during_the_imports_is_one_line_and_exit_130_or_143(
    model: Path, tmp_path: Path, entry: str, after: str, signum: int
) -> None:
    """The signal is sent once `-X importtime` reports that module imported: deterministic, and after the handlers
    are in place (they come before the CLI's imports; Python's own start-up is the only time before them)."""
    start = ["-m", "lowrank_compress.cli"] if entry == "-m" else ["-c", _SCRIPT]
    cmd = [
        sys.executable,
        "-X",
        "importtime",
        *start,
        "factorize",
        str(model),
        "-o",
        "out",
        "--method",
        "svd",
    ]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        preexec_fn=_sigint_default,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        seen = re.compile(rf"^import time:.*\| +{re.escape(after)}")
        lines = iter(proc.stderr.readline, "")
        assert any(seen.match(line) for line in lines), "the import never happened"
        proc.send_signal(signum)
        rest = proc.stderr.read()
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    said = [line for line in rest.splitlines() if not line.startswith("import time:")]
    what = "terminated (SIGTERM)" if signum == signal.SIGTERM else "interrupted"
    assert code == 128 + signum and said == [f"{what}; nothing was written"], rest[-3000:]
    assert list(tmp_path.iterdir()) == []


# A reader that turns the KeyboardInterrupt raised inside it into its own error, as safetensors' native reader does:
# the signal arrives while `get_tensor` runs, and what comes back is a TypeError (seen in CI: "could not determine the
# shape of object type 'torch.storage.UntypedStorage'").
_WRAPPING_READER = """
import os, signal, sys, time
import safetensors

_real = safetensors.safe_open


class Wrapping:
    def __init__(self, *args, **kwargs):
        self.handle = _real(*args, **kwargs)

    def get_tensor(self, name):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
        except KeyboardInterrupt:
            raise TypeError("could not determine the shape of object type 'torch.storage.UntypedStorage'") from None
        return self.handle.get_tensor(name)


safetensors.safe_open = Wrapping
from lowrank_compress.console import main

sys.argv[0] = "lowrank-compress"
sys.exit(main())
"""


def test_a_signal_that_a_library_wraps_as_its_own_error_is_still_an_interruption(
    model: Path, tmp_path: Path
) -> None:
    """Not "cannot read tensor ...; re-download or re-save it": a user who pressed Ctrl-C (or a scheduler that sent
    SIGTERM) would be told that a sound checkpoint is corrupt."""
    proc = subprocess.run(
        [sys.executable, "-c", _WRAPPING_READER, "factorize", str(model), "-o", "out", "--method", "svd"],
        cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    said = [x for x in proc.stderr.splitlines() if x.strip() and not x.startswith("warning: ")]
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert said == ["terminated (SIGTERM); nothing was written"], proc.stderr[-3000:]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", COMMANDS)
def test_help_describes_no_range_that_is_not_there(command: str) -> None:
    """Number options without bounds say nothing about a range (an unbounded click FloatRange printed "x<=None")."""
    from click.testing import CliRunner

    from lowrank_compress.cli import cli

    res = CliRunner().invoke(cli, [command, "--help"], terminal_width=200)
    assert res.exit_code == 0 and "None]" not in res.output and "x<=None" not in res.output, res.output
