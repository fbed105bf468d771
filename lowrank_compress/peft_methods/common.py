"""What our peft methods share: config fields, a layer that adds an update to any base layer's output, and a tuner
model that wraps the targeted layers.

A base layer is anything with `in_features` / `out_features` whose forward computes x W^T (+ b): nn.Linear,
bitsandbytes' Linear4bit, and LowRankLinear as a whole, so each method works on dense, NF4 and factorized models.
Each layer also says what its trained update is as an `AdapterDelta` (adapter_kinds.py), which is how finetune
merges it; peft's own in-place merge is refused (a factorized layer has no weight to write into).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from lowrank_compress.errors import LowrankError
from lowrank_compress.modules import LowRankLinear, is_conv1d
from lowrank_compress.peft_methods.factorized import MERGE_REFUSAL, UnloadsFactors


@dataclass
class MethodConfig(PeftConfig):
    """The target-selection fields peft's tuner machinery reads, as every peft config has them."""

    target_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules to adapt."})
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules not to adapt."})
    layers_to_transform: list[int] | int | None = field(default=None, metadata={"help": "Layer indices."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Layer name pattern."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Extra trainable modules."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)


class MethodLayer(nn.Module, BaseTunerLayer):
    """base(x) + sum over active adapters of `update(x, adapter)`. Subclasses set `adapter_layer_names` and
    `other_param_names` (peft's bookkeeping of what belongs to an adapter) and define `update_layer`, `update` and
    `adapter_delta`."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any) -> None:
        super().__init__()
        real = base_layer.get_base_layer() if isinstance(base_layer, BaseTunerLayer) else base_layer
        if is_conv1d(real) or not hasattr(real, "in_features"):
            raise LowrankError(f"{type(self).__name__} wraps Linear layers only, not {type(real).__name__}")
        self.base_layer = base_layer
        self.in_features, self.out_features = real.in_features, real.out_features
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    @abc.abstractmethod
    def update_layer(self, adapter_name: str, config: Any) -> None:
        """Create this adapter's parameters from its config."""

    @abc.abstractmethod
    def update(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        """The adapter's contribution to the layer's output for input x."""

    @abc.abstractmethod
    def adapter_delta(self, adapter: str) -> Any:
        """The adapter's weight update, as the merge reads it."""

    def base_weight(self) -> torch.Tensor:
        """The frozen base weight (out x in) in float32: factors multiplied, 4-bit dequantized."""
        from lowrank_compress.modules import linear_weight

        base = self.get_base_layer()
        w = base.dense_weight() if isinstance(base, LowRankLinear) else linear_weight(base)
        return w.detach().float()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        for adapter in self.active_adapters:
            if adapter in getattr(self, self.adapter_layer_names[0]):
                result = result + self.update(x, adapter).to(result.dtype)
        return result

    def merge(self, safe_merge: bool = False, adapter_names: Any = None) -> None:
        raise LowrankError(MERGE_REFUSAL)

    def unmerge(self) -> None:  # never merged in place, see merge
        return None


class MethodModel(UnloadsFactors, BaseTuner):
    """Wraps each targeted layer in `layer_cls` (set by subclasses with `prefix` and `tuner_layer_cls`)."""

    layer_cls: type[MethodLayer]
    target_module_mapping: dict[str, list[str]] = {}  # noqa: RUF012 (peft reads it as a class attribute)

    def _create_and_replace(self, peft_config: Any, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: str, **kwargs: Any) -> None:  # fmt: skip
        if isinstance(target, self.layer_cls):
            target.update_layer(adapter_name, peft_config)
            return
        new = self.layer_cls(target, adapter_name, peft_config)
        if adapter_name not in self.active_adapters:
            new.requires_grad_(False)
        setattr(parent, target_name, new)
        real = new.get_base_layer()
        weight = real.up.weight if isinstance(real, LowRankLinear) else real.weight
        if weight.device.type != "meta":
            for name, p in new.named_parameters():
                if self.prefix in name:
                    p.data = p.data.to(weight.device)
