"""gqa-uptrain: turn multi-head-attention checkpoints into grouped-query attention and uptrain them."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gqa-uptrain")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
