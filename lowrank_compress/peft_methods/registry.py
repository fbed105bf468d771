"""Adding a PEFT method to peft's registries, so adapters of ours save and load like peft's own.

peft looks a saved adapter up by the `peft_type` string in adapter_config.json: `PEFT_TYPE_TO_CONFIG_MAPPING` gives
the config class, `PEFT_TYPE_TO_TUNER_MAPPING` the model class that wraps the layers. `peft.utils.register_peft_method`
fills them, but only for names peft already lists in its closed `PeftType` enum: a method peft does not ship has no
member there. For those we add the same three entries under the name's string. `PeftType` is a `str` enum, so its
members and their strings hash and compare alike, and every lookup peft makes with the `peft_type` it read from a
file finds our entry. Nothing of peft's is replaced: a name peft already knows is refused. These registries are
peft internals, hence the upper bound on peft in pyproject.toml.
"""

from __future__ import annotations


def register_method(name: str, config_cls: type, model_cls: type) -> None:
    """Make peft build `model_cls` for configs whose `peft_type` is `name.upper()` (idempotent)."""
    from peft.mapping import (
        PEFT_TYPE_TO_CONFIG_MAPPING,
        PEFT_TYPE_TO_PREFIX_MAPPING,
        PEFT_TYPE_TO_TUNER_MAPPING,
    )
    from peft.utils import PeftType, register_peft_method

    key = name.upper()
    known = PEFT_TYPE_TO_CONFIG_MAPPING.get(key)
    if known is config_cls:
        return
    if known is not None:
        raise RuntimeError(f"peft already has a method {key} ({known.__name__}); not replacing it")
    if key in PeftType.__members__:  # a future peft that lists the name: its own registration
        register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=model_cls.prefix)
        return
    PEFT_TYPE_TO_CONFIG_MAPPING[key] = config_cls
    PEFT_TYPE_TO_TUNER_MAPPING[key] = model_cls
    PEFT_TYPE_TO_PREFIX_MAPPING[key] = model_cls.prefix
