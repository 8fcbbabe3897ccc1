"""The sequence KV cache of cached decoding, and attention of new tokens over it.

`moda_attention` attends T queries to the same T keys; decoding attends a few new tokens to every key
seen so far. Caches:
  * sequence: per attention sublayer, K (after QK-norm and RoPE, exactly what the logits read) and V
    of every position written so far: [B, S_max, Hk, D] each.
  * depth: plain MoDA reads the token's own slots, produced during its own forward pass and read by
    no later token, so nothing about depth is stored across steps: the new tokens' depth stream is
    built layer by layer during the step (by the block loop) and dropped afterwards. Chunk-visible
    depth (`depth_chunk = C > 1`) also reads the earlier tokens of the chunk: their final depth
    buffers are kept in a ring of C tokens ([B, C, L_max, Hk, D], index = position % C).

The attention itself is the reference's dense softmax with explicit positions
(`pallas_kernels.reference`, with explicit positions): what each query sees comes from `pallas_kernels.spec`,
the same rule every kernel reads. Decoding is memory-bound on the cache, and the probabilities are
wanted anyway for the analysis (`return_probs=True`).
"""

from __future__ import annotations

import functools
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
  chunk_k_BCLKD: jax.Array | None = None  # depth_chunk > 1: the chunk's earlier tokens' depth K/V
  chunk_v_BCLKD: jax.Array | None = None

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
  ring = None
  if config.depth_chunk > 1 and config.num_depth_slots:
    ring = jnp.zeros((batch, config.depth_chunk, config.num_depth_slots, config.num_kv_heads,
                      config.head_dim), dtype)
  return Cache(blocks, blocks, last, last, jnp.zeros((), jnp.int32), ring, ring)


