"""Bad inputs for every command: is each one refused in one clean line, without touching the user's files?

    python benchmarks/bench_bad_inputs.py                       # every case; writes results/bad_inputs.json
    python benchmarks/bench_bad_inputs.py --list                # the case names, nothing run
    python benchmarks/bench_bad_inputs.py --dry-run             # build every case's inputs, print its command
    python benchmarks/bench_bad_inputs.py --only 'evaluate/*'   # names or globs, comma-separated
    python benchmarks/bench_bad_inputs.py --only factorize/budget-nan,finetune/data-empty --timeout 60 --keep

Issue 16, "never silently wrong". Each case runs `python -m lowrank_compress.cli ...` as a real subprocess
(this checkout's package first on PYTHONPATH, the rest of the environment inherited, LOWRANK_DEBUG removed)
in a directory of its own, holding what its setup put there: a broken copy of a tiny random Llama, a user's
folder of files, a recipe. The fixtures (the Llama, a factorize output of it at 0.6 with svd / uniform, a
BERT encoder, a sharded Llama, a GGUF file, a text file) are built once; a case that changes them is
recorded, and they are restored for the next case.

Verdicts (one per case):
- clean error: non-zero exit, and stderr is one `error: ...` line, or click's usage error (`Usage:` and `Try`
  lines, then one `Error: ...` line); `warning: ` lines aside
- unexpected error: a line with "this is a bug" (the CLI's catch-all for exceptions it did not expect)
- traceback: "Traceback" in stdout or stderr
- exit 0 on bad input: the command succeeded (unless the case says why success is the documented answer: then
  "documented")
- hang: past --timeout seconds (default 120); the process group gets SIGTERM (the tool cleans up as on
  Ctrl-C), then SIGKILL 30 s later
- other failure: a non-zero exit that is none of the above (several lines, killed by a signal, ...)
- skipped: the case could not be built here (a read-only folder when running as root)

Checks on every case, whatever its verdict:
- inputs changed: a file or folder that was there before the run (the fixtures, or what the setup placed) is
  missing or has another SHA-256 afterwards, or something new appeared among the fixtures
- partial output: after a failed run, something new in the case's directory (OUT, `.OUT.tmp-*`, a checkpoint)
- data lost: a file or folder of the user's (the paths a case protects) is missing or changed afterwards
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from _common import arg, main_or_help, save

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.fixtures, and this checkout's lowrank_compress

NAME = "model.layers.0.mlp.up_proj.weight"  # the tensor the header and tensor edits break


# --------------------------------------------------------------------------------------------------- fixtures


@dataclass(frozen=True)
class Fixtures:
    root: Path
    model: Path  # tiny random Llama with its tokenizer
    fz: Path  # factorize output of `model` (budget 0.6, svd, uniform)
    bert: Path  # tiny BertModel: an encoder
    sharded: Path  # tiny Llama in several shards with an index
    gguf: Path | None  # tiny Llama as GGUF (None without the gguf package)
    text: Path  # real English text, 12,000 characters

    def paths(self) -> dict[str, str]:
        return {k: str(getattr(self, k)) for k in ("model", "fz", "bert", "sharded", "text")}


def build_fixtures(root: Path) -> Fixtures:
    from transformers.utils import logging

    from lowrank_compress.pipeline import factorize_model
    from lowrank_compress.recipe import build_settings
    from tests.fixtures import tiny_bert, tiny_llama, training_text

    logging.disable_progress_bar()  # save_pretrained's shard bars
    root.mkdir(parents=True)
    model = tiny_llama(root)
    fz = root / "fz"
    factorize_model(model, fz, build_settings(budget=0.6, method="svd", policy="uniform"))
    text = root / "train.txt"
    text.write_text(training_text(12_000), encoding="utf-8")
    return Fixtures(root, model, fz, tiny_bert(root), tiny_llama(root, sharded=True), _gguf(root), text)


def _gguf(root: Path) -> Path | None:
    try:
        from tests.fixtures import tiny_gguf

        return tiny_gguf(root)
    except ImportError:
        return None


# --------------------------------------------------------------------------------------------------- setups

Setup = Callable[[Fixtures, Path], None]  # builds what a case needs in its directory `w`
Edit = Callable[[Path], None]  # breaks a model directory in place


class Skip(Exception):
    """The case cannot be built on this machine; the reason is recorded."""


def nothing(fx: Fixtures, w: Path) -> None:
    pass


def chain(*setups: Setup) -> Setup:
    def setup(fx: Fixtures, w: Path) -> None:
        for s in setups:
            s(fx, w)

    return setup


def broken(edit: Edit | None = None, source: str = "model", dest: str = "m") -> Setup:
    """A copy of the fixture `source` at w/dest, then `edit` applied to it."""

    def setup(fx: Fixtures, w: Path) -> None:
        src = getattr(fx, source)
        if src is None:
            raise Skip(f"no {source} fixture here")
        shutil.copytree(src.parent if src.is_file() else src, w / dest)
        if edit is not None:
            edit(w / dest)

    return setup


def user_files(rel: str) -> Setup:
    """A user's folder at w/rel: a file, and a subfolder with a file."""

    def setup(fx: Fixtures, w: Path) -> None:
        d = w / rel
        (d / "data").mkdir(parents=True, exist_ok=True)
        (d / "thesis.tex").write_text("three years of work\n")
        (d / "data" / "results.csv").write_text("a,b\n1,2\n")

    return setup


def file(rel: str, content: str | bytes) -> Setup:
    def setup(fx: Fixtures, w: Path) -> None:
        path = w / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)

    return setup


