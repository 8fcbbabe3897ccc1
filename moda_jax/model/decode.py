"""Cached decoding: `decode_step` continues rows of tokens through the model with a KV cache.

The step is the model's own forward pass (`Transformer.__call__` with `cache=`): the same block loop,
blocks and head as training, with each attention sublayer reading and extending its sequence KV cache
(`kv_cache.py`). Parameters from `init`, training or a checkpoint apply unchanged.
"""

from __future__ import annotations

import jax

from moda_jax.model.config import ModelConfig
from moda_jax.model.kv_cache import Cache, init_cache
from moda_jax.model.transformer import Transformer

__all__ = ["Cache", "decode_step", "init_cache"]


def decode_step(config: ModelConfig, params, tokens_BT: jax.Array, cache: Cache, *,
                return_probs: bool = False):
  """(logits [B, T, V] float32, the updated Cache, probs or None) for tokens continuing the cache.

  The new tokens take positions cache.length .. cache.length + T - 1 (one document per row, all rows
  at the same position). With `return_probs`, probs is [N, B, T, H, S_max + L_max]: the attention
  probabilities of every attention sublayer (sequence columns first, then the token's depth slots).
  """
  return Transformer(config).apply({"params": params}, tokens_BT, cache=cache, return_probs=return_probs)
