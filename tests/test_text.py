"""Text sources: the built-in Python reference and its halves, .txt and .jsonl files, and their errors."""

from __future__ import annotations

import hashlib
import json

import pytest

from lowrank_compress.errors import CalibrationError
from lowrank_compress.text import load_text, text_fingerprint


def _topics() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def test_builtin_all_is_every_topic_in_sorted_key_order() -> None:
    assert load_text("builtin") == "\n\n".join(_topics())
    assert len(load_text("builtin")) > 400_000


def test_builtin_halves_are_disjoint_whole_topics_and_cover_everything() -> None:
    cal = load_text("builtin", split="calibration")
    held = load_text("builtin", split="heldout")
    topics = _topics()
    # Each half is a run of whole topics: find the cut that reproduces both halves exactly.
    cuts = [i for i in range(1, len(topics)) if "\n\n".join(topics[:i]) == cal]
    assert len(cuts) == 1
    assert held == "\n\n".join(topics[cuts[0] :])
    # Disjoint: no topic (long enough to be unique) occurs in both halves.
    for t in topics:
        if len(t) > 200:
            assert (t in cal) != (t in held)
    # Balanced by size, not count: each half holds 40-60% of the characters.
    total = len(cal) + len(held)
    assert 0.4 < len(cal) / total < 0.6


def test_builtin_split_is_deterministic() -> None:
    assert load_text("builtin", split="calibration") == load_text("builtin", split="calibration")
    assert load_text("builtin", split="heldout") == load_text("builtin", split="heldout")


def test_unknown_split_is_an_error() -> None:
    with pytest.raises(CalibrationError, match="unknown text split 'train'"):
        load_text("builtin", split="train")


def test_txt_file_and_its_halves_split_at_the_paragraph_nearest_the_middle(tmp_path) -> None:
    paragraphs = [f"Paragraph {i}." + " word" * (5 + i) for i in range(9)]
    text = "\n\n".join(paragraphs) + "\n"
    path = tmp_path / "data.txt"
    path.write_text(text, encoding="utf-8")
    assert load_text(path) == text
    assert load_text(str(path), split="all") == text
    cal, held = load_text(path, split="calibration"), load_text(path, split="heldout")
    # Expected cut: the paragraph break whose position is nearest len(text) // 2.
    breaks = [i for i in range(len(text)) if text.startswith("\n\n", i)]
    cut = min(breaks, key=lambda i: abs(i - len(text) // 2))
    assert cal == text[:cut]
    assert held == text[cut + 2 :]
    assert cal + "\n\n" + held == text


def test_txt_without_paragraphs_splits_at_a_line_break(tmp_path) -> None:
    text = "".join(f"line {i}\n" for i in range(10))
    path = tmp_path / "lines.txt"
    path.write_text(text)
    cal, held = load_text(path, split="calibration"), load_text(path, split="heldout")
    assert cal.splitlines() + held.splitlines() == text.splitlines()
    assert abs(len(cal) - len(held)) <= 8


def test_unicode_text_is_read_as_utf8(tmp_path) -> None:
    path = tmp_path / "u.txt"
    path.write_text("naïve café — 東京\n", encoding="utf-8")
    assert load_text(path) == "naïve café — 東京\n"


def test_undecodable_bytes_name_the_line(tmp_path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("first line\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(CalibrationError, match=r"not valid UTF-8 .*line 2"):
        load_text(path)


def test_jsonl_records_are_joined_with_blank_lines(tmp_path) -> None:
    path = tmp_path / "d.jsonl"
    rows = [{"text": "first record", "id": 1}, {"text": "second\nrecord"}, {"text": "third"}]
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n")
    assert load_text(path) == "first record\n\nsecond\nrecord\n\nthird"


def test_jsonl_bad_json_names_the_line(tmp_path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "broken"\n')
    with pytest.raises(CalibrationError, match=r"d\.jsonl:2: not valid JSON"):
        load_text(path)


@pytest.mark.parametrize("line", ['{"body": "no text here"}', '["a list"]', '"a string"'])
def test_jsonl_missing_text_field_names_the_line(tmp_path, line) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n\n' + line + "\n")
    with pytest.raises(CalibrationError, match=r"d\.jsonl:3: no 'text' field"):
        load_text(path)


def test_jsonl_text_field_must_be_a_string(tmp_path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": 42}\n')
    with pytest.raises(CalibrationError, match=r"d\.jsonl:1: the 'text' field is a int"):
        load_text(path)


def test_missing_file(tmp_path) -> None:
    with pytest.raises(CalibrationError, match="no such file"):
        load_text(tmp_path / "absent.txt")


def test_directory_is_not_a_file(tmp_path) -> None:
    with pytest.raises(CalibrationError, match="not a file"):
        load_text(tmp_path)


@pytest.mark.parametrize("name", ["data.csv", "data.json", "data"])
def test_unsupported_extension(tmp_path, name) -> None:
    path = tmp_path / name
    path.write_text("some text")
    with pytest.raises(CalibrationError, match="unsupported text format"):
        load_text(path)


@pytest.mark.parametrize(
    ("name", "content"), [("e.txt", ""), ("w.txt", " \n\n\t "), ("e.jsonl", '{"text": ""}\n')]
)
def test_empty_text(tmp_path, name, content) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(CalibrationError, match="empty"):
        load_text(path)


def test_text_too_short_to_split(tmp_path) -> None:
    path = tmp_path / "x.txt"
    path.write_text("x")
    assert load_text(path) == "x"
    with pytest.raises(CalibrationError, match="too short to split"):
        load_text(path, split="heldout")


def test_errors_are_one_line(tmp_path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("{not json}\n")
    with pytest.raises(CalibrationError) as info:
        load_text(path)
    assert "\n" not in str(info.value)


def test_fingerprint_is_sha256_of_utf8() -> None:
    text = "héllo"
    assert text_fingerprint(text) == hashlib.sha256("héllo".encode()).hexdigest()
    assert text_fingerprint("a") != text_fingerprint("b")
