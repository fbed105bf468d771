"""What a finished run writes into OUT: the adapters in PEFT's format, or a merged model (factorized layers kept
factorized)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank_compress.modules import LowRankLinear
from lowrank_compress.recipe import FinetuneSettings
from lowrank_compress.training.trp import ranks


def save_adapters(peft_model: Any, directory: Path, model_path: str | Path) -> None:
    """PEFT's own format: adapter_config.json + adapter_model.safetensors, pointing at MODEL."""
    for config in peft_model.peft_config.values():
        config.base_model_name_or_path = str(Path(model_path).resolve())
    peft_model.save_pretrained(str(directory))


def merge(peft_model: Any, settings: FinetuneSettings, rows: torch.Tensor, device: torch.device,
          model_path: str | Path, allow_pickle: bool) -> tuple[nn.Module, dict[str, Any]]:  # fmt: skip
    """Fold the adapters into MODEL's float32 weights (into the dequantized ones when trained on NF4: those are the
    weights the adapters learned to correct). `keep` is whitened by the inputs the exactly merged (grown) model sees
    on a few training sequences: the inputs the trained model sees."""
    from lowrank_compress.adapters import extract_adapters, merge_adapters
    from lowrank_compress.quantize import dequantize

    base, deltas = extract_adapters(peft_model)
    if settings.quantize == "none":  # the frozen copy may be bf16: merge into the original float32 weights
        from lowrank_compress.loading import load_model

        del base
        base = load_model(model_path, allow_pickle=allow_pickle, need_tokenizer=False)[0].to(device)
    else:  # what the adapters were trained against
        dequantize(base)
    base.float()
    stats = _keep_stats(base, deltas, rows, device) if settings.merge_rank == "keep" else None
    layers = merge_adapters(base, deltas, merge_rank=settings.merge_rank, stats=stats, kind=settings.adapter)
    errors = [v["relative_error"] for v in layers.values()]
    info = {"merge_rank": settings.merge_rank, "layers": len(deltas), "ranks": ranks(base),
            "max_relative_error": max(errors, default=0.0), "whitened": stats is not None,
            "relative_errors": {n: v["relative_error"] for n, v in layers.items()},
            "dense_layers": sorted(n for n, v in layers.items() if v["rank_after"] is None)}  # fmt: skip
    return base, info


def _keep_stats(base: nn.Module, deltas: dict[str, Any], rows: torch.Tensor, device: torch.device) -> Any:
    """Input statistics of the factorized layers in the trained model (merged exactly: grown, or dense beyond
    break-even), on up to 8 training sequences."""
    import copy

    from lowrank_compress.adapters import merge_adapters
    from lowrank_compress.calibration import collect_stats

    grown = copy.deepcopy(base)
    merge_adapters(grown, deltas, merge_rank="break-even")
    names = [n for n, m in base.named_modules() if isinstance(m, LowRankLinear)]
    return collect_stats(grown, rows[: min(8, rows.shape[0])], names, device=str(device))


def save_lowrank(model: nn.Module, directory: Path, tokenizer: Any, source: Any, quant_config: dict[str, Any] | None,
                 settings: FinetuneSettings) -> None:  # fmt: skip
    from lowrank_compress.format import save_compressed

    info = {k: v for k, v in (quant_config or {}).items() if k not in ("quant_method", "version", "ranks")}
    info["finetune"] = {"train": settings.train, "adapter": settings.adapter if settings.train == "adapters" else None,
                        "merge_rank": settings.merge_rank if settings.merge else None}  # fmt: skip
    model.requires_grad_(False)
    save_compressed(model, directory, ranks=ranks(model), quant_info=info, tokenizer=tokenizer,
                    source_dir=source.directory)  # fmt: skip
