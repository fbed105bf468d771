"""BoRA's settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from lowrank_compress.peft_methods.common import MethodConfig


@dataclass
class BoraConfig(MethodConfig):
    """BoRA (Wang et al. 2024): DoRA's magnitude on both dimensions. With V = W + s B A,
    W' = normcol(diag(m_row) normrow(V)) diag(m_col): each row of V scaled to its learned norm m_row, then each
    column of the result to its learned norm m_col (the paper's two normalization steps, rows first as DoRA's)."""

    r: int = field(default=8, metadata={"help": "Rank of B A."})
    alpha: float = field(default=16.0, metadata={"help": "s = alpha / r."})
    init_seed: int | None = field(default=None, metadata={"help": "Seed of A's Kaiming-uniform init."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = "BORA"
        if self.r < 1:
            raise ValueError(f"BoRA needs r >= 1, got {self.r}")
