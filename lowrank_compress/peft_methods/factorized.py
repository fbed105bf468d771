"""peft's own methods (LoRA / DoRA, C3A, GraLoRA, MiSS) around a `LowRankLinear` as a whole.

peft's layers accept `nn.Linear` (and its quantized forms) only. Around a factorized layer W = up down the update
must span the whole weight, as it does on a dense layer, so the adapter wraps the LowRankLinear itself: its forward is
base(x) + update(x), which only needs the base's forward and its in / out widths.

Each method gets a config subclass with a `peft_type` of its own (`LOWRANK_LORA`, ...), registered with peft
(registry.py), so `PeftModel.from_pretrained` rebuilds these layers from adapter_config.json after
`import lowrank_compress`. On dense models finetune uses peft's own configs (plain `LORA`, `C3A`, ...), loadable
without this package.

- LoRA / DoRA: peft's public plug-in point for layers it does not know, `LoraConfig._register_custom_module`, maps
  LowRankLinear to a subclass of peft's LoRA Linear; peft's own LoraModel does the rest.
- C3A, GraLoRA, MiSS have no such plug-in point: their model classes are subclassed to build our layer subclass for
  a LowRankLinear and defer to peft otherwise.

peft's layer constructors read the in / out widths from an `nn.Linear`; ours hand them a bias-free stand-in Linear
on the meta device (no memory) with the same widths, then put the real LowRankLinear in its place as the base layer.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lowrank_compress.errors import LowrankError
from lowrank_compress.modules import LowRankLinear

MERGE_REFUSAL = (
    "merging into a factorized layer must keep it factorized: use `lowrank-compress finetune --merge` "
    "or lowrank_compress.adapters.merge_adapters instead of peft's merge"
)


def base_of(target: nn.Module) -> nn.Module:
    """The layer a (possibly already wrapped) target adapts."""
    return target.get_base_layer() if hasattr(target, "get_base_layer") else target


def init_on_stand_in(layer: Any, layer_cls: type, base_layer: nn.Module, **kwargs: Any) -> None:
    """Run peft's `layer_cls.__init__` (it accepts only nn.Linear) on a meta-device Linear of the base's widths,
    then make the real base layer the wrapped one."""
    real = base_of(base_layer)
    stand_in = nn.Linear(real.in_features, real.out_features, bias=False, device="meta")
    layer_cls.__init__(layer, stand_in, **kwargs)
    layer.base_layer = base_layer


class RefuseMerge:
    """peft merges by writing into `base_layer.weight`, which a LowRankLinear computes (up @ down) and cannot hold."""

    def merge(self, safe_merge: bool = False, adapter_names: Any = None) -> None:
        raise LowrankError(MERGE_REFUSAL)

    def unmerge(self) -> None:  # never merged in place, see merge
        return None


class UnloadsFactors:
    """Model mixin: peft's generic unload hands the base layer back with `base.weight = adapter.weight`, which a
    LowRankLinear (weight computed from its factors) cannot take; it goes back as it is."""

    def _replace_module(
        self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module
    ) -> None:
        if isinstance(new_module, LowRankLinear):
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)  # type: ignore[misc]


# --------------------------------------------------------------------------------------------------- LoRA / DoRA


def _lora_classes() -> tuple[type, type]:
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    class LowRankLoraLinear(RefuseMerge, PeftLoraLinear):
        """peft's LoRA / DoRA Linear layer, wrapped around a LowRankLinear as a whole."""

        def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs: Any) -> None:
            kwargs.pop("parameter_name", None)  # peft passes it to every dispatcher; Linear does not take it
            super().__init__(base_layer, adapter_name, **kwargs)

        def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
            return module.in_features, module.out_features

    class LowRankLoraConfig(LoraConfig):
        """LoraConfig whose LoRA also wraps LowRankLinear layers (peft's custom-module mapping)."""

        def __post_init__(self) -> None:
            super().__post_init__()
            self.peft_type = "LOWRANK_LORA"
            self._register_custom_module({LowRankLinear: LowRankLoraLinear})

    return LowRankLoraLinear, LowRankLoraConfig


# --------------------------------------------------------------------------------------------------- C3A


def _c3a_classes() -> tuple[type, type, type]:
    from peft.tuners.c3a import C3AConfig, C3ALayer, C3ALinear, C3AModel

    class LowRankC3ALinear(RefuseMerge, C3ALinear):
        """C3A's block-circulant update around a LowRankLinear (its forward reads only x and the kernels)."""

        def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any, block_size: int, **kw: Any):
            nn.Module.__init__(self)
            init_on_stand_in(self, C3ALayer, base_layer, **kw)
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, block_size, config=config)

    class LowRankC3AModel(UnloadsFactors, C3AModel):
        @staticmethod
        def _create_new_module(config: Any, adapter_name: str, target: nn.Module, **kwargs: Any) -> nn.Module:
            if isinstance(base_of(target), LowRankLinear):
                return LowRankC3ALinear(target, adapter_name, config=config, **kwargs)
            return C3AModel._create_new_module(config, adapter_name, target, **kwargs)

    class LowRankC3AConfig(C3AConfig):
        def __post_init__(self) -> None:
            super().__post_init__()
            self.peft_type = "LOWRANK_C3A"

    return LowRankC3ALinear, LowRankC3AModel, LowRankC3AConfig


# --------------------------------------------------------------------------------------------------- GraLoRA


