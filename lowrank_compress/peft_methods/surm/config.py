"""SURM's settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from lowrank_compress.peft_methods.common import MethodConfig


@dataclass
class SurmConfig(MethodConfig):
    """SURM (Sehanobish et al. 2024), its general low-displacement-rank form: ΔW = scale sum_{i<r} C(g_i) S(h_i),
    circulant times skew-circulant, an n x n matrix of displacement rank r (n = max(in, out); a rectangular layer
    takes its top-left out x in corner). g starts at zero (a zero update), h small and random. The default scale 1 / n
    (as C3A divides by the width) keeps an optimizer step of size lr on g from moving C(g) by more than about lr in
    norm: at scale 1 an all-same-sign step of 3e-4 moves C(g)'s norm by up to n x 3e-4 (0.46 at n = 1536), and two
    steps at lr 3e-4 took SmolLM2 at 0.8 from perplexity 11.86 to 14.97 (1,024 held-out tokens)."""

    r: int = field(
        default=8, metadata={"help": "Displacement rank: the number of circulant x skew-circulant terms."}
    )
    scale: float | None = field(default=None, metadata={"help": "Scale of the update (None: 1 / n)."})
    init_seed: int | None = field(default=None, metadata={"help": "Seed of h's init."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = "SURM"
        if self.r < 1:
            raise ValueError(f"SURM needs r >= 1, got {self.r}")
