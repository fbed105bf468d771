"""SURM's tuner model."""

from __future__ import annotations

from lowrank_compress.peft_methods.common import MethodModel
from lowrank_compress.peft_methods.surm.layer import SurmLayer


class SurmModel(MethodModel):
    prefix = "surm_"
    tuner_layer_cls = SurmLayer
    layer_cls = SurmLayer