def _ring_positions(cache: Cache, chunk: int) -> jax.Array:
  """[C] positions of the tokens in the ring; -1 (seen by no query) where the slot holds none."""
  first = (cache.length // chunk) * chunk
  positions = first + jnp.arange(chunk, dtype=jnp.int32)
  return jnp.where(positions < cache.length, positions, -1)


def update_ring(config: ModelConfig, cache: Cache, stream, positions_BT) -> Cache:
  """The cache after a step whose tokens at `positions_BT` ended with the depth `stream`: the ring
  keeps the final buffers of the tokens of the chunk that the next token belongs to."""
  if cache.chunk_k_BCLKD is None:
    return cache
  chunk = config.depth_chunk
  new_length = positions_BT[0, -1] + 1
  keep = positions_BT[0] >= (new_length // chunk) * chunk
  # Tokens of earlier chunks are dropped (an out-of-range index), so no ring index is written twice.
  index = jnp.where(keep, positions_BT[0] % chunk, chunk)
  ring = lambda old, new: old.at[:, index].set(new.astype(old.dtype), mode="drop")
  return cache._replace(chunk_k_BCLKD=ring(cache.chunk_k_BCLKD, stream.k_BTLKD),
                        chunk_v_BCLKD=ring(cache.chunk_v_BCLKD, stream.v_BTLKD))


def cached_attention(config: ModelConfig, q_BTHD, k_BTKD, v_BTKD, depth_q_BTHD, stream, depth_start,
                     positions_BT, kv_cache, return_probs: bool, ring=None):
  """Writes the new keys / values at `positions_BT` and attends the queries to the whole cache.

  `stream` holds the new tokens' depth slots written so far (its length is this layer's depth_len);
  `depth_start` the bounded window's first slot (None: 0); `ring` the (k, v) ring of the chunk's
  earlier tokens when depth_chunk > 1. Returns (out_BTHD, (k_cache, v_cache), probs_BTHC or None)
  with C = S_max + L columns, [sequence | depth]: a depth column sums the slot's mass over the tokens
  whose slots the query reads. All rows advance together: row 0's first position is where the new
  tokens go. Without `config.joint_depth_read` (depth attention) sequence and depth are two
  softmaxes whose outputs add (so a row of probs sums to 2 once a slot is visible).
  """
  k_cache, v_cache = kv_cache
  start = (0, positions_BT[0, 0], 0, 0)
  k_cache = jax.lax.dynamic_update_slice(k_cache, k_BTKD.astype(k_cache.dtype), start)
  v_cache = jax.lax.dynamic_update_slice(v_cache, v_BTKD.astype(v_cache.dtype), start)
  attend = functools.partial(_attend, config, q_BTHD, depth_q_BTHD, depth_start=depth_start,
                             positions_BT=positions_BT, ring=ring, max_len=k_cache.shape[1])
  if config.joint_depth_read or stream.k_BTLKD is None:
    out_BTHD, probs_BTHC = attend((k_cache, v_cache), stream)
  else:
    out_seq, probs_seq = attend((k_cache, v_cache), stream._replace(k_BTLKD=None, v_BTLKD=None))
    out_depth, probs_depth = attend(None, stream)
    out_BTHD = (out_seq.astype(jnp.float32) + out_depth.astype(jnp.float32)).astype(out_seq.dtype)
    probs_BTHC = jnp.concatenate([probs_seq, probs_depth], axis=-1)
  return out_BTHD, (k_cache, v_cache), (probs_BTHC if return_probs else None)


def _attend(config: ModelConfig, q_BTHD, depth_q_BTHD, keys, stream, *, depth_start, positions_BT, ring,
            max_len: int):
  """(out_BTHD, probs_BTHC) of the queries over the cache `keys` (None: depth only) and the depth
  slots of `stream` (k None: sequence only); C = S_max (if keys) + L (if depth) columns."""
  batch = q_BTHD.shape[0]
  k_cache, v_cache = (None, None) if keys is None else keys
  num_slots = 0 if stream.k_BTLKD is None else stream.k_BTLKD.shape[2]
  # Keys are cache positions 0 .. S_max - 1; causality (s <= p) hides the unfilled ones. Positions
  # (of keys and of depth tokens) are below S_max.
  spec = spec_lib.Spec(seq_len=max_len, num_slots=num_slots, causal=True, scale=q_BTHD.shape[-1] ** -0.5,
                       has_sequence=keys is not None, depth_chunk=config.depth_chunk)
  max_len = max_len if keys is not None else 0  # probs columns of the sequence part
  tokens = lambda positions_X: jnp.broadcast_to(positions_X, (batch, positions_X.shape[-1]))
  shared = dict(k_BSKD=k_cache, v_BSKD=v_cache, spec=spec, k_tokens_BS=tokens(jnp.arange(max_len, dtype=jnp.int32)),
                depth_start=0 if depth_start is None else depth_start, depth_len=stream.length,
                return_probs=True)
  if ring is None or num_slots == 0:
    # Own-token depth: the new tokens' stream belongs to the queries, so the depth columns of probs are
    # each query's own L slots.
    out_BTHD, _, probs_BTHC = reference.query_aligned_attention(
        q_BTHD, depth_q_BTHD=depth_q_BTHD, depth_k_BTLKD=stream.k_BTLKD, depth_v_BTLKD=stream.v_BTLKD,
        q_tokens_BT=positions_BT, **shared)
    return out_BTHD, probs_BTHC
  # Chunk-visible depth: the ring's tokens and the new ones, positions deciding who sees whom.
  ring_k, ring_v, ring_positions_C = ring
  out_BTHD, _, probs_BTHC = reference.dense_attention(
      q_BTHD, depth_q_BTHD=depth_q_BTHD,
      depth_k_BXLKD=jnp.concatenate([ring_k.astype(stream.k_BTLKD.dtype), stream.k_BTLKD], axis=1),
      depth_v_BXLKD=jnp.concatenate([ring_v.astype(stream.v_BTLKD.dtype), stream.v_BTLKD], axis=1),
      q_tokens_BT=positions_BT, depth_tokens_BX=tokens(jnp.concatenate([ring_positions_C, positions_BT[0]])),
      **shared)
  seq_BTHS, depth_BTHXL = probs_BTHC[..., :max_len], probs_BTHC[..., max_len:]
  depth_BTHL = depth_BTHXL.reshape(*depth_BTHXL.shape[:3], -1, num_slots).sum(axis=3)
  return out_BTHD, jnp.concatenate([seq_BTHS, depth_BTHL], axis=-1)


def ring_of(config: ModelConfig, cache: Cache):
  """(k, v, positions) of the chunk ring for `cached_attention`, or None without one."""
  if cache.chunk_k_BCLKD is None:
    return None
  return cache.chunk_k_BCLKD, cache.chunk_v_BCLKD, _ring_positions(cache, config.depth_chunk)