def folder(rel: str) -> Setup:
    def setup(fx: Fixtures, w: Path) -> None:
        (w / rel).mkdir(parents=True, exist_ok=True)

    return setup


def read_only(rel: str) -> Setup:
    def setup(fx: Fixtures, w: Path) -> None:
        d = w / rel
        d.mkdir(parents=True)
        d.chmod(0o555)
        if os.access(d, os.W_OK):
            raise Skip("a read-only folder is still writable here (running as root)")

    return setup


def garbage(n: int = 4096, prefix: bytes = b"") -> bytes:
    return prefix + hashlib.shake_256(b"garbage").digest(n)


# --------------------------------------------------------------------------------------------------- edits


def drop(*names: str) -> Edit:
    def edit(d: Path) -> None:
        for name in names:
            for p in d.glob(name):
                p.unlink()

    return edit


def write(name: str, content: str | bytes) -> Edit:
    def edit(d: Path) -> None:
        (d / name).write_bytes(content.encode() if isinstance(content, str) else content)

    return edit


def config(**changes: object) -> Edit:
    def edit(d: Path) -> None:
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(changes)
        (d / "config.json").write_text(json.dumps(cfg))

    return edit


def gpt2_config(d: Path) -> None:
    cfg = {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "n_embd": 64,
        "n_layer": 2,
        "n_head": 4,
        "vocab_size": 320,
        "n_positions": 256,
    }
    (d / "config.json").write_text(json.dumps(cfg))


def no_quantization_config(guard: bool) -> Edit:
    """A factorize output whose config.json lost quantization_config (and, unless `guard`, the load guard)."""

    def edit(d: Path) -> None:
        from lowrank_compress.format import LOAD_GUARD_KEY

        cfg = json.loads((d / "config.json").read_text())
        del cfg["quantization_config"]
        if not guard:
            cfg.pop(LOAD_GUARD_KEY, None)
        (d / "config.json").write_text(json.dumps(cfg))

    return edit


def raw(change: Callable[[bytes], bytes]) -> Edit:
    """model.safetensors' bytes, changed."""

    def edit(d: Path) -> None:
        f = d / "model.safetensors"
        f.write_bytes(change(f.read_bytes()))

    return edit


def header_size(blob: bytes) -> int:
    return int.from_bytes(blob[:8], "little")


def garbage_header(blob: bytes) -> bytes:
    text = b"{not json at all}"
    return len(text).to_bytes(8, "little") + text + blob[8 + header_size(blob) :]


def header(change: Callable[[dict, int], None]) -> Edit:
    """model.safetensors with its JSON header changed by `change(header, data_length)`, the data as it was."""

    def edit(d: Path) -> None:
        from tests.fixtures import read_safetensors_raw, write_safetensors_raw

        h, data = read_safetensors_raw(d / "model.safetensors")
        change(h, len(data))
        write_safetensors_raw(d / "model.safetensors", h, data)

    return edit


def past_end(h: dict, n: int) -> None:
    start, end = h[NAME]["data_offsets"]
    h[NAME]["data_offsets"] = [n, n + end - start]


def twice_the_shape(h: dict, n: int) -> None:
    h[NAME]["shape"] = [h[NAME]["shape"][0], h[NAME]["shape"][1] * 2]


def unknown_dtype(h: dict, n: int) -> None:
    h[NAME]["dtype"] = "Q4"


def overlap(h: dict, n: int) -> None:
    h[NAME]["data_offsets"] = list(h["model.layers.0.mlp.gate_proj.weight"]["data_offsets"])


def tensors(change: Callable[[dict], None]) -> Edit:
    """model.safetensors rewritten with its tensors changed."""

    def edit(d: Path) -> None:
        from safetensors.torch import load_file, save_file

        weights = load_file(str(d / "model.safetensors"))
        change(weights)
        save_file(weights, str(d / "model.safetensors"), metadata={"format": "pt"})

    return edit


def nan_weight(weights: dict) -> None:
    weights[NAME][0, 0] = float("nan")


def zero_size(weights: dict) -> None:
    import torch

    weights[NAME] = torch.empty(0, weights[NAME].shape[1])


def pickled(d: Path) -> None:
    """pytorch_model.bin (plain tensors) instead of model.safetensors."""
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(str(d / "model.safetensors")), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()


