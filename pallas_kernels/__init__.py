"""MoDA attention kernels, independent of Flax: `moda_attention` and its backends."""

from pallas_kernels.api import IMPLEMENTATIONS, moda_attention, resolve_implementation

__all__ = ["IMPLEMENTATIONS", "moda_attention", "resolve_implementation"]
