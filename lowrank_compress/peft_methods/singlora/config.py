"""SingLoRA's settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from lowrank_compress.peft_methods.common import MethodConfig


@dataclass
class SingLoraConfig(MethodConfig):
    """SingLoRA (Bensaïd et al. 2025): W + (alpha / r) u(t) A A*^T with one matrix A (max(in, out) x r) and
    u(t) = min(t / T, 1), T = `ramp_steps` optimizer steps (the ramp is what makes the start a zero update: A is
    random, as the paper initializes it; see the layer for its scale)."""

    r: int = field(default=8, metadata={"help": "Rank of A."})
    alpha: float = field(default=8.0, metadata={"help": "Scale alpha / r."})
    ramp_steps: int = field(default=100, metadata={"help": "T of the ramp u(t) = min(t / T, 1)."})
    init_seed: int | None = field(default=None, metadata={"help": "Seed of A's Kaiming-uniform init."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = "SINGLORA"
        if self.r < 1 or self.ramp_steps < 1:
            raise ValueError(f"SingLoRA needs r >= 1 and ramp_steps >= 1, got {self.r} and {self.ramp_steps}")