class _OpensAFile:
    """Unpickled, this object would call open(path, "w"): a PWNED file beside the model if code ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple:
        return open, (self.path, "w")


def pickled_code(d: Path) -> None:
    import torch
    from safetensors.torch import load_file

    weights: dict = load_file(str(d / "model.safetensors"))
    weights["extra"] = _OpensAFile(d.parent / "PWNED")
    torch.save(weights, d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()


def gguf_garbage(d: Path) -> None:
    for p in d.glob("*.safetensors"):
        p.unlink()
    (d / "config.json").unlink()
    (d / "model.gguf").write_bytes(garbage(4096, b"GGUF"))


def half_gguf(d: Path) -> None:
    f = d / "model.gguf"
    blob = f.read_bytes()
    f.write_bytes(blob[: len(blob) // 2])


def missing_shard(d: Path) -> None:
    index = json.loads((d / "model.safetensors.index.json").read_text())
    (d / sorted(set(index["weight_map"].values()))[1]).unlink()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
EVIL_YAML = "budget: [0.5\n  method: : :\n"


# --------------------------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """argv: the arguments after `python -m lowrank_compress.cli`, split like a shell line; {w} is the case's
    directory, {model} {fz} {bert} {sharded} {text} the fixtures. protect: the user's files and folders
    (relative to {w}) that must survive. documented: why exiting 0 is the documented answer, where it is.
    cwd: where the command runs, relative to {w}."""

    name: str
    argv: str
    setup: Setup = nothing
    protect: tuple[str, ...] = ()
    documented: str = ""
    cwd: str = "cwd"

    @property
    def command(self) -> str:
        return self.name.split("/")[0]

    def build(self, fx: Fixtures, w: Path) -> list[str]:
        return [token.format(w=w, **fx.paths()) for token in shlex.split(self.argv)]


SVD = "--method svd --policy uniform"
CAL = "--method whiten --policy uniform --self-mix 0 --samples 2 --seq-len 32"  # a calibration that is quick
EV = "--max-tokens 300 --window 64 --stride 32 --no-speed"
FT_RUN = "--steps 1 --seq-len 32 --batch-size 1 --eval-tokens 0"
LIGHT = {  # each command's quick settings, after MODEL
    "analyze": "",
    "factorize": f"-o {{w}}/out {SVD} --budget 0.6",
    "evaluate": EV,
    "finetune": f"--data {{text}} -o {{w}}/out {FT_RUN}",
    "sweep": f"-o {{w}}/out --budgets 0.6 {SVD} {EV}",
}
FZ = f"factorize {{model}} -o {{w}}/out {SVD} --budget 0.6"
FT = f"finetune {{fz}} --data {{text}} -o {{w}}/out {FT_RUN}"
SW = f"sweep {{model}} -o {{w}}/out --budgets 0.6 {SVD} {EV}"


def using(line: str, options: str) -> str:
    """`line` with `options` instead of the same options there: each option once, as a user types it."""
    given = {t for t in shlex.split(options) if t.startswith("-")}
    tokens, kept, i = shlex.split(line), [], 0
    while i < len(tokens):
        has_value = i + 1 < len(tokens) and not tokens[i + 1].startswith("-")
        if tokens[i] in given:
            i += 2 if has_value else 1
        else:
            kept.append(tokens[i])
            i += 1
    return shlex.join(kept + shlex.split(options))


# Broken checkpoints: each label is run on every command listed (MODEL = the broken copy at {w}/m).
MATRIX: list[tuple[str, Setup, str]] = [
    ("empty-dir", folder("m"), "analyze factorize evaluate finetune sweep"),
    ("no-config", broken(drop("config.json")), "analyze factorize evaluate finetune"),
    ("config-garbage", broken(write("config.json", "{ nope")), "analyze factorize evaluate finetune"),
    ("config-empty", broken(write("config.json", "")), "analyze factorize evaluate"),
    ("config-list", broken(write("config.json", "[1, 2]")), "analyze factorize"),
    ("config-wrong-types", broken(config(hidden_size="sixty-four", num_hidden_layers="two")),
     "analyze factorize evaluate"),
    ("config-gpt2-over-llama", broken(gpt2_config), "analyze factorize evaluate sweep"),
    ("config-more-layers", broken(config(num_hidden_layers=4)), "analyze factorize evaluate finetune"),
    ("config-vocab-mismatch", broken(config(vocab_size=999)), "analyze factorize evaluate"),
    ("missing-tensor", broken(tensors(lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))),
     "analyze factorize evaluate finetune sweep"),
    ("truncated-data", broken(raw(lambda b: b[:-100])), "analyze factorize evaluate finetune sweep"),
    ("truncated-header", broken(raw(lambda b: b[: 8 + header_size(b) - 3])), "analyze factorize"),
    ("empty-safetensors", broken(write("model.safetensors", b"")), "analyze factorize"),
    ("header-length-2^62", broken(raw(lambda b: (2**62).to_bytes(8, "little") + b[8:])),
     "analyze factorize evaluate"),
    ("header-garbage-json", broken(raw(garbage_header)), "analyze factorize evaluate"),
    ("offsets-past-end", broken(header(past_end)), "analyze factorize"),
    ("shape-larger-than-bytes", broken(header(twice_the_shape)), "analyze factorize evaluate"),
    ("unknown-dtype", broken(header(unknown_dtype)), "analyze factorize"),
    ("overlapping-tensors", broken(header(overlap)), "analyze factorize evaluate"),
    ("nan-weights", broken(tensors(nan_weight)), "analyze factorize evaluate finetune"),
    ("zero-size-tensor", broken(tensors(zero_size)), "analyze factorize evaluate"),
    ("gguf-garbage", broken(gguf_garbage), "analyze factorize evaluate"),
    ("gguf-truncated", broken(half_gguf, source="gguf"), "analyze factorize"),
    ("pickle-without-flag", broken(pickled), "analyze factorize evaluate finetune"),
    ("shard-missing", broken(missing_shard, source="sharded"), "analyze factorize evaluate"),
    ("shard-index-garbage", broken(write("model.safetensors.index.json", "{ nope"), source="sharded"),
     "analyze factorize"),
    ("no-tokenizer", broken(drop(*TOKENIZER_FILES)), "evaluate finetune"),
    ("tokenizer-garbage", broken(write("tokenizer.json", "{ nope")), "evaluate finetune"),
]  # fmt: skip

DOCUMENTED = {
    "analyze/nan-weights": "analyze reports layers with NaN/Inf weights (finite: false), with a warning",
    "analyze/no-config": "without config.json analyze classifies tensors by their names (checkpoint.py)",
}


def matrix_cases() -> list[Case]:
    return [
        Case(
            f"{command}/{label}",
            f"{command} {{w}}/m {LIGHT[command]}",
            setup,
            documented=DOCUMENTED.get(f"{command}/{label}", ""),
        )
        for label, setup, commands in MATRIX
        for command in commands.split()
    ]


def out_cases(command: str, head: str) -> list[Case]:
    """Where -o points, for a command whose line up to -o is `head`, with MODEL a copy at {w}/m (for finetune,
    of the factorize output)."""
    source = "fz" if command == "finetune" else "model"
    model, notes = broken(source=source), file("notes.txt", "my notes\n")
    nested = head.replace("{w}/m", "{w}/mine/m")  # MODEL inside the user's folder
    return [
        Case(f"{command}/out-is-model", f"{head} -o {{w}}/m --overwrite", model, protect=("m",)),
        Case(f"{command}/out-is-model-no-overwrite", f"{head} -o {{w}}/m", model, protect=("m",)),
        Case(
            f"{command}/out-parent-of-model",
            f"{nested} -o {{w}}/mine --overwrite",
            chain(user_files("mine"), broken(source=source, dest="mine/m")),
            protect=("mine",),
        ),
        Case(
            f"{command}/out-existing-file",
            f"{head} -o {{w}}/notes.txt",
            chain(model, notes),
            protect=("notes.txt",),
        ),
        Case(
            f"{command}/out-foreign-dir",
            f"{head} -o {{w}}/mine",
            chain(model, user_files("mine")),
            protect=("mine",),
        ),
        Case(
            f"{command}/out-foreign-dir-overwrite",
            f"{head} -o {{w}}/mine --overwrite",
            chain(model, user_files("mine")),
            protect=("mine",),
        ),
        Case(
            f"{command}/out-dot-overwrite",
            f"{head} -o . --overwrite",
            chain(model, user_files("cwd")),
            protect=("cwd",),
        ),
        Case(
            f"{command}/out-empty-string-overwrite",
            f"{head} -o '' --overwrite",
            chain(model, user_files("cwd")),
            protect=("cwd",),
        ),
        Case(
            f"{command}/out-parent-of-cwd",
            f"{head} -o .. --overwrite",
            chain(model, user_files("cwd"), folder("cwd/b")),
            protect=("cwd",),
            cwd="cwd/b",
        ),
        Case(
            f"{command}/out-parent-is-file",
            f"{head} -o {{w}}/notes.txt/out",
            chain(model, notes),
            protect=("notes.txt",),
        ),
        Case(f"{command}/out-read-only-parent", f"{head} -o {{w}}/ro/out", chain(model, read_only("ro"))),
    ]


def recipe_cases(command: str, head: str) -> list[Case]:
    recipes = {
        "garbage-yaml": EVIL_YAML,
        "duplicate-keys": "budget: 0.5\nbudget: 0.7\n",
        "unknown-key": "budgte: 0.5\n",
        "wrong-type": "samples: many\n",
        "bool-budget": "budget: true\n",
        "list": "- budget\n- 0.5\n",
        "binary": garbage(512, b"\xff\xfe"),
        "budget-2": "budget: 2\n",
        "device-meta": "device: meta\n",
    }
    cases = [
        Case(f"{command}/recipe-{k}", f"{head} --recipe {{w}}/recipe.yaml", file("recipe.yaml", v))
        for k, v in recipes.items()
    ]
    cases.append(Case(f"{command}/recipe-missing", f"{head} --recipe {{w}}/none.yaml"))
    cases.append(Case(f"{command}/recipe-is-a-folder", f"{head} --recipe {{w}}/recipes", folder("recipes")))
    return cases


def model_path_cases(command: str, tail: str) -> list[Case]:
    return [
        Case(f"{command}/model-missing", f"{command} {{w}}/nope {tail}"),
        Case(f"{command}/model-empty-string", f"{command} '' {tail}"),
        Case(f"{command}/model-is-text-file", f"{command} {{text}} {tail}"),
    ]


def factorize_cases() -> list[Case]:
    values = {
        "budget-negative": "--budget -0.5",
        "budget-zero": "--budget 0",
        "budget-one": "--budget 1",
        "budget-1.5": "--budget 1.5",
        "budget-nan": "--budget nan",
        "budget-inf": "--budget inf",
        "budget-text": "--budget most",
        "method-unknown": "--method magic",
        "policy-unknown": "--policy magic",
        "energy-zero": "--policy energy --energy 0",
        "rank-multiple-zero": "--rank-multiple 0",
        "target-matches-nothing": "--target 'nothing.*'",
        "target-bad-regex": "--target 're:('",
        "ignore-everything": "--ignore '*'",
        "device-meta": "--device meta",
        "device-foo": "--device foo",
        "device-cuda-99": "--device cuda:99",
        "max-shard-size-garbage": "--max-shard-size lots",
        "max-shard-size-zero": "--max-shard-size 0",
        "refine-steps-data-free": "--refine-steps 4",  # the svd / uniform run of FZ reads no calibration windows
    }
    calibrated = {
        "samples-zero": "--samples 0",
        "seq-len-zero": "--seq-len 0",
        "seq-len-100000": "--seq-len 100000",
        "grad-samples-zero": "--policy sensitivity --grad-samples 0",
        "damping-negative": "--damping -1",
        "self-mix-2": "--self-mix 2",
        "self-seq-len-1": "--self-mix 0.5 --self-seq-len 1",
        "refine-steps-negative": "--refine-steps -1",
        "calibration-missing": "--calibration {w}/none.txt",
        "calibration-empty": "--calibration {w}/empty.txt",
        "calibration-binary": "--calibration {w}/bin.txt",
        "calibration-folder": "--calibration {w}/texts",
        "calibration-jsonl-no-text": "--calibration {w}/rows.jsonl",
    }
    texts = chain(
        file("empty.txt", " \n"),
        file("bin.txt", garbage(8192)),
        folder("texts"),
        file("rows.jsonl", '{"body": "no text field"}\n' * 50),
    )
    calibrating = using(FZ, CAL)
    return [
        *(Case(f"factorize/{k}", using(FZ, v)) for k, v in values.items()),
        *(Case(f"factorize/{k}", using(calibrating, v), texts) for k, v in calibrated.items()),
        Case("factorize/already-factorized", FZ.replace("{model}", "{fz}")),
        Case(
            "factorize/no-tokenizer-calibrated",
            calibrating.replace("{model}", "{w}/m"),
            broken(drop(*TOKENIZER_FILES)),
        ),
        Case(
            "factorize/tokenizer-garbage-calibrated",
            calibrating.replace("{model}", "{w}/m"),
            broken(write("tokenizer.json", "{ nope")),
        ),
        Case(
            "factorize/pickle-code-with-flag",
            FZ.replace("{model}", "{w}/m --allow-pickle"),
            broken(pickled_code),
        ),
        Case("factorize/encoder-fisher", using(FZ.replace("{model}", "{bert}"), "--method fisher")),
        *checkpoint_cases("factorize", calibrating, "model"),
        *recipe_cases("factorize", FZ.replace(" --budget 0.6", "")),
        *model_path_cases("factorize", LIGHT["factorize"]),
        *out_cases("factorize", f"factorize {{w}}/m {SVD} --budget 0.6"),
    ]


def analyze_cases() -> list[Case]:
    return [
        *model_path_cases("analyze", ""),
        Case("analyze/pickle-code-with-flag", "analyze {w}/m --allow-pickle", broken(pickled_code)),
        Case("analyze/target-matches-nothing", "analyze {model} --target 'nothing.*'"),
        Case("analyze/target-bad-regex", "analyze {model} --target 're:('"),
        Case("analyze/out-is-model", "analyze {w}/m --out {w}/m --overwrite", broken(), protect=("m",)),
        Case(
            "analyze/out-existing-file",
            "analyze {model} --out {w}/notes.txt",
            file("notes.txt", "my notes\n"),
            protect=("notes.txt",),
        ),
        Case(
            "analyze/out-foreign-dir-overwrite",
            "analyze {model} --out {w}/mine --overwrite",
            user_files("mine"),
            protect=("mine",),
        ),
        Case(
            "analyze/out-dot-overwrite",
            "analyze {model} --out . --overwrite",
            user_files("cwd"),
            protect=("cwd",),
        ),
        Case(
            "analyze/out-parent-is-file",
            "analyze {model} --out {w}/notes.txt/out",
            file("notes.txt", "my notes\n"),
            protect=("notes.txt",),
        ),
    ]


def evaluate_cases() -> list[Case]:
    head = "evaluate {model} " + EV
    values = {
        "window-zero": "--window 0",
        "window-one": "--window 1",
        "window-100000": "--window 100000",
        "stride-zero": "--stride 0",
        "stride-negative": "--stride -1",
        "max-tokens-negative": "--max-tokens -1",
        "device-meta": "--device meta",
        "device-foo": "--device foo",
        "device-cuda-99": "--device cuda:99",
        "data-missing": "--data {w}/none.txt",
        "data-empty": "--data {w}/empty.txt",
        "data-binary": "--data {w}/bin.txt",
        "data-folder": "--data {w}/texts",
        "data-jsonl-garbage": "--data {w}/rows.jsonl",
        "baseline-missing": "--baseline {w}/nope",
        "baseline-garbage": "--baseline {w}/m",
        "baseline-text-file": "--baseline {text}",
        "baseline-encoder": "--baseline {bert}",
        "answers-missing": "--answers {w}/none.jsonl",
        "answers-garbage": "--answers {w}/rows.jsonl",
        "answers-empty-list": "--answers {w}/noanswers.jsonl",
        "answers-text-file": "--answers {w}/bin.txt",
        "answers-folder": "--answers {w}/texts",
        "threads-zero": "--threads 0",
    }
    setup = chain(
        file("empty.txt", ""),
        file("bin.txt", garbage(8192)),
        folder("texts"),
        file("rows.jsonl", "{ not json\n" * 20),
        file("noanswers.jsonl", '{"prompt": "q", "answers": []}\n'),
        broken(write("config.json", "{ nope")),
    )
    return [
        *(Case(f"evaluate/{k}", using(head, v), setup) for k, v in values.items()),
        *model_path_cases("evaluate", EV),
        Case("evaluate/encoder", "evaluate {bert} " + EV),
        Case(
            "evaluate/lost-quantization-config",
            "evaluate {w}/m " + EV,
            broken(no_quantization_config(True), "fz"),
        ),
        Case(
            "evaluate/lost-quantization-config-and-guard",
            "evaluate {w}/m " + EV,
            broken(no_quantization_config(False), "fz"),
        ),
    ]


def checkpoint_cases(command: str, line: str, source: str, dirs: bool = True) -> list[Case]:
    """Where --resume and (with `dirs`) --checkpoint-dir must not point, for a command run as `line` on MODEL
    `{source}`."""
    resume = {
        "resume-missing": "--resume {w}/nope",
        "resume-garbage": "--resume {w}/ckpt",
        "resume-user-dir": "--resume {w}/mine",
        "resume-other-commands": "--resume {w}/other",
    }
    other = "factorize" if command == "finetune" else "finetune"
    setup = chain(
        file("ckpt/state.json", "{ nope"),
        file("ckpt/trained.safetensors", garbage()),
        file("other/state.json", json.dumps({"command": other, "version": 1, "settings": {}})),
        user_files("mine"),
    )
    resuming = [Case(f"{command}/{k}", using(line, v), setup, protect=("mine",)) for k, v in resume.items()]
    if not dirs:
        return resuming
    return [
        *resuming,
        Case(f"{command}/ckpt-dir-is-out", f"{line} --checkpoint-dir {{w}}/out"),
        Case(
            f"{command}/ckpt-dir-parent-of-out",
            using(line, "-o {w}/work/out --checkpoint-dir {w}/work"),
            user_files("work/notes"),
            protect=("work",),
        ),
        Case(
            f"{command}/ckpt-dir-user-dir",
            f"{line} --checkpoint-dir {{w}}/mine",
            user_files("mine"),
            protect=("mine",),
        ),  # fmt: skip
        Case(
            f"{command}/ckpt-dir-user-dir-overwrite",
            f"{line} --checkpoint-dir {{w}}/mine --overwrite",
            user_files("mine"),
            protect=("mine",),
        ),
        Case(
            f"{command}/ckpt-dir-is-model",
            line.replace(f"{{{source}}}", "{w}/m") + " --checkpoint-dir {w}/m",
            broken(source=source),
            protect=("m",),
        ),
    ]


def finetune_cases() -> list[Case]:
    values = {
        "rank-zero": "--rank 0",
        "rank-negative": "--rank -4",
        "steps-zero": "--steps 0",
        "seq-len-zero": "--seq-len 0",
        "seq-len-100000": "--seq-len 100000",
        "batch-size-zero": "--batch-size 0",
        "grad-accum-zero": "--grad-accum 0",
        "lr-zero": "--lr 0",
        "lr-nan": "--lr nan",
        "alpha-inf": "--alpha inf",
        "warmup-1.5": "--warmup 1.5",
        "epochs-and-steps": "--epochs 1",
        "adapter-unknown": "--adapter magic",
        "factors-with-nf4": "--train factors --quantize nf4",
        "save-every-zero": "--save-every 0",
        "eval-tokens-negative": "--eval-tokens -1",
        "nuclear-on-adapters": "--nuclear 0.1",
        "data-missing": "--data {w}/none.txt",
        "data-empty": "--data {w}/empty.txt",
        "data-binary": "--data {w}/bin.txt",
        "data-short": "--data {w}/short.txt",
        "data-folder": "--data {w}/texts",
        "eval-data-missing": "--eval-data {w}/none.txt",
    }
    setup = chain(
        file("empty.txt", " \n"),
        file("bin.txt", garbage(8192)),
        file("short.txt", "A few words only."),
        folder("texts"),
    )
    dense = "finetune {model} --data {text} -o {w}/out " + FT_RUN
    return [
        *(Case(f"finetune/{k}", using(FT, v), setup) for k, v in values.items()),
        Case("finetune/merge-keep-on-dense", f"{dense} --merge --merge-rank keep"),
        Case("finetune/train-factors-on-dense", f"{dense} --train factors"),
        Case("finetune/encoder", "finetune {bert} --data {text} -o {w}/out " + FT_RUN),
        *checkpoint_cases("finetune", FT, "fz"),
        *model_path_cases("finetune", LIGHT["finetune"]),
        *out_cases("finetune", f"finetune {{w}}/m --data {{text}} {FT_RUN}"),
    ]


def sweep_cases() -> list[Case]:
    budgets = {
        "budgets-above-one": "0.9,1.2",
        "budgets-repeated": "0.8,0.8",
        "budgets-text": "a,b",
        "budgets-empty": ",",
        "budgets-nan": "nan",
        "budgets-inf": "inf",
        "budgets-negative": "-0.1",
        "budgets-zero": "0",
        "budgets-one": "1",
    }
    return [
        *(Case(f"sweep/{k}", using(SW, f"--budgets {v}")) for k, v in budgets.items()),
        Case("sweep/encoder", SW.replace("{model}", "{bert}")),
        Case("sweep/device-meta", f"{SW} --device meta"),
        Case("sweep/window-100000", using(SW, "--window 100000")),
        Case("sweep/recipe-garbage-yaml", f"{SW} --recipe {{w}}/r.yaml", file("r.yaml", EVIL_YAML)),
        *checkpoint_cases("sweep", SW, "model", dirs=False),
        *model_path_cases("sweep", LIGHT["sweep"]),
        Case(
            "sweep/out-is-model",
            using(SW.replace("{model}", "{w}/m"), "-o {w}/m --overwrite"),
            broken(),
            protect=("m",),
        ),
        Case(
            "sweep/out-foreign-dir-overwrite",
            using(SW, "-o {w}/mine --overwrite"),
            user_files("mine"),
            protect=("mine",),
        ),
        Case("sweep/out-dot-overwrite", using(SW, "-o . --overwrite"), user_files("cwd"), protect=("cwd",)),
    ]


def report_cases() -> list[Case]:
    return [
        Case("report/model-not-an-output", "report {model}"),
        Case("report/missing", "report {w}/nope"),
        Case("report/empty-dir", "report {w}/m", folder("m")),
        Case("report/empty-string", "report ''", user_files("cwd"), protect=("cwd",)),
        Case("report/report-json-garbage", "report {w}/m", broken(write("report.json", "{ nope"), "fz")),
        Case(
            "report/report-json-wrong-shape",
            "report {w}/m",
            broken(write("report.json", '{"summary": 3}'), "fz"),
        ),
        Case("report/second-not-an-output", "report {w}/m {model}", broken(source="fz")),
        Case(
            "report/out-existing-file",
            "report {w}/m -o {w}/notes.txt",
            chain(broken(source="fz"), file("notes.txt", "my notes\n")),
            protect=("notes.txt",),
        ),
        Case(
            "report/out-user-dir-with-report-md",
            "report {w}/m -o {w}/mine",
            chain(broken(source="fz"), user_files("mine"), file("mine/report.md", "# my own report\n")),
            protect=("mine",),
        ),
        Case(
            "report/out-parent-is-file",
            "report {w}/m -o {w}/notes.txt/r",
            chain(broken(source="fz"), file("notes.txt", "my notes\n")),
            protect=("notes.txt",),
        ),
    ]


def all_cases() -> list[Case]:
    cases = [
        *analyze_cases(),
        *factorize_cases(),
        *evaluate_cases(),
        *report_cases(),
        *sweep_cases(),
        *finetune_cases(),
        *matrix_cases(),
    ]
    cases.sort(key=lambda c: c.command)  # stable: grouped by command, in table order within each
    names = [c.name for c in cases]
    assert len(set(names)) == len(names), "case names repeat"
    return cases


# --------------------------------------------------------------------------------------------------- runner


def snapshot(top: Path) -> dict[str, str]:
    """Every file (its SHA-256) and folder under `top`, hidden ones included, by relative path."""
    if not top.exists():
        return {}
    found = {}
    for p in sorted(top.rglob("*")):
        rel = str(p.relative_to(top))
        if p.is_symlink() or not (p.is_file() or p.is_dir()):
            found[rel] = "other"
        elif p.is_dir():
            found[rel] = "dir"
        else:
            found[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return found


def changed(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return [p for p, h in before.items() if after.get(p) != h]


def added(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """New paths, without those inside a new folder (the folder stands for them)."""
    new = [p for p in after if p not in before]
    return [p for p in new if not any(p.startswith(q + "/") for q in new)]


def under(path: str, roots: tuple[str, ...]) -> bool:
    return any(path == r or path.startswith(r + "/") for r in roots)


def execute(argv: list[str], cwd: Path, timeout: float) -> tuple[int | None, str, str, float]:
    """Run the CLI; returns (exit code or None on a hang, stdout, stderr, seconds)."""
    env = {k: v for k, v in os.environ.items() if k != "LOWRANK_DEBUG"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lowrank_compress.cli", *argv],
        cwd=cwd,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err, time.perf_counter() - start
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # the tool cleans up on SIGTERM as on Ctrl-C
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        return None, out, err, time.perf_counter() - start


def is_clean(stderr: str) -> bool:
    """One `error:` line, or click's usage error: Usage/Try lines and one `Error:` line (warnings and the phase lines
    a command prints when stderr is not a terminal aside)."""
    import re

    from lowrank_compress.cli import PHASE_LINE

    lines = [
        x
        for x in stderr.splitlines()
        if x.strip() and not x.startswith("warning: ") and not re.match(PHASE_LINE, x)
    ]
    if len(lines) == 1 and lines[0].startswith("error: "):
        return True
    usage = [x for x in lines if not x.startswith(("Usage: ", "Try '"))]
    return len(usage) == 1 and lines[-1].startswith("Error: ") and lines[0].startswith("Usage: ")


def classify(code: int | None, stdout: str, stderr: str, documented: str) -> str:
    if code is None:
        return "hang"
    if "Traceback" in stdout + stderr:
        return "traceback"
    if "this is a bug" in stderr:
        return "unexpected error"
    if code == 0:
        return "documented" if documented else "exit 0 on bad input"
    return "clean error" if is_clean(stderr) else "other failure"


def prepare(case: Case, fx: Fixtures, work: Path) -> tuple[Path, str]:
    """The case's directory with its setup done, and why the case is skipped ("" when it is not)."""
    w = work / case.name.replace("/", "__")
    (w / case.cwd).mkdir(parents=True)
    try:
        case.setup(fx, w)
    except Skip as e:
        return w, str(e)
    # a bug of this script's, not of the tool's: recorded, and the other cases still run
    except Exception as e:
        return w, f"setup failed: {type(e).__name__}: {e}"
    return w, ""


