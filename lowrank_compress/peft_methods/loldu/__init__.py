"""LoLDU (Shi et al. 2024, "LoLDU: Low-Rank Adaptation via Lower-Diag-Upper Decomposition") as a peft method."""

from lowrank_compress.peft_methods.loldu.config import LoLduConfig
from lowrank_compress.peft_methods.loldu.layer import LoLduLayer
from lowrank_compress.peft_methods.loldu.model import LoLduModel

__all__ = ["LoLduConfig", "LoLduLayer", "LoLduModel"]
