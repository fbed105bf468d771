"""Quality and speed of a model: strided perplexity, bits per character, prefill and decode throughput."""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from lowrank_compress.calibration import (
    frozen_eval,
    no_cache_kwargs,
    quiet_transformers,
    special_affixes,
    tokenize_text,
)
from lowrank_compress.errors import CalibrationError, LowrankError

if TYPE_CHECKING:
    from lowrank_compress.answers import AnswerSet

ProgressFn = Callable[[int, int], None]


@dataclass
class Perplexity:
    """Result of `perplexity`. `window` and `stride` are the values used (stride may have been reduced)."""

    perplexity: float
    bits_per_char: float
    nll_sum: float  # nats, summed over scored tokens
    n_tokens: int  # tokens scored
    n_chars: int  # characters covered by the scored tokens
    window: int
    stride: int

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.n_tokens


def perplexity(
    model: nn.Module,
    tokenizer: Any,
    text: str,
    *,
    window: int = 512,
    stride: int = 256,
    max_tokens: int | None = None,
    batch_size: int = 4,
    device: str = "cpu",
    progress: ProgressFn | None = None,
) -> Perplexity:
    """Strided (sliding-window) perplexity of `text`, as in the Hugging Face perplexity guide.

    The text is tokenized without special tokens (then cut to `max_tokens`). Windows of `window` model inputs
    advance by `stride` text tokens; a window scores only the tokens it adds beyond the previous window's end, so
    every token but the first is scored exactly once, with all the context its window holds. The first token has
    no context and is never scored.

    If the tokenizer adds a BOS (any special prefix), each window is that prefix followed by `window - len(prefix)`
    text tokens: the prefix is context only, never scored. The stride is reduced when it is too large for every
    token to be scored: to the text tokens a window holds with a BOS, one fewer without (a window's first token
    then has no context, so consecutive windows must overlap by a token). The result reports the stride used.

    bits_per_char = nll_sum / ln 2 / n_chars, where n_chars = len(decode(ids)) - len(decode(ids[:1])) over the
    scored token ids (after truncation): the characters the scored tokens cover. It compares models with
    different tokenizers, which perplexity per token does not.
    """
    prefix, body, stride = _window_layout(model, tokenizer, window, stride, batch_size)
    ids = tokenize_text(tokenizer, text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise CalibrationError(f"evaluation text has {len(ids)} token(s); at least 2 are needed to score one")

    groups = _batches(_spans(len(ids), body, stride), batch_size)
    nll_sum, n_tokens = _score(model, ids, prefix, groups, device, progress)

    with quiet_transformers():
        n_chars = len(tokenizer.decode(ids)) - len(tokenizer.decode(ids[:1]))
    n_chars = max(n_chars, 1)
    return Perplexity(
        perplexity=math.exp(nll_sum / n_tokens),
        bits_per_char=nll_sum / math.log(2) / n_chars,
        nll_sum=nll_sum,
        n_tokens=n_tokens,
        n_chars=n_chars,
        window=window,
        stride=stride,
    )


def _window_layout(
    model: nn.Module, tokenizer: Any, window: int, stride: int, batch_size: int
) -> tuple[list[int], int, int]:
    """(special prefix, text tokens per window, stride used): the arguments checked against the model's context and
    the tokenizer's prefix before any text is tokenized, the stride cut to what still scores every token."""
    if window < 2:
        raise CalibrationError(f"perplexity window must be at least 2 tokens, got {window}")
    if stride < 1:
        raise CalibrationError(f"perplexity stride must be at least 1 token, got {stride}")
    if batch_size < 1:
        raise CalibrationError(f"perplexity batch size must be at least 1, got {batch_size}")
    limit = context_length(model)
    if limit is not None and window > limit:
        raise CalibrationError(
            f"perplexity window {window} is longer than the model's context of {limit} tokens; use --window {limit}"
        )
    prefix, _ = special_affixes(tokenizer)
    body = window - len(prefix)
    # A window's first text token is predicted from the prefix, or, without one, cannot be predicted at all: so
    # without a prefix windows must overlap by one token for every token to be scored.
    max_stride = body if prefix else body - 1
    if max_stride < 1:
        raise CalibrationError(
            f"perplexity window {window} is too short to score any token; use a longer window"
        )
    return prefix, body, min(stride, max_stride)


def _spans(n_ids: int, body: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, n_scored): window text tokens ids[start:end], scoring the last n_scored of them. The layout that
    scores every token but the first exactly once, each with all the context its window holds."""
    spans: list[tuple[int, int, int]] = []
    prev_end = 0
    for start in range(0, n_ids, stride):
        end = min(start + body, n_ids)
        n_scored = end - max(prev_end, 1)  # the first token of the text is context only
        if n_scored > 0:
            spans.append((start, end, n_scored))
        prev_end = end
        if end == n_ids:
            break
    return spans


def _batches(spans: list[tuple[int, int, int]], batch_size: int) -> list[list[tuple[int, int, int]]]:
    """Consecutive windows of equal length, at most `batch_size` to a batch: equal lengths stack into one input
    without padding or an attention mask. Only the last window is usually shorter."""
    groups: list[list[tuple[int, int, int]]] = []
    for span in spans:
        if groups and len(groups[-1]) < batch_size and _length(groups[-1][0]) == _length(span):
            groups[-1].append(span)
        else:
            groups.append([span])
    return groups


def _score(
    model: nn.Module,
    ids: list[int],
    prefix: list[int],
    groups: list[list[tuple[int, int, int]]],
    device: str,
    progress: ProgressFn | None,
) -> tuple[float, int]:
    """(nll_sum in nats, tokens scored) over the batches of windows: the only part that runs the model, frozen."""
    tokens = torch.tensor(ids, dtype=torch.long)
    pre = torch.tensor(prefix, dtype=torch.long)
    nll_sum = 0.0
    n_tokens = 0
    with frozen_eval(model), torch.inference_mode():
        for done, group in enumerate(groups, start=1):
            batch = torch.stack([torch.cat([pre, tokens[s:e]]) for s, e, _ in group]).to(device)
            logits = model(input_ids=batch, **no_cache_kwargs(model)).logits
            length = batch.shape[1]
            for row, (_, _, k) in enumerate(group):
                # logits at position j predict token j + 1; the scored tokens are the last k of the row.
                pred = logits[row, length - k - 1 : length - 1]
                if pred.dtype not in (torch.float32, torch.float64):
                    pred = pred.float()  # half-precision log-softmax loses too much
                target = batch[row, length - k :]
                nll = F.cross_entropy(pred, target, reduction="sum")
                nll_sum += float(nll.double())
                n_tokens += k
            if progress is not None:
                progress(done, len(groups))
    return nll_sum, n_tokens


def context_length(model: nn.Module) -> int | None:
    """The longest input the model's position embeddings allow (None when the config does not say)."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return limit if isinstance(limit, int) and limit > 0 else None


def fit_sequence_length(
    model: nn.Module, length: int, option: str, default: int, warn: Callable[[str], None]
) -> int:
    """`length`, checked against the model's context: past it, learned position embeddings index out of range and
    rotary ones run on positions the model never saw (and attention grows quadratically). A length the user chose
    is refused in one line; the option's `default` is shortened to the context, with a warning."""
    limit = context_length(model)
    if limit is None or length <= limit:
        return length
    if length == default:
        warn(f"the model's context is {limit} tokens: using {option} {limit} (the default is {default})")
        return limit
    raise LowrankError(
        f"{option} {length} is longer than the model's context of {limit} tokens "
        f"(max_position_embeddings in its config); use at most {limit}"
    )


def _length(span: tuple[int, int, int]) -> int:
    return span[1] - span[0]


# --------------------------------------------------------------------------------------------------- speed


@dataclass
class Speed:
    """Median throughput of one model, with the seconds of every repeat behind it (for the spread). decode is None
    when the model cannot generate (an encoder). load_average: the machine's 1-minute load average, the larger of
    its values before and after the timing."""

    prefill_tokens_per_s: dict[int, float]  # seq_len -> tokens/s for one sequence of that length
    decode_tokens_per_s: float | None
    prefill_seconds: dict[int, list[float]] = field(default_factory=dict)  # seq_len -> seconds of each repeat
    decode_seconds: list[float] = field(default_factory=list)
    load_average: float | None = None

    def spread(self) -> dict[str, Any]:
        """Relative spread of each figure across repeats: (slowest - fastest) / median seconds."""
        return {
            "prefill": {str(n): relative_spread(t) for n, t in self.prefill_seconds.items()},
            "decode": relative_spread(self.decode_seconds) if self.decode_seconds else None,
        }


SPREAD_LIMIT = (
    0.25  # a figure whose repeats differ by more than this share of their median is not a measurement
)


def relative_spread(values: Sequence[float]) -> float:
    """(max - min) / median: 0 when every repeat took the same time; 0.5 when they range over half the median."""
    if not values:
        raise LowrankError("no repeats to take the spread of")
    return (max(values) - min(values)) / statistics.median(values)


def machine_cores() -> int:
    """The cores this process may run on (its CPU affinity), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def load_average() -> float | None:
    """The 1-minute load average (None where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def speed_verdict(
    spreads: Sequence[float], load: float | None, cores: int, *, cpu: bool = True
) -> dict[str, Any]:
    """Whether speed figures can be written as facts: not when any figure's spread across repeats exceeds
    SPREAD_LIMIT, nor (on the CPU) when the load average exceeded the core count while timing, since then torch's
    threads waited for cores and the figures measure the other jobs as much as the model."""
    reasons = []
    worst = max(spreads, default=0.0)
    if worst > SPREAD_LIMIT:
        reasons.append(f"repeats differ by up to {worst:.0%} of their median (limit {SPREAD_LIMIT:.0%})")
    if cpu and load is not None and load > cores:
        reasons.append(f"load average {load:.2f} exceeded the {cores} cores while timing")
    return {
        "reliable": not reasons,
        "reasons": reasons,
        "max_spread": worst,
        "spread_limit": SPREAD_LIMIT,
        "load_average": load,
        "cores": cores,
        "threads": torch.get_num_threads(),
    }


_PROMPT_LEN = 8


def measure_speed(
    models: Mapping[str, nn.Module],
    *,
    seq_lens: Sequence[int] = (128, 512),
    decode_tokens: int = 32,
    repeats: int = 5,
    device: str = "cpu",
    vocab_size: int | None = None,
    seed: int = 0,
) -> dict[str, Speed]:
    """Time prefill and greedy decoding of several models on the same random tokens, interleaved.

    Each model is warmed up once. Then each repeat times every model in turn (so drifts in machine load hit all
    models alike) and the median over repeats is reported; the caller compares models by ratios. Prefill is one
    forward pass of a (1 x seq_len) input without KV cache, computing the LM head for the last position only when the
    model allows it (as `generate` does: a prompt's other logits are never used); decode is `generate` with a KV cache, greedy, exactly
    `decode_tokens` new tokens from an 8-token prompt, timed whole (the short prompt's prefill included).
    """
    if not models:
        raise LowrankError("measure_speed needs at least one model")
    if repeats < 1:
        raise LowrankError(f"speed repeats must be at least 1, got {repeats}")
    if vocab_size is None:
        vocab_size = _common_vocab_size(models)
    gen = torch.Generator().manual_seed(seed)
    inputs = {n: torch.randint(0, vocab_size, (1, n), generator=gen).to(device) for n in seq_lens}
    prompt = torch.randint(0, vocab_size, (1, _PROMPT_LEN), generator=gen).to(device)
    can_decode = {name: decode_tokens > 0 and _can_generate(m) for name, m in models.items()}

    def prefill(model: nn.Module, n: int) -> float:
        kwargs = {**no_cache_kwargs(model), **_last_logits_only(model)}
        return _timed(lambda: model(input_ids=inputs[n], **kwargs), device)

    def decode(model: nn.Module) -> float:
        return _timed(lambda: _generate(model, prompt, decode_tokens), device)

    load_before = load_average()
    prefill_times, decode_times = _time_interleaved(models, seq_lens, repeats, can_decode, prefill, decode)
    loads = [x for x in (load_before, load_average()) if x is not None]
    return {
        name: Speed(
            prefill_tokens_per_s={n: n / statistics.median(prefill_times[name][n]) for n in seq_lens},
            decode_tokens_per_s=decode_tokens / statistics.median(decode_times[name])
            if can_decode[name]
            else None,
            prefill_seconds=prefill_times[name],
            decode_seconds=decode_times[name],
            load_average=max(loads) if loads else None,
        )
        for name in models
    }


def _common_vocab_size(models: Mapping[str, nn.Module]) -> int:
    """The smallest vocabulary of the models' configs: random token ids below it are valid input to every one."""
    sizes = [getattr(getattr(m, "config", None), "vocab_size", None) for m in models.values()]
    if any(s is None for s in sizes):
        raise LowrankError("cannot tell the vocabulary size of every model; pass vocab_size")
    return min(sizes)  # type: ignore[type-var]


def _time_interleaved(
    models: Mapping[str, nn.Module],
    seq_lens: Sequence[int],
    repeats: int,
    can_decode: Mapping[str, bool],
    prefill: Callable[[nn.Module, int], float],
    decode: Callable[[nn.Module], float],
) -> tuple[dict[str, dict[int, list[float]]], dict[str, list[float]]]:
    """(prefill seconds per model and seq_len, decode seconds per model) of every repeat, after one warm-up of each.
    Each repeat times every model in turn, so drifts in machine load hit all alike; the models run in eval mode and
    get their own modes back afterwards, whatever happens."""
    prefill_times: dict[str, dict[int, list[float]]] = {name: {n: [] for n in seq_lens} for name in models}
    decode_times: dict[str, list[float]] = {name: [] for name in models}
    training = {m: m.training for model in models.values() for m in model.modules()}
    try:
        for model in models.values():
            model.eval()
        with torch.inference_mode():
            for name, model in models.items():  # warm-up: kernels, allocator, lazy init
                for n in seq_lens:
                    prefill(model, n)
                if can_decode[name]:
                    decode(model)
            for _ in range(repeats):
                for name, model in models.items():
                    for n in seq_lens:
                        prefill_times[name][n].append(prefill(model, n))
                    if can_decode[name]:
                        decode_times[name].append(decode(model))
    finally:
        for m, flag in training.items():
            m.training = flag
    return prefill_times, decode_times


def speed_ratios(a: Speed, b: Speed) -> dict[str, Any]:
    """a / b throughputs: {"prefill_tokens_per_s": {"<seq_len>": ratio}, "decode_tokens_per_s": ratio or None}."""
    decode = None
    if a.decode_tokens_per_s is not None and b.decode_tokens_per_s is not None:
        decode = a.decode_tokens_per_s / b.decode_tokens_per_s
    return {
        "prefill_tokens_per_s": {
            str(n): v / b.prefill_tokens_per_s[n] for n, v in a.prefill_tokens_per_s.items()
        },
        "decode_tokens_per_s": decode,
    }


def ratio_spread(a: Speed, b: Speed) -> dict[str, Any]:
    """Spread of the a / b throughput ratios across repeats: each repeat timed both models back to back, so its
    ratio is b's seconds over a's; the spread is (max - min) / median of those per-repeat ratios."""

    def one(ta: list[float], tb: list[float]) -> float | None:
        if not ta or len(ta) != len(tb):
            return None
        return relative_spread([y / x for x, y in zip(ta, tb, strict=True)])

    return {
        "prefill": {str(n): one(t, b.prefill_seconds.get(n, [])) for n, t in a.prefill_seconds.items()},
        "decode": one(a.decode_seconds, b.decode_seconds),
    }


def all_spreads(speeds: Sequence[Speed], ratio_spreads: Sequence[dict[str, Any]] = ()) -> list[float]:
    """Every spread figure of these speeds and ratio spreads, flattened (for `speed_verdict`)."""
    values: list[float | None] = []
    for d in [sp.spread() for sp in speeds] + list(ratio_spreads):
        values += [*d["prefill"].values(), d["decode"]]
    return [v for v in values if v is not None]


def _last_logits_only(model: nn.Module) -> dict[str, Any]:
    """`logits_to_keep=1` for causal LMs whose forward takes it (the projection to the vocabulary is a large share of
    a small model's prefill, and generation computes it for the last position only)."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


def _can_generate(model: nn.Module) -> bool:
    check = getattr(model, "can_generate", None)
    return bool(check()) if callable(check) else False


def _generate(model: nn.Module, prompt: torch.Tensor, n: int) -> Any:
    config = getattr(model, "generation_config", None)
    pad = getattr(config, "pad_token_id", None)
    if pad is None:
        eos = getattr(config, "eos_token_id", None)
        pad = (eos[0] if isinstance(eos, list) and eos else eos) if eos is not None else 0
    return model.generate(
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        do_sample=False,
        max_new_tokens=n,
        min_new_tokens=n,
        use_cache=True,
        pad_token_id=pad,
    )


def _timed(fn: Callable[[], Any], device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return max(time.perf_counter() - t0, 1e-9)


def _sync(device: str) -> None:
    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------------- a whole evaluation


@dataclass
class ModelReport:
    """Quality and speed of one evaluated checkpoint."""

    role: str  # "model" or "baseline"
    path: str
    params: int
    quality: Perplexity
    speed: Speed | None


@dataclass
class Evaluation:
    """What `evaluate_models` measured; `to_dict()` is the `--json` output and the report's evaluation section."""

    data: str
    split: str
    text_sha256: str
    models: list[ModelReport]
    seconds: float
    answers: Any = None  # answers.AnswerCheck, when the answer check ran
    speed_check: dict[str, Any] | None = None  # speed_verdict(...), when speed was measured

    def ratios(self) -> dict[str, Any] | None:
        """model / baseline for perplexity, bits per char, params and throughputs (None without a baseline)."""
        by = {m.role: m for m in self.models}
        if "baseline" not in by:
            return None
        a, b = by["model"], by["baseline"]
        out: dict[str, Any] = {
            "perplexity": a.quality.perplexity / b.quality.perplexity,
            "bits_per_char": a.quality.bits_per_char / b.quality.bits_per_char,
            "params": a.params / b.params,
        }
        if a.speed is not None and b.speed is not None:
            out.update(speed_ratios(a.speed, b.speed))
            out["speed_spread"] = ratio_spread(a.speed, b.speed)
        if self.answers is not None:
            out["answers_kept"] = self.answers.kept_fraction()
        return out

    def to_dict(self) -> dict[str, Any]:
        def one(m: ModelReport) -> dict[str, Any]:
            q = m.quality
            return {
                "role": m.role,
                "path": m.path,
                "params": m.params,
                "perplexity": q.perplexity,
                "bits_per_char": q.bits_per_char,
                "tokens_scored": q.n_tokens,
                "chars_scored": q.n_chars,
                "window": q.window,
                "stride": q.stride,
                "prefill_tokens_per_s": {str(k): v for k, v in m.speed.prefill_tokens_per_s.items()}
                if m.speed is not None
                else None,
                "decode_tokens_per_s": m.speed.decode_tokens_per_s if m.speed is not None else None,
                "speed_spread": m.speed.spread() if m.speed is not None else None,
            }

        return {
            "data": self.data,
            "split": self.split,
            "text_sha256": self.text_sha256,
            "models": [one(m) for m in self.models],
            "ratios": self.ratios(),
            "answers": self.answers.to_dict() if self.answers is not None else None,
            "speed": self.speed_check,
            "seconds": self.seconds,
        }


def evaluate_models(
    model: str | Any,
    baseline: str | Any | None = None,
    *,
    data: str = "builtin",
    window: int | None = None,
    stride: int = 256,
    max_tokens: int | None = 8192,
    speed: bool = True,
    seq_lens: Sequence[int] = (128, 512),
    decode_tokens: int = 32,
    repeats: int = 5,
    device: str = "cpu",
    allow_pickle: bool = False,
    answers: str | Path | AnswerSet | None = "builtin",
    progress: Callable[[str, int, int], None] | None = None,
) -> Evaluation:
    """Perplexity, answers (and speed) of `model`, and of `baseline` when given, on the same text in the same run.

    data: "builtin" scores the held-out half of the built-in text (factorize calibrates on the other half);
    a file is scored whole. window: default 512, or the model's context when shorter (speed sequence lengths are
    capped the same way). answers: an answer set ("builtin", a .jsonl path, a loaded set) asked of each model
    greedily (see `answers.check_answers`), or None to skip it. Speed is measured for both models interleaved (see
    `measure_speed`).
    """
    from lowrank_compress.answers import AnswerSet, check_answers, load_answer_set
    from lowrank_compress.choices import check_device
    from lowrank_compress.text import load_text, text_fingerprint

    check_device(str(device))
    t0 = time.perf_counter()
    answer_set = answers if isinstance(answers, AnswerSet) or answers is None else load_answer_set(answers)
    split = "heldout" if data == "builtin" else "all"
    text = load_text(data, split=split)
    report = progress or (lambda phase, done, total: None)
    paths = {"model": model} if baseline is None else {"model": model, "baseline": baseline}
    loaded = _load_language_models(paths, device, allow_pickle)
    window, seq_lens = _fit_lengths(loaded, window, seq_lens)
    quality = _perplexities(loaded, text, window, stride, max_tokens, device, report)
    checked = None
    if answer_set is not None:
        checked = check_answers(loaded, answer_set, device=device, progress=report)
    speeds: dict[str, Speed] = {}
    if speed:
        speeds = _speeds(loaded, seq_lens, decode_tokens, repeats, device, report)
    models = [
        ModelReport(role, str(paths[role]), _count_params(m), quality[role], speeds.get(role))
        for role, (m, _) in loaded.items()
    ]
    seconds = round(time.perf_counter() - t0, 2)
    verdict = judge_speeds(speeds, "model", "baseline", str(device)) if speeds else None
    return Evaluation(
        data, split, text_fingerprint(text), models, seconds, answers=checked, speed_check=verdict
    )


def _load_language_models(
    paths: dict[str, Any], device: str, allow_pickle: bool
) -> dict[str, tuple[Any, Any]]:
    """role -> (model, tokenizer), each checked to be a finite causal LM before anything is measured."""
    from lowrank_compress.loading import load_model, require_finite, require_language_model

    loaded = {}
    for role, path in paths.items():
        m, tok, _ = load_model(path, device=device, allow_pickle=allow_pickle)
        require_language_model(m.config, path, "evaluate")
        require_finite(m, path)
        loaded[role] = (m, tok)
    return loaded


def _fit_lengths(
    loaded: dict[str, tuple[Any, Any]], window: int | None, seq_lens: Sequence[int]
) -> tuple[int, Sequence[int]]:
    """(window, speed sequence lengths) within the shortest context of the models, so both are measured alike; an
    unset window defaults to 512."""
    limits = [n for n in (context_length(m) for m, _ in loaded.values()) if n is not None]
    context = min(limits) if limits else None
    if window is None:
        window = min(512, context) if context else 512
    if context is not None:
        seq_lens = [n for n in seq_lens if n <= context] or [context]
    return window, seq_lens


def _perplexities(
    loaded: dict[str, tuple[Any, Any]],
    text: str,
    window: int,
    stride: int,
    max_tokens: int | None,
    device: str,
    report: Callable[[str, int, int], None],
) -> dict[str, Perplexity]:
    """role -> perplexity of each model on the same text and windows, its progress reported under its role."""
    return {
        role: perplexity(
            m,
            tok,
            text,
            window=window,
            stride=stride,
            max_tokens=max_tokens,
            device=device,
            progress=lambda done, total, role=role: report(f"perplexity ({role})", done, total),
        )
        for role, (m, tok) in loaded.items()
    }


def _speeds(
    loaded: dict[str, tuple[Any, Any]],
    seq_lens: Sequence[int],
    decode_tokens: int,
    repeats: int,
    device: str,
    report: Callable[[str, int, int], None],
) -> dict[str, Speed]:
    """role -> speed, the models timed interleaved; one progress step, since the timing cannot report its own."""
    report("speed", 0, 1)
    speeds = measure_speed(
        {role: m for role, (m, _) in loaded.items()},
        seq_lens=seq_lens,
        decode_tokens=decode_tokens,
        repeats=repeats,
        device=device,
    )
    report("speed", 1, 1)
    return speeds


def judge_speeds(speeds: Mapping[str, Speed], model: str, baseline: str, device: str) -> dict[str, Any]:
    """`speed_verdict` over every figure of `speeds` and the model / baseline ratios (when both were timed)."""
    pairs = [ratio_spread(speeds[model], speeds[baseline])] if model in speeds and baseline in speeds else []
    load = max((sp.load_average for sp in speeds.values() if sp.load_average is not None), default=None)
    return speed_verdict(
        all_spreads(list(speeds.values()), pairs), load, machine_cores(), cpu=device == "cpu"
    )


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied tensors are yielded once
