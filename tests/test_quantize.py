"""NF4 quantization of the frozen base through bitsandbytes (optional extra), and the guard against its CPU bug."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lowrank_compress
from lowrank_compress.adapters import adapter_targets, attach
from lowrank_compress.modules import LowRankLinear
from tests.test_adapters import ids, logits

bnb = pytest.importorskip("bitsandbytes")


def test_nf4_width_probe_matches_a_direct_measurement() -> None:
    """The guard's probe says what bitsandbytes actually does on this machine (the CPU bug shows at width 96 on
    bitsandbytes 0.50.2; a fixed library would make both sides True)."""
    import bitsandbytes.functional as bnbf

    from lowrank_compress.quantize import nf4_width_ok

    for width in (64, 96, 100, 128, 160):
        w = torch.randn(64, width, generator=torch.Generator().manual_seed(width + 1))
        q, state = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True, blocksize=64)
        err = float((bnbf.dequantize_4bit(q, state) - w).norm() / w.norm())
        assert nf4_width_ok(width) == (err < 0.13), (width, err)


@pytest.mark.parametrize("rank", [64, 96, 100])
def test_nf4_factors_dequantize_correctly_whatever_the_rank(rank: int) -> None:
    from lowrank_compress.quantize import dequantize, quantize_nf4

    gen = torch.Generator().manual_seed(rank)
    layer = LowRankLinear.from_factors(
        torch.randn(128, rank, generator=gen), torch.randn(rank, 192, generator=gen)
    )
    dense = layer.dense_weight().detach().clone()
    holder = torch.nn.Sequential(layer)
    quantize_nf4(holder)
    assert type(layer.up.weight).__name__ == "Params4bit"
    # NF4 per factor is ~0.09 relative error; the product of two stays well under 0.2 (the CPU bug gives > 0.25)
    err = float((layer.dense_weight() - dense).norm() / dense.norm())
    assert err < 0.2, err
    dequantize(holder)
    assert layer.up.weight.shape == (128, rank) and layer.down.weight.shape == (rank, 192)
    assert float((layer.dense_weight() - dense).norm() / dense.norm()) == pytest.approx(err, rel=1e-4)


def test_nf4_forward_and_backward_on_cpu(factorized: Path) -> None:
    from lowrank_compress.quantize import quantize_nf4

    model = lowrank_compress.load(factorized)
    reference = logits(model)
    report = quantize_nf4(model)
    assert report.quantized > 0
    peft_model = attach(model, "lora", 4, 8.0, adapter_targets(model))
    out = logits(peft_model)
    assert float((out - reference).norm() / reference.norm()) < 0.2
    batch = ids()
    loss = peft_model(input_ids=batch, labels=batch).loss
    loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert any(float(g.abs().sum()) > 0 for n, g in grads.items() if "lora_B" in n)
    frozen = [p for p in peft_model.parameters() if not p.requires_grad]
    assert all(p.grad is None for p in frozen)


def test_missing_bitsandbytes_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from lowrank_compress.quantize import require_bitsandbytes

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(lowrank_compress.LowrankError, match=r"pip install 'lowrank-compress\[nf4\]'"):
        require_bitsandbytes()
