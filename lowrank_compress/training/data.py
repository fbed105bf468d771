"""Training text: packed into sequences, visited in an order that is a pure function of (seed, step), so a resumed
run sees exactly the batches the uninterrupted run would have seen."""

from __future__ import annotations

from typing import Any

import torch

from lowrank_compress.choices import CHAT_DATA
from lowrank_compress.errors import CalibrationError
from lowrank_compress.recipe import FinetuneSettings


def pack(tokenizer: Any, text: str, seq_len: int, what: str = "--data") -> torch.LongTensor:
    """The text cut into consecutive sequences of `seq_len` tokens, each framed by the tokenizer's special tokens
    (BOS) the way the model sees text in use; the tail shorter than a sequence is dropped."""
    from lowrank_compress.calibration import special_affixes, tokenize_text

    prefix, suffix = special_affixes(tokenizer)
    body = seq_len - len(prefix) - len(suffix)
    if body < 1:
        raise CalibrationError(f"--seq-len {seq_len} leaves no room for text after the special tokens")
    ids = tokenize_text(tokenizer, text)
    rows = len(ids) // body
    if rows < 1:
        raise CalibrationError(
            f"{what} has {len(ids)} tokens, shorter than one training sequence of {body} text tokens; "
            "pass more text or lower --seq-len"
        )
    t = torch.tensor(ids[: rows * body], dtype=torch.long).view(rows, body)
    parts = [torch.tensor(prefix, dtype=torch.long).expand(rows, -1), t,
             torch.tensor(suffix, dtype=torch.long).expand(rows, -1)]  # fmt: skip
    return torch.cat(parts, dim=1)


def batch_rows(n_rows: int, seed: int, position: int, count: int) -> list[int]:
    """Rows for global sample positions [position, position + count): epoch e = position // n_rows visits the rows
    in the order of a permutation seeded by (seed, e). A pure function, so a resumed run continues the same order."""
    out = []
    cache: dict[int, list[int]] = {}
    for p in range(position, position + count):
        epoch, i = divmod(p, n_rows)
        if epoch not in cache:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            cache[epoch] = torch.randperm(n_rows, generator=gen).tolist()
        out.append(cache[epoch][i])
    return out


def texts(settings: FinetuneSettings) -> tuple[str | None, str | None, dict[str, Any]]:
    """Training and evaluation text. Without --eval-data: train on the first half of --data, score the second.
    --data chat trains on sampled conversations (no training text here), scored on --eval-data or the built-in
    text's held-out half."""
    from lowrank_compress.text import BUILTIN, load_text

    if settings.data == CHAT_DATA:
        held = load_text(settings.eval_data or BUILTIN, split="all" if settings.eval_data else "heldout")
        names = {"train": f"{settings.chat_samples} conversations sampled from {settings.teacher}",
                 "eval": settings.eval_data or f"{BUILTIN} (second half)"}  # fmt: skip
        return None, held if settings.eval_tokens else None, names
    if settings.eval_data is None:
        train = load_text(settings.data, split="calibration")
        held = load_text(settings.data, split="heldout") if settings.eval_tokens else None
        return (
            train,
            held,
            {"train": f"{settings.data} (first half)", "eval": f"{settings.data} (second half)"},
        )
    train = load_text(settings.data)
    held = load_text(
        settings.eval_data
    )  # read even when unused (--eval-tokens 0): a wrong path is still an error
    held = held if settings.eval_tokens else None
    return train, held, {"train": settings.data, "eval": settings.eval_data}
