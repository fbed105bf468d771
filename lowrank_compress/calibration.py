"""Calibration batches and the per-layer statistics that activation-aware factorizations need.

`make_batches` cuts token windows from a text; `collect_stats` runs them through the model with hooks on the
target layers and accumulates, per layer, the input Gram matrix X^T X (SVD-LLM whitening), the mean absolute input
per channel (ASVD), and optionally squared loss gradients (FWSVD Fisher rows, per-layer sensitivity).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowrank_compress.errors import CalibrationError, LowrankError

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


# --------------------------------------------------------------------------------------------------- statistics


@dataclass
class LayerStats:
    """What one layer saw during calibration. Sums, not means, so statistics of several runs can be added."""

    gram: torch.Tensor  # (in x in) float64: sum over calibration tokens of x x^T, x = the layer's input
    abs_sum: torch.Tensor  # (in,) float64: sum of |x| per input channel (ASVD's activation magnitude)
    n_tokens: int
    # (out,) float64: sum over batches of the squared weight gradient, summed per output row (FWSVD)
    fisher_rows: torch.Tensor | None = None
    # mean squared loss gradient w.r.t. the layer output, per element (sensitivity)
    out_grad_sq: float | None = None


def _is_conv1d(module: nn.Module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always ships it
        return False
    return isinstance(module, Conv1D)


def _resolve_modules(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    found: dict[str, nn.Module] = {}
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError as e:
            raise LowrankError(
                f"calibration target {name!r} is not a module of this model; check the layer name"
            ) from e
        if not (isinstance(module, nn.Linear) or _is_conv1d(module)):
            raise LowrankError(
                f"calibration target {name!r} is a {type(module).__name__}, not a Linear layer; "
                "target only Linear (or GPT-2 Conv1D) layers"
            )
        found[name] = module
    return found


def _has_lm_head(model: nn.Module) -> bool:
    get = getattr(model, "get_output_embeddings", None)
    return callable(get) and get() is not None


class _Accumulator:
    """Running sums for one layer; created lazily on the device and with the width the layer's input has."""

    def __init__(self) -> None:
        self.gram: torch.Tensor | None = None
        self.abs_sum: torch.Tensor | None = None
        self.n_tokens = 0
        self.fisher_rows: torch.Tensor | None = None
        self.grad_sq_sum = 0.0
        self.grad_count = 0

    def add_input(self, gram: torch.Tensor, abs_sum: torch.Tensor, n: int) -> None:
        if self.gram is None:
            self.gram, self.abs_sum = gram.clone(), abs_sum.clone()
        else:
            self.gram += gram
            self.abs_sum += abs_sum
        self.n_tokens += n

    def stats(self) -> LayerStats:
        if self.gram is None or self.abs_sum is None:
            raise LowrankError(
                "a calibration target was never called during the forward pass; is it a used layer?"
            )
        fisher = self.fisher_rows.cpu() if self.fisher_rows is not None else None
        mean_sq = self.grad_sq_sum / self.grad_count if self.grad_count else None
        return LayerStats(self.gram.cpu(), self.abs_sum.cpu(), self.n_tokens, fisher, mean_sq)


