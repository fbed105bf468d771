"""Every command reads weights through one validated reader: a config that disagrees with the weights, or a damaged
file, is one line naming the file and what is wrong, before any work, with the input untouched and no output.

transformers would otherwise initialize what is missing at random (its load report muted), and evaluate would print a
perplexity of noise, finetune train on it, exit 0.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from lowrank_compress.cli import cli
from tests.fixtures import read_safetensors_raw, tiny_llama, training_text, write_safetensors_raw

WEIGHTS = "model.safetensors"
VICTIM = "model.layers.1.mlp.down_proj.weight"


def edit_config(**changes: object) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        config = json.loads((d / "config.json").read_text())
        config.update(changes)
        (d / "config.json").write_text(json.dumps(config))

    return edit


def edit_tensors(change: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        tensors = load_file(d / WEIGHTS)
        change(tensors)
        save_file(tensors, d / WEIGHTS, metadata={"format": "pt"})

    return edit


def gpt2_config(d: Path) -> None:
    config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 64, "n_layer": 2, "n_head": 4,
              "vocab_size": 320, "n_positions": 256}  # fmt: skip
    (d / "config.json").write_text(json.dumps(config))


def overlapping(d: Path) -> None:
    """Two tensors whose data offsets overlap: a header that lies."""
    header, data = read_safetensors_raw(d / WEIGHTS)
    names = [n for n in header if n != "__metadata__"]
    header[names[1]]["data_offsets"] = header[names[0]]["data_offsets"]
    write_safetensors_raw(d / WEIGHTS, header, data)


# (case, how the model directory is damaged, what the one line must say)
CASES = [
    ("gpt2-config-over-llama", gpt2_config, "is missing from the checkpoint"),
    ("more-layers-than-stored", edit_config(num_hidden_layers=3), "model.layers.2"),
    ("missing-tensor", edit_tensors(lambda t: t.pop(VICTIM)), VICTIM),
    (
        "zero-size-tensor",
        edit_tensors(lambda t: t.update({VICTIM: torch.empty(0, 128)})),
        "has shape [0, 128]",
    ),
    ("wrong-shape", edit_config(intermediate_size=96), "the config expects"),
    (
        "extra-tensor",
        edit_tensors(lambda t: t.update({"model.extra.weight": torch.ones(2)})),
        "model.extra.weight",
    ),
    ("config-wrong-types", edit_config(hidden_size="sixty-four"), "not a valid llama config"),
    ("truncated-data", lambda d: (d / WEIGHTS).write_bytes((d / WEIGHTS).read_bytes()[:-100]), "truncated"),
    ("overlapping-tensors", overlapping, "overlap"),
]


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("agree"))


def digest(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.mark.parametrize("case,damage,needle", CASES, ids=[c[0] for c in CASES])
def test_weights_that_disagree_with_the_config_are_refused_by_every_command(
    good: Path, tmp_path: Path, case: str, damage: Callable[[Path], None], needle: str
) -> None:
    model = tmp_path / "m"
    shutil.copytree(good, model)
    damage(model)
    before = digest(model)
    text = tmp_path / "train.txt"
    text.write_text(training_text(20_000))
    out = tmp_path / "out"
    commands = {
        "analyze": ("analyze", model),
        "evaluate": ("evaluate", model, "--max-tokens", "200", "--window", "64", "--no-speed"),
        "factorize": ("factorize", model, "-o", out, "--method", "svd", "--budget", "0.6"),
        "finetune": ("finetune", model, "-o", out, "--data", text, "--steps", "1", "--eval-tokens", "0"),
    }
    for command, args in commands.items():
        res = CliRunner().invoke(cli, [str(a) for a in args])
        lines = res.stderr.strip().splitlines()
        assert res.exit_code == 1, (command, res.output)
        assert len(lines) == 1 and needle in lines[0] and str(model) in lines[0], (command, res.stderr)
        assert "this is a bug" not in lines[0]
        assert not out.exists() and digest(model) == before, command
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], command


def test_sound_checkpoints_pass_the_agreement_check(good: Path, factorized: Path, tmp_path: Path) -> None:
    """What loads correctly passes: the dense model, one whose head is tied to the embeddings (stored once), and a
    factorized output whose layers are stored as their two factors."""
    from lowrank_compress.checkpoint import Checkpoint

    for path in (good, tiny_llama(tmp_path, tied=True), factorized):
        with Checkpoint.open(path) as ckpt:
            ckpt.require_matches_config()


def test_eval_data_that_does_not_exist_is_an_error_even_when_unused(good: Path, tmp_path: Path) -> None:
    text = tmp_path / "train.txt"
    text.write_text(training_text(20_000))
    args = ["finetune", good, "-o", tmp_path / "out", "--data", text, "--eval-data", tmp_path / "none.txt",
            "--steps", "1", "--eval-tokens", "0"]  # fmt: skip
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exit_code != 0 and "none.txt" in res.stderr, res.output
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
