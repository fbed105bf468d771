"""LoLDU's settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from lowrank_compress.peft_methods.common import MethodConfig


@dataclass
class LoLduConfig(MethodConfig):
    """LoLDU (Shi et al. 2024): the frozen weight's LDU decomposition W = P L D U; its first r columns of P L and
    rows of U stay frozen, and only the r diagonal entries z (started at D's) and one scale sigma (started at 1) train:
    W' = W + P L_r (sigma diag(z) - D_r) U_r, zero at the start."""

    r: int = field(default=16, metadata={"help": "How many leading LDU components are trainable."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = "LOLDU"
        if self.r < 1:
            raise ValueError(f"LoLDU needs r >= 1, got {self.r}")
