"""BoRA (Wang et al. 2024, "BoRA: Bi-dimensional Weight-Decomposed Low-Rank Adaptation") as a peft method; it has no
official code, so this follows the paper's description."""

from lowrank_compress.peft_methods.bora.config import BoraConfig
from lowrank_compress.peft_methods.bora.layer import BoraLayer
from lowrank_compress.peft_methods.bora.model import BoraModel

__all__ = ["BoraConfig", "BoraLayer", "BoraModel"]
