"""Adapters as peft methods: peft's own around factorized layers (factorized.py), and the methods peft lacks
(singlora, loldu, bora, surm), each in a folder with config / layer / model as peft's tuners are laid out.

`register()` adds them all to peft's registries; `import lowrank_compress` runs it when peft is imported (see
plugins.py), so adapters saved by finetune load with plain `PeftModel.from_pretrained`.
"""

from __future__ import annotations


def register() -> None:
    """Register every method of ours with peft (idempotent)."""
    from lowrank_compress.peft_methods import factorized
    from lowrank_compress.peft_methods.bora import BoraConfig, BoraModel
    from lowrank_compress.peft_methods.loldu import LoLduConfig, LoLduModel
    from lowrank_compress.peft_methods.registry import register_method
    from lowrank_compress.peft_methods.singlora import SingLoraConfig, SingLoraModel
    from lowrank_compress.peft_methods.surm import SurmConfig, SurmModel

    factorized.register()
    register_method("singlora", SingLoraConfig, SingLoraModel)
    register_method("loldu", LoLduConfig, LoLduModel)
    register_method("bora", BoraConfig, BoraModel)
    register_method("surm", SurmConfig, SurmModel)


def advance(model: object) -> None:
    """One optimizer step done: move every adapter that follows a schedule (SingLoRA's ramp) along."""
    for module in model.modules():  # type: ignore[attr-defined]
        step = getattr(module, "advance", None)
        if callable(step) and hasattr(module, "adapter_layer_names"):
            step()


def set_step(model: object, step: int) -> None:
    """Put every scheduled adapter at optimizer step `step` (a resumed run)."""
    for module in model.modules():  # type: ignore[attr-defined]
        steps = getattr(module, "singlora_step", None)
        if steps is not None:
            for t in steps.values():
                t.fill_(step)