def run_case(case: Case, fx: Fixtures, pristine: Path, work: Path, timeout: float) -> dict:
    row: dict = {"name": case.name, "command": case.command}
    w, skipped = prepare(case, fx, work)
    if skipped:
        return {**row, "verdict": "skipped", "reason": skipped}
    argv = case.build(fx, w)
    before, fixtures_before = snapshot(w), snapshot(fx.root)
    code, out, err, seconds = execute(argv, w / case.cwd, timeout)
    after, fixtures_after = snapshot(w), snapshot(fx.root)
    lost = [p for p in changed(before, after) if under(p, case.protect)]
    inputs = [p for p in changed(before, after) if not under(p, case.protect)]
    inputs += [
        f"fixtures/{p}"
        for p in changed(fixtures_before, fixtures_after) + added(fixtures_before, fixtures_after)
    ]
    if fixtures_after != fixtures_before:  # the next cases get the fixtures as they were
        shutil.rmtree(fx.root)
        shutil.copytree(pristine, fx.root)
    partial = added(before, after) if code != 0 else []
    lines, out_lines = ([x for x in text.splitlines() if x.strip()] for text in (err, out))
    return {
        **row,
        "argv": argv,
        "exit_code": code,
        "seconds": round(seconds, 2),
        "verdict": classify(code, out, err, case.documented),
        "stderr_last_line": lines[-1] if lines else "",
        "stdout_last_line": out_lines[-1] if out_lines else "",
        "stderr_lines": len(lines),
        "inputs_changed": inputs,
        "partial_output": partial,
        "data_lost": lost,
        **({"documented": case.documented} if case.documented else {}),
    }


