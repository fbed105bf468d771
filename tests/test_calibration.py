"""Calibration windows and per-layer statistics, checked against direct computations on tiny random models."""

from __future__ import annotations

import functools
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lowrank_compress.calibration import (
    LayerStats,
    collect_stats,
    make_batches,
    min_tokens_needed,
    tokenize_text,
)
from lowrank_compress.errors import CalibrationError, LowrankError


def assert_gram_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Per-batch Gram products run in float32 (sums in float64): entries agree to float32 rounding of the scale."""
    scale = float(expected.diagonal().abs().max())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-6 * scale)


def sample_text(n_chars: int = 12_000) -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))[:n_chars]


@functools.lru_cache(maxsize=4)
def _tokenizer_json(style: str) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] if style == "bert" else ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token=specials[1] if style == "bert" else specials[0]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([sample_text(20_000)], trainer=trainer)
    if style == "bos":
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    elif style == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
        )
    return tok.to_str()


def make_tokenizer(style: str = "bos"):
    """Byte-level BPE (300 tokens) trained offline. style: "bos" (prepends <s>=1), "plain" (adds nothing), "bert"."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(_tokenizer_json(style))
    if style == "bert":
        specials = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]"}
    else:
        specials = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    return PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=128, **specials)


def tiny_llama(vocab: int = 300, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(vocab: int = 300, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2
    )
    return GPT2LMHeadModel(cfg).eval()


def _offsets(row: list[int], ids: list[int]) -> list[int]:
    return [i for i in range(len(ids) - len(row) + 1) if ids[i : i + len(row)] == row]


# --------------------------------------------------------------------------------------------------- make_batches


def test_batches_are_reproducible_with_a_seed_and_differ_with_another() -> None:
    tok, text = make_tokenizer("plain"), sample_text()
    a = make_batches(tok, text, samples=6, seq_len=24, seed=3)
    b = make_batches(tok, text, samples=6, seq_len=24, seed=3)
    c = make_batches(tok, text, samples=6, seq_len=24, seed=4)
    assert a.dtype == torch.long and a.shape == (6, 24)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_bos_tokenizer_windows_start_with_bos_then_consecutive_text_tokens() -> None:
    tok, text = make_tokenizer("bos"), sample_text()
    assert tok("x").input_ids[0] == 1 and tok("x", add_special_tokens=False).input_ids[0] != 1
    ids = tokenize_text(tok, text)
    batches = make_batches(tok, text, samples=5, seq_len=20, seed=0)
    assert batches.shape == (5, 20)
    assert (batches[:, 0] == 1).all()
    for row in batches.tolist():
        assert 1 not in row[1:]
        assert _offsets(row[1:], ids), "window body is not a contiguous run of the text's tokens"


def test_plain_tokenizer_windows_are_text_tokens_only() -> None:
    tok, text = make_tokenizer("plain"), sample_text()
    ids = tokenize_text(tok, text)
    assert ids == tok(text, add_special_tokens=False).input_ids  # short text: one chunk, same as one call
    batches = make_batches(tok, text, samples=5, seq_len=20, seed=0)
    for row in batches.tolist():
        assert _offsets(row, ids)
    assert batches.shape == (5, 20)  # all seq_len tokens are text: no BOS slot reserved


def test_bert_tokenizer_windows_are_wrapped_in_cls_and_sep() -> None:
    tok, text = make_tokenizer("bert"), sample_text()
    ids = tokenize_text(tok, text)
    batches = make_batches(tok, text, samples=3, seq_len=16, seed=1)
    assert (batches[:, 0] == 2).all() and (batches[:, -1] == 3).all()
    for row in batches.tolist():
        assert _offsets(row[1:-1], ids)


def test_windows_do_not_overlap_when_the_text_is_long_enough() -> None:
    tok, text = make_tokenizer("plain"), sample_text()
    ids = tokenize_text(tok, text)
    body = 40
    samples = len(ids) // body  # as many as fit: the random gaps must all be zero-ish but never negative
    for seed in range(3):
        batches = make_batches(tok, text, samples=samples, seq_len=body, seed=seed)
        starts = [_offsets(row, ids)[0] for row in batches.tolist()]
        assert all(b - a >= body for a, b in zip(starts, starts[1:], strict=False))


def test_short_text_gives_distinct_overlapping_windows_down_to_the_stated_minimum() -> None:
    tok = make_tokenizer("bos")
    text = sample_text(800)
    n = len(tokenize_text(tok, text))
    seq_len = 30
    body = seq_len - 1  # BOS takes one slot
    samples = n - body + 1  # the most distinct windows there are
    assert min_tokens_needed(samples, body) == n
    batches = make_batches(tok, text, samples=samples, seq_len=seq_len, seed=0)
    # Every offset is used exactly once: the rows are all the windows the text has.
    ids = tokenize_text(tok, text)
    every = Counter(tuple([1, *ids[i : i + body]]) for i in range(samples))
    assert Counter(tuple(r) for r in batches.tolist()) == every
    with pytest.raises(CalibrationError) as info:
        make_batches(tok, text, samples=samples + 1, seq_len=seq_len, seed=0)
    msg = str(info.value)
    assert f"has {n} tokens" in msg and f"at least {n + 1}" in msg and "\n" not in msg


def test_bad_batch_arguments() -> None:
    tok = make_tokenizer("bos")
    with pytest.raises(CalibrationError, match="at least 1"):
        make_batches(tok, sample_text(), samples=0, seq_len=8)
    with pytest.raises(CalibrationError, match="no room for text"):
        make_batches(tok, sample_text(), samples=2, seq_len=1)


def test_long_text_is_tokenized_in_chunks_at_line_breaks() -> None:
    tok = make_tokenizer("plain")
    text = sample_text(150_000)
    ids = tokenize_text(tok, text)
    whole = tok(text, add_special_tokens=False).input_ids
    # Chunks are cut after a newline; byte-level BPE may merge across that point only rarely.
    assert abs(len(ids) - len(whole)) <= 3
    assert tok.decode(ids) == text


# --------------------------------------------------------------------------------------------------- collect_stats


def _captured_inputs(model, names, batches, batch_size):
    """The inputs each module receives, captured with our own hooks (float64, flattened)."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [
        model.get_submodule(n).register_forward_hook(
            lambda m, a, o, n=n: seen[n].append(a[0].detach().reshape(-1, a[0].shape[-1]).double())
        )
        for n in names
    ]
    with torch.no_grad():
        for s in range(0, len(batches), batch_size):
            model(input_ids=batches[s : s + batch_size])
    for h in handles:
        h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


def test_llama_gram_equals_xtx_of_the_layer_inputs() -> None:
    model = tiny_llama()
    batches = torch.randint(0, 300, (5, 12), generator=torch.Generator().manual_seed(0))
    names = [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.k_proj",
        "model.layers.0.self_attn.o_proj",
        "model.layers.1.mlp.up_proj",
        "model.layers.1.mlp.down_proj",
    ]
    stats = collect_stats(model, batches, names, batch_size=2)
    assert set(stats) == set(names)
    # Independent path for the first layer: embeddings -> input RMSNorm, computed by hand.
    with torch.no_grad():
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(batches)).reshape(-1, 32).double()
    for n in names[:2]:
        assert_gram_close(stats[n].gram, x.T @ x)
        torch.testing.assert_close(stats[n].abs_sum, x.abs().sum(0), rtol=1e-6, atol=1e-8)
    captured = _captured_inputs(model, names, batches, 2)
    for n in names:
        st = stats[n]
        xn = captured[n]
        assert isinstance(st, LayerStats)
        assert st.gram.dtype == torch.float64 and st.abs_sum.dtype == torch.float64
        assert st.n_tokens == 5 * 12
        assert st.gram.shape == (xn.shape[1], xn.shape[1])
        assert_gram_close(st.gram, xn.T @ xn)
        torch.testing.assert_close(st.abs_sum, xn.abs().sum(0), rtol=1e-6, atol=1e-6)
        assert st.fisher_rows is None and st.out_grad_sq is None
    assert stats["model.layers.1.mlp.down_proj"].gram.shape == (48, 48)
    # q and k read the same tensor: they share one (read-only) Gram instead of holding two equal copies
    assert stats[names[0]].gram is stats[names[1]].gram
    assert stats[names[0]].gram is not stats["model.layers.0.self_attn.o_proj"].gram


def test_gpt2_conv1d_gram_equals_xtx_of_the_layer_inputs() -> None:
    model = tiny_gpt2()
    batches = torch.randint(0, 300, (3, 10), generator=torch.Generator().manual_seed(1))
    names = ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_proj", "transformer.h.1.attn.c_proj"]
    stats = collect_stats(model, batches, names, batch_size=4)
    with torch.no_grad():
        pos = torch.arange(10)
        h = model.transformer.wte(batches) + model.transformer.wpe(pos)
        x = model.transformer.h[0].ln_1(h).reshape(-1, 32).double()
    assert_gram_close(stats[names[0]].gram, x.T @ x)
    captured = _captured_inputs(model, names, batches, 4)
    for n in names:
        assert_gram_close(stats[n].gram, captured[n].T @ captured[n])
        assert stats[n].n_tokens == 30
    # Conv1D weights are (in x out): mlp.c_proj is (128 x 32), so its input is 128 wide.
    assert stats["transformer.h.0.mlp.c_proj"].gram.shape == (128, 128)


def _reference_grads(model, names, batches, batch_size, conv1d: bool):
    """Fisher rows and mean squared output gradients (overall and per output channel) by plain autograd, with our
    own loss."""
    modules = [model.get_submodule(n) for n in names]
    fisher = {
        n: torch.zeros(m.weight.shape[1 if conv1d else 0], dtype=torch.float64)
        for n, m in zip(names, modules, strict=True)
    }
    sq = dict.fromkeys(names, 0.0)
    count = dict.fromkeys(names, 0)
    per_channel: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(m, a, o):
            o.retain_grad()
            outputs[name] = o

        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in zip(names, modules, strict=True)]
    for s in range(0, len(batches), batch_size):
        ids = batches[s : s + batch_size]
        logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        for n, m in zip(names, modules, strict=True):
            fisher[n] += m.weight.grad.double().pow(2).sum(dim=0 if conv1d else 1)
            og = outputs[n].grad.double()
            sq[n] += float(og.pow(2).sum())
            count[n] += og.numel()
            flat = og.pow(2).reshape(-1, og.shape[-1])
            per_channel[n] = per_channel.get(n, 0) + flat.sum(0)  # summed over positions
        model.zero_grad(set_to_none=True)
    for h in handles:
        h.remove()
    channels = {n: per_channel[n] / (count[n] / per_channel[n].shape[0]) for n in names}
    return fisher, {n: sq[n] / count[n] for n in names}, channels


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fisher_rows_and_output_sensitivity_equal_autograd(arch) -> None:
    if arch == "llama":
        model = tiny_llama(seed=2)
        names = [
            "model.layers.0.self_attn.v_proj",
            "model.layers.1.mlp.gate_proj",
            "model.layers.1.mlp.down_proj",
        ]
    else:
        model = tiny_gpt2(seed=2)
        names = ["transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_fc"]
    batches = torch.randint(0, 300, (5, 9), generator=torch.Generator().manual_seed(5))
    model.train()  # collect_stats must run in eval mode (GPT-2 has dropout) and restore train mode
    model.get_submodule(names[0]).weight.requires_grad_(False)
    stats = collect_stats(model, batches, names, batch_size=2, fisher=True, sensitivity=True)
    assert model.training and all(m.training for m in model.modules())
    assert not model.get_submodule(names[0]).weight.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if n != names[0] + ".weight")
    assert all(p.grad is None for p in model.parameters())
    assert all(not model.get_submodule(n)._forward_hooks for n in names)

    model.eval()
    model.get_submodule(names[0]).weight.requires_grad_(True)
    fisher, sens, channels = _reference_grads(
        model, names, batches, 1, conv1d=arch == "gpt2"
    )  # a loss per window
    for n in names:
        st = stats[n]
        assert st.fisher_rows is not None and st.fisher_rows.dtype == torch.float64
        out_dim = model.get_submodule(n).weight.shape[1 if arch == "gpt2" else 0]
        assert st.fisher_rows.shape == (out_dim,)
        torch.testing.assert_close(st.fisher_rows, fisher[n], rtol=1e-4, atol=1e-12)
        assert st.out_grad_sq == pytest.approx(sens[n], rel=1e-4)
        torch.testing.assert_close(st.out_grad_channels, channels[n], rtol=1e-4, atol=1e-12)
        assert st.n_tokens == 45


def test_sensitivity_alone_leaves_fisher_empty_and_progress_is_reported() -> None:
    model = tiny_llama()
    batches = torch.randint(0, 300, (5, 8), generator=torch.Generator().manual_seed(0))
    calls: list[tuple[int, int]] = []
    stats = collect_stats(
        model,
        batches,
        ["model.layers.0.mlp.up_proj"],
        batch_size=2,
        sensitivity=True,
        progress=lambda d, t: calls.append((d, t)),
    )
    st = stats["model.layers.0.mlp.up_proj"]
    assert st.fisher_rows is None and st.out_grad_sq is not None and st.out_grad_sq > 0
    # 3 batches of statistics, then one gradient step per window
    assert calls == [(i, 8) for i in range(1, 9)]


def test_gradient_statistics_on_a_spread_subset() -> None:
    """grad_samples=k takes k windows spread evenly: the same as passing exactly those windows."""
    model = tiny_llama()
    batches = torch.randint(0, 300, (5, 8), generator=torch.Generator().manual_seed(1))
    name = "model.layers.1.self_attn.o_proj"
    subset = collect_stats(
        model, batches, [name], batch_size=2, sensitivity=True, fisher=True, grad_samples=2
    )[name]
    direct = collect_stats(model, batches[[0, 4]], [name], batch_size=2, sensitivity=True, fisher=True)[name]
    assert subset.out_grad_sq == pytest.approx(direct.out_grad_sq, rel=1e-9)
    torch.testing.assert_close(subset.fisher_rows, direct.fisher_rows, rtol=1e-9, atol=0)
    assert subset.n_tokens == 5 * 8  # the Gram still uses every window
    with pytest.raises(CalibrationError):
        collect_stats(model, batches, [name], sensitivity=True, grad_samples=0)


def test_encoder_without_lm_head_cannot_give_gradients() -> None:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(
        BertConfig(
            vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48
        )
    ).eval()
    batches = make_batches(make_tokenizer("bert"), sample_text(), samples=2, seq_len=12)
    name = "encoder.layer.0.intermediate.dense"
    stats = collect_stats(model, batches, [name])  # plain statistics work for encoders
    assert stats[name].gram.shape == (32, 32) and stats[name].n_tokens == 24
    for kwargs in ({"fisher": True}, {"sensitivity": True}):
        with pytest.raises(LowrankError, match="no language-model head"):
            collect_stats(model, batches, [name], **kwargs)
    assert not model.get_submodule(name)._forward_hooks


def test_unknown_or_non_linear_module_is_an_error() -> None:
    model = tiny_llama()
    batches = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(LowrankError, match="not a module"):
        collect_stats(model, batches, ["model.layers.9.mlp.up_proj"])
    with pytest.raises(LowrankError, match="not a Linear"):
        collect_stats(model, batches, ["model.layers.0.input_layernorm"])


def test_hooks_are_removed_when_the_forward_fails() -> None:
    model = tiny_llama()
    name = "model.layers.0.mlp.up_proj"
    bad = torch.full((1, 4), 10_000, dtype=torch.long)  # out of the vocabulary: the embedding raises
    with pytest.raises(IndexError):
        collect_stats(model, bad, [name])
    assert not model.get_submodule(name)._forward_hooks


@pytest.mark.parametrize("style", ["bos", "plain"])
def test_self_generated_batches_are_seeded_and_start_like_a_document(style: str) -> None:
    from lowrank_compress.calibration import sample_batches

    model, tok = tiny_llama(), make_tokenizer(style)
    model.train()
    a = sample_batches(model, tok, samples=5, seq_len=12, seed=3, batch_size=2)
    b = sample_batches(model, tok, samples=5, seq_len=12, seed=3, batch_size=2)
    c = sample_batches(model, tok, samples=5, seq_len=12, seed=4, batch_size=2)
    assert a.shape == (5, 12) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    start = tok.bos_token_id if style == "bos" else tok.eos_token_id
    assert (a[:, 0] == start).all()
    assert not (a[:, 1:] == tok.eos_token_id).any()  # EOS suppressed: every row is full length
    assert len(torch.unique(a[:, 1:])) > 10  # sampled, not greedy repetition
    assert model.training  # mode restored
    # the global RNG is untouched
    torch.manual_seed(0)
    x = torch.rand(3)
    torch.manual_seed(0)
    sample_batches(model, tok, samples=1, seq_len=4)
    assert torch.equal(torch.rand(3), x)


def test_generation_hands_the_output_head_a_contiguous_input_and_leaves_no_hook() -> None:
    """`generate` gives the head a strided view (the last position of each row): torch's CPU bfloat16 matmul then
    copies the head's weight once per row (6 GB at the 7B shape). Sampling and the answer check run it under
    `contiguous_head_input`, so the head's forward receives contiguous rows there, and strided ones without it."""
    from lowrank_compress.answers import generate_answers
    from lowrank_compress.calibration import sample_batches

    model, tok = tiny_llama(), make_tokenizer("bos")
    head = model.get_output_embeddings()
    received: list[bool] = []
    original = head.forward
    head.forward = lambda x: (received.append(x.is_contiguous()), original(x))[1]  # what the matmul gets
    ids = torch.tensor([[1, 5, 6, 7], [1, 8, 9, 10]])
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)
    assert received[0] is False  # the prefill's view, which the context exists for
    received.clear()
    sample_batches(model, tok, samples=2, seq_len=8, seed=0)
    generate_answers(model, tok, ["What is two plus two?", "Name a colour."], max_new_tokens=2)
    assert len(received) > 4 and all(received)
    assert not head._forward_pre_hooks  # removed on the way out