def _gralora_classes() -> tuple[type, type, type]:
    from peft.tuners.gralora import GraloraConfig, GraloraLayer, GraloraModel
    from peft.tuners.gralora.layer import Linear as GraloraLinear

    class LowRankGraloraLinear(RefuseMerge, GraloraLinear):
        """GraLoRA's k x k grid of low-rank blocks around a LowRankLinear."""

        def __init__(self, base_layer: nn.Module, adapter_name: str, module_name: str, config: Any, r: int = 0,
                     **kw: Any) -> None:  # fmt: skip
            nn.Module.__init__(self)
            init_on_stand_in(self, GraloraLayer, base_layer, **kw)
            self.fan_in_fan_out = False
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, module_name, r, config=config)

    class LowRankGraloraModel(UnloadsFactors, GraloraModel):
        @staticmethod
        def _create_new_module(config: Any, adapter_name: str, target: nn.Module, module_name: str,
                               **kwargs: Any) -> nn.Module:  # fmt: skip
            if isinstance(base_of(target), LowRankLinear):
                return LowRankGraloraLinear(target, adapter_name, module_name, config=config, **kwargs)
            return GraloraModel._create_new_module(config, adapter_name, target, module_name, **kwargs)

    class LowRankGraloraConfig(GraloraConfig):
        def __post_init__(self) -> None:
            super().__post_init__()
            self.peft_type = "LOWRANK_GRALORA"

    return LowRankGraloraLinear, LowRankGraloraModel, LowRankGraloraConfig


# --------------------------------------------------------------------------------------------------- MiSS (Bone)


def _miss_classes() -> tuple[type, type, type]:
    from peft.tuners.miss import MissConfig, MissLayer, MissModel
    from peft.tuners.miss.layer import MissLinear

    class LowRankMissLinear(RefuseMerge, MissLinear):
        """MiSS's shared block around a LowRankLinear (its default mode reads the base's output, not its weight)."""

        def __init__(
            self, base_layer: nn.Module, adapter_name: str, config: Any, r: int = 0, **kw: Any
        ) -> None:
            nn.Module.__init__(self)
            init_on_stand_in(self, MissLayer, base_layer, **kw)
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, config=config, **kw)
            self.miss_fn = config.init_weights

    class LowRankMissModel(UnloadsFactors, MissModel):
        @staticmethod
        def _create_new_module(config: Any, adapter_name: str, target: nn.Module, **kwargs: Any) -> nn.Module:
            if isinstance(base_of(target), LowRankLinear):
                return LowRankMissLinear(target, adapter_name, config=config, **kwargs)
            return MissModel._create_new_module(config, adapter_name, target, **kwargs)

    class LowRankMissConfig(MissConfig):
        def __post_init__(self) -> None:
            super().__post_init__()
            self.peft_type = "LOWRANK_MISS"

    return LowRankMissLinear, LowRankMissModel, LowRankMissConfig


# --------------------------------------------------------------------------------------------------- AdaLoRA


def _adalora_classes() -> tuple[type, type, type]:
    from peft.tuners.adalora import AdaLoraConfig, AdaLoraLayer, AdaLoraModel, SVDLinear

    class LowRankSVDLinear(RefuseMerge, SVDLinear):
        """AdaLoRA's SVD-form update P diag(E) Q around a LowRankLinear (its forward reads only the base's output)."""

        def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any, r: int = 0, lora_alpha: int = 1,
                     **kw: Any) -> None:  # fmt: skip
            nn.Module.__init__(self)
            init_on_stand_in(self, AdaLoraLayer, base_layer)
            self.fan_in_fan_out = False
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, lora_alpha, config=config)

    class LowRankAdaLoraModel(UnloadsFactors, AdaLoraModel):
        """peft's AdaLoRA (its rank allocator, and the saved state resized by the final rank pattern) on LowRankLinear
        layers too."""

        @staticmethod
        def _create_new_module(
            lora_config: Any, adapter_name: str, target: nn.Module, **kwargs: Any
        ) -> nn.Module:
            if isinstance(base_of(target), LowRankLinear):
                return LowRankSVDLinear(target, adapter_name, config=lora_config, **kwargs)
            return AdaLoraModel._create_new_module(lora_config, adapter_name, target, **kwargs)

    class LowRankAdaLoraConfig(AdaLoraConfig):
        def __post_init__(self) -> None:
            super().__post_init__()
            self.peft_type = "LOWRANK_ADALORA"

    return LowRankSVDLinear, LowRankAdaLoraModel, LowRankAdaLoraConfig


# --------------------------------------------------------------------------------------------------- registry

_CLASSES: dict[str, tuple[type, ...]] = {}


def classes(method: str) -> tuple[type, ...]:
    """The (layer, [model,] config) classes of a method, built once on first use (peft is imported lazily)."""
    if method not in _CLASSES:
        build = {
            "lora": _lora_classes,
            "c3a": _c3a_classes,
            "gralora": _gralora_classes,
            "miss": _miss_classes,
            "adalora": _adalora_classes,
        }
        _CLASSES[method] = build[method]()
    return _CLASSES[method]


def config_class(method: str) -> type:
    """The config class that makes `method` wrap LowRankLinear layers."""
    return classes(method)[-1]


def register() -> None:
    """Register the LOWRANK_* methods with peft (idempotent)."""
    from peft.tuners.lora import LoraModel

    from lowrank_compress.peft_methods.registry import register_method

    register_method("lowrank_lora", config_class("lora"), LoraModel)
    for method in ("c3a", "gralora", "miss", "adalora"):
        _, model_cls, config_cls = classes(method)
        register_method(f"lowrank_{method}", config_cls, model_cls)
