"""Memory block by block: factorize in this process and print, after every block of every pass, the block's peak,
the process RSS (anonymous and file pages) and glibc's heap, to see whether anything survives a block.

    python benchmarks/profile_blocks.py --layers 8                  # hidden 2048, intermediate 5504 (a 1/2-scale 7B)
    python benchmarks/profile_blocks.py --layers 3 --shape 7b       # the Llama-2-7B block shape
    python benchmarks/profile_blocks.py --layers 8 --flags "--method svd --policy uniform"
    python benchmarks/profile_blocks.py --layers 4 --shape 7b --census yes   # plus the live tensors after each block

Default flags: text-only calibration (`--self-mix 0 --samples 16`). The checkpoint (random bf16, SmolLM2's
tokenizer) is generated in a temporary directory by bench_scale.make_checkpoint. Lines go to stderr.
"""

from __future__ import annotations

import ctypes
import re
import resource
import shlex
import sys
import tempfile
import time
from pathlib import Path

from _common import arg
from bench_scale import SHAPE, make_checkpoint

HALF = {"hidden_size": 2048, "intermediate_size": 5504, "num_attention_heads": 16, "num_key_value_heads": 16}


def rollup_mb() -> tuple[float, float, float]:
    """RSS, its anonymous part and its file-backed part (/proc/self/smaps_rollup), in MB."""
    text = Path("/proc/self/smaps_rollup").read_text()

    def get(key: str) -> float:
        return int(re.search(rf"^{key}:\s+(\d+)", text, re.M).group(1)) / 1024

    return get("Rss"), get("Anonymous"), get("Rss") - get("Anonymous")


def heap_mb() -> tuple[float, float]:
    """glibc's heap (mallinfo2): bytes in arenas, bytes in mmapped chunks, in MB."""

    class MallInfo2(ctypes.Structure):
        _fields_ = [
            (n, ctypes.c_size_t)
            for n in [
                "arena",
                "ordblks",
                "smblks",
                "hblks",
                "hblkhd",
                "usmblks",
                "fsmblks",
                "uordblks",
                "fordblks",
                "keepcost",
            ]
        ]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    info = libc.mallinfo2()
    return info.arena / 2**20, info.hblkhd / 2**20


def census(top: int = 6) -> str:
    """Tensors reachable from Python holding 1 MB or more, by shape and dtype (storage counted once): what a block
    left behind, where the heap figures only say how much."""
    import gc
    from collections import Counter

    import torch

    seen: set[int] = set()
    sizes: Counter[str] = Counter()
    for obj in gc.get_objects():
        if not isinstance(obj, torch.Tensor) or obj.device.type == "meta":
            continue
        storage = obj.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() < 2**20:
            continue
        seen.add(storage.data_ptr())
        sizes[f"{list(obj.shape)} {str(obj.dtype).removeprefix('torch.')}"] += storage.nbytes()
    total = sum(sizes.values()) / 2**20
    parts = ", ".join(f"{k}: {v / 2**20:,.0f}" for k, v in sizes.most_common(top))
    return f"live tensors {total:,.0f} MB ({parts})"


def main() -> None:
    from lowrank_compress.memory import PeakMemory

    layers = int(arg("--layers", "8"))
    shape = SHAPE if arg("--shape", "half") == "7b" else HALF
    flags = shlex.split(arg("--flags", "--self-mix 0 --samples 16"))
    with_census = arg("--census", "no") == "yes"
    start = time.perf_counter()
    count = [0]
    exit_block = PeakMemory.__exit__

    def logged_exit(self: PeakMemory, *exc: object) -> None:
        exit_block(self, *exc)
        count[0] += 1
        rss, anon, file = rollup_mb()
        arena, mapped = heap_mb()
        print(f"block {count[0]:3d}: peak {self.mb:7.0f} MB | after: RSS {rss:7.0f} (anon {anon:7.0f}, file "
              f"{file:5.0f}), heap arenas {arena:6.0f}, mmapped {mapped:6.0f} | {time.perf_counter() - start:6.0f} s",
              file=sys.stderr, flush=True)  # fmt: skip
        if with_census:
            print(f"           {census()}", file=sys.stderr, flush=True)

    PeakMemory.__exit__ = logged_exit  # type: ignore[method-assign]
    from lowrank_compress.cli import main as cli

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        make_checkpoint(model, layers, shape)
        sys.argv = [
            "lowrank-compress",
            "factorize",
            str(model),
            "-o",
            str(Path(tmp) / "out"),
            "--json",
            *flags,
        ]
        try:
            cli()
        except SystemExit as e:
            if e.code:
                raise
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak:,.0f} MB over {layers} layers", file=sys.stderr)


if __name__ == "__main__":
    main()
