"""Fixtures shared by several test modules."""

from __future__ import annotations

from pathlib import Path

import pytest

from lowrank_compress.pipeline import factorize_model
from lowrank_compress.recipe import build_settings
from tests.fixtures import tiny_llama


@pytest.fixture(scope="session")
def factorized(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama factorized to 60% with plain SVD and uniform ranks (every decoder Linear is a LowRankLinear)."""
    root = tmp_path_factory.mktemp("factorized")
    out = root / "fz"
    factorize_model(tiny_llama(root), out, build_settings(budget=0.6, method="svd", policy="uniform"))
    return out