def unlock(top: Path) -> None:
    """Give every folder under `top` its write permission back, so that it can be removed."""
    for p in [top, *top.rglob("*")]:
        if p.is_dir() and not p.is_symlink():
            p.chmod(0o755)


# --------------------------------------------------------------------------------------------------- report

VERDICTS = (
    "clean error",
    "unexpected error",
    "traceback",
    "exit 0 on bad input",
    "hang",
    "other failure",
    "documented",
    "skipped",
)
FLAGS = ("inputs_changed", "partial_output", "data_lost")
COLUMNS = {
    "tried": "tried",
    "clean error": "clean",
    "unexpected error": "unexpected",
    "traceback": "traceback",
    "exit 0 on bad input": "exit 0",
    "hang": "hang",
    "other failure": "other",
    "documented": "documented",
    "skipped": "skipped",
    "inputs_changed": "inputs chg",
    "partial_output": "partial",
    "data_lost": "data lost",
}


def totals(rows: list[dict]) -> dict[str, int]:
    counts = {"tried": sum(r["verdict"] != "skipped" for r in rows)}
    counts |= {v: sum(r["verdict"] == v for r in rows) for v in VERDICTS}
    counts |= {f: sum(bool(r.get(f)) for r in rows) for f in FLAGS}
    return counts