def test_a_low_sampling_temperature_collapses_the_samples_to_the_models_mode() -> None:
    """Logits divided by T: at T = 1e-6 the distribution is its argmax, so two seeds draw the same rows (the greedy
    continuation, EOS suppressed), while at T = 1 they differ."""
    from lowrank_compress.calibration import sample_batches

    model, tok = tiny_llama(), make_tokenizer("bos")
    kw = dict(samples=3, seq_len=10)
    cold = [sample_batches(model, tok, seed=s, temperature=1e-6, **kw) for s in (1, 2)]
    assert torch.equal(cold[0], cold[1])
    assert not torch.equal(*(sample_batches(model, tok, seed=s, **kw) for s in (1, 2)))
    ids = cold[0][:1, :1]
    with torch.no_grad():
        for _ in range(9):
            logits = model(ids).logits[0, -1]
            logits[tok.eos_token_id] = -float("inf")
            ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)
    assert torch.equal(cold[0][0], ids[0])


def test_random_start_draws_each_rows_first_token_from_the_ordinary_vocabulary() -> None:
    from lowrank_compress.calibration import sample_batches

    model, tok = tiny_llama(), make_tokenizer("bos")
    kw = dict(samples=40, seq_len=6, batch_size=16, random_start=True)
    a = sample_batches(model, tok, seed=5, **kw)
    assert torch.equal(a, sample_batches(model, tok, seed=5, **kw))  # seeded, batching included
    assert not torch.equal(a[:, 1], sample_batches(model, tok, seed=6, **kw)[:, 1])
    assert a.shape == (40, 6) and (a[:, 0] == tok.bos_token_id).all()
    firsts = a[:, 1].tolist()
    assert not set(firsts) & set(tok.all_special_ids)
    assert all(0 <= t < len(tok) for t in firsts)
    assert len(set(firsts)) >= 30  # 40 uniform draws from ~296 tokens: a handful of repeats at most


