"""The sequence KV cache of cached decoding, and attention of new tokens over it.

`moda_attention` attends T queries to the same T keys; decoding attends a few new tokens to every key
seen so far. Caches:
  * sequence: per attention sublayer, K (after QK-norm and RoPE, exactly what the logits read) and V
    of every position written so far: [B, S_max, Hk, D] each.
  * depth: depth attention reads the token's own slots, produced during its own forward pass and read
    by no later token, so nothing about depth is stored across steps: the new tokens' depth stream
    is built layer by layer during the step (by the block loop) and dropped afterwards.

The attention itself is the reference's dense softmax with explicit positions
(`pallas_kernels.reference.dense_attention`): what each query sees comes from `pallas_kernels.spec`,
the same rule every kernel reads. Decoding is memory-bound on the cache, and the probabilities are
wanted anyway for the analysis (`return_probs=True`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels import reference
from pallas_kernels import spec as spec_lib

from moda_jax.model.config import ModelConfig


class Cache(NamedTuple):
  """Sequence K/V of every attention sublayer; the N - 1 depth-writing blocks are stacked first."""

  blocks_k_NBSKD: jax.Array  # [N - 1, B, S_max, Hk, D]
  blocks_v_NBSKD: jax.Array
  last_k_BSKD: jax.Array     # the last block's attention
  last_v_BSKD: jax.Array
  length: jax.Array          # int32 scalar: positions 0 .. length - 1 are filled

  @property
  def max_len(self) -> int:
    return self.last_k_BSKD.shape[1]


def init_cache(config: ModelConfig, batch: int, max_len: int) -> Cache:
  """An empty cache for `batch` rows of up to `max_len` tokens (<= config.max_seq_len)."""
  if not 1 <= max_len <= config.max_seq_len:
    raise ValueError(f"max_len={max_len}: expected 1 <= max_len <= max_seq_len={config.max_seq_len}.")
  layer = (batch, max_len, config.num_kv_heads, config.head_dim)
  dtype = jnp.dtype(config.dtype)
  blocks = jnp.zeros((config.num_layers - 1,) + layer, dtype)
  last = jnp.zeros(layer, dtype)
  return Cache(blocks, blocks, last, last, jnp.zeros((), jnp.int32))


def cached_attention(q_BTHD, k_BTKD, v_BTKD, depth_q_BTHD, stream, positions_BT, kv_cache,
                     return_probs: bool):
  """Writes the new keys / values at `positions_BT` and attends the queries to the whole cache.

  Returns (out_BTHD, (k_cache, v_cache), probs_BTHC or None) with C = S_max + L columns,
  [sequence | depth]. All rows advance together: row 0's first position is where the new tokens go.
  """
  k_cache, v_cache = kv_cache
  start = (0, positions_BT[0, 0], 0, 0)
  k_cache = jax.lax.dynamic_update_slice(k_cache, k_BTKD.astype(k_cache.dtype), start)
  v_cache = jax.lax.dynamic_update_slice(v_cache, v_BTKD.astype(v_cache.dtype), start)
  batch, max_len = k_cache.shape[:2]
  num_slots = 0 if stream.k_BTLKD is None else stream.k_BTLKD.shape[2]
  # Keys are cache positions 0 .. S_max - 1; causality (s <= p) hides the unfilled ones.
  spec = spec_lib.Spec(seq_len=max_len, num_slots=num_slots, causal=True,
                       scale=q_BTHD.shape[-1] ** -0.5)
  k_tokens_BS = jnp.broadcast_to(jnp.arange(max_len, dtype=jnp.int32), (batch, max_len))

  def one_query(q_BHD, depth_q_BHD, depth_k_BLKD, depth_v_BLKD, position_B):
    # One query token against the cache and its own depth slots: probs [B, 1, H, S_max + L], the
    # depth columns being the token's own slots (depth attention reads only those).
    one = lambda x: None if x is None else x[:, None]
    out_B1HD, _, probs_B1HC = reference.dense_attention(
        one(q_BHD), k_cache, v_cache, one(depth_q_BHD), one(depth_k_BLKD), one(depth_v_BLKD),
        spec=spec, q_tokens_BT=one(position_B), k_tokens_BS=k_tokens_BS,
        depth_tokens_BX=one(position_B), depth_start=0, depth_len=stream.length, return_probs=True)
    return out_B1HD[:, 0], probs_B1HC[:, 0]

  axis = lambda x: None if x is None else 1
  out_BTHD, probs_BTHC = jax.vmap(
      one_query, in_axes=(1, axis(depth_q_BTHD), axis(stream.k_BTLKD), axis(stream.v_BTLKD), 1),
      out_axes=1)(q_BTHD, depth_q_BTHD, stream.k_BTLKD, stream.v_BTLKD, positions_BT)
  return out_BTHD, (k_cache, v_cache), (probs_BTHC if return_probs else None)
