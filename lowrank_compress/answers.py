"""The answer check: short prompts with checkable answers, asked greedily, right or wrong.

Why it exists: held-out perplexity on one kind of text hides what a chat user sees. SmolLM2-135M-Instruct
factorized at budget 0.8 scored 1.48x the dense perplexity, which reads as "a bit worse", while it answered
"The capital of Germany is Germany." So every evaluation also asks a fixed set of questions and counts the answers
the compressed model keeps: right in the dense model and still right in the compressed one.

A set is a `.jsonl` file, one object per line: `{"prompt": str, "answers": [str, ...]}` (optionally `"kind"`); an
output is right when its first sentence contains one of the answers (case and spacing ignored; an answer that begins
or ends with a letter or digit must stand as a whole word there, so "4" does not match inside "14"). The built-in set ships as
package data (`lowrank_compress/data/answers.jsonl`). Prompts go through the tokenizer's chat template when it has
one (else "Question: ...\\nAnswer:"), and are answered greedily, batched with left padding; torch is imported only
by the functions that generate.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowrank_compress.errors import LowrankError

BUILTIN = "builtin"
MAX_NEW_TOKENS = 32
SAMPLES_SHOWN = 6
_BUILTIN_PATH = Path(__file__).with_name("data") / "answers.jsonl"
_PLAIN_TEMPLATE = "Question: {prompt}\nAnswer:"


@dataclass(frozen=True)
class AnswerItem:
    """One prompt and the answer strings that count as right."""

    prompt: str
    answers: tuple[str, ...]
    kind: str = ""


@dataclass(frozen=True)
class AnswerSet:
    """A loaded set: where it came from (`builtin` or a path), its SHA-256, and its items."""

    source: str
    sha256: str
    items: tuple[AnswerItem, ...]


def load_answer_set(source: str | Path = BUILTIN) -> AnswerSet:
    """Read and validate a set; a bad file is one LowrankError line naming the file and line."""
    path = _BUILTIN_PATH if str(source) == BUILTIN else Path(source)
    if path.suffix.lower() != ".jsonl":
        raise LowrankError(f'{path}: an answer set is a .jsonl file (one {{"prompt", "answers"}} per line)')
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise LowrankError(f"{path}: no such file; pass a .jsonl answer set, builtin or none") from None
    except OSError as e:
        raise LowrankError(f"{path}: cannot read it ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise LowrankError(f"{path}: not UTF-8 text") from None
    items = tuple(
        _parse_item(line, path, n) for n, line in enumerate(text.splitlines(), start=1) if line.strip()
    )
    if not items:
        raise LowrankError(f"{path}: no items; each line needs a prompt and its answers")
    return AnswerSet(str(source), hashlib.sha256(raw).hexdigest(), items)


def optional_answer_set(value: str) -> AnswerSet | None:
    """A command's --answers: None for `none`, else the loaded set (read before any model, so a bad file fails
    at once)."""
    return None if value.strip().lower() == "none" else load_answer_set(value)


def _parse_item(line: str, path: Path, n: int) -> AnswerItem:
    """One line of a set: an object with a non-empty string prompt and a non-empty list of non-empty strings."""
    where = f"{path}:{n}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise LowrankError(f"{where}: not JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise LowrankError(f'{where}: each line must be an object {{"prompt": ..., "answers": [...]}}')
    prompt, answers = obj.get("prompt"), obj.get("answers")
    if not isinstance(prompt, str) or not prompt.strip():
        raise LowrankError(f"{where}: 'prompt' must be a non-empty string")
    if isinstance(answers, str):
        answers = [answers]
    if (
        not isinstance(answers, list)
        or not answers
        or not all(isinstance(a, str) and _normalize(a) for a in answers)
    ):
        raise LowrankError(f"{where}: 'answers' must be a non-empty list of non-empty strings")
    kind = obj.get("kind", "")
    return AnswerItem(prompt, tuple(answers), kind if isinstance(kind, str) else "")


# --------------------------------------------------------------------------------------------------- judging


def _normalize(text: str) -> str:
    """Lower case, compatibility forms (curly quotes, full-width digits), single spaces."""
    text = unicodedata.normalize("NFKC", text).replace("\u2019", "'").replace("\u2018", "'")
    text = text.replace("\u201c", '"').replace("\u201d", '"')
    return " ".join(text.lower().split())


def first_sentence(output: str) -> str:
    """The output up to its first sentence end ('.', '!' or '?' before a space or the end) or blank line.

    Only this part is judged: a small model that rambles names many things, and a degenerate compressed model
    rambles longest, so judging the whole output would count chance mentions ("365 * 12 = 312 months" holds "12")."""
    end = _SENTENCE_END.search(output)
    return output[: end.start() + 1] if end else output


_SENTENCE_END = re.compile(r"[.!?](?=\s|$)|\n\s*\n")


def is_right(output: str, answers: Sequence[str]) -> bool:
    """Whether the first sentence of `output` contains one of `answers` (normalized; an answer's edge that is a
    letter or digit must be a word edge, and a number must not be part of a decimal: "0" is not in "-18.0")."""
    said = _normalize(first_sentence(output))
    for answer in answers:
        want = _normalize(answer)
        if not want:
            continue
        head = r"(?<![0-9a-z])(?<![0-9][.,])" if want[0].isalnum() else ""
        tail = r"(?![0-9a-z])(?![.,][0-9])" if want[-1].isalnum() else ""
        if re.search(head + re.escape(want) + tail, said):
            return True
    return False


@dataclass
class AnswerCheck:
    """The answers of a model (and of its baseline, when there is one) to one set, judged."""

    source: str
    sha256: str
    items: tuple[AnswerItem, ...]
    outputs: dict[str, list[str]]  # role ("model", "baseline") -> one output per item
    chat_template: bool
    max_new_tokens: int
    right: dict[str, list[bool]] = field(init=False)

    def __post_init__(self) -> None:
        self.right = {
            role: [is_right(o, item.answers) for o, item in zip(outs, self.items, strict=True)]
            for role, outs in self.outputs.items()
        }

    def kept(self) -> int | None:
        """Items right in the baseline and still right in the model (None without a baseline)."""
        if "baseline" not in self.right:
            return None
        return sum(b and m for b, m in zip(self.right["baseline"], self.right["model"], strict=True))

    def kept_fraction(self) -> float | None:
        """kept / right in the baseline (None without a baseline, or when the baseline got none right)."""
        kept, base = self.kept(), self.count("baseline")
        return None if kept is None or not base else kept / base

    def count(self, role: str) -> int | None:
        return sum(self.right[role]) if role in self.right else None

    def samples(self, n: int = SAMPLES_SHOWN) -> list[int]:
        """Items to show side by side: answers lost first (right in the baseline only), then kept, then the rest;
        in set order within each group, so the same set always shows the same items."""
        model = self.right["model"]
        base = self.right.get("baseline", model)
        lost = [i for i, (b, m) in enumerate(zip(base, model, strict=True)) if b and not m]
        kept = [i for i, (b, m) in enumerate(zip(base, model, strict=True)) if b and m]
        rest = [i for i in range(len(self.items)) if i not in set(lost) | set(kept)]
        half = n // 2
        chosen = lost[:half] + kept[: n - min(len(lost), half)]
        chosen += [i for i in lost + rest if i not in chosen]
        return sorted(chosen[:n])

    def to_dict(self) -> dict[str, Any]:
        roles = list(self.outputs)
        return {
            "source": self.source,
            "sha256": self.sha256,
            "items": len(self.items),
            "chat_template": self.chat_template,
            "max_new_tokens": self.max_new_tokens,
            "right": {role: self.count(role) for role in roles},
            "kept": self.kept(),
            "kept_fraction": self.kept_fraction(),
            "samples": self.samples(),
            "results": [
                {
                    "prompt": item.prompt,
                    "answers": list(item.answers),
                    "outputs": {role: self.outputs[role][i] for role in roles},
                    "right": {role: self.right[role][i] for role in roles},
                }
                for i, item in enumerate(self.items)
            ],
        }


def answers_summary(data: dict[str, Any]) -> str:
    """One line from an `AnswerCheck.to_dict()`: what the CLI, the model card and the report say."""
    right, n = data["right"], data["items"]
    line = f"answers right: model {right['model']} of {n}"
    if data.get("kept") is not None:
        base = right["baseline"]
        share = f" ({data['kept_fraction']:.0%})" if data.get("kept_fraction") is not None else ""
        line += f", baseline {base} of {n}; answers kept {data['kept']} of {base}{share}"
    where = "builtin set" if data["source"] == BUILTIN else data["source"]
    template = "chat template" if data["chat_template"] else "plain prompts"
    return f"{line} ({where}, {template}, greedy, {data['max_new_tokens']} new tokens)"


# --------------------------------------------------------------------------------------------------- asking


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """The prompt as the model is asked it: through the chat template (a user turn, then the assistant's opening),
    else as "Question: ...\\nAnswer:" with the tokenizer's own special prefix (BOS)."""
    from lowrank_compress.calibration import has_chat_template, quiet_transformers

    with quiet_transformers():
        if has_chat_template(tokenizer):
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])
        return list(tokenizer(_PLAIN_TEMPLATE.format(prompt=prompt))["input_ids"])