# --------------------------------------------------------------------------------------------------- mixed sets


def test_blended_statistics_of_equal_windows_are_the_pooled_statistics() -> None:
    """Two parts of equal-length windows weighted by their window counts give exactly the statistics of all windows
    at once; shared Grams (q/k) stay shared; the gradient mean is the count-weighted mean."""
    from lowrank_compress.calibration import blend_stats

    model = tiny_llama()
    batches = torch.randint(0, 300, (6, 10), generator=torch.Generator().manual_seed(2))
    names = [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.k_proj",
        "model.layers.1.mlp.down_proj",
    ]
    whole = collect_stats(model, batches, names, batch_size=2)
    a = collect_stats(model, batches[:4], names, batch_size=2, sensitivity=True)
    b = collect_stats(model, batches[4:], names, batch_size=2, sensitivity=True)
    mixed = blend_stats([(a, 4 / 6), (b, 2 / 6)])
    for n in names:
        assert mixed[n].n_tokens == 60
        assert_gram_close(mixed[n].gram, whole[n].gram)
        torch.testing.assert_close(mixed[n].abs_sum, whole[n].abs_sum, rtol=1e-9, atol=1e-9)
        expected = (a[n].out_grad_sq * 4 + b[n].out_grad_sq * 2) / 6
        assert mixed[n].out_grad_sq == pytest.approx(expected, rel=1e-12)
    assert mixed[names[0]].gram is mixed[names[1]].gram
    # only one part measured gradients: the blend takes them from it
    plain = collect_stats(model, batches[:4], names, batch_size=2)
    assert blend_stats([(plain, 0.5), (b, 0.5)])[names[2]].out_grad_sq == b[names[2]].out_grad_sq


