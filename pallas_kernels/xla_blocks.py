"""Block layouts, tile masks and matmul precision shared by the `xla` forward and backward passes.

Tokens are cut into `num_blocks` blocks of `block` tokens (T padded up to a multiple; padded keys are
masked, padded query rows are sliced off). The G query heads that read one kv head are folded into the
rows of a query block, so a query block is [B, K, R, D] with R = block * G and row r = (token r // G,
group member r % G). Key/value blocks are [B, K, block, D]: GQA never copies K or V, and every matmul is
a plain batched [R, D] x [D, block].
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels import spec as moda_spec
from pallas_kernels.spec import Spec

# Largest tile per platform. Measured fwd+bwd (causal, Hq8 Hk2 D64 L16 f32, 16 CPU cores): at B2 T2048
# tiles of 128 / 256 / 512 took 282 / 183 / 142 ms, at B2 T512 25 / 17 / 22 ms (one 512 tile also
# computes the causal upper half). On an H200 (bf16 B1 T16384 Hq16 Hk4 D64 L32) 128 / 256 / 512 / 1024
# took 553 / 156 / 67 / 44 ms: every tile is a handful of small kernels, so fewer, bigger tiles win.
# TPU is not measured; 512 is a multiple of the MXU width between the two.
_MAX_BLOCK_BY_PLATFORM = {"cpu": 256, "tpu": 512}
_MAX_BLOCK_ELSEWHERE = 1024
# One float32 [B, Hq, block, block] tile stays below this: large B * Hq shrinks the tile (not below 128).
_TILE_BYTES = 256 * 2**20


def default_max_block(platform: str, batch: int, num_q_heads: int) -> int:
  block = _MAX_BLOCK_BY_PLATFORM.get(platform, _MAX_BLOCK_ELSEWHERE)
  while block > 128 and batch * num_q_heads * block * block * 4 > _TILE_BYTES:
    block //= 2
  return block


class Geometry(NamedTuple):
  """Static facts about one call; hashable so it can be a `custom_vjp` non-differentiable argument."""
  batch: int
  num_kv_heads: int
  group: int
  head_dim: int
  block: int
  num_blocks: int
  spec: Spec

  @property
  def seq_len(self) -> int:
    return self.spec.seq_len

  @property
  def num_slots(self) -> int:  # L; 0 without depth
    return self.spec.num_slots

  @property
  def causal(self) -> bool:
    return self.spec.causal

  @property
  def scale(self) -> float:
    return self.spec.scale

  @property
  def rows(self) -> int:
    return self.block * self.group

  @property
  def padded_len(self) -> int:
    return self.block * self.num_blocks


def choose_block(seq_len: int, max_block: int, depth_chunk: int = 1) -> tuple[int, int]:
  """(block, num_blocks) covering seq_len with tiles of at most max_block and little padding.

  Only the last block may hold padding (padded_len - seq_len < block): the non-causal sweep masks
  padded keys in the last tile only. With chunk-visible depth (C = depth_chunk > 1, C <= max_block)
  the block is a multiple of C, so every chunk lies inside one query block (`xla_depth`).
  """
  if seq_len <= max_block:
    block = seq_len
  else:
    block = math.ceil(seq_len / math.ceil(seq_len / max_block))
    if max_block >= 8:
      block = min(-(-block // 8) * 8, max_block)  # sublane-friendly multiple of 8
  if 1 < depth_chunk <= max_block:
    block = max(depth_chunk, block // depth_chunk * depth_chunk)
  return block, math.ceil(seq_len / block)


def dot(subscripts: str, a, b):
  """einsum with float32 accumulation; exact (HIGHEST) for float32 inputs, native for bf16/f16.

  Half-precision operands stay half precision like in flash kernels: the MXU / tensor cores take them
  natively and accumulate in float32.
  """
  precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return jnp.einsum(subscripts, a, b, precision=precision, preferred_element_type=jnp.float32)


def pad_tokens(x, geo: Geometry, axis: int = 1, value=0):
  """Pads the token axis from T up to the block multiple (a no-op when T is already one)."""
  pad = geo.padded_len - geo.seq_len
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def to_query_blocks(x_BTH_, geo: Geometry, pad_value=0):
  """[B, T, Hq, *F] -> [num_blocks, B, K, R, *F] (row r = token r // G, group member r % G)."""
  features = x_BTH_.shape[3:]
  x = pad_tokens(x_BTH_, geo, value=pad_value).reshape(geo.batch, geo.num_blocks, geo.block, geo.num_kv_heads,
                                       geo.group, *features)
  x = jnp.moveaxis(x, (1, 3), (0, 2))  # [N, B, K, block, G, *F]
  return x.reshape(geo.num_blocks, geo.batch, geo.num_kv_heads, geo.rows, *features)


def from_query_blocks(x_NBKR_, geo: Geometry):
  """Inverse of `to_query_blocks`, padded tokens dropped."""
  features = x_NBKR_.shape[4:]
  x = x_NBKR_.reshape(geo.num_blocks, geo.batch, geo.num_kv_heads, geo.block, geo.group, *features)
  x = jnp.moveaxis(x, (0, 2), (1, 3))  # [B, N, block, K, G, *F]
  x = x.reshape(geo.batch, geo.padded_len, geo.num_kv_heads * geo.group, *features)
  return x[:, :geo.seq_len]


def to_key_blocks(x_BTKD, geo: Geometry):
  """[B, T, K, D] -> [num_blocks, B, K, block, D]."""
  x = pad_tokens(x_BTKD, geo).reshape(geo.batch, geo.num_blocks, geo.block, geo.num_kv_heads, -1)
  return jnp.transpose(x, (1, 0, 3, 2, 4))


def from_key_blocks(x_NBKSD, geo: Geometry):
  """Inverse of `to_key_blocks`, padded tokens dropped."""
  x = jnp.transpose(x_NBKSD, (1, 0, 3, 2, 4)).reshape(geo.batch, geo.padded_len, geo.num_kv_heads, -1)
  return x[:, :geo.seq_len]


def segment_blocks(segment_ids_BT, geo: Geometry):
  """(per query row [N, B, R], per key [N, B, block]) segment ids, or (None, None)."""
  if segment_ids_BT is None:
    return None, None
  seg_NBS = jnp.swapaxes(pad_tokens(segment_ids_BT, geo).reshape(geo.batch, geo.num_blocks, geo.block),
                         0, 1)
  return jnp.repeat(seg_NBS, geo.group, axis=2), seg_NBS


def key_block_mask(i, j, diagonal: bool, seg_rows_BR, seg_keys_BS, geo: Geometry):
  """Which logits of tile (query block i, key block j) are visible: [B or 1, 1, R, block] or None.

  `diagonal` marks the one tile per query block that can hold entries hidden by position: the
  diagonal block (causal) or the last key block (non-causal, where only padded keys are hidden).
  Every other tile `sweep_key_blocks` visits is visible by position, so only segments can hide its
  entries (no mask at all without segments).
  """
  q_segment = None if seg_rows_BR is None else seg_rows_BR[:, :, None]
  k_segment = None if seg_keys_BS is None else seg_keys_BS[:, None, :]
  if diagonal and (geo.causal or geo.padded_len != geo.seq_len):
    row_token_R1 = (i * geo.block + jnp.arange(geo.rows) // geo.group)[:, None]
    key_token_1S = (j * geo.block + jnp.arange(geo.block))[None, :]
    if q_segment is None:
      return moda_spec.sequence_visible(geo.spec, row_token_R1, key_token_1S)[None, None]
    return moda_spec.sequence_visible(geo.spec, row_token_R1[None], key_token_1S[None], q_segment,
                                      k_segment)[:, None]
  if q_segment is None:
    return None
  return moda_spec.same_segment(q_segment, k_segment)[:, None]


def sweep_key_blocks(i, step: Callable, carry, geo: Geometry):
  """Runs carry = step(j, diagonal, carry) over the key blocks query block i sees.

  The unmasked tiles run in a `fori_loop` whose trip count depends on i (causal: i tiles, so the
  blocks above the diagonal cost nothing); the one tile that may need a mask runs last.
  """
  last = i if geo.causal else geo.num_blocks - 1
  carry = jax.lax.fori_loop(0, last, lambda j, c: step(j, False, c), carry)
  return step(last, True, carry)


def masked(logits, mask):
  return logits if mask is None else jnp.where(mask, logits, -jnp.inf)
