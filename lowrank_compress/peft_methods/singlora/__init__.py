"""SingLoRA (Bensaïd et al. 2025, "SingLoRA: Low Rank Adaptation Using a Single Matrix") as a peft method."""

from lowrank_compress.peft_methods.singlora.config import SingLoraConfig
from lowrank_compress.peft_methods.singlora.layer import SingLoraLayer
from lowrank_compress.peft_methods.singlora.model import SingLoraModel

__all__ = ["SingLoraConfig", "SingLoraLayer", "SingLoraModel"]