def test_blend_weights_are_shares_of_the_statistics_whatever_the_window_length() -> None:
    """A part of short windows weighted 1/2 holds half of the per-token second moment, not a share by tokens."""
    from lowrank_compress.calibration import blend_stats

    model = tiny_llama()
    gen = torch.Generator().manual_seed(3)
    long, short = torch.randint(0, 300, (2, 24), generator=gen), torch.randint(0, 300, (2, 6), generator=gen)
    name = "model.layers.1.mlp.up_proj"
    a, b = collect_stats(model, long, [name])[name], collect_stats(model, short, [name])[name]
    mixed = blend_stats([({name: a}, 0.5), ({name: b}, 0.5)])[name]
    n = a.n_tokens + b.n_tokens
    assert mixed.n_tokens == n
    torch.testing.assert_close(mixed.gram / n, 0.5 * a.gram / a.n_tokens + 0.5 * b.gram / b.n_tokens)
    with pytest.raises(CalibrationError):
        blend_stats([({name: a}, 0.0)])


def test_window_losses_are_each_windows_mean_next_token_loss() -> None:
    model = tiny_llama(seed=4)
    batches = torch.randint(0, 300, (3, 9), generator=torch.Generator().manual_seed(4))
    name = "model.layers.0.mlp.up_proj"
    losses: list[float] = []
    stats = collect_stats(model, batches, [name], batch_size=2, losses=losses)
    with torch.no_grad():
        logits = model(input_ids=batches).logits
    expected = [float(F.cross_entropy(logits[i, :-1], batches[i, 1:])) for i in range(3)]
    assert losses == pytest.approx(expected, rel=1e-5)
    assert_gram_close(stats[name].gram, collect_stats(model, batches, [name])[name].gram)  # same statistics


