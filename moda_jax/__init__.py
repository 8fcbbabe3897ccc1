"""MoDA (Mixture-of-Depths Attention) Transformer in Flax Linen."""

from moda_jax.config import ModelConfig
from moda_jax.model import Transformer

__all__ = ["ModelConfig", "Transformer", "load_checkpoint"]


def __getattr__(name: str):
  # Lazy: `load_checkpoint` needs Orbax and Grain, which the model alone does not.
  if name == "load_checkpoint":
    from moda_jax.checkpoint import load_checkpoint  # pylint: disable=g-import-not-at-top
    return load_checkpoint
  raise AttributeError(f"module 'moda_jax' has no attribute {name!r}")