def print_table(by_command: dict[str, dict[str, int]]) -> None:
    print(f"\n{'command':10}" + "".join(f"{c:>11}" for c in COLUMNS.values()))
    for command, counts in by_command.items():
        print(f"{command:10}" + "".join(f"{counts[k]:>11}" for k in COLUMNS))


def print_findings(rows: list[dict]) -> None:
    bad = [
        r for r in rows if r["verdict"] not in ("clean error", "documented") or any(r.get(f) for f in FLAGS)
    ]
    if bad:
        print("\nnot clean:")
    for r in bad:
        flags = ", ".join(
            f"{f}: {' '.join(r[f][:3])}{' ...' if len(r[f]) > 3 else ''}" for f in FLAGS if r.get(f)
        )
        print(f"  {r['name']}: {r['verdict']}{'; ' + flags if flags else ''}")
        said = r.get("stderr_last_line") or (
            r.get("stdout_last_line") and f"(stdout) {r['stdout_last_line']}"
        )
        print(f"      {said or r.get('reason', '')}"[:300])


# --------------------------------------------------------------------------------------------------- main


def select(cases: list[Case], only: str) -> list[Case]:
    if not only:
        return cases
    patterns = [p.strip() for p in only.split(",") if p.strip()]
    unknown = [p for p in patterns if not any(fnmatch.fnmatchcase(c.name, p) for c in cases)]
    if unknown:
        sys.exit(f"no case matches {', '.join(unknown)} (--list shows the names)")
    return [c for c in cases if any(fnmatch.fnmatchcase(c.name, p) for p in patterns)]