def test_narrow_calibration_warning_threshold() -> None:
    import math

    from lowrank_compress.calibration import NARROW_PERPLEXITY_FACTOR, narrow_calibration_warning

    edge = math.log(NARROW_PERPLEXITY_FACTOR)
    assert narrow_calibration_warning(3.0, 3.0, 0.5) is None
    assert narrow_calibration_warning(3.0 - 0.99 * edge, 3.0, 0.5) is None
    assert narrow_calibration_warning(3.0 + 0.99 * edge, 3.0, 0.5) is None
    low = narrow_calibration_warning(
        0.1, 3.0, 0.6
    )  # repetitive text: the model predicts it far better than its own
    high = narrow_calibration_warning(9.0, 3.0, 0.5)
    assert low is not None and "more predictable" in low and "--self-mix 0.6" in low and "\n" not in low
    assert high is not None and "less predictable" in high
    assert narrow_calibration_warning(float("nan"), 3.0, 0.5) is None


def test_token_count_warning_counts_pooled_self_generated_tokens() -> None:
    from lowrank_compress.calibration import calibration_warnings

    text = torch.arange(100).reshape(2, 50)
    assert calibration_warnings(text, 64, 300)  # 100 tokens < 2 x 64
    assert not calibration_warnings(text, 64, 300, extra_tokens=40)


