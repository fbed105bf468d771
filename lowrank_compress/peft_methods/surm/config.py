"""SURM's settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from lowrank_compress.peft_methods.common import MethodConfig


@dataclass
class SurmConfig(MethodConfig):
    """SURM (Sehanobish et al. 2024), its general low-displacement-rank form: ΔW = scale sum_{i<r} C(g_i) S(h_i),
    circulant times skew-circulant, an n x n matrix of displacement rank r (n = max(in, out); a rectangular layer
    takes its top-left out x in corner). g starts at zero (a zero update), h small and random."""

    r: int = field(
        default=8, metadata={"help": "Displacement rank: the number of circulant x skew-circulant terms."}
    )
    scale: float = field(default=1.0, metadata={"help": "Scale of the update."})
    init_seed: int | None = field(default=None, metadata={"help": "Seed of h's init."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = "SURM"
        if self.r < 1:
            raise ValueError(f"SURM needs r >= 1, got {self.r}")
