"""Adapters around factorized layers (peft LoRA / DoRA), exact and rank-keeping merges, and NF4 quantization."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import lowrank_compress
from lowrank_compress.adapters import (
    AdapterDelta,
    adapter_targets,
    attach,
    extract_adapters,
    grow,
    merge_adapters,
    truncate,
)
from lowrank_compress.calibration import LayerStats
from lowrank_compress.modules import LowRankLinear


def ids() -> torch.Tensor:
    return torch.randint(4, 300, (2, 16), generator=torch.Generator().manual_seed(1))


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids()).logits.float()


def randomize_adapters(peft_model: torch.nn.Module, seed: int = 0) -> None:
    """Trained-looking adapters: B (zero at init) and DoRA magnitudes perturbed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=gen))


def test_targets_wrap_factorized_layers_whole_and_skip_the_head(factorized: Path) -> None:
    model = lowrank_compress.load(factorized)
    names = adapter_targets(model)
    lowrank = [n for n, m in model.named_modules() if isinstance(m, LowRankLinear)]
    assert lowrank and set(lowrank) <= set(names)
    assert not any(n.endswith((".up", ".down")) for n in names)
    assert "lm_head" not in names
    dense = [n for n in names if n not in lowrank]
    assert all(isinstance(model.get_submodule(n), torch.nn.Linear) for n in dense)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_fresh_adapters_leave_the_outputs_unchanged(factorized: Path, kind: str) -> None:
    model = lowrank_compress.load(factorized)
    before = logits(model)
    peft_model = attach(model, kind, 4, 8.0, adapter_targets(model))
    wrapped = [m for m in peft_model.modules() if type(m).__name__ == "LowRankLoraLinear"]
    assert wrapped, "no LowRankLinear was wrapped as a whole"
    torch.testing.assert_close(logits(peft_model), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_grow_merge_equals_the_unmerged_model(factorized: Path, kind: str) -> None:
    model = lowrank_compress.load(factorized)
    ranks = {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    peft_model = attach(model, kind, 4, 8.0, adapter_targets(model))
    randomize_adapters(peft_model)
    expected = logits(peft_model)
    base, deltas = extract_adapters(peft_model)
    assert logits(base).sub(expected).abs().max() > 1e-3  # the adapters do something
    report = merge_adapters(base, deltas, merge_rank="grow")
    torch.testing.assert_close(logits(base), expected, rtol=1e-4, atol=1e-4)
    for name, rank in ranks.items():  # still factorized, rank r + r_a
        module = base.get_submodule(name)
        assert isinstance(module, LowRankLinear) and module.rank == rank + 4
        assert report[name]["rank_after"] == rank + 4


def test_grow_is_exact_for_dora_row_scaling() -> None:
    gen = torch.Generator().manual_seed(0)
    up, down = torch.randn(12, 3, generator=gen), torch.randn(3, 10, generator=gen)
    delta = AdapterDelta(
        torch.randn(2, 10, generator=gen), torch.randn(12, 2, generator=gen), torch.rand(12) + 0.5
    )
    u2, d2 = grow(up, down, delta)
    w = up.double() @ down.double() + delta.b.double() @ delta.a.double()
    expected = w * (delta.magnitude.double() / np.linalg.norm(w.numpy(), axis=1))[:, None]
    torch.testing.assert_close(u2 @ d2, expected)
    assert u2.shape == (12, 5) and d2.shape == (5, 10)


def test_keep_merge_error_is_eckart_young() -> None:
    gen = torch.Generator().manual_seed(0)
    up, down = torch.randn(20, 6, generator=gen), torch.randn(6, 15, generator=gen)
    u, d, err, total = truncate(up, down, 4)
    w = (up.double() @ down.double()).numpy()
    s = np.linalg.svd(w, compute_uv=False)
    np.testing.assert_allclose(err, float(np.sum(s[4:] ** 2)), rtol=1e-9)
    np.testing.assert_allclose(total, float(np.sum(s**2)), rtol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(w - (u @ d).numpy()) ** 2, err, rtol=1e-7)
    assert u.shape == (20, 4) and d.shape == (4, 15)


def test_whitened_keep_merge_minimizes_the_output_error() -> None:
    gen = torch.Generator().manual_seed(0)
    up, down = torch.randn(20, 6, generator=gen), torch.randn(6, 15, generator=gen)
    x = torch.randn(200, 15, generator=gen, dtype=torch.float64) * torch.linspace(
        0.1, 3, 15, dtype=torch.float64
    )
    stats = LayerStats(gram=x.T @ x, abs_sum=x.abs().sum(0), n_tokens=200)
    u, d, err, _ = truncate(up, down, 4, stats)
    w = (up.double() @ down.double()).numpy()
    # theory: the dropped squared singular values of W X^T; and it is the output error actually left
    s = np.linalg.svd(w @ x.numpy().T, compute_uv=False)
    np.testing.assert_allclose(err, float(np.sum(s[4:] ** 2)), rtol=1e-7)
    np.testing.assert_allclose(np.linalg.norm((w - (u @ d).numpy()) @ x.numpy().T) ** 2, err, rtol=1e-6)
    plain_u, plain_d, _, _ = truncate(up, down, 4)
    assert np.linalg.norm((w - (plain_u @ plain_d).numpy()) @ x.numpy().T) ** 2 > err


def test_keep_merge_returns_to_the_original_ranks(factorized: Path) -> None:
    model = lowrank_compress.load(factorized)
    ranks = {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    peft_model = attach(model, "lora", 4, 8.0, adapter_targets(model))
    randomize_adapters(peft_model)
    base, deltas = extract_adapters(peft_model)
    report = merge_adapters(base, deltas, merge_rank="keep")
    assert {n: base.get_submodule(n).rank for n in ranks} == ranks
    assert all(0 < report[n]["relative_error"] < 1 for n in ranks)


def test_peft_merge_and_unload_refuses_to_densify(factorized: Path) -> None:
    model = lowrank_compress.load(factorized)
    peft_model = attach(model, "lora", 2, 4.0, adapter_targets(model))
    with pytest.raises(lowrank_compress.LowrankError, match="keep it factorized"):
        peft_model.merge_and_unload()
