"""lowrank-compress: post-training low-rank compression of transformer checkpoints."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lowrank-compress")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"

from lowrank_compress.errors import LowrankError
from lowrank_compress.modules import LowRankLinear

__all__ = ["LowRankLinear", "LowrankError", "__version__"]
