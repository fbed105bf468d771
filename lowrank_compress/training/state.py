"""Checkpoints through accelerate: `Accelerator.save_state` / `load_state` write and restore the optimizer, the
schedule (registered for checkpointing), the random states and the trained weights; a small `state.json` beside
them holds the loop's position, its losses, the settings and data it was made with, and what each method needs to
rebuild the shapes before loading (ranks). Only the trained parameters are saved, not the frozen base: accelerate's
model-state hooks replace the full state dict by those, and load them back with a check of names and shapes.

Each checkpoint is written to a marked temporary directory and swapped into place, so a crash leaves this
checkpoint or the previous one, never a half-written one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank_compress.errors import LowrankError
from lowrank_compress.outdir import new_temp_dir
from lowrank_compress.recipe import FinetuneSettings
from lowrank_compress.resume import (
    check_same_model,
    check_same_settings,
    finish_checkpoint,
    read_state,
    writing_checkpoint,
)

VERSION = 2  # 1: the hand-written format before the loop used accelerate's save_state (not readable any more)
TRAINED = "trained.safetensors"


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trained(model: nn.Module, directory: Path) -> None:
    """The trained parameters back into `model`, refusing a checkpoint whose names or shapes differ."""
    from safetensors.torch import load_file

    saved = load_file(str(directory / TRAINED))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(saved) != set(params):
        raise LowrankError(f"{directory}: the checkpoint's trainable tensors do not match this model")
    with torch.no_grad():
        for name, p in params.items():
            if saved[name].shape != p.shape:
                raise LowrankError(
                    f"{directory}: checkpoint tensor {name} has shape {tuple(saved[name].shape)}"
                )
            p.copy_(saved[name].to(p))


def attach_hooks(accelerator: Any) -> None:
    """Make save_state write only the trained parameters (our file) and load_state read them back."""
    from safetensors.torch import save_file

    def save_hook(models: list[Any], weights: list[Any], output_dir: str) -> None:
        if accelerator.is_main_process:
            model = accelerator.unwrap_model(models[0])
            save_file(trained_state(model), str(Path(output_dir) / TRAINED))
        weights.clear()  # accelerate writes no full model state

    def load_hook(models: list[Any], input_dir: str) -> None:
        load_trained(accelerator.unwrap_model(models[0]), Path(input_dir))
        models.clear()  # loaded here; accelerate loads no full model state

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def write(directory: Path, accelerator: Any, state: dict[str, Any]) -> None:
    """save_state into a marked temporary directory beside `directory` (named by the main process, shared with
    the others: every process writes its random state), state.json, then the swap into place."""
    from accelerate.utils import broadcast_object_list

    tmp = None
    with writing_checkpoint(directory, lambda: tmp if accelerator.is_main_process else None):
        names = [str(new_temp_dir(directory, "checkpoint")) if accelerator.is_main_process else None]
        tmp = Path(broadcast_object_list(names)[0])
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            finish_checkpoint(tmp, directory, {"command": "finetune", "version": VERSION, **state})
        accelerator.wait_for_everyone()


def read(directory: Path, settings: FinetuneSettings, model_path: str | Path) -> dict[str, Any]:
    """The checkpoint's state.json, after checking it was made by the same command on the same model."""
    state = read_state(directory, "finetune")
    if state.get("version") == 1:
        raise LowrankError(
            f"{directory}: a checkpoint of an older lowrank-compress (format 1), which this version cannot resume; "
            "start afresh with --overwrite"
        )
    if state.get("version") != VERSION:
        raise LowrankError(f"{directory}: checkpoint version {state.get('version')} is not {VERSION}")
    if not (directory / TRAINED).is_file():
        raise LowrankError(f"{directory}: the checkpoint has no {TRAINED}; it is incomplete, start afresh")
    check_same_model(directory, state, model_path)
    check_same_settings(directory, state["settings"], settings)
    state["dir"] = directory
    return state
