"""Peak memory of a stretch of work: CUDA's allocator peak on a GPU, the process RSS sampled from /proc on CPU."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch


class PeakMemory:
    """Peak memory inside a `with` block: CUDA's allocator peak on a GPU; on CPU the process RSS, sampled every
    50 ms from /proc (Linux; elsewhere the process-lifetime peak), so what came before does not count."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif Path("/proc/self/statm").is_file():
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._stop.is_set():
            rss = int(Path("/proc/self/statm").read_text().split()[1]) * page
            self.peak = max(self.peak, rss)
            self._stop.wait(0.05)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self._thread is not None:
            return self.peak / 2**20
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def map_large_allocations(threshold: int = 2**20) -> None:
    """Serve every allocation of `threshold` bytes or more with its own mapping (glibc's `mallopt`), returned to
    the system when freed. glibc's default threshold adapts upward to 32 MB, so hidden-state batches and product
    slabs (1-32 MB) land in its heaps, whose fragments `malloc_trim` cannot give back: at the Llama-7B shape the heap
    grew by about 144 MB per block without this. Each mapping is zeroed page by page when first touched, which on a
    small model costs a fifth of factorize's time (SmolLM2: 114 -> 146 s), hence only for models that stream."""
    libc = _c_library()
    if libc and hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, threshold)


def _c_library() -> object:
    import ctypes
    import ctypes.util

    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        try:
            _libc = ctypes.CDLL(name) if name else False
        except OSError:
            _libc = False
    return _libc


def return_free_memory() -> None:
    """Hand the allocator's free pages back to the system (glibc's `malloc_trim`; nothing elsewhere).

    Tensors below glibc's mmap threshold (up to 32 MB once it adapts) come from its heaps, which keep freed pages:
    between blocks they would count as resident memory that nothing uses, and the peak would grow block by block.
    """
    libc = _c_library()
    if libc and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


_libc: object = None