def dry_run(cases: list[Case], fx: Fixtures, tmp: Path) -> None:
    """Set every case up and print its command line; nothing is run."""
    for case in cases:
        w, skipped = prepare(case, fx, tmp / "cases")
        line = f"skipped: {skipped}" if skipped else shlex.join(case.build(fx, w)).replace(str(tmp), "$TMP")
        print(f"{case.name:48} {line}")


def main() -> None:
    cases = all_cases()
    if "--list" in sys.argv:
        for c in cases:
            print(c.name)
        print(f"{len(cases)} cases")
        return
    cases = select(cases, arg("--only", ""))
    timeout = float(arg("--timeout", "120"))
    tmp = Path(tempfile.mkdtemp(prefix="bad-inputs-", dir=arg("--tmp", None)))
    clock = time.perf_counter()
    fx = build_fixtures(tmp / "fixtures")
    shutil.copytree(fx.root, tmp / "pristine")
    print(f"fixtures in {time.perf_counter() - clock:.0f} s under {tmp}; {len(cases)} cases", flush=True)
    rows = []
    try:
        if "--dry-run" in sys.argv:
            return dry_run(cases, fx, tmp)
        for i, case in enumerate(cases, 1):
            row = run_case(case, fx, tmp / "pristine", tmp / "cases", timeout)
            rows.append(row)
            flags = " ".join(f for f in FLAGS if row.get(f))
            seconds = row.get("seconds", 0)
            print(
                f"{i:>4}/{len(cases)} {case.name:48} {row['verdict']:20} {seconds:6.1f}s {flags}", flush=True
            )
    finally:
        unlock(tmp)
        if "--keep" not in sys.argv:
            shutil.rmtree(tmp, ignore_errors=True)
    by_command = {
        c: totals([r for r in rows if r["command"] == c]) for c in dict.fromkeys(r["command"] for r in rows)
    }
    by_command["all"] = totals(rows)
    print_table(by_command)
    print_findings(rows)
    for r in rows:  # the temporary directory is gone: its paths become $TMP
        r["argv"] = [a.replace(str(tmp), "$TMP") for a in r.get("argv", [])]
        for key in ("stderr_last_line", "stdout_last_line"):
            if key in r:
                r[key] = r[key].replace(str(tmp), "$TMP")
    data = {"timeout_s": timeout, "totals": by_command["all"], "by_command": by_command, "cases": rows}
    print(f"wrote {save(arg('--out', 'bad_inputs'), data)}")


if __name__ == "__main__":
    main_or_help(main, __doc__)