def collect_stats(
    model: nn.Module,
    batches: torch.Tensor,
    modules: Sequence[str],
    *,
    batch_size: int = 4,
    fisher: bool = False,
    sensitivity: bool = False,
    progress: ProgressFn | None = None,
    device: str = "cpu",
) -> dict[str, LayerStats]:
    """Run `batches` (samples x seq_len token ids) through `model` and return statistics per named module.

    The input of each module (nn.Linear, or GPT-2's Conv1D whose input is the same) is flattened over batch and
    sequence and accumulated in float64: X^T X and sum |X|. Layers fed the same tensor (q/k/v, gate/up) share the
    computation. The model runs in eval mode (no dropout); its modes and requires_grad flags are restored.

    fisher / sensitivity need a backward pass of the model's LM loss (labels = input ids, mean over tokens, one
    loss per batch of `batch_size` windows), so the model must have an LM head:
    - fisher_rows: sum over batches of the squared weight gradient, summed over the input dimension, per output row;
    - out_grad_sq: mean over all batches and elements of the squared gradient w.r.t. the module output.
    """
    if batches.ndim != 2 or batches.shape[0] == 0:
        raise CalibrationError(
            f"calibration batches must be a non-empty (samples x seq_len) tensor, got {tuple(batches.shape)}"
        )
    if batch_size < 1:
        raise CalibrationError(f"calibration batch size must be at least 1, got {batch_size}")
    targets = _resolve_modules(model, modules)
    need_grad = fisher or sensitivity
    if need_grad and not _has_lm_head(model):
        raise LowrankError(
            f"{type(model).__name__} has no language-model head, so the loss gradients that the fisher method and "
            "the sensitivity policy need are unavailable; use method svd, asvd or whiten and another rank policy"
        )

    accs = {name: _Accumulator() for name in targets}
    # Layers fed the same tensor (q/k/v, gate/up) reuse the last input's sums.
    last: dict[str, Any] = {"x": None, "gram": None, "abs": None}
    handles: list[Any] = []

    def input_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            x = args[0]
            if last["x"] is not x:
                flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
                last["x"], last["gram"], last["abs"] = x, flat.T @ flat, flat.abs().sum(0)
            accs[name].add_input(last["gram"], last["abs"], x.numel() // x.shape[-1])
            if sensitivity and isinstance(output, torch.Tensor) and output.requires_grad:
                acc = accs[name]

                def grad_hook(g: torch.Tensor) -> None:
                    acc.grad_sq_sum += float(g.detach().to(torch.float64).pow(2).sum())
                    acc.grad_count += g.numel()

                output.register_hook(grad_hook)

        return hook

    training = {m: m.training for m in model.modules()}
    requires = {p: p.requires_grad for p in model.parameters()}
    weights = [m.weight for m in targets.values()]
    try:
        model.eval()
        if need_grad:
            for p in model.parameters():
                p.requires_grad_(False)
            for w in weights:
                w.requires_grad_(True)
        for name, module in targets.items():
            handles.append(module.register_forward_hook(input_hook(name)))
        total = (batches.shape[0] + batch_size - 1) // batch_size
        for done, start in enumerate(range(0, batches.shape[0], batch_size), start=1):
            ids = batches[start : start + batch_size].to(device)
            if need_grad:
                with torch.enable_grad():
                    out = model(input_ids=ids, labels=ids, **no_cache_kwargs(model))
                    loss = getattr(out, "loss", None)
                    if loss is None:
                        raise LowrankError(
                            f"{type(model).__name__} returned no loss for labels; fisher and sensitivity need a "
                            "causal language model"
                        )
                    grads = torch.autograd.grad(loss, weights)
                if fisher:
                    for (name, module), g in zip(targets.items(), grads, strict=True):
                        rows = g.detach().to(torch.float64).pow(2).sum(dim=0 if _is_conv1d(module) else 1)
                        acc = accs[name]
                        acc.fisher_rows = rows if acc.fisher_rows is None else acc.fisher_rows + rows
                del out, loss, grads
            else:
                with torch.no_grad():
                    model(input_ids=ids, **no_cache_kwargs(model))
            last["x"] = last["gram"] = last["abs"] = None
            if progress is not None:
                progress(done, total)
    finally:
        for h in handles:
            h.remove()
        for m, flag in training.items():
            m.training = flag
        for p, flag in requires.items():
            p.requires_grad_(flag)
    return {name: acc.stats() for name, acc in accs.items()}


def no_cache_kwargs(model: nn.Module) -> dict[str, Any]:
    """Ask for no KV cache when the model has one: calibration never decodes, the cache only costs memory."""
    config = getattr(model, "config", None)
    return {"use_cache": False} if config is not None and hasattr(config, "use_cache") else {}
