"""The preallocated KV cache the calibration sampling uses gives the same tokens as transformers' own cache."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, MistralConfig, MistralForCausalLM
from transformers.cache_utils import DynamicLayer

from lowrank_compress.kv_cache import PreallocatedLayer, preallocated_cache
from tests.fixtures import tiny_llama


def _sample(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, new: int, **cache) -> torch.Tensor:
    torch.manual_seed(0)
    return model.generate(
        input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0, max_new_tokens=new,
        min_new_tokens=new, pad_token_id=0, **cache,
    )  # fmt: skip


def _models(tmp_path) -> dict[str, torch.nn.Module]:
    small = dict(num_hidden_layers=2, num_attention_heads=4, vocab_size=256)
    return {
        "llama": AutoModelForCausalLM.from_pretrained(tiny_llama(tmp_path, gqa=True)),
        "gpt2": GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=128)),
        # a sliding window shorter than the generation: its layers keep transformers' own kind
        "mistral": MistralForCausalLM(
            MistralConfig(
                hidden_size=64, intermediate_size=128, num_key_value_heads=2, sliding_window=8, **small
            )
        ),
    }


@pytest.mark.parametrize("name", ["llama", "gpt2", "mistral"])
def test_sampling_with_the_preallocated_cache_gives_the_same_tokens(tmp_path, name: str) -> None:
    """Seeded ancestral sampling of a left-padded batch: token for token what the default cache gives, whether the
    buffers hold the whole generation or have to grow (capacity 3)."""
    model = _models(tmp_path)[name].eval()
    ids = torch.tensor([[0, 0, 5, 9, 11], [3, 4, 5, 6, 7]])
    mask = (ids != 0).long()
    mask[1] = 1
    expected = _sample(model, ids, mask, 40)
    for capacity in (45, 3):
        cache = preallocated_cache(model, capacity)
        assert cache, "the model takes a cache"
        got = _sample(model, ids, mask, 40, **cache)
        assert torch.equal(got, expected), capacity
        preallocated = [isinstance(layer, PreallocatedLayer) for layer in next(iter(cache.values())).layers]
        assert preallocated == [name != "mistral"] * 2


def test_a_cropped_layer_continues_from_what_it_holds() -> None:
    """After a crop (assisted decoding does it), the next update appends after the kept positions, as DynamicLayer's
    concatenation does."""
    ours, theirs = PreallocatedLayer(16), DynamicLayer()
    steps = [torch.randn(1, 2, n, 4) for n in (5, 1, 1)]
    for layer in (ours, theirs):
        for x in steps:
            layer.update(x, -x)
        layer.crop(-3)  # 7 positions -> 4
        layer.update(steps[0][..., :2, :], steps[0][..., :2, :])
    assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)
    assert ours.keys.shape[-2] == 6
