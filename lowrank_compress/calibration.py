"""Calibration batches and the per-layer statistics that activation-aware factorizations need.

`make_batches` cuts token windows from a text; `collect_stats` runs them through the model with hooks on the
target layers and accumulates, per layer, the input Gram matrix X^T X (SVD-LLM whitening), the mean absolute input
per channel (ASVD), and optionally squared loss gradients (FWSVD Fisher rows, per-layer sensitivity).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowrank_compress.errors import CalibrationError, LowrankError
from lowrank_compress.modules import LowRankLinear, is_conv1d

ProgressFn = Callable[[int, int], None]
_CHUNK_CHARS = 64_000


# --------------------------------------------------------------------------------------------------- tokenization


def special_affixes(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text when encoding (BOS, or [CLS] ... [SEP]).

    Found by encoding a probe with and without special tokens, because flags such as `add_bos_token` are not
    reliable across tokenizer classes (a fast tokenizer with a BOS template reports add_bos_token=False).
    """
    probe = "Hello world"
    with quiet_transformers():
        plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
        full = list(tokenizer(probe)["input_ids"])
    n = len(plain)
    for start in range(len(full) - n + 1):
        if full[start : start + n] == plain:
            return full[:start], full[start + n :]
    # The text itself tokenized differently (rare); fall back on the declared BOS.
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and full[:1] == [bos] and plain[:1] != [bos]:
        return [bos], []
    return [], []


def tokenize_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of the whole text without special tokens.

    Long texts are tokenized in chunks of about 64k characters cut just after a line break, so the result can
    differ from a single call by a token at each chunk boundary (at most one boundary per 64k characters).
    """
    chunks = list(_chunks(text, _CHUNK_CHARS))
    if not chunks:
        return []
    with quiet_transformers():
        encoded = tokenizer(chunks, add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    for piece in encoded:
        ids.extend(int(i) for i in piece)
    return ids


def _chunks(text: str, size: int) -> Iterator[str]:
    start = 0
    while start < len(text):
        end = min(start + size, len(text))
        if end < len(text):
            nl = text.rfind("\n", start, end)
            if nl > start:
                end = nl + 1
        yield text[start:end]
        start = end


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' chatter (load reports, weight-loading progress bars, the 'sequence longer than the
    model maximum' warning: we cut windows ourselves); our own progress bars say what is happening."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


# --------------------------------------------------------------------------------------------------- batches


def min_tokens_needed(samples: int, body_len: int) -> int:
    """Text tokens needed for `samples` distinct windows of `body_len` text tokens: body_len + samples - 1.

    That is the least text with `samples` distinct start offsets. Windows overlap when the text holds fewer
    than samples * body_len tokens; with more, they never overlap.
    """
    return body_len + samples - 1


def make_batches(tokenizer: Any, text: str, *, samples: int, seq_len: int, seed: int = 0) -> torch.LongTensor:
    """`samples` x `seq_len` token windows from `text`, at offsets drawn from a generator seeded with `seed`.

    Each row is the tokenizer's special prefix (BOS, or [CLS]), then `seq_len - len(prefix) - len(suffix)`
    consecutive text tokens, then its special suffix ([SEP] for BERT-style tokenizers, usually nothing), so the
    model sees its inputs as it does in use. Rows are in text order.

    Offsets: when the text holds at least `samples` non-overlapping windows, the windows are placed at random
    without overlap (random gaps between consecutive windows); otherwise `samples` distinct offsets are drawn at
    random and windows overlap. Fewer than `min_tokens_needed` text tokens is a `CalibrationError`.
    """
    if samples < 1:
        raise CalibrationError(f"calibration samples must be at least 1, got {samples}")
    prefix, suffix = special_affixes(tokenizer)
    body = seq_len - len(prefix) - len(suffix)
    if body < 1:
        raise CalibrationError(
            f"calibration sequence length {seq_len} leaves no room for text after the tokenizer's "
            f"{len(prefix) + len(suffix)} special token(s); use a longer --seq-len"
        )
    ids = tokenize_text(tokenizer, text)
    n = len(ids)
    need = min_tokens_needed(samples, body)
    if n < need:
        raise CalibrationError(
            f"calibration text has {n} tokens but {samples} windows of {seq_len} tokens need at least {need}; "
            "pass more text, or lower --samples / --seq-len"
        )
    gen = torch.Generator().manual_seed(seed)
    slack = n - samples * body
    if slack >= 0:
        # Non-overlapping: window k starts at k * body + gap_k with 0 <= gap_0 <= ... <= gap_{samples-1} <= slack.
        gaps = torch.sort(torch.randint(0, slack + 1, (samples,), generator=gen)).values
        starts = gaps + torch.arange(samples) * body
    else:
        starts = torch.sort(torch.randperm(n - body + 1, generator=gen)[:samples]).values
    tokens = torch.tensor(ids, dtype=torch.long)
    rows = [
        torch.cat(
            [
                torch.tensor(prefix, dtype=torch.long),
                tokens[s : s + body],
                torch.tensor(suffix, dtype=torch.long),
            ]
        )
        for s in starts.tolist()
    ]
    return torch.stack(rows)


SELF = "self"
"""--calibration self: windows sampled from the model itself."""


def _sampling_prefix(tokenizer: Any) -> list[int]:
    """What every self-generated row opens with: the special prefix (BOS), or without one the end-of-text token
    that separates documents in training."""
    prefix, _ = special_affixes(tokenizer)
    if prefix:
        return prefix
    start = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    if start is None:
        raise CalibrationError(
            "the tokenizer has no BOS or EOS token to start self-generated calibration from; pass a text"
        )
    return [int(start)]


def _ordinary_tokens(model: nn.Module, tokenizer: Any, samples: int, seed: int) -> torch.LongTensor:
    """`samples` tokens drawn uniformly (seeded) from the ordinary, non-special vocabulary."""
    vocab = min(len(tokenizer), int(getattr(model.config, "vocab_size", None) or len(tokenizer)))
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    ordinary = torch.tensor([i for i in range(vocab) if i not in special], dtype=torch.long)
    return ordinary[torch.randint(len(ordinary), (samples,), generator=torch.Generator().manual_seed(seed))]


def _sampling_config(
    tokenizer: Any, new: int, temperature: float, stops: list[int], full_length: bool = True
) -> Any:
    """Plain ancestral sampling of `new` tokens (no top-k / top-p truncation: the samples keep the model's full
    distribution); greedy decoding at temperature 0. `full_length`: the `stops` tokens are suppressed, so every row
    has all `new` tokens; else a row ends at its first stop token (and is padded after it)."""
    from transformers import GenerationConfig

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    sampled = dict(temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else {}
    return GenerationConfig(
        **sampled, do_sample=temperature > 0, max_new_tokens=new,
        min_new_tokens=new if full_length else 0, pad_token_id=pad, eos_token_id=stops or None, use_cache=True,
    )  # fmt: skip


def left_padded(openings: Sequence[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows of different lengths as one batch, padded on the left so every row ends where generation starts;
    with the attention mask that hides the padding."""
    width = max(len(o) for o in openings)
    ids = torch.tensor([[pad] * (width - len(o)) + list(o) for o in openings], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(o)) + [1] * len(o) for o in openings], dtype=torch.long)
    return ids, mask


