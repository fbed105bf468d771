"""BoRA's tuner model."""

from __future__ import annotations

from lowrank_compress.peft_methods.bora.layer import BoraLayer
from lowrank_compress.peft_methods.common import MethodModel


class BoraModel(MethodModel):
    prefix = "bora_"
    tuner_layer_cls = BoraLayer
    layer_cls = BoraLayer
