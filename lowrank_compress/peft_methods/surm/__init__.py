"""SURM (Sehanobish et al. 2024, "Structured Unrestricted-Rank Matrices for Parameter Efficient Fine-tuning"), its
low-displacement-rank form, as a peft method."""

from lowrank_compress.peft_methods.surm.config import SurmConfig
from lowrank_compress.peft_methods.surm.layer import SurmLayer
from lowrank_compress.peft_methods.surm.model import SurmModel

__all__ = ["SurmConfig", "SurmLayer", "SurmModel"]