@contextlib.contextmanager
def contiguous_head_input(model: nn.Module) -> Iterator[None]:
    """While generating, the output head gets a contiguous copy of its input. `generate` hands it a strided view
    (each row's last position), and torch's CPU matmul at bfloat16 then copies the head's weight once per row: at
    the Llama-7B shape with a 49k vocabulary, 16 rows took 6 GB more at the prefill. The copy it gets instead is
    rows x hidden."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    if head is None:
        yield
        return
    handle = head.register_forward_pre_hook(
        lambda module, args: tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)
    )
    try:
        yield
    finally:
        handle.remove()


def _generate_seeded(
    model: nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    config: Any,
    *,
    seed: int,
    device: str,
    progress: ProgressFn | None,
) -> list[torch.Tensor]:
    """`model.generate` on each (input ids, attention mask) batch in turn, on the CPU afterwards. Seeded once before
    the first batch; the global RNG and the model's train/eval mode are left as they were."""
    from lowrank_compress.kv_cache import preallocated_cache

    outs = []
    training = model.training
    model.eval()
    try:
        # the sampling draws from the device's generator: fork it too, so the caller's random state is left as it was
        cuda = [torch.device(device)] if torch.device(device).type == "cuda" else []
        with torch.random.fork_rng(devices=cuda), torch.inference_mode(), contiguous_head_input(model):
            torch.manual_seed(seed)
            for done, (ids, mask) in enumerate(batches, start=1):
                cache = preallocated_cache(model, ids.shape[1] + config.max_new_tokens)  # same tokens, faster
                with quiet_transformers():
                    out = model.generate(
                        input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config, **cache
                    )  # fmt: skip
                outs.append(out.cpu())
                if progress is not None:
                    progress(done, len(batches))
    finally:
        model.train(training)
    return outs


def sample_batches(
    model: nn.Module,
    tokenizer: Any,
    *,
    samples: int,
    seq_len: int,
    seed: int = 0,
    temperature: float = 1.0,
    random_start: bool = False,
    batch_size: int = 8,
    device: str = "cpu",
    progress: ProgressFn | None = None,
) -> torch.LongTensor:
    """`samples` x `seq_len` token windows sampled from the model: calibration that follows the model's own
    distribution and needs no data.

    Each row starts with the tokenizer's special prefix (BOS), or, without one, with the end-of-text token that
    separates documents in training; then plain ancestral sampling (temperature 1: no top-k/top-p truncation, so
    the samples keep the model's full distribution) with EOS suppressed, so every row is full length. Seeded:
    the same model, seed and sizes give the same tokens.

    random_start: the token after the prefix is drawn uniformly from the ordinary (non-special) vocabulary, as
    LLM-QAT does for data-free calibration: the rows open in more varied ways than from the bare prefix, so they
    spread wider over what the model writes (benchmarks/bench_cross_domain.py measures the effect).
    """
    if samples < 1 or seq_len < 2:
        raise CalibrationError(
            f"self calibration needs samples >= 1 and seq-len >= 2, got {samples} x {seq_len}"
        )
    prefix = _sampling_prefix(tokenizer)
    new = seq_len - len(prefix) - int(random_start)
    if new < 1:
        raise CalibrationError(
            f"--seq-len {seq_len} leaves no room to sample after the {len(prefix)}-token prefix"
        )
    starts = _ordinary_tokens(model, tokenizer, samples, seed) if random_start else None
    config = _sampling_config(tokenizer, new, temperature, stops=stop_ids(tokenizer))
    batches = []
    for first in range(0, samples, batch_size):
        ids = torch.tensor([prefix] * min(batch_size, samples - first), dtype=torch.long)
        if starts is not None:
            ids = torch.cat([ids, starts[first : first + len(ids), None]], dim=1)
        batches.append((ids, torch.ones_like(ids)))
    outs = _generate_seeded(model, batches, config, seed=seed, device=device, progress=progress)
    return torch.cat([out[:, :seq_len] for out in outs])


# --------------------------------------------------------------------------------------------------- chat calibration

CHAT_PROMPTS_FILE = "chat_prompts.jsonl"
"""The built-in user turns that open the self-generated conversations (package data, one {"prompt": ...} a line):
varied everyday requests (facts, explanations, writing, code, arithmetic, advice)."""

