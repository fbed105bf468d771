"""LoLDU's tuner model."""

from __future__ import annotations

from lowrank_compress.peft_methods.common import MethodModel
from lowrank_compress.peft_methods.loldu.layer import LoLduLayer


class LoLduModel(MethodModel):
    prefix = "loldu_"
    tuner_layer_cls = LoLduLayer
    layer_cls = LoLduLayer
