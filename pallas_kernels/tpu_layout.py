"""Conversions between the public [B, T, H, D] layouts and the Pallas TPU kernels' head-major ones.

TPU blocks tile the last two dimensions, so a per-head block of a [B, T, H, D] array would need a
second-minor block of one head, which Mosaic rejects. The kernels therefore take head-major arrays
(see `tpu_tiles`); these transposes (plus the padding of T to whole tiles and of L to whole depth
steps) are done by XLA around the kernels. Padded tokens and slots are sliced off on the way back.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.tpu_tiles import LANES, SUBLANES


def _pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
  if x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths)


def queries_to_kernel(x_BTHD: jax.Array, num_kv_heads: int, padded_len: int) -> jax.Array:
  """[B, T, Hq, D] -> [B, Hk, G, T_pad, D]; query head h = kv_head * G + g."""
  batch, seq_len, num_heads, head_dim = x_BTHD.shape
  x_BTKGD = x_BTHD.reshape(batch, seq_len, num_kv_heads, num_heads // num_kv_heads, head_dim)
  return _pad_axis(jnp.transpose(x_BTKGD, (0, 2, 3, 1, 4)), 3, padded_len)


def queries_from_kernel(x_BKGTD: jax.Array, seq_len: int) -> jax.Array:
  """Inverse of `queries_to_kernel`."""
  batch, num_kv_heads, group, _, head_dim = x_BKGTD.shape
  x_BTKGD = jnp.transpose(x_BKGTD[:, :, :, :seq_len], (0, 3, 1, 2, 4))
  return x_BTKGD.reshape(batch, seq_len, num_kv_heads * group, head_dim)


def keys_to_kernel(x_BTKD: jax.Array, padded_len: int) -> jax.Array:
  """[B, T, Hk, D] -> [B, Hk, T_pad, D]."""
  return _pad_axis(jnp.transpose(x_BTKD, (0, 2, 1, 3)), 2, padded_len)


def keys_from_kernel(x_BKTD: jax.Array, seq_len: int) -> jax.Array:
  return jnp.transpose(x_BKTD[:, :, :seq_len], (0, 2, 1, 3))


def depth_to_kernel(x_BTLKD: jax.Array, padded_len: int, padded_slots: int) -> jax.Array:
  """[B, T, L, Hk, D] -> slot-major [B, Hk, L_pad, T_pad, D]."""
  x_BKLTD = jnp.transpose(x_BTLKD, (0, 3, 2, 1, 4))
  return _pad_axis(_pad_axis(x_BKLTD, 2, padded_slots), 3, padded_len)


def depth_from_kernel(x_BKLTD: jax.Array, seq_len: int, num_slots: int) -> jax.Array:
  return jnp.transpose(x_BKLTD[:, :, :num_slots, :seq_len], (0, 3, 2, 1, 4))


def row_stat_from_kernel(x_BKGT128: jax.Array, seq_len: int) -> jax.Array:
  """Lane-broadcast per-row statistic [B, Hk, G, T_pad, 128] -> [B, T, Hq]."""
  batch, num_kv_heads, group = x_BKGT128.shape[:3]
  x_BTKG = jnp.transpose(x_BKGT128[:, :, :, :seq_len, 0], (0, 3, 1, 2))
  return x_BTKG.reshape(batch, seq_len, num_kv_heads * group)


def row_stat_to_kernel(x_BTH: jax.Array, num_kv_heads: int, padded_len: int) -> jax.Array:
  """[B, T, Hq] -> lane-broadcast [B, Hk, G, T_pad, 128] float32 (the kernels' row-statistic layout)."""
  x_BKGT1 = queries_to_kernel(x_BTH[..., None].astype(jnp.float32), num_kv_heads, padded_len)
  return jnp.broadcast_to(x_BKGT1, (*x_BKGT1.shape[:-1], LANES))


def segments_to_kernel(segment_ids_BT: jax.Array | None, padded_len: int):
  """Returns (query ids [B, T_pad, 128], key ids [B, 8, T_pad]) or (None, None).

  Padded tokens get id -1; whatever they match is harmless: padded keys are masked by position and
  padded query rows are sliced off (and carry zero cotangent).
  """
  if segment_ids_BT is None:
    return None, None
  batch, seq_len = segment_ids_BT.shape
  ids_BT = jnp.pad(segment_ids_BT.astype(jnp.int32), ((0, 0), (0, padded_len - seq_len)),
                   constant_values=-1)
  q_ids = jnp.broadcast_to(ids_BT[:, :, None], (batch, padded_len, LANES))
  kv_ids = jnp.broadcast_to(ids_BT[:, None, :], (batch, SUBLANES, padded_len))
  return q_ids, kv_ids
