"""MoDA (Mixture-of-Depths Attention) language models in Flax Linen.

The package is layered (low to high): `model` and `data` (independent of each other), `train`,
`eval`; `pallas_kernels` below them all holds the operator. This module is only the public facade:
`ModelConfig` and `Transformer` from the model, and `load_checkpoint` (lazily, from the evaluation
layer, because it needs Orbax and Grain, which the model alone does not).
"""

from moda_jax.model.config import ModelConfig
from moda_jax.model.transformer import Transformer

__all__ = ["ModelConfig", "Transformer", "load_checkpoint"]


def __getattr__(name: str):
  if name == "load_checkpoint":
    from moda_jax.train.checkpoint import load_checkpoint  # pylint: disable=g-import-not-at-top
    return load_checkpoint
  raise AttributeError(f"module 'moda_jax' has no attribute {name!r}")