# --------------------------------------------------------------------------------------------------- chat calibration

# Two template styles: BOS / EOS written literally around every turn, and a Llama-3-like template that writes the
# tokenizer's BOS once through `bos_token` and closes each turn with `eos_token`.
CHAT_TEMPLATES = {
    "literal": (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant:{% endif %}"
    ),
    "variables": (
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]\n{{ m['content'] }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]\n{% endif %}"
    ),
}


def chat_tokenizer(style: str):
    tok = make_tokenizer("bos")  # a fresh object: the cached one is not modified
    tok.chat_template = CHAT_TEMPLATES[style]
    return tok


def template_ids(tok, messages, generation_prompt: bool = False) -> list[int]:
    """The tokenizer's own rendering and tokenization of a conversation (transformers' apply_chat_template)."""
    out = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    ids = out["input_ids"] if hasattr(out, "keys") else out
    return [int(i) for i in ids]


def shipped_chat_prompts() -> list[str]:
    """The built-in user prompts, read straight from the package data file."""
    import json
    from pathlib import Path

    import lowrank_compress

    path = Path(lowrank_compress.__file__).parent / "data" / "chat_prompts.jsonl"
    return [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]


def test_the_built_in_chat_prompts_are_varied_package_data() -> None:
    from lowrank_compress.calibration import chat_prompts

    prompts = shipped_chat_prompts()
    assert chat_prompts() == prompts
    assert len(prompts) >= 40 and len(set(prompts)) == len(prompts)
    assert all(10 < len(p) < 120 for p in prompts)


def test_no_built_in_chat_prompt_asks_what_the_answer_check_asks() -> None:
    """The answer check measures what compression kept, so neither calibration (the self-generated conversations)
    nor `finetune --data chat` may train on its items: no chat prompt names a subject of an answer item (a
    capitalized word after its first) or one of its answers. Allowed: Python (the code items' language), French
    and Spanish (translation targets), and words too common to be a subject (the, that, three, world)."""
    import re

    from lowrank_compress.answers import load_answer_set

    allowed = {"python", "french", "spanish", "the", "that", "three", "world"}
    subjects: set[str] = set()
    for item in load_answer_set("builtin").items:
        words = re.findall(r"[A-Za-z][A-Za-z0-9]*", item.prompt)
        subjects |= {w.lower() for w in words[1:] if w[0].isupper()}
        subjects |= {a.lower() for a in item.answers if len(a) >= 4 and a.replace(" ", "").isalpha()}
    clashes = [
        (subject, prompt)
        for prompt in shipped_chat_prompts()
        for subject in sorted(subjects - allowed)
        if re.search(rf"\b{re.escape(subject)}\b", prompt.lower())
    ]
    assert clashes == []


