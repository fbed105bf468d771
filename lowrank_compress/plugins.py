"""Registering with transformers and peft when they are imported, not when `lowrank_compress` is.

`import lowrank_compress` must be all a user needs before `AutoModelForCausalLM.from_pretrained(OUT)` (transformers
has to know quant_method "lowrank") and before `PeftModel.from_pretrained` on a factorized model (peft has to know
our methods, see peft_methods). Registering eagerly meant importing torch, transformers and peft (several seconds) on every
`import lowrank_compress`, hence on every `lowrank-compress --help`. Instead `install()` registers right away
with whatever is already imported, and puts a finder on `sys.meta_path` that registers the rest the moment its
module finishes importing (the "post-import hook" of wrapt and PEP 369). Only the standard library is imported here.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

# module whose import triggers the hook -> (module of ours, function to call there)
HOOKS: dict[str, tuple[str, str]] = {
    "transformers.quantizers.auto": ("lowrank_compress.format", "register"),
    # the whole package, not one tuner: registering imports several of peft's tuners and its registries
    "peft": ("lowrank_compress.adapters", "register_peft"),
}


_pending: list[str] = []  # triggers whose registration waits for our own modules to finish importing


def _ours_importing(but: str | None = None) -> bool:
    """Whether a module of this package (other than `but`, and the package itself, which only installs the hooks)
    is part-way through its import. Registering then would import our adapter modules, which may import that very
    module back while it is still incomplete (`import lowrank_compress.peft_methods.common` first: common imports
    peft, peft's hook registers our methods, their configs import common: a circular ImportError)."""
    return any(
        name.startswith(f"{__package__}.")
        and name != but
        and getattr(getattr(module, "__spec__", None), "_initializing", False)
        for name, module in list(sys.modules.items())
    )


def _run(trigger: str, finished: str | None = None) -> None:
    """Call the registration for `trigger`, or queue it while one of our modules is mid-import (see
    `_ours_importing`); a module of ours that imported `trigger` itself and has no function yet registers at its own
    end instead (format.py does). `finished`: a module of ours whose code has just run to its end."""
    if _ours_importing(but=finished):
        if trigger not in _pending:
            _pending.append(trigger)
        return
    module_name, function = HOOKS[trigger]
    register = getattr(importlib.import_module(module_name), function, None)
    if register is not None:
        register()


class _HookedLoader:
    """The loader that found the module, running the hook after the module's code; all else is delegated."""

    def __init__(self, loader: Any, trigger: str | None) -> None:
        self._loader = loader
        self._trigger = trigger  # None: a module of ours, after which queued registrations may run

    def create_module(self, spec: Any) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        if self._trigger is not None:
            _run(self._trigger)
        elif _pending and not _ours_importing(but=module.__name__):
            while _pending:
                _run(_pending.pop(0), finished=module.__name__)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class _PostImportFinder:
    """A `sys.meta_path` finder that finds nothing itself: for the trigger modules and our own it asks the other
    finders and wraps the loader they return."""

    lowrank_compress_hooks = True  # how install() recognizes an earlier instance (also after a reload)

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None) -> Any:
        ours = fullname.startswith(f"{__package__}.")
        if fullname not in HOOKS and not ours:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _HookedLoader(spec.loader, None if ours else fullname)
                return spec
        return None


def quiet_bitsandbytes() -> None:
    """bitsandbytes logs a warning on import on CPUs without its optional `kernels` package; it falls back and
    works, so the message is noise for our users. Set before peft imports it."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def install() -> None:
    """Register now with what is imported, later with the rest (idempotent)."""
    quiet_bitsandbytes()
    if not any(getattr(f, "lowrank_compress_hooks", False) for f in sys.meta_path):
        sys.meta_path.insert(0, _PostImportFinder())
    for trigger in HOOKS:
        if trigger in sys.modules:
            _run(trigger)