def generate_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_size: int = 40,
    device: str = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Greedy answers, one per prompt, decoded up to the first stop token without special tokens.

    Prompts are batched (left-padded with an attention mask) in set order, so two models asked the same set see
    the same batches."""
    import torch

    from lowrank_compress.calibration import contiguous_head_input, left_padded, stop_ids

    stops = stop_ids(tokenizer, model)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else (stops[0] if stops else 0)
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    outputs: list[str] = []
    batches = [encoded[i : i + batch_size] for i in range(0, len(encoded), batch_size)]
    training = model.training
    model.eval()
    try:
        for done, batch in enumerate(batches, start=1):
            width = max(len(x) for x in batch)
            new_tokens = _room(model, width, max_new_tokens)
            ids, mask = left_padded(batch, pad)
            with torch.inference_mode(), contiguous_head_input(model):
                out = model.generate(
                    input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False, max_new_tokens=new_tokens,
                    eos_token_id=stops or None, pad_token_id=pad,
                )  # fmt: skip
            outputs += [_decode(tokenizer, row[width:].tolist(), stops) for row in out]
            if progress is not None:
                progress(done, len(batches))
    finally:
        model.train(training)
    return outputs


def _room(model: Any, width: int, wanted: int) -> int:
    """New tokens that fit after a prompt batch of `width` tokens in the model's context (all `wanted` when it does
    not say); a prompt that leaves no room is an error, since the model cannot be asked it."""
    from lowrank_compress.evaluate import context_length

    limit = context_length(model)
    if limit is None or width + wanted <= limit:
        return wanted
    if width >= limit:
        raise LowrankError(
            f"an answer-set prompt takes {width} tokens, the model's whole context of {limit}; pass a set of shorter "
            "prompts, or --answers none"
        )
    return limit - width


def _decode(tokenizer: Any, ids: list[int], stops: Sequence[int]) -> str:
    for i, t in enumerate(ids):
        if t in stops:
            ids = ids[:i]
            break
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def check_answers(
    models: dict[str, tuple[Any, Any]],
    answer_set: AnswerSet,
    *,
    max_new_tokens: int = MAX_NEW_TOKENS,
    device: str = "cpu",
    progress: Callable[[str, int, int], None] | None = None,
) -> AnswerCheck:
    """Ask every model (role -> (model, tokenizer)) the whole set; judge each answer."""
    from lowrank_compress.calibration import has_chat_template

    prompts = [item.prompt for item in answer_set.items]
    report = progress or (lambda phase, done, total: None)
    outputs = {
        role: generate_answers(
            model,
            tok,
            prompts,
            max_new_tokens=max_new_tokens,
            device=device,
            progress=lambda d, t, role=role: report(f"answers ({role})", d, t),
        )  # fmt: skip
        for role, (model, tok) in models.items()
    }
    chat = all(has_chat_template(tok) for _, tok in models.values())
    return AnswerCheck(answer_set.source, answer_set.sha256, answer_set.items, outputs, chat, max_new_tokens)
