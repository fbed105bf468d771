"""What the settings accept: method, policy, adapter and other names, and the device check.

In a module of their own, importing only the standard library, so that the CLI can build its options (and answer
`--help` or a usage error) and check `--device` without importing torch; the modules that use the names import
them from here.
"""

from __future__ import annotations

# factorize
METHODS: tuple[str, ...] = ("svd", "asvd", "whiten", "fisher")
POLICIES: tuple[str, ...] = ("uniform", "energy", "stable-rank", "sensitivity")
GRAD_SOURCES: tuple[str, ...] = ("mix", "self")
SELF_STARTS: tuple[str, ...] = ("random", "prefix")

# finetune
ADAPTERS: tuple[str, ...] = ("lora", "dora")
MERGE_RANKS: tuple[str, ...] = ("grow", "keep")
QUANTIZE: tuple[str, ...] = ("none", "nf4")
TRAIN: tuple[str, ...] = ("adapters", "factors")
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")
