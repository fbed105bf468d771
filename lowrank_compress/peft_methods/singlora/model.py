"""SingLoRA's tuner model."""

from __future__ import annotations

from lowrank_compress.peft_methods.common import MethodModel
from lowrank_compress.peft_methods.singlora.layer import SingLoraLayer


class SingLoraModel(MethodModel):
    prefix = "singlora_"
    tuner_layer_cls = SingLoraLayer
    layer_cls = SingLoraLayer
