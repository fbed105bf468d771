"""What the settings accept: method, policy, adapter and other names, and the device check.

In a module of their own, importing only the standard library, so that the CLI can build its options (and answer
`--help` or a usage error) and check `--device` without importing torch; the modules that use the names import
them from here.
"""

from __future__ import annotations

import re

from lowrank_compress.errors import LowrankError

# factorize
METHODS: tuple[str, ...] = ("svd", "asvd", "whiten", "fisher")
POLICIES: tuple[str, ...] = ("uniform", "energy", "stable-rank", "sensitivity")
# the policies that read each layer's spectrum; the others need its shape (uniform) or stable rank only, so
# factorize skips pass 1's decompositions for them
SPECTRUM_POLICIES: tuple[str, ...] = ("energy", "sensitivity")
GRAD_SOURCES: tuple[str, ...] = ("mix", "self", "answers")
SELF_STARTS: tuple[str, ...] = ("random", "prefix")

# finetune
# name -> (structure of the update, trainable parameters of an out x in layer, merge into factors, paper);
# `finetune --help` and the README's adapter table list them
ADAPTER_INFO: dict[str, tuple[str, str, str, str]] = {
    "lora": ("s B A", "r (in + out)", "grow: exact, rank + r", "LoRA (Hu et al. 2021)"),
    "dora": ("LoRA with learned row magnitudes", "r (in + out) + out", "grow: exact, rank + r", "DoRA (Liu et al. 2024)"),
    "c3a": ("block-circulant update (FFT product), b x b blocks", "in out / b", "keep, or break-even (dense)",
            "C3A (Chen et al. 2024)"),
    "gralora": ("k x k blocks, each its own rank-r/k LoRA", "r (in + out)", "grow: exact, rank + k r",
                "GraLoRA (Jung et al. 2025)"),
    "bone": ("MiSS: one r x out block shared by every r-wide input chunk", "r out", "grow: exact, rank + r",
             "Bone / MiSS (Kang et al. 2024)"),
    "singlora": ("(alpha/r) u(t) A A*^T, one matrix, ramp u(t) = min(t/T, 1), T = the warmup steps",
                 "r max(in, out)", "grow: exact, rank + r", "SingLoRA (Bensaid et al. 2025)"),
    "loldu": ("W = P L D U frozen, only D's first r entries (and a scale) train", "r + 1",
              "grow: exact, rank + r", "LoLDU (Shi et al. 2024)"),
    "bora": ("LoRA, then learned row and column magnitudes (two normalizations)", "r (in + out) + out + in",
             "grow: exact, rank + r", "BoRA (Wang et al. 2024)"),
    "surm": ("sum of r circulant x skew-circulant products (displacement rank r), n = max(in, out)", "2 r n",
             "keep, or break-even (dense)", "SURM (Sehanobish et al. 2024)"),
}  # fmt: skip
ADAPTERS: tuple[str, ...] = tuple(ADAPTER_INFO)
MERGE_RANKS: tuple[str, ...] = ("grow", "keep", "break-even")
QUANTIZE: tuple[str, ...] = ("none", "nf4")
CHAT_DATA = "chat"  # finetune --data chat: conversations sampled from the --teacher, not a text
TRAIN: tuple[str, ...] = ("adapters", "factors")
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")
OPTIMIZERS: tuple[str, ...] = ("adamw", "lora-pro")  # lora-pro: LoRA-Pro's gradients, then AdamW
INITS: tuple[str, ...] = ("zero", "gora")  # zero: every adapter starts at a zero update; gora: GoRA
# adalora: peft's AdaLoRA, allocated by the loop; elalora: ElaLoRA; ard: ARD-LoRA (training/)
RANK_SCHEDULES: tuple[str, ...] = ("none", "adalora", "elalora", "ard")

DEVICES = "cpu, cuda, cuda:N or mps"


def check_device(device: str) -> str:
    """`device` when this tool can run on it here, else one LowrankError line. Unchecked, a device string failed
    only inside the run, after the model was read ("meta" and "foo" as internal errors, "cuda:N" beyond the GPUs
    present in CUDA); so only cpu, cuda, cuda:N below the GPU count, and mps where it is available pass. torch is
    imported only to check cuda and mps."""
    match = re.fullmatch(r"(cpu|cuda|mps)(?::(\d+))?", device)
    if match is None or (match[2] is not None and match[1] != "cuda"):
        raise LowrankError(f"--device {device!r} is not a device lowrank-compress runs on; use {DEVICES}")
    if device == "cpu":
        return device
    import torch

    if match[1] == "mps":
        if not torch.backends.mps.is_available():
            raise LowrankError("--device mps: Apple's MPS is not available on this machine; use --device cpu")
        return device
    if not torch.cuda.is_available():
        raise LowrankError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    count = torch.cuda.device_count()
    if match[2] is not None and int(match[2]) >= count:
        raise LowrankError(
            f"--device {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
        )
    return device