CONTINUE_PROMPT = "Continue this text:\n\n{head}"
"""The user turn of a calibration text window wrapped as a conversation: it quotes the window's first quarter; the
assistant's turn continues with the rest of the window's text."""


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer carries a chat template (instruct models do; base models usually not)."""
    return bool(getattr(tokenizer, "chat_template", None))


def chat_prompts() -> list[str]:
    """The built-in user prompts for self-generated conversations."""
    import json
    from importlib import resources

    text = resources.files("lowrank_compress").joinpath("data", CHAT_PROMPTS_FILE).read_text(encoding="utf-8")
    return [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()]


def render_chat(
    tokenizer: Any, messages: list[dict[str, str]], *, add_generation_prompt: bool = False
) -> list[int]:
    """Token ids of a conversation through the tokenizer's chat template: the template writes every special token
    (BOS, role markers, end of turn), so the text is tokenized without adding any more."""
    with quiet_transformers():
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def chat_window_messages(tokenizer: Any, body: Sequence[int], head_len: int) -> list[dict[str, str]]:
    """A text window as a conversation: the user asks to continue its first `head_len` tokens (`CONTINUE_PROMPT`),
    the assistant answers with the rest."""
    decode = functools.partial(
        tokenizer.decode, skip_special_tokens=False, clean_up_tokenization_spaces=False
    )
    return [
        {"role": "user", "content": CONTINUE_PROMPT.format(head=decode(list(body[:head_len])))},
        {"role": "assistant", "content": decode(list(body[head_len:]))},
    ]


def stop_ids(tokenizer: Any, model: Any = None) -> list[int]:
    """Every token that ends a turn, sorted: the tokenizer's EOS and the EOS ids (one or a list) of the model's
    generation config (Llama 3 ends turns with <|eot_id|>, not the tokenizer's EOS)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [*(eos if isinstance(eos, list) else [eos]), getattr(tokenizer, "eos_token_id", None)]
    return sorted({int(i) for i in ids if i is not None})


def make_chat_batches(
    tokenizer: Any, text: str, *, samples: int, seq_len: int, seed: int = 0
) -> torch.LongTensor:
    """`make_batches` for a chat model: each text window becomes a conversation (`chat_window_messages`: the user
    quotes the window's first quarter and asks to continue, the assistant continues with the rest), rendered through
    the tokenizer's chat template, and cut to its first `seq_len` tokens. Windows are drawn with some extra text
    (an eighth, at least 16 tokens) so the rendered conversation always fills `seq_len`: the assistant's answer runs
    to the window's end, like an excerpt of a long answer. Same offsets and seed rules as `make_batches`."""
    margin = max(16, seq_len // 8)
    prefix, suffix = special_affixes(tokenizer)
    drawn = make_batches(
        tokenizer, text, samples=samples, seq_len=seq_len + margin + len(prefix) + len(suffix), seed=seed
    )
    rows = []
    for row in drawn.tolist():
        body = row[len(prefix) : len(row) - len(suffix)]
        ids = render_chat(tokenizer, chat_window_messages(tokenizer, body, max(1, seq_len // 4)))
        if len(ids) < seq_len:
            raise CalibrationError(
                f"a calibration window rendered through the chat template has {len(ids)} tokens, under --seq-len "
                f"{seq_len}; use --no-chat"
            )
        rows.append(ids[:seq_len])
    return torch.tensor(rows, dtype=torch.long)


def sample_chat_batches(
    model: nn.Module,
    tokenizer: Any,
    *,
    samples: int,
    seq_len: int,
    seed: int = 0,
    temperature: float = 1.0,
    batch_size: int = 8,
    free: int = 0,
    random_start: bool = True,
    device: str = "cpu",
    progress: ProgressFn | None = None,
) -> torch.LongTensor:
    """`samples` x `seq_len` conversations sampled from a chat model: each row is a built-in user prompt
    (`chat_prompts`, a seeded permutation, so rows ask different things while there are prompts left) rendered
    through the chat template with the assistant's opening, then the model's own answer by plain ancestral sampling
    (temperature 1, EOS suppressed so every row is full length: the answer runs to the window's end).

    `free`: the last `free` rows are free text instead, opened as `sample_batches` opens its rows (the sampling
    prefix, then with `random_start` a uniformly drawn ordinary token), sampled in the same batches as the
    conversations (two generations of half the rows each took 1.5 times one of them all on SmolLM2 on the CPU).
    Batched with left padding, which is removed from the rows. Seeded, and the global RNG is left untouched."""
    prompts = chat_prompts()
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed)).tolist()
    openings = [
        render_chat(tokenizer, [{"role": "user", "content": prompts[order[i % len(prompts)]]}], add_generation_prompt=True)
        for i in range(samples - free)
    ]  # fmt: skip
    if free:
        prefix = _sampling_prefix(tokenizer)
        starts = _ordinary_tokens(model, tokenizer, free, seed).tolist() if random_start else [None] * free
        openings += [prefix + ([] if t is None else [t]) for t in starts]
    longest = max(len(o) for o in openings)
    if longest >= seq_len:
        raise CalibrationError(
            f"--seq-len {seq_len} leaves no room for an answer after the chat template's user turn ({longest} "
            "tokens); use a longer --seq-len (or --self-seq-len)"
        )
    new = seq_len - min(len(o) for o in openings)
    # every end-of-turn token is suppressed, the generation config's too (Llama 3 ends turns with <|eot_id|>, not
    # the tokenizer's EOS), so the answer runs on instead of opening a turn the window never asked for
    config = _sampling_config(tokenizer, new, temperature, stops=stop_ids(tokenizer, model))
    firsts = range(0, samples, batch_size)
    batches = [left_padded(openings[first : first + batch_size], config.pad_token_id) for first in firsts]
    outs = _generate_seeded(model, batches, config, seed=seed, device=device, progress=progress)
    rows = []
    for out, (ids, _), first in zip(outs, batches, firsts, strict=True):
        for k, o in enumerate(openings[first : first + batch_size]):  # the row without its left padding
            rows.append(out[k, ids.shape[1] - len(o) : ids.shape[1] - len(o) + seq_len])
    return torch.stack(rows)


def sample_chat_exchanges(
    model: nn.Module,
    tokenizer: Any,
    *,
    samples: int,
    seq_len: int,
    answer_tokens: int,
    seed: int = 0,
    temperature: float = 1.0,
    device: str = "cpu",
    progress: ProgressFn | None = None,
) -> torch.LongTensor:
    """`samples` x `seq_len` multi-turn conversations sampled from a chat model: each row asks a built-in prompt
    (`chat_prompts`, a seeded permutation), the model answers until its end of turn (or `answer_tokens` tokens), the
    next prompt follows, and so on until the rendered conversation fills `seq_len` (cut there). Unlike
    `sample_chat_batches`, whose one answer runs on past its end, the windows hold many answers as users see them,
    each opening and ending as it does in use. Every row is re-rendered through the chat template after each turn.
    All rows sample as one batch per round; seeded, and the global RNG is left untouched."""
    rows, _ = _exchanges(
        model, tokenizer, samples=samples, seq_len=seq_len, answer_tokens=answer_tokens, seed=seed,
        temperature=temperature, device=device, progress=progress,
    )  # fmt: skip
    return rows


ANSWER_TOKENS = 64
"""The longest answer of the answer windows (`sample_chat_answers`); most of the built-in prompts' greedy answers
end before it on SmolLM2-Instruct."""


def sample_chat_answers(
    model: nn.Module, tokenizer: Any, *, samples: int, seq_len: int, answer_tokens: int, seed: int = 0,
    device: str = "cpu",
) -> tuple[torch.LongTensor, torch.LongTensor]:  # fmt: skip
    """The model's own answers, as a chat user gets them: `sample_chat_exchanges` decoded greedily, with labels for
    a next-token loss on the answers alone (each assistant turn with its end of turn; the prompts, roles and system
    text are -100, which the loss ignores). The loss gradients of these windows measure what the model's answers
    depend on, not how well it predicts text."""
    rows, spans = _exchanges(
        model, tokenizer, samples=samples, seq_len=seq_len, answer_tokens=answer_tokens, seed=seed,
        temperature=0.0, device=device, progress=None,
    )  # fmt: skip
    labels = torch.full_like(rows, -100)
    for i, row_spans in enumerate(spans):
        for start, end in row_spans:
            labels[i, start:end] = rows[i, start:end]
    return rows, labels


def _exchanges(
    model: nn.Module, tokenizer: Any, *, samples: int, seq_len: int, answer_tokens: int, seed: int,
    temperature: float, device: str, progress: ProgressFn | None,
) -> tuple[torch.LongTensor, list[list[tuple[int, int]]]]:  # fmt: skip
    """`sample_chat_exchanges`'s rows, with each row's answer spans [start, end) in its tokens: from where the
    rendering with the answer leaves the rendering that asked for it (the assistant's opening) to the end of the
    template's tokens that close the turn, cut at `seq_len`."""
    if answer_tokens < 1:
        raise CalibrationError(f"--self-answer-tokens must be at least 1, got {answer_tokens}")
    prompts = chat_prompts()
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed)).tolist()
    stops = stop_ids(tokenizer, model)
    stop_set = set(stops)
    conversations: list[list[dict[str, str]]] = [[] for _ in range(samples)]
    rendered: list[list[int]] = [[] for _ in range(samples)]
    spans: list[list[tuple[int, int]]] = [[] for _ in range(samples)]
    asked = 0
    for turn in itertools.count(1):
        open_rows = [i for i in range(samples) if len(rendered[i]) < seq_len]
        for i in open_rows:  # rows take the next prompts in turn, so rows ask different things
            conversations[i].append({"role": "user", "content": prompts[order[asked % len(prompts)]]})
            asked += 1
            rendered[i] = render_chat(tokenizer, conversations[i], add_generation_prompt=True)
        open_rows = [i for i in open_rows if len(rendered[i]) < seq_len]  # a user turn may fill the window
        if not open_rows:
            break
        room = seq_len - min(len(rendered[i]) for i in open_rows)
        config = _sampling_config(tokenizer, min(answer_tokens, room), temperature, stops, full_length=False)
        batch = left_padded([rendered[i] for i in open_rows], config.pad_token_id)
        (out,) = _generate_seeded(
            model, [batch], config, seed=seed * 1009 + turn, device=device, progress=None
        )
        for k, i in enumerate(open_rows):
            answer = out[k, batch[0].shape[1] :].tolist()
            ends = [j for j, t in enumerate(answer) if t in stop_set]
            text = tokenizer.decode(answer[: ends[0] if ends else len(answer)], skip_special_tokens=True)
            conversations[i].append({"role": "assistant", "content": text})
            before, rendered[i] = rendered[i], render_chat(tokenizer, conversations[i])
            spans[i].append((_common_prefix(before, rendered[i]), min(len(rendered[i]), seq_len)))
        if progress is not None:
            progress(samples - sum(len(r) < seq_len for r in rendered), samples)
    return torch.tensor([r[:seq_len] for r in rendered], dtype=torch.long), spans


def _common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two renderings share."""
    return next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def calibration_warnings(
    batches: torch.Tensor, max_in_features: int, vocab_size: int | None, *, extra_tokens: int = 0
) -> list[str]:
    """Why a calibration set may be too small or too narrow to trust, as sentences (empty: nothing to say).

    - Fewer tokens (`batches` plus `extra_tokens`, e.g. self-generated windows pooled with them) than twice the
      widest layer input: its Gram X^T X is (nearly) rank-deficient, the whitening leans on the ridge, and the
      factors fit the few directions the text happened to excite.
    - Few distinct tokens in `batches` (under 5% of what they could hold: min(tokens, vocabulary)): repetitive text
      whose statistics describe a sliver of what the model will see.
    """
    n = int(batches.numel())
    total = n + extra_tokens
    notes = []
    if total < 2 * max_in_features:
        notes.append(
            f"only {total} calibration tokens for layers with up to {max_in_features} inputs: their input statistics "
            "are rank-deficient; use more text (--samples, --seq-len)"
        )
    distinct = int(torch.unique(batches).numel())
    room = min(n, vocab_size) if vocab_size else n
    if room > 0 and distinct < 0.05 * room:
        notes.append(
            f"the calibration text is repetitive: {distinct} distinct tokens in {n}; the factors will fit it and "
            "little else; use varied text"
        )
    return notes


NARROW_PERPLEXITY_FACTOR = 4.0
"""How far (either way) the model's perplexity on the calibration text may be from its perplexity on its own
samples before factorize calls the text narrow.

Temperature-1 samples score at the model's own entropy rate, the perplexity of "what it usually sees". Measured on
SmolLM2-135M (windows of 512): its own samples 33-57, the Python reference 12.8, Bierce's fiction 50; ordinary prose
and documentation stay within a factor of about 4. Repetitive or templated text scores near 1 and random or
foreign-script text in the hundreds to thousands: those are tens of times off, far outside 4x. A looser factor would
miss boilerplate-heavy sets; a tighter one would flag ordinary technical text.
"""


def narrow_calibration_warning(text_loss: float, self_loss: float, self_mix: float) -> str | None:
    """A warning when the model's perplexity on the calibration text (exp of its mean token loss `text_loss`) is more
    than `NARROW_PERPLEXITY_FACTOR` times above or below its perplexity on its own samples; None otherwise.
    `self_mix` is the samples' share of the pooled statistics, which the advice mentions."""
    if not (math.isfinite(text_loss) and math.isfinite(self_loss)):
        return None
    if abs(text_loss - self_loss) <= math.log(NARROW_PERPLEXITY_FACTOR):
        return None
    text_ppl, self_ppl = math.exp(text_loss), math.exp(self_loss)
    kind = "far more predictable" if text_ppl < self_ppl else "far less predictable"
    return (
        f"the calibration text is {kind} to the model than its own samples (perplexity {text_ppl:.3g} vs "
        f"{self_ppl:.3g}): it is narrow, and the factors fit it at the expense of other text (the model's samples, "
        f"--self-mix {self_mix:g} of the statistics, offset part of that); use text like what the model will see"
    )


def blend_stats(parts: Sequence[tuple[dict[str, LayerStats], float]]) -> dict[str, LayerStats]:
    """Statistics of several calibration sets (each with a weight) pooled as one.

    Each part's sums are divided by its token count before they are weighted, so a weight is the share of the
    statistics that part holds whatever its window length; the result is scaled back to the total token count, so it
    reads like plain sums (for parts of equal-length windows weighted by their window counts it is the pooled sum).
    Gradient statistics come from the parts that measured them (fisher_rows treated like the Gram; out_grad_sq, a
    mean, as the weight-averaged mean). Layers that shared one Gram in
    every part share one blended Gram.
    """
    parts = [(stats, w) for stats, w in parts if w > 0]
    if not parts:
        raise CalibrationError("no calibration statistics to blend (every weight is 0)")
    total_w = sum(w for _, w in parts)
    names = list(parts[0][0])
    shared: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
    out: dict[str, LayerStats] = {}
    for name in names:
        layer = [(stats[name], w / total_w) for stats, w in parts]
        n_total = sum(st.n_tokens for st, _ in layer)
        key = tuple(id(st.gram) for st, _ in layer)
        if key not in shared:
            gram = sum(st.gram * (w * n_total / st.n_tokens) for st, w in layer)
            summed = [st.abs_sum * (w * n_total / st.n_tokens) for st, w in layer if st.abs_sum is not None]
            abs_sum = sum(summed) if len(summed) == len(layer) else None
            crosses = [st.cross * (w * n_total / st.n_tokens) for st, w in layer if st.cross is not None]
            if crosses and len(crosses) != len(layer):
                raise CalibrationError("internal: only some calibration parts have error-aware statistics")
            shared[key] = (gram, abs_sum, sum(crosses) if crosses else None)  # type: ignore[assignment]
        gram, abs_sum, cross = shared[key]
        fisher, grad, channels = blend_gradients(layer)
        out[name] = LayerStats(gram, abs_sum, n_total, fisher, grad, channels, cross)  # type: ignore[arg-type]
    return out


def blend_gradients(
    layer: Sequence[tuple[LayerStats, float]],
) -> tuple[torch.Tensor | None, float | None, torch.Tensor | None]:
    """One layer's gradient statistics (fisher_rows, out_grad_sq, out_grad_channels) pooled over the parts that
    measured them, with the parts' weights (summing to 1 over all parts); see `blend_stats`."""
    n_total = sum(st.n_tokens for st, _ in layer)
    rows = [(st, w) for st, w in layer if st.fisher_rows is not None]
    fisher = None
    if rows:
        norm = n_total / sum(w for _, w in rows)
        fisher = sum(st.fisher_rows * (w * norm / st.n_tokens) for st, w in rows)  # type: ignore[operator]
    measured = [(st.out_grad_sq, w) for st, w in layer if st.out_grad_sq is not None]
    grad = sum(g * w for g, w in measured) / sum(w for _, w in measured) if measured else None
    per_channel = [(st.out_grad_channels, w) for st, w in layer if st.out_grad_channels is not None]
    channels = sum(c * w for c, w in per_channel) / sum(w for _, w in per_channel) if per_channel else None
    return fisher, grad, channels  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------- statistics


@dataclass
class LayerStats:
    """What one layer saw during calibration. Sums, not means, so statistics of several runs can be added.

    Layers that read the same tensor (q/k/v, gate/up) share the same `gram` and `abs_sum` objects: treat them as
    read-only.
    """

    # (in x in) float64 (float32 where the fit runs in float32, `factorize.fit_dtype`): sum over calibration tokens
    # of x x^T, x = the layer's input
    gram: torch.Tensor
    # (in,) float64: sum of |x| per input channel (ASVD's activation magnitude); None where it was not summed (the
    # block-sequential pipeline sums it for the asvd method alone)
    abs_sum: torch.Tensor | None
    n_tokens: int
    # (out,) float64: sum over batches of the squared weight gradient, summed per output row (FWSVD)
    fisher_rows: torch.Tensor | None = None
    # mean squared loss gradient w.r.t. the layer output, per element (sensitivity)
    out_grad_sq: float | None = None
    # (out,) float64: the same per output channel (its mean is out_grad_sq): the loss-weighted fit's row weights
    out_grad_channels: torch.Tensor | None = None
    # (in x in) in `gram`'s dtype, error-aware fitting only: sum of x x'^T, x the layer's input in the dense model
    # and x' its input when the block is fed the compressed prefix's hidden states; `gram` and `abs_sum` then
    # describe x'
    cross: torch.Tensor | None = None
    # (out x in) in `gram`'s dtype, error-aware fitting only, in place of `cross` for a layer with fewer outputs
    # than inputs (down_proj: 4096 x 11008 rather than 11008^2): W times the cross term, summed directly as
    # sum of (W x) x'^T
    weighted_cross: torch.Tensor | None = None


def _resolve_modules(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    found: dict[str, nn.Module] = {}
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError as e:
            raise LowrankError(
                f"calibration target {name!r} is not a module of this model; check the layer name"
            ) from e
        if not (isinstance(module, (nn.Linear, LowRankLinear)) or is_conv1d(module)):
            raise LowrankError(
                f"calibration target {name!r} is a {type(module).__name__}, not a Linear layer; "
                "target only Linear (or GPT-2 Conv1D) layers"
            )
        found[name] = module
    return found


def _has_lm_head(model: nn.Module) -> bool:
    get = getattr(model, "get_output_embeddings", None)
    return callable(get) and get() is not None


class _InputSums:
    """Running input sums, shared by the layers that read the same tensor (q/k/v, gate/up): one Gram, not three."""

    def __init__(self, dtype: torch.dtype = torch.float64, abs_sums: bool = True) -> None:
        """`abs_sums`: also sum |x| (only the asvd method reads it; it costs a third of a Gram's time)."""
        self.gram: torch.Tensor | None = None
        self.abs_sum: torch.Tensor | None = None
        self.n_tokens = 0
        self.dtype = dtype
        self.abs_sums = abs_sums

    def add(self, x: torch.Tensor, weight: float = 1.0) -> None:
        """Add a batch's sums, multiplied by `weight` (a calibration part's share, see `BlockStatistics.add`).

        The product runs in float32 (twice as fast as float64 on CPUs, and a batch has only thousands of rows);
        the running sums are in `dtype`: float64 by default, so accuracy does not decay with the number of batches,
        float32 where the fit that reads them runs in float32 anyway (`factorize.fit_dtype`)."""
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        self.gram = add_product(self.gram, flat, flat, weight, self.dtype)
        if self.abs_sums:
            abs_sum = flat.abs().sum(0, dtype=torch.float64).mul_(weight)
            self.abs_sum = abs_sum if self.abs_sum is None else self.abs_sum.add_(abs_sum)
        self.n_tokens += flat.shape[0]


PRODUCT_COLUMNS = 1024
"""Columns of a^T b computed at a time by `add_product`."""
GRAM_COLUMNS = 256
"""Columns of a Gram computed at a time: narrower slabs skip more of the half below the diagonal (on 2 cores a
1536-wide Gram of 2048 rows took 40 ms in slabs of 256, 48 ms in slabs of 1024, 62 ms as one product)."""


def add_product(
    total: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, weight: float = 1.0,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:  # fmt: skip
    """`total + weight a^T b` in place (a new `dtype` total when `total` is None), the product taken in float32 a
    slab of columns at a time: a whole float32 product and its float64 copy would add 1.5x the Gram (1.4 GB for a
    11008-wide layer) for a moment.

    A Gram (`b is a`) is symmetric: each slab computes only the rows down to its diagonal block and mirrors them, half
    the multiplications."""
    if total is None:
        total = torch.zeros(a.shape[1], b.shape[1], dtype=dtype, device=a.device)
    step = GRAM_COLUMNS if b is a else PRODUCT_COLUMNS
    for j in range(0, b.shape[1], step):
        end = min(j + step, b.shape[1])
        if b is not a:
            total[:, j:end].add_(a.T @ b[:, j:end], alpha=weight)
            continue
        upper = a[:, :end].T @ a[:, j:end]  # rows 0..end of the slab: above and on the diagonal block
        total[:end, j:end].add_(upper, alpha=weight)
        total[j:end, :j].add_(upper[:j].T, alpha=weight)
    return total


class OutputGrads:
    """The squared loss gradient at one layer's output, summed per output channel over the positions seen: the
    sensitivity is its mean, the loss-weighted fit's row weights its per-channel means."""

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None
        self.positions = 0

    def add(self, g: torch.Tensor) -> None:
        sq = g.detach().to(torch.float64).pow(2).reshape(-1, g.shape[-1])
        self.sums = sq.sum(0) if self.sums is None else self.sums + sq.sum(0)
        self.positions += sq.shape[0]

    def channels(self) -> torch.Tensor | None:
        return self.sums.cpu() / self.positions if self.sums is not None and self.positions else None

    def mean(self) -> float | None:
        channels = self.channels()
        return float(channels.mean()) if channels is not None else None


class _Accumulator:
    """Running sums for one layer: its (possibly shared) input sums and its own gradient statistics."""

    def __init__(self) -> None:
        self.inputs: _InputSums | None = None
        self.fisher_rows: torch.Tensor | None = None
        self.grads = OutputGrads()

    def stats(self) -> LayerStats:
        sums = self.inputs
        if sums is None or sums.gram is None or sums.abs_sum is None:
            raise LowrankError(
                "a calibration target was never called during the forward pass; is it a used layer?"
            )
        fisher = self.fisher_rows.cpu() if self.fisher_rows is not None else None
        grads = self.grads
        return LayerStats(
            sums.gram.cpu(), sums.abs_sum.cpu(), sums.n_tokens, fisher, grads.mean(), grads.channels()
        )


def collect_stats(
    model: nn.Module,
    batches: torch.Tensor,
    modules: Sequence[str],
    *,
    batch_size: int = 4,
    fisher: bool = False,
    sensitivity: bool = False,
    grad_samples: int | None = None,
    progress: ProgressFn | None = None,
    device: str = "cpu",
    losses: list[float] | None = None,
) -> dict[str, LayerStats]:
    """Run `batches` (samples x seq_len token ids) through `model` and return statistics per named module.

    Pass 1, without gradients and without the LM head (its logits are not needed): the input of each module
    (nn.Linear, or GPT-2's Conv1D whose input is the same) is flattened over batch and sequence and accumulated:
    X^T X and sum |X|. Layers fed the same tensor (q/k/v, gate/up) share those sums.

    Pass 2, only for fisher / sensitivity: a backward pass of the LM loss (labels = input ids, mean over tokens, one
    loss per window: as fast as batches on CPU, with a quarter of the activation memory of four) over
    `grad_samples` windows spread evenly through `batches` (default: all). It needs an LM head.
    - out_grad_sq: mean over batches and elements of the squared gradient w.r.t. the module output. Without fisher,
      gradients flow from the input embeddings only, so no weight gradient is ever computed (half the cost).
    - fisher_rows: sum over batches of the squared weight gradient, summed over the input dimension, per output row.
    The model runs in eval mode (no dropout); its modes and requires_grad flags are restored.

    losses: when a list is given, pass 1 runs through the LM head too and appends each window's mean next-token loss
    (nats) to it, in row order: what the narrow-calibration check compares, at the cost of the head's matmul only.
    """
    if batches.ndim != 2 or batches.shape[0] == 0:
        raise CalibrationError(
            f"calibration batches must be a non-empty (samples x seq_len) tensor, got {tuple(batches.shape)}"
        )
    if batch_size < 1:
        raise CalibrationError(f"calibration batch size must be at least 1, got {batch_size}")
    targets = _resolve_modules(model, modules)
    need_grad = fisher or sensitivity
    if (need_grad or losses is not None) and not _has_lm_head(model):
        raise LowrankError(
            f"{type(model).__name__} has no language-model head, so the loss gradients that the fisher method and "
            "the sensitivity policy need are unavailable; use method svd, asvd or whiten and another rank policy"
        )
    grad_rows = _spread(batches.shape[0], grad_samples) if need_grad else []
    n_stat = -(-batches.shape[0] // batch_size)
    total = n_stat + len(grad_rows)
    report = progress or (lambda done, total: None)

    accs = {name: _Accumulator() for name in targets}
    with frozen_eval(model):
        starts = range(0, batches.shape[0], batch_size)
        for done, start in enumerate(starts, start=1):  # pass 1: input sums (and window losses)
            _input_step(model, batches[start : start + batch_size].to(device), targets, accs, losses)
            report(done, total)
        if need_grad:
            handles = [m.register_forward_hook(_output_grad_hook(name, accs)) for name, m in targets.items()]
            weights = [m.weight for m in targets.values()] if fisher else None
            try:
                for w in weights or []:
                    w.requires_grad_(True)
                for done, row in enumerate(grad_rows, start=1):  # pass 2: gradients
                    _gradient_step(model, batches[row : row + 1].to(device), targets, accs, weights)
                    report(n_stat + done, total)
            finally:
                for h in handles:
                    h.remove()
    return {name: acc.stats() for name, acc in accs.items()}


def _window_losses(logits: torch.Tensor, ids: torch.Tensor) -> list[float]:
    """Mean next-token cross-entropy (nats) of each row, one row at a time to bound the float32 copy."""
    out = []
    for row in range(ids.shape[0]):
        pred = logits[row, :-1].float()
        out.append(float(torch.nn.functional.cross_entropy(pred, ids[row, 1:], reduction="mean")))
    return out


def _spread(n: int, k: int | None) -> list[int]:
    """k row indices spread evenly over range(n) (all rows when k is None or >= n)."""
    if k is None or k >= n:
        return list(range(n))
    if k < 1:
        raise CalibrationError(f"gradient samples must be at least 1, got {k}")
    return sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)})


@contextlib.contextmanager
def frozen_eval(model: nn.Module) -> Iterator[None]:
    """The model in eval mode (no dropout) with no parameter requiring grad; its modes and flags restored after."""
    training = {m: m.training for m in model.modules()}
    requires = {p: p.requires_grad for p in model.parameters()}
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        yield
    finally:
        for m, flag in training.items():
            m.training = flag
        for p, flag in requires.items():
            p.requires_grad_(flag)


def _input_step(
    model: nn.Module,
    ids: torch.Tensor,
    targets: dict[str, nn.Module],
    accs: dict[str, _Accumulator],
    losses: list[float] | None,
) -> None:
    """One batch through the model body (the whole model when window losses are wanted), its targets' inputs added
    to their sums."""
    last: dict[str, Any] = {}
    handles = [m.register_forward_hook(_input_hook(name, accs, last)) for name, m in targets.items()]
    try:
        body = model if losses is not None else _body(model, targets)
        with torch.no_grad():
            out = body(input_ids=ids, **no_cache_kwargs(body))
            if losses is not None:
                losses.extend(_window_losses(out.logits, ids))
    finally:
        for h in handles:
            h.remove()


def _body(model: nn.Module, targets: dict[str, nn.Module]) -> nn.Module:
    """The model without its LM head when every target lives in the base model (the head's logits are not needed)."""
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        return model
    inside = {id(m) for m in base.modules()}
    return base if all(id(m) in inside for m in targets.values()) else model


def _input_hook(name: str, accs: dict[str, _Accumulator], last: dict[str, Any]) -> Callable[..., None]:
    """Add the module's input to its input sums; `last` (the previous tensor and its sums) detects shared inputs."""

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        x = args[0]
        acc = accs[name]
        same = last.get("x") is x
        if acc.inputs is None:  # first batch: a layer that reads the previous layer's tensor joins its sums
            acc.inputs = last["sums"] if same else _InputSums()
        if not (same and acc.inputs is last.get("sums")):
            acc.inputs.add(x)
        last["x"], last["sums"] = x, acc.inputs

    return hook


def _output_grad_hook(name: str, accs: dict[str, _Accumulator]) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(accs[name].grads.add)

    return hook


def _gradient_step(
    model: nn.Module,
    ids: torch.Tensor,
    targets: dict[str, nn.Module],
    accs: dict[str, _Accumulator],
    weights: list[torch.Tensor] | None,
) -> None:
    """One LM-loss backward pass. Without weights (sensitivity only) gradients start at the input embeddings."""
    with torch.enable_grad():
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        out = model(inputs_embeds=embeds, labels=ids, **no_cache_kwargs(model))
        loss = getattr(out, "loss", None)
        if loss is None:
            raise LowrankError(
                f"{type(model).__name__} returned no loss for labels; fisher and sensitivity need a causal language model"
            )
        grads = torch.autograd.grad(loss, weights if weights is not None else [embeds])
    if weights is not None:
        for (name, module), g in zip(targets.items(), grads, strict=True):
            rows = g.detach().to(torch.float64).pow(2).sum(dim=0 if is_conv1d(module) else 1)
            acc = accs[name]
            acc.fisher_rows = rows if acc.fisher_rows is None else acc.fisher_rows + rows


def no_cache_kwargs(model: nn.Module) -> dict[str, Any]:
    """Ask for no KV cache when the model has one: calibration never decodes, the cache only costs memory."""
    config = getattr(model, "config", None)
    return {"use_cache": False} if config is not None and hasattr(config, "use_cache") else {}


def part_scales(shares: dict[str, float], tokens: dict[str, int]) -> dict[str, float]:
    """Per calibration part, the factor on its sums that pools the parts as `blend_stats` does: the part's share
    of the statistics (shares normalized over the parts with a positive share) x total tokens / part tokens."""
    total_share = sum(w for w in shares.values() if w > 0)
    if total_share <= 0:
        raise CalibrationError("no calibration statistics to blend (every weight is 0)")
    total_tokens = sum(tokens[p] for p, w in shares.items() if w > 0)
    return {p: (w / total_share) * total_tokens / tokens[p] if w > 0 else 0.0 for p, w in shares.items()}


class BlockStatistics:
    """Input statistics of the target layers of one block, batch by batch (the block-sequential pipeline).

    `record()` captures each target's input during one block call. `add(dense)` adds a batch's inputs to the sums
    (X^T X, sum |X|); `add(dense, shifted)` adds the error-aware sums instead: X'^T X' and sum |X'| of the inputs
    seen when the block is fed the compressed prefix's hidden states, and the cross term X^T X'. Layers that read
    the same tensor (q/k/v, gate/up) share one set of sums, as in `collect_stats`.

    Several calibration parts pool into one set of sums as `blend_stats` pools them: `add(..., weight=w)` with
    w = share x total tokens / part tokens (`part_scales`), so the mixture never holds a second copy of the sums.
    The square sums are kept in `dtype` (see `_InputSums.add`).
    """

    def __init__(
        self, modules: dict[str, nn.Module], dtype: torch.dtype = torch.float64, abs_sums: bool = True
    ) -> None:
        """`dtype`, `abs_sums`: see `_InputSums`."""
        self.modules = modules
        self.dtype = dtype
        self.abs_sums = abs_sums
        self.sums: dict[str, _InputSums] = {}
        self.cross: dict[int, torch.Tensor] = {}  # id(sums) -> running cross term
        self.weighted: dict[str, torch.Tensor] = {}  # name -> running W X^T X', where that is the smaller one

    @contextlib.contextmanager
    def record(self) -> Iterator[dict[str, torch.Tensor]]:
        """Each target's input during one block call, in the order they ran; layers reading one tensor get the same
        object (`add` shares their sums by it). Kept inputs stay alive, so no two can share an address by reuse."""
        seen: dict[str, torch.Tensor] = {}
        by_address: dict[tuple[Any, ...], torch.Tensor] = {}

        def hook(name: str) -> Callable[..., None]:
            def fn(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
                x = args[0]
                key = (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype)
                seen[name] = by_address.setdefault(key, x.detach())

            return fn

        handles = [m.register_forward_hook(hook(n)) for n, m in self.modules.items()]
        try:
            yield seen
        finally:
            for h in handles:
                h.remove()

    def add(
        self,
        dense: dict[str, torch.Tensor],
        shifted: dict[str, torch.Tensor] | None = None,
        weight: float = 1.0,
    ) -> None:
        groups: dict[int, list[str]] = {}  # layers reading one tensor share their sums
        for name in self.modules:
            if name not in dense:
                raise LowrankError(
                    f"calibration target {name} was never called during the block's forward pass"
                )
            groups.setdefault(id(dense[name]), []).append(name)
        for names in groups.values():
            sums = self.sums.get(names[0]) or _InputSums(self.dtype, self.abs_sums)
            self.sums.update(dict.fromkeys(names, sums))
            x = dense[names[0]]
            if shifted is None:
                sums.add(x, weight)
                continue
            xs = shifted[names[0]]
            sums.add(xs, weight)
            a = x.reshape(-1, x.shape[-1]).float()
            b = xs.reshape(-1, xs.shape[-1]).float()
            weights = {n: _dense_weight(self.modules[n]) for n in names}
            if sum(w.shape[0] for w in weights.values()) < a.shape[1]:
                for n, w in weights.items():
                    self.weighted[n] = add_product(
                        self.weighted.get(n), a @ w.float().T, b, weight, self.dtype
                    )
            else:
                self.cross[id(sums)] = add_product(self.cross.get(id(sums)), a, b, weight, self.dtype)

    def stats(self) -> dict[str, LayerStats]:
        out = {}
        for name, sums in self.sums.items():
            assert sums.gram is not None
            cross = self.cross.get(id(sums))
            out[name] = LayerStats(
                sums.gram, sums.abs_sum, sums.n_tokens, cross=cross, weighted_cross=self.weighted.get(name)
            )
        return out


def _dense_weight(module: nn.Module) -> torch.Tensor:
    """A Linear (or GPT-2 Conv1D) layer's weight as (out x in)."""
    w = module.weight.detach()
    return w.T if is_conv1d(module) else w
