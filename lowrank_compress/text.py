"""Text sources shared by calibration and evaluation: the built-in Python reference, `.txt` and `.jsonl` files.

Calibration and evaluation must never see the same text, so every source can be cut into two disjoint,
deterministic halves: `split="calibration"` (the first half) and `split="heldout"` (the second half).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from lowrank_compress.errors import CalibrationError

BUILTIN = "builtin"
SPLITS = ("all", "calibration", "heldout")
_SEP = "\n\n"


def load_text(source: str | Path, *, split: str = "all") -> str:
    """Return the text of `source` ("builtin", or a path to a `.txt` / `.jsonl` file), optionally one half of it.

    builtin: the Python reference shipped with every CPython (`pydoc_data.topics.topics`), topics joined in
    sorted-key order with blank lines. It is split on whole topics at the topic boundary nearest the middle
    character (the topics vary from a few hundred to 60k characters, so cutting at half the *count* would give
    halves of very unequal size).
    Files: `.txt` is read as UTF-8; `.jsonl` holds one JSON object per line with a string "text" field (blank lines
    are skipped; records are joined with blank lines). A file is split at the paragraph break (blank line) nearest
    its middle, else at the line break nearest the middle, else at the whitespace nearest the middle.
    """
    if split not in SPLITS:
        raise CalibrationError(f"unknown text split {split!r}; use one of: {', '.join(SPLITS)}")
    if isinstance(source, str) and source == BUILTIN:
        return _builtin(split)
    path = Path(source)
    text = _read_file(path)
    if not text.strip():
        raise CalibrationError(f"{path}: the text is empty; pass a file with some text in it")
    if split == "all":
        return text
    first, second = _split_halves(text, str(path))
    return first if split == "calibration" else second


def text_fingerprint(text: str) -> str:
    """SHA-256 of the UTF-8 text, so a report says exactly which text was used."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _builtin(split: str) -> str:
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # some distributions package the pydoc data separately
        raise CalibrationError(
            "the built-in text (pydoc_data.topics) is not available in this Python; pass a .txt or .jsonl file instead"
        ) from e
    values = [topics[k] for k in sorted(topics)]
    if split == "all":
        return _SEP.join(values)
    total = sum(len(v) for v in values)
    acc, cut, best = 0, 1, None
    for i, v in enumerate(values[:-1], start=1):  # cut after topic i-1; both halves keep at least one topic
        acc += len(v)
        gap = abs(2 * acc - total)
        if best is None or gap < best:
            best, cut = gap, i
    part = values[:cut] if split == "calibration" else values[cut:]
    return _SEP.join(part)


def _read_file(path: Path) -> str:
    if not path.exists():
        raise CalibrationError(f"{path}: no such file; pass a .txt or .jsonl file, or 'builtin'")
    if not path.is_file():
        raise CalibrationError(f"{path}: not a file; pass a .txt or .jsonl file, or 'builtin'")
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl"):
        raise CalibrationError(
            f"{path}: unsupported text format {path.suffix or '(no extension)'!r}; use .txt (plain UTF-8) or .jsonl "
            "(one JSON object per line with a 'text' field)"
        )
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise CalibrationError(
            f"{path}: not valid UTF-8 (byte {e.start}, line {line}); convert the file to UTF-8"
        ) from e
    except OSError as e:
        raise CalibrationError(f"{path}: cannot be read ({e.strerror or e})") from e
    return _parse_jsonl(raw, path) if suffix == ".jsonl" else raw


def _parse_jsonl(raw: str, path: Path) -> str:
    texts: list[str] = []
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise CalibrationError(
                f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object"
            ) from e
        if not isinstance(record, dict) or "text" not in record:
            raise CalibrationError(
                f"{path}:{lineno}: no 'text' field; each line must be an object like {{\"text\": ...}}"
            )
        value = record["text"]
        if not isinstance(value, str):
            raise CalibrationError(
                f"{path}:{lineno}: the 'text' field is a {type(value).__name__}, not a string"
            )
        texts.append(value)
    return _SEP.join(texts)


def _split_halves(text: str, where: str) -> tuple[str, str]:
    """Cut at the paragraph break nearest the middle, else the line break, else the whitespace, else the middle."""
    middle = len(text) // 2
    for sep in ("\n\n", "\n", " "):
        cut = _nearest(text, sep, middle)
        if cut is not None:
            first, second = text[:cut].rstrip(), text[cut + len(sep) :].lstrip()
            if first.strip() and second.strip():
                return first, second
    first, second = text[:middle], text[middle:]
    if not first.strip() or not second.strip():
        raise CalibrationError(
            f"{where}: the text is too short to split into calibration and held-out halves"
        )
    return first, second


def _nearest(text: str, sep: str, middle: int) -> int | None:
    """Index of the occurrence of `sep` nearest `middle`, or None when it does not occur."""
    right = text.find(sep, middle)
    left = text.rfind(sep, 0, middle)
    candidates = [i for i in (left, right) if i >= 0]
    if not candidates:
        return None
    return min(candidates, key=lambda i: (abs(i - middle), i))
