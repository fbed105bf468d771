"""Settings: factorize's (with YAML recipes) and finetune's, one dataclass each; unknown keys and wrong values fail
loudly. Only the standard library and PyYAML are imported, so that the CLI reads the defaults for its options and
--help without importing torch."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lowrank_compress.choices import (
    ADAPTERS,
    CHAT_DATA,
    GRAD_SOURCES,
    INITS,
    MERGE_RANKS,
    METHODS,
    OPTIMIZERS,
    POLICIES,
    PRECISIONS,
    QUANTIZE,
    RANK_SCHEDULES,
    SELF_STARTS,
    TRAIN,
    check_device,
)
from lowrank_compress.errors import BudgetError, LowrankError

__all__ = [
    "GRAD_SOURCES",
    "METHODS",
    "POLICIES",
    "SELF_STARTS",
    "FactorizeSettings",
    "FinetuneSettings",
    "build_settings",
    "load_recipe",
]


# refinement steps per block by default with the whiten fit (FactorizeSettings.refine_steps)
REFINE_STEPS = 8


@dataclass
class FactorizeSettings:
    """Exactly what a factorize run does; written to recipe.yaml and reusable with --recipe."""

    budget: float = 0.8
    method: str = "whiten"
    policy: str = "sensitivity"
    energy: float | None = None
    calibration: str = "builtin"
    samples: int = 16
    seq_len: int = 512
    grad_samples: int = 4
    seed: int = 0
    target: list[str] = field(default_factory=list)
    ignore: list[str] = field(default_factory=list)
    rank_multiple: int = 1
    # whiten: a loading of the Gram by this fraction of its mean diagonal (GPTQ-style damping); 0 is SVD-LLM, larger
    # values blend the objective toward plain SVD; with the error-aware fit it also pulls the fit toward W, which
    # keeps it from fitting the calibration windows' errors (0.1 chosen by benchmarks/bench_cross_domain.py)
    damping: float = 0.1
    # share of the pooled calibration statistics that comes from `samples` windows sampled from the model itself,
    # beside the text's `samples` windows: the factors then also fit what the model usually sees, not only the
    # calibration text (chosen by benchmarks/bench_cross_domain.py); 0 = the text alone, nothing sampled
    self_mix: float = 0.6
    # tokens per self-generated window (None: seq_len); shorter windows sample faster
    self_seq_len: int | None = None
    # how each self-generated window starts after the BOS/EOS prefix: "random" (a uniformly drawn ordinary token,
    # which varies how the samples open) or "prefix" (the bare prefix)
    self_start: str = "random"
    # sampling temperature of the self-generated windows: 1 keeps the model's full distribution; lower values stay
    # closer to what it writes when decoding greedily, as chat users and the answer check see it
    self_temperature: float = 1.0
    # chat models (the tokenizer has a chat template): the self-generated share is conversations, the model's answers
    # to built-in user prompts through the template. None (the default): on when the tokenizer has a chat template
    # (on SmolLM2-Instruct it kept more answers at every seed, see the README); True without a template: ignored,
    # with a note; False: plain calibration for every model
    chat: bool | None = None
    # chat calibration: the text windows too are wrapped as turns (a user opening, the rest as the answer); False
    # (the default) keeps them plain text, which held out better on SmolLM2-Instruct (see the README)
    chat_text: bool = False
    # chat calibration: the share of the self-generated windows that are conversations; the rest are free text
    # sampled as for a base model (instruct models are also asked to write plain text)
    chat_share: float = 1.0
    # chat calibration: each sampled answer ends at its end of turn (or after this many tokens) and the window goes
    # on with the next prompt and answer until it is full, so it holds several answers as users see them; None: one
    # answer runs on to fill the window
    self_answer_tokens: int | None = None
    # where the loss gradients (sensitivity, fisher, loss weights) come from: "mix" (both parts), "self"
    # (self-generated only) or "answers" (chat models: grad_samples windows of the model's greedy answers to the
    # built-in prompts, several exchanges each, the loss on the answers alone; sampled besides the calibration)
    grad_source: str = "mix"
    # fit each layer to the dense model's outputs while feeding it the compressed prefix's inputs (AA-SVD /
    # SVD-LLM V2 style, closed form); False: fit to the dense inputs alone (SVD-LLM)
    error_aware: bool = True
    # whiten: weight each output channel's squared error by the loss's mean squared gradient there (measured by the
    # gradient windows' backward pass, which it then needs), the diagonal of K-FAC's output factor, and read the
    # ranks from the weighted spectra. None (the default): on for the whiten method on models with a language-model
    # loss (on SmolLM2-Instruct it cut the held-out excess perplexity and kept as many answers over eight seeds, see
    # the README); True where it cannot run: said, and off; False: every channel counts alike (SVD-LLM)
    loss_weighted: bool | None = None
    # Adam steps per block refining its factors against the dense block's outputs, one calibration window a step
    # (0: closed form only). None (the default): REFINE_STEPS with the whiten method, where it was measured (on
    # SmolLM2, from half the depth, the excess perplexity at 0.8 and 0.6 fell under 0.7x of the in-memory default's
    # on both held-out texts at 1.3-1.4x its wall time, see the README), 0 with the others
    refine_steps: int | None = None
    # where along the depth the refinement starts, as a share of the blocks: block i is refined when i >= refine_from
    # x blocks (0: every block; 0.5: the later half, which on SmolLM2 at 0.8 kept most of every block's gain)
    refine_from: float = 0.5
    device: str = "cpu"
    # keep the calibration hidden states on the CPU while blocks run on --device (a GPU smaller than they are)
    offload: bool = False

    @property
    def reads_calibration(self) -> bool:
        """Whether the run reads calibration windows: every method but plain SVD does, and the sensitivity policy's
        gradients do."""
        return self.method != "svd" or self.policy == "sensitivity"

    def validate(self) -> FactorizeSettings:
        for f in dataclasses.fields(self):  # first: nan passes every comparison below
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise LowrankError(f"{f.name.replace('_', '-')} must be a finite number, got {value}")
        if not 0.0 < self.budget < 1.0:
            raise BudgetError(
                f"budget must be strictly between 0 and 1 (the fraction of target params kept), got {self.budget}"
            )
        if self.method not in METHODS:
            raise LowrankError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.policy not in POLICIES:
            raise LowrankError(f"unknown policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        if not 0.0 <= self.damping < 1e3:
            raise LowrankError(
                f"damping must be a fraction of the Gram's mean diagonal in [0, 1000), got {self.damping}"
            )
        if not 0.0 <= self.self_mix <= 1.0:
            raise LowrankError(
                "self-mix must be the self-generated share of the calibration statistics in [0, 1], "
                f"got {self.self_mix}"
            )
        if not 0.0 <= self.chat_share <= 1.0:
            raise LowrankError(f"chat-share must be a fraction in [0, 1], got {self.chat_share}")
        if not 0.0 < self.self_temperature <= 10.0:
            raise LowrankError(f"self-temperature must be in (0, 10], got {self.self_temperature}")
        if self.self_start not in SELF_STARTS:
            raise LowrankError(
                f"unknown self-start {self.self_start!r}; choose one of {', '.join(SELF_STARTS)}"
            )
        for name, auto in _AUTO.items():
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise LowrankError(
                    f"{name.replace('_', '-')} must be true, false or null ({auto}), got {value!r}"
                )
        if self.self_answer_tokens is not None and self.self_answer_tokens < 1:
            raise LowrankError(f"self-answer-tokens must be at least 1, got {self.self_answer_tokens}")
        if self.self_seq_len is not None and self.self_seq_len < 2:
            raise LowrankError(f"self-seq-len must be at least 2, got {self.self_seq_len}")
        if self.grad_source not in GRAD_SOURCES:
            raise LowrankError(
                f"unknown grad-source {self.grad_source!r}; choose one of {', '.join(GRAD_SOURCES)}"
            )
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise LowrankError(f"energy must be in (0, 1], got {self.energy}")
        if self.refine_steps is not None and self.refine_steps < 0:
            raise LowrankError(f"refine-steps must be 0 or more, got {self.refine_steps}")
        if self.refine_steps and not self.reads_calibration:
            raise LowrankError(
                f"--refine-steps needs calibration windows, which --method svd with --policy {self.policy} never "
                "reads; use a data-aware --method or --policy sensitivity, or --refine-steps 0"
            )
        if not 0.0 <= self.refine_from < 1.0:
            raise LowrankError(f"refine-from must be a share of the blocks in [0, 1), got {self.refine_from}")
        for name in ("samples", "seq_len", "grad_samples", "rank_multiple"):
            if getattr(self, name) < 1:
                raise LowrankError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        check_device(self.device)
        return self

    def to_yaml(self, header: str = "") -> str:
        body = yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)
        return (header + "\n" if header else "") + body


_TYPES: dict[str, tuple[type, ...]] = {
    "budget": (float, int),
    "energy": (float, int, type(None)),
    "damping": (float, int),
    "self_mix": (float, int),
    "self_seq_len": (int, type(None)),
    "self_temperature": (float, int),
    "chat_share": (float, int),
    "self_answer_tokens": (int, type(None)),
    "samples": (int,),
    "seq_len": (int,),
    "grad_samples": (int,),
    "seed": (int,),
    "rank_multiple": (int,),
    "target": (list,),
    "ignore": (list,),
    "refine_steps": (int, type(None)),
    "refine_from": (float, int),
}
_BOOLS = ("error_aware", "loss_weighted", "offload", "chat", "chat_text")
# booleans whose null means "decide from the model", and what it decides by
_AUTO = {
    "chat": "when the tokenizer has a chat template",
    "loss_weighted": "the whiten method on a language model",
}


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice (it would silently keep the last value)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a recipe file into a dict of settings; unknown keys, wrong types or bad YAML are errors naming the file."""
    p = Path(path)
    try:
        data = yaml.load(p.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except FileNotFoundError:
        raise LowrankError(f"recipe {p}: no such file") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        problem = f": {e.problem}" if isinstance(e, yaml.constructor.ConstructorError) and e.problem else ""
        raise LowrankError(f"recipe {p}: not valid YAML{at}{problem}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LowrankError(f"recipe {p}: expected a mapping of settings, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(FactorizeSettings)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise LowrankError(
            f"recipe {p}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}"
        )
    for key, value in data.items():
        if key in _BOOLS:
            if not isinstance(value, bool) and not (key in _AUTO and value is None):
                allowed = "true, false or null" if key in _AUTO else "true or false"
                raise LowrankError(f"recipe {p}: {key} must be {allowed}")
            continue
        expected = _TYPES.get(key, (str,))
        if isinstance(value, bool) or not isinstance(value, expected):
            raise LowrankError(f"recipe {p}: {key} has the wrong type ({type(value).__name__})")
        if isinstance(value, list) and not all(isinstance(v, str) for v in value):
            raise LowrankError(f"recipe {p}: {key} must be a list of patterns (strings)")
    return data


def build_settings(recipe: str | Path | None = None, **overrides: Any) -> FactorizeSettings:
    """Defaults, then the recipe, then explicit overrides (None means: not given)."""
    values: dict[str, Any] = load_recipe(recipe) if recipe else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    for key in ("target", "ignore"):
        if key in values:
            values[key] = list(values[key])
    for key in ("budget", "damping", "self_mix"):
        if key in values:
            values[key] = float(values[key])
    return FactorizeSettings(**values).validate()


@dataclass
class FinetuneSettings:
    """Exactly what a finetune run does; recorded in finetune.json and in each checkpoint (a resume must match)."""

    data: str = "builtin"  # a text file, builtin, or chat: conversations sampled from the teacher
    eval_data: str | None = None
    teacher: str | None = None  # distillation: the loss is KL(teacher || model) at every position
    chat_samples: int = 32  # --data chat: conversations sampled
    adapter: str = "lora"
    rank: int = 16
    alpha: float | None = None  # None: 2 x rank (LoRA scaling 2)
    block_size: int | None = (
        None  # c3a: None picks per layer the size nearest LoRA's parameter count at `rank`
    )
    blocks: int = 2  # gralora: k
    quantize: str = "none"
    steps: int | None = None
    epochs: float | None = None  # neither steps nor epochs: one epoch
    lr: float = 1e-3
    batch_size: int = 4
    grad_accum: int = 1
    seq_len: int = 256
    warmup: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    merge: bool = False
    merge_rank: str = "grow"
    train: str = "adapters"
    nuclear: float = 0.0
    truncate_every: int = 0
    truncate_energy: float = 0.999
    low_rank_reg: float = 0.0  # LoRAE: weight of the exact nuclear norm of every trained low-rank product
    precision: str = "auto"
    optimizer: str = "adamw"  # lora-pro: LoRA-Pro's adjusted gradients (training/lora_pro.py)
    init: str = "zero"  # gora: GoRA's ranks and gradient init (training/gora.py)
    init_batches: int = 8  # gora: batches whose gradients are accumulated
    gora_gamma: float = 16.0  # gora: the initial update is -(gamma / rank) G projected on A's rows
    rank_schedule: str = "none"  # adalora, elalora (training/rank_schedule.py), ard (training/ard.py)
    ard_l1: float = 1e-3  # ard: weight of the l1 term on the scales
    ard_tv: float = 1e-3  # ard: weight of the total-variation term across depth
    save_every: int = 50
    eval_tokens: int = 16384
    answers: str = "builtin"  # the answer check before and after training: builtin, a .jsonl set, or none
    seed: int = 0

    def validate(self) -> FinetuneSettings:
        choices = {"adapter": ADAPTERS, "quantize": QUANTIZE, "merge_rank": MERGE_RANKS, "train": TRAIN,
                   "precision": PRECISIONS, "optimizer": OPTIMIZERS, "init": INITS,
                   "rank_schedule": RANK_SCHEDULES}  # fmt: skip
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise LowrankError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}")
        if self.block_size is not None and self.block_size < 1:
            raise LowrankError(f"--block-size must be at least 1, got {self.block_size}")
        if self.data == CHAT_DATA and self.teacher is None:
            raise LowrankError("--data chat samples conversations from the --teacher model; pass --teacher")
        for name in ("rank", "blocks", "batch_size", "grad_accum", "save_every", "chat_samples"):
            if getattr(self, name) < 1:
                raise LowrankError(
                    f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}"
                )
        if self.seq_len < 2:
            raise LowrankError(f"--seq-len must be at least 2, got {self.seq_len}")
        if self.steps is not None and self.epochs is not None:
            raise LowrankError("give --steps or --epochs, not both")
        if self.steps is not None and self.steps < 1:
            raise LowrankError(f"--steps must be at least 1, got {self.steps}")
        if self.epochs is not None and not self.epochs > 0:
            raise LowrankError(f"--epochs must be positive, got {self.epochs}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise LowrankError(f"--lr must be a positive number, got {self.lr}")
        if not 0.0 <= self.warmup < 1.0:
            raise LowrankError(f"--warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        if self.nuclear < 0 or self.truncate_every < 0 or not 0.0 < self.truncate_energy <= 1.0:
            raise LowrankError("--nuclear and --truncate-every must be >= 0 and --truncate-energy in (0, 1]")
        if not (self.low_rank_reg >= 0 and math.isfinite(self.low_rank_reg)):
            raise LowrankError(f"--low-rank-reg must be a number >= 0, got {self.low_rank_reg}")
        if (
            self.low_rank_reg
            and self.train == "adapters"
            and (self.adapter not in ("lora", "dora") or self.rank_schedule != "none")
        ):
            raise LowrankError(
                "--low-rank-reg penalizes a low-rank product B A or U D: use --adapter lora or dora without "
                "--rank-schedule, or --train factors"
            )
        if self.train == "factors":
            if self.quantize != "none":
                raise LowrankError(
                    "--train factors trains the factors in full precision; drop --quantize nf4"
                )
        elif self.nuclear or self.truncate_every:
            raise LowrankError("--nuclear and --truncate-every apply to --train factors only")
        if self.eval_tokens < 0:
            raise LowrankError(f"--eval-tokens must be >= 0, got {self.eval_tokens}")
        self._validate_methods()
        return self

    def _validate_methods(self) -> None:
        """The training methods of issue 15 work on LoRA's two factors only."""
        asked = [f"--{k.replace('_', '-')} {v}" for k, v in
                 (("optimizer", self.optimizer), ("init", self.init), ("rank_schedule", self.rank_schedule))
                 if v not in ("adamw", "zero", "none")]  # fmt: skip
        for option in asked:
            if self.train != "adapters" or self.adapter != "lora":
                what = "--train factors" if self.train != "adapters" else f"--adapter {self.adapter}"
                raise LowrankError(
                    f"{option} works on LoRA's factors A and B; use --adapter lora, not {what}"
                )
        if self.rank_schedule != "none" and len(asked) > 1:
            raise LowrankError(
                f"--rank-schedule {self.rank_schedule} moves the ranks itself; it does not combine with "
                f"{[a for a in asked if not a.startswith('--rank-schedule')][0]}"
            )
        if self.init == "gora" and self.quantize != "none":
            raise LowrankError("--init gora reads each layer's full-precision weight; drop --quantize nf4")
        if not (self.ard_l1 >= 0 and self.ard_tv >= 0 and math.isfinite(self.ard_l1 + self.ard_tv)):
            raise LowrankError("--ard-l1 and --ard-tv must be numbers >= 0")
        if self.init_batches < 1:
            raise LowrankError(f"--init-batches must be at least 1, got {self.init_batches}")
        if not (self.gora_gamma > 0 and math.isfinite(self.gora_gamma)):
            raise LowrankError(f"--gora-gamma must be a positive number, got {self.gora_gamma}")

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha) if self.alpha is not None else 2.0 * self.rank
