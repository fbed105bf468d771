"""Adapters as peft methods: peft's own around factorized layers (factorized.py), and the methods peft lacks
(singlora, loldu, bora, surm), each in a folder with config / layer / model as peft's tuners are laid out.

`register()` adds them all to peft's registries; `import lowrank_compress` runs it when peft is imported (see
plugins.py), so adapters saved by finetune load with plain `PeftModel.from_pretrained`.
"""

from __future__ import annotations


def register() -> None:
    """Register every method of ours with peft (idempotent)."""
    from lowrank_compress.peft_methods import factorized

    factorized.register()