@pytest.mark.parametrize("style", sorted(CHAT_TEMPLATES))
def test_chat_text_windows_equal_the_tokenizers_own_chat_template_token_for_token(style: str) -> None:
    """Each text window is the conversation [user: "Continue this text:\\n\\n" + its first quarter, assistant: the
    rest], exactly as the tokenizer's apply_chat_template tokenizes it (BOS, roles, end-of-turn EOS), cut to
    seq_len; the windows are the text windows make_batches draws with the same seed (plus the extra text)."""
    from lowrank_compress.calibration import make_chat_batches, render_chat

    tok, seq_len = chat_tokenizer(style), 96
    text = sample_text()
    rows = make_chat_batches(tok, text, samples=4, seq_len=seq_len, seed=2)
    assert rows.shape == (4, seq_len) and rows.dtype == torch.long
    assert torch.equal(rows, make_chat_batches(tok, text, samples=4, seq_len=seq_len, seed=2))
    margin = max(16, seq_len // 8)
    plain = make_batches(tok, text, samples=4, seq_len=seq_len + margin + 1, seed=2)  # +1: the BOS prefix
    bos, eos = tok.bos_token_id, tok.eos_token_id
    for row, window in zip(rows.tolist(), plain.tolist(), strict=True):
        body = window[1:]
        head, rest = body[: seq_len // 4], body[seq_len // 4 :]
        user = "Continue this text:\n\n" + tok.decode(head, clean_up_tokenization_spaces=False)
        messages = [
            {"role": "user", "content": user},
            {"role": "assistant", "content": tok.decode(rest, clean_up_tokenization_spaces=False)},
        ]
        full = template_ids(tok, messages)
        assert len(full) > seq_len and row == full[:seq_len]
        # the structure: BOS first, the user turn closed by EOS, then the assistant's turn opening
        opening = template_ids(tok, messages[:1], generation_prompt=True)
        assert row[0] == bos and row[: len(opening)] == opening
        assert eos in row and row.index(eos) < len(opening)
        # one BOS per turn opened (the user's, the assistant's) in the literal template, one in all otherwise
        assert tok.decode(row).count(tok.bos_token) == (2 if style == "literal" else 1)
        # and a whole conversation renders as apply_chat_template tokenizes it
        assert render_chat(tok, messages) == full
        assert render_chat(tok, messages[:1], add_generation_prompt=True) == opening


@pytest.mark.parametrize("style", sorted(CHAT_TEMPLATES))
def test_chat_self_generated_conversations_start_with_the_templates_user_turn(style: str) -> None:
    from lowrank_compress.calibration import sample_chat_batches

    model, tok = tiny_llama(), chat_tokenizer(style)
    model.train()
    openings = {
        p: template_ids(tok, [{"role": "user", "content": p}], generation_prompt=True)
        for p in shipped_chat_prompts()
    }
    kw = dict(samples=5, seq_len=80, batch_size=2)
    a = sample_chat_batches(model, tok, seed=3, **kw)
    assert a.shape == (5, 80) and a.dtype == torch.long
    assert torch.equal(a, sample_chat_batches(model, tok, seed=3, **kw))
    assert not torch.equal(a, sample_chat_batches(model, tok, seed=4, **kw))
    asked = []
    for row in a.tolist():
        # no left padding left in the row: it opens with one prompt's user turn and the assistant's opening
        matches = [p for p, o in openings.items() if row[: len(o)] == o]
        assert len(matches) == 1, tok.decode(row[:40])
        asked.append(matches[0])
        assert row[0] == tok.bos_token_id
        answer = row[len(openings[matches[0]]) :]
        assert answer and tok.eos_token_id not in answer  # EOS suppressed: the answer fills the window
    assert len(set(asked)) == 5  # different prompts while there are prompts left
    assert model.training  # mode restored
    torch.manual_seed(0)
    x = torch.rand(3)
    torch.manual_seed(0)
    sample_chat_batches(model, tok, samples=1, seq_len=80)
    assert torch.equal(torch.rand(3), x)  # the global RNG is untouched


def test_chat_answers_suppress_the_generation_configs_end_of_turn_tokens_too() -> None:
    """A model that would always say token 5, its generation config's second end-of-turn id: the answers hold
    every ordinary token but 5 and the tokenizer's EOS."""
    from lowrank_compress.calibration import sample_chat_batches

    model, tok = tiny_llama(), chat_tokenizer("literal")
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[5] = 50.0
    model.lm_head = head
    model.generation_config.eos_token_id = [tok.eos_token_id, 5]
    rows = sample_chat_batches(model, tok, samples=3, seq_len=80, seed=0)
    prompts = shipped_chat_prompts()
    for row in rows.tolist():
        opening = next(
            o
            for o in (template_ids(tok, [{"role": "user", "content": p}], True) for p in prompts)
            if row[: len(o)] == o
        )
        answer = row[len(opening) :]
        assert answer and 5 not in answer and tok.eos_token_id not in answer
    model.generation_config.eos_token_id = tok.eos_token_id  # without the second id, token 5 is all it says
    rows = sample_chat_batches(model, tok, samples=1, seq_len=80, seed=0)
    assert rows[0, -10:].tolist() == [5] * 10


def test_chat_windows_too_short_for_the_user_turn_are_one_clear_error() -> None:
    from lowrank_compress.calibration import sample_chat_batches

    with pytest.raises(CalibrationError, match=r"--seq-len 12 leaves no room for an answer"):
        sample_chat_batches(tiny_llama(), chat_tokenizer("literal"), samples=2, seq_len=12)


@pytest.mark.parametrize("width", [5, 256, 700])
def test_add_product_sums_weighted_products_and_grams_computed_by_halves(width: int) -> None:
    """The running sums behind every Gram and cross term: total + w a^T b over batches, against numpy in float64.
    A Gram (b is a) is computed down to the diagonal and mirrored: it must still equal the full product on both sides
    (widths below, at and across the slab width)."""
    from lowrank_compress.calibration import add_product

    gen = torch.Generator().manual_seed(width)
    batches = [torch.randn(300, width, generator=gen) for _ in range(3)]
    others = [torch.randn(300, 40, generator=gen) for _ in range(3)]
    gram = cross = None
    for x, y, w in zip(batches, others, (1.0, 0.5, 2.0), strict=True):
        gram = add_product(gram, x, x, w)
        cross = add_product(cross, x, y, w)
    xs = [x.double().numpy() for x in batches]
    ys = [y.double().numpy() for y in others]
    want_gram = sum(w * x.T @ x for x, w in zip(xs, (1.0, 0.5, 2.0), strict=True))
    want_cross = sum(w * x.T @ y for x, y, w in zip(xs, ys, (1.0, 0.5, 2.0), strict=True))
    np.testing.assert_allclose(gram.numpy(), want_gram, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(cross.numpy(), want_cross, rtol=1e-5, atol=1e-3)


def _always_says(model, token: int):
    """The model with a head that puts all probability on `token`."""
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[token] = 50.0
    model.lm_head = head
    return model


def test_chat_exchanges_are_the_templates_own_multi_turn_conversations_cut_to_the_window() -> None:
    """A model that ends every answer at once: each window is, token for token, the tokenizer's own rendering of
    [user: p1, assistant: "", user: p2, assistant: "", ...] cut to seq_len, the prompts taken in the seeded order
    row after row, one round of prompts per turn."""
    from lowrank_compress.calibration import sample_chat_exchanges

    tok = chat_tokenizer("literal")
    model = _always_says(tiny_llama(), tok.eos_token_id)
    samples, seq_len = 3, 120
    rows = sample_chat_exchanges(model, tok, samples=samples, seq_len=seq_len, answer_tokens=8, seed=2)
    prompts = shipped_chat_prompts()
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(2)).tolist()
    conversations: list[list[dict[str, str]]] = [[] for _ in range(samples)]
    asked = 0

    def rendered(c: list[dict[str, str]]) -> int:
        return len(template_ids(tok, c)) if c else 0

    while any(rendered(c) < seq_len for c in conversations):
        for c in conversations:
            if rendered(c) < seq_len:
                c += [{"role": "user", "content": prompts[order[asked % len(prompts)]]}]
                asked += 1
                if len(template_ids(tok, c, True)) < seq_len:
                    c += [{"role": "assistant", "content": ""}]
    expected = [template_ids(tok, c, c[-1]["role"] == "user")[:seq_len] for c in conversations]
    assert rows.tolist() == expected
    assert all(sum(m["role"] == "user" for m in c) >= 2 for c in conversations)  # several exchanges a window


def test_answer_windows_label_each_answer_with_its_closing_tokens_and_nothing_else() -> None:
    """`sample_chat_answers`: greedy exchanges (a model that always says one token, so every answer is that token
    `answer_tokens` times), and labels that are the token ids exactly on each assistant turn as the tokenizer's own
    template renders it (from the end of the rendering that asks for the answer to the end of the one holding it)
    and -100 (ignored by the loss) on everything else: prompts, roles, system text."""
    from lowrank_compress.calibration import sample_chat_answers

    tok = chat_tokenizer("literal")
    says = tok("a", add_special_tokens=False)["input_ids"][0]
    model = _always_says(tiny_llama(), says)
    samples, seq_len = 2, 150
    rows, labels = sample_chat_answers(model, tok, samples=samples, seq_len=seq_len, answer_tokens=3, seed=1)
    prompts = shipped_chat_prompts()
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(1)).tolist()
    answer = tok.decode([says] * 3, skip_special_tokens=True)
    conversations: list[list[dict[str, str]]] = [[] for _ in range(samples)]
    spans: list[list[tuple[int, int]]] = [[] for _ in range(samples)]
    asked = 0
    while any(len(template_ids(tok, c)) < seq_len for c in conversations if c) or not conversations[0]:
        for c, row_spans in zip(conversations, spans, strict=True):
            if c and len(template_ids(tok, c)) >= seq_len:
                continue
            c.append({"role": "user", "content": prompts[order[asked % len(prompts)]]})
            asked += 1
            asking = template_ids(tok, c, True)
            if len(asking) < seq_len:
                c.append({"role": "assistant", "content": answer})
                full = template_ids(tok, c)
                assert full[: len(asking)] == asking  # this template only grows, so the span is unambiguous
                row_spans.append((len(asking), min(len(full), seq_len)))
    expected = torch.full((samples, seq_len), -100)
    for i, c in enumerate(conversations):
        ids = template_ids(tok, c, c[-1]["role"] == "user")[:seq_len]
        assert rows[i].tolist() == ids
        for start, end in spans[i]:
            expected[i, start:end] = torch.tensor(ids[start:end])
    assert torch.equal(labels, expected)
    assert all(len(row_spans) >= 2 for row_spans in spans)  # several answers a window
    for i, row_spans in enumerate(spans):  # each labelled span is one answer and its turn's end
        for start, end in row_spans[:-1]:
            text = tok.decode(rows[i, start:end].tolist())
            assert text.strip().startswith(answer) and text.endswith("</s>") and "user" not in text


def test_chat_exchanges_cap_each_answer_are_seeded_and_leave_the_rng_and_mode_alone() -> None:
    from lowrank_compress.calibration import sample_chat_exchanges

    tok = chat_tokenizer("literal")
    model = tiny_llama()
    model.train()
    kw = dict(samples=3, seq_len=240, answer_tokens=4)
    a = sample_chat_exchanges(model, tok, seed=1, **kw)
    assert a.shape == (3, 240)
    assert torch.equal(a, sample_chat_exchanges(model, tok, seed=1, **kw))
    assert not torch.equal(a, sample_chat_exchanges(model, tok, seed=2, **kw))
    for row in a.tolist():  # at most 4 answer tokens per turn: several user turns fit
        assert tok.decode(row).count("user:") >= 3
    assert model.training
    torch.manual_seed(0)
    x = torch.rand(3)
    torch.manual_seed(0)
    sample_chat_exchanges(model, tok, samples=1, seq_len=60, answer_tokens=2)
    assert torch.equal(torch.rand(3), x)
    with pytest.raises(CalibrationError, match="at least 1"):
        sample_chat_exchanges(model, tok, samples=1, seq_len=60, answer_tokens=0)
