"""`--device`: cpu, cuda, cuda:N below the GPU count and mps where available run; anything else is one line before any
model is read (`--device meta` was an internal error, `cuda:99` a CUDA error deep in the run)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from lowrank_compress.choices import check_device
from lowrank_compress.cli import cli
from lowrank_compress.errors import LowrankError
from lowrank_compress.evaluate import evaluate_models
from lowrank_compress.recipe import build_settings

REFUSED = ["meta", "foo", "cuda:99", "cpu:0", "CUDA", "cuda:-1", "", "xla"]


@pytest.mark.parametrize("device", REFUSED)
@pytest.mark.parametrize("command", ["factorize", "sweep", "evaluate"])
def test_a_device_that_cannot_run_is_one_line_before_any_work(
    command: str, device: str, tmp_path: Path
) -> None:
    missing = tmp_path / "no-model"  # the device is refused first: the model is never looked at
    out = ["-o", str(tmp_path / "out")] if command != "evaluate" else []
    res = CliRunner().invoke(cli, [command, str(missing), *out, "--device", device])
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 1 and len(lines) == 1 and "Traceback" not in res.output, res.output
    assert lines[0].startswith("error: --device ") and ("CUDA" in lines[0] or "use cpu, cuda" in lines[0])
    assert sorted(tmp_path.iterdir()) == []


def test_a_recipe_and_the_library_refuse_it_too(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("device: meta\n")
    with pytest.raises(LowrankError, match="'meta' is not a device"):
        build_settings(recipe)
    with pytest.raises(LowrankError, match="'meta' is not a device"):
        evaluate_models(tmp_path / "no-model", device="meta")


def test_cpu_runs_and_gpus_are_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA branch, on any machine: cuda:N must be below the count."""
    assert check_device("cpu") == "cpu" and build_settings(device="cpu").device == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [check_device(d) for d in ("cuda", "cuda:0", "cuda:1")] == ["cuda", "cuda:0", "cuda:1"]
    with pytest.raises(
        LowrankError, match=r"^--device cuda:2: this machine has 2 CUDA device\(s\), cuda:0 to cuda:1$"
    ):
        check_device("cuda:2")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(LowrankError, match="MPS is not available"):
        check_device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert check_device("mps") == "mps"
