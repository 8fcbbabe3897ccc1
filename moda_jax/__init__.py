"""MoDA (Mixture-of-Depths Attention) Transformer in Flax Linen."""

from moda_jax.config import ModelConfig
from moda_jax.model import Transformer

__all__ = ["ModelConfig", "Transformer"]
