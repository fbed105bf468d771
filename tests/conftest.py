"""Fixtures shared by several test modules."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lowrank_compress.pipeline import factorize_model
from lowrank_compress.recipe import build_settings
from tests.fixtures import tiny_llama

# The test run itself loads the cores, so the busy-machine warning (and lowered threads) of every command would
# depend on what else runs; an explicit thread count turns that default off, in this process and in the commands
# the tests start as subprocesses. Tests about the busy machine set the load themselves.
os.environ.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0))))


@pytest.fixture(autouse=True)
def quiet_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process commands see an idle machine unless a test says otherwise (see OMP_NUM_THREADS above)."""
    import lowrank_compress.evaluate as ev
    import lowrank_compress.threads as th

    monkeypatch.setattr(ev, "load_average", lambda: 0.0)
    monkeypatch.setattr(th, "other_busy_cores", lambda *_: 0.0)


@pytest.fixture(scope="session")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A training text of 12,000 characters (finetune's --data)."""
    from tests.fixtures import training_text

    path = tmp_path_factory.mktemp("text") / "train.txt"
    path.write_text(training_text(12_000), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def factorized(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama factorized to 60% with plain SVD and uniform ranks (every decoder Linear is a LowRankLinear)."""
    root = tmp_path_factory.mktemp("factorized")
    out = root / "fz"
    factorize_model(tiny_llama(root), out, build_settings(budget=0.6, method="svd", policy="uniform"))
    return out
