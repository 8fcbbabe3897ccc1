"""The depth stream: fixed-size per-token K/V buffers and the count of slots written so far.

Buffers are allocated once at their final size L_max = `config.num_depth_slots` so that a scan
carry has a fixed shape; slot `l` is written exactly once (block b writes slots
[b * S, (b + 1) * S), S = `config.slots_per_block`: its attention's slot, then its FFN's). A
reader passes `length` as `depth_len`, so slots not yet written are ignored by the kernel.

With QK-norm the keys are stored RMS-normalized without gain (`layers.depth_key`); each reader
scores them with its depth query q * (its k-norm gain) and never rewrites the buffer.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from moda_jax.model.config import ModelConfig


class DepthKV(NamedTuple):
  """The scan carry's depth part. `k`/`v` are None when the model has no depth slots."""

  k_BTLKD: jax.Array | None
  v_BTLKD: jax.Array | None
  length: jax.Array  # int32 scalar: slots written so far


def empty(config: ModelConfig, batch: int, seq_len: int) -> DepthKV:
  """Zero buffers [B, T, L_max, Hk, D] in the compute dtype, or None buffers when L_max = 0."""
  length = jnp.zeros((), jnp.int32)
  if config.num_depth_slots == 0:
    return DepthKV(None, None, length)
  shape = (batch, seq_len, config.num_depth_slots, config.num_kv_heads, config.head_dim)
  zeros = jnp.zeros(shape, jnp.dtype(config.dtype))
  return DepthKV(zeros, zeros, length)


def stack_slots(slots: list[tuple[jax.Array, jax.Array]]) -> tuple[jax.Array, jax.Array]:
  """[(k_BTKD, v_BTKD)] * S in slot order -> (k_BTSKD, v_BTSKD)."""
  return (jnp.stack([k for k, _ in slots], axis=2), jnp.stack([v for _, v in slots], axis=2))


def write(depth: DepthKV, k_BTSKD: jax.Array, v_BTSKD: jax.Array) -> DepthKV:
  """Writes S consecutive slots at `depth.length` and advances it by S."""
  start = (0, 0, depth.length, 0, 0)
  k_BTLKD = jax.lax.dynamic_update_slice(depth.k_BTLKD, k_BTSKD.astype(depth.k_BTLKD.dtype), start)
  v_BTLKD = jax.lax.dynamic_update_slice(depth.v_BTLKD, v_BTSKD.astype(depth.v_BTLKD.dtype), start)
  return DepthKV(k_BTLKD, v_BTLKD, depth.length + k_BTSKD.shape[2])


def read_slots(buffer_BTLKD: jax.Array, start, num_slots: int) -> jax.Array:
  """The S = num_slots slots starting at `start` (traced or static): [B, T, S, Hk, D]."""
  return jax.lax.dynamic_slice_in_dim(buffer_BTLKD, start, num_slots, axis=2)
