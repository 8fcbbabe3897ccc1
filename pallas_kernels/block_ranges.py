"""Which blocks a tile's inner loop visits: the causal and the segment bounds in block units.

Shared by the Pallas GPU backends (pallas_triton, pallas_mosaic_gpu), whose kernels step a tile of query
tokens over blocks of keys (forward, dq) or a block of keys over tiles of query tokens (dk/dv). The bounds
only decide what is visited; what is visible inside a visited block is `spec`'s mask, always.

  * `segment_spans` (in XLA, once per call): `spec.segment_span` stacked as the [B, T, 2] array the
    kernels' launchers share;
  * `segment_blocks` (in XLA, per call): per tile, the units (blocks of the inner loop) between the first
    and the last token of the tile's segments, from `spec.segment_span`: exact for any ids;
  * `run_blocks` (in XLA, per call): per tile inside one run of consecutive tokens of one segment, the
    units wholly inside that run, where the segment comparison can be dropped;
  * `key_block_range` / `query_tile_range` (inside kernels, on int32 scalars): the causal range of one
    tile, split into the blocks that need the causal mask and those that do not, intersected with its
    segment bounds. Operands are non-negative, so `lax.div` is floor division (and one instruction in
    every backend's lowering).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import spec as spec_lib


def segment_spans(segment_ids_BT):
  """[B, T, 2] int32 (first, last) of each token's segment (`spec.segment_span`), or None without
  segments: computed once per call, every kernel's bounds (`segment_blocks`) derive from it."""
  return None if segment_ids_BT is None else jnp.stack(spec_lib.segment_span(segment_ids_BT), axis=-1)


def segment_blocks(span_BT2, tile_tokens: int, unit_tokens: int, num_tiles: int | None = None):
  """[B, tiles, 2] int32 (None without segments): for each tile of `tile_tokens` tokens, [first, end) of the
  units of `unit_tokens` tokens (the blocks the kernel's inner loop steps over) that may hold a token of a
  segment of the tile.

  first = min(first token of the segment) // unit and end = max(last token) // unit + 1 over the tile's
  real tokens (t < T: the padding of the last tile never widens it); by `spec.segment_span`, no unit
  outside holds a token of a segment of the tile. Exact for any ids, not only contiguous runs.
  `num_tiles` (default cdiv(T, tile_tokens)) may be larger, for a grid with tiles wholly past T: theirs
  is the empty [T // unit, 0), which widens no min / max taken over tiles that hold a real token.
  """
  if span_BT2 is None:
    return None
  batch, seq_len, _ = span_BT2.shape
  num_tiles = pl.cdiv(seq_len, tile_tokens) if num_tiles is None else num_tiles
  pad = [(0, 0), (0, num_tiles * tile_tokens - seq_len)]
  # Past-the-end fillers that never win the min / max over a tile's real tokens.
  first_BNt = jnp.pad(span_BT2[..., 0], pad, constant_values=seq_len).reshape(batch, num_tiles, tile_tokens)
  last_BNt = jnp.pad(span_BT2[..., 1], pad, constant_values=-1).reshape(batch, num_tiles, tile_tokens)
  return jnp.stack([jnp.min(first_BNt, axis=2) // unit_tokens, jnp.max(last_BNt, axis=2) // unit_tokens + 1],
                   axis=-1).astype(jnp.int32)


def run_blocks(segment_ids_BT, tile_tokens: int, unit_tokens: int, num_tiles: int):
  """[B, tiles, 2] int32 (None without segments): for each tile of `tile_tokens` tokens whose real tokens all
  lie in one run (a stretch of consecutive tokens of one segment, `spec.same_segment`), [first, end) of the
  units of `unit_tokens` tokens wholly inside that run: every key there shares the segment of every one of
  the tile's tokens, so a block of them that is visible by position needs no mask at all. Other tiles
  (several runs, or wholly past T) get [0, 0). Exact for any ids (a run, not `spec.segment_span`'s span).

  Per tile, the last run start at or before its last token and the first one after it: one masked max and
  one masked min over [tiles, T] (two reductions of elementwise work, where a scan over T would be a
  chain of log T steps per call).
  """
  if segment_ids_BT is None:
    return None
  batch, seq_len = segment_ids_BT.shape
  same_BT1 = spec_lib.same_segment(segment_ids_BT[:, 1:], segment_ids_BT[:, :-1])
  starts_B1T = jnp.concatenate([jnp.ones((batch, 1), bool), ~same_BT1], axis=1)[:, None, :]  # a run starts at t
  token_11T = jnp.arange(seq_len, dtype=jnp.int32)[None, None, :]
  first_token_1N = jnp.arange(num_tiles, dtype=jnp.int32)[None, :] * tile_tokens
  last_token_1N1 = (jnp.minimum(first_token_1N + tile_tokens, seq_len) - 1)[:, :, None]
  run_first_BN = jnp.max(jnp.where(starts_B1T & (token_11T <= last_token_1N1), token_11T, 0), axis=2)
  run_end_BN = jnp.min(jnp.where(starts_B1T & (token_11T > last_token_1N1), token_11T, seq_len), axis=2)
  one_run_BN = (run_first_BN <= first_token_1N) & (first_token_1N < seq_len)
  first_BN = (run_first_BN + unit_tokens - 1) // unit_tokens
  return jnp.stack([jnp.where(one_run_BN, first_BN, 0), jnp.where(one_run_BN, run_end_BN // unit_tokens, 0)],
                   axis=-1).astype(jnp.int32)


def key_block_range(first_token, *, tile_tokens: int, block_keys: int, seq_len: int, causal: bool,
                    segment_range=None):
  """(first, num_free, end) of the key blocks of the query tile of `tile_tokens` tokens from `first_token`:
  blocks [first, num_free) are visible by position to every row of the tile (no mask but segments);
  [num_free, end) need the whole `spec.sequence_visible` mask; the others hold no key any row sees.

  `segment_range` ((first, end) of the tile's row of `segment_blocks(span, tile_tokens, block_keys)`)
  confines the loop to the blocks holding the tile's segments; without it the loop starts at block 0.
  A tile with a real token has first < end (its first token is in its own segment, at or before its
  block); one wholly past T has an empty range (first >= end).
  """
  if causal:
    last_token = jnp.minimum(first_token + tile_tokens, seq_len)
    num_free = lax.div(first_token, jnp.int32(block_keys))
    end = lax.div(last_token + block_keys - 1, jnp.int32(block_keys))
  else:
    num_free, end = seq_len // block_keys, pl.cdiv(seq_len, block_keys)
  return _confine(0, num_free, end, segment_range)


def query_tile_range(start, *, block_keys: int, tile_tokens: int, seq_len: int, causal: bool,
                     segment_range=None):
  """(first, num_masked, end) of the query tiles of `tile_tokens` tokens for the key block of `block_keys`
  keys from `start`: tiles [first, num_masked) hold tokens of the block and need the causal mask;
  [num_masked, end) see every key of the block by position (no mask but segments); the others see none
  of its keys. Tiles run to cdiv(T, tile_tokens).

  `segment_range` ((first, end) of the block's row of `segment_blocks(span, block_keys, tile_tokens)`)
  confines the loop to the tiles holding the block's segments. A block with a real key has first < end.
  """
  if causal:
    last_token = jnp.minimum(start + block_keys, seq_len)
    first = lax.div(start, jnp.int32(tile_tokens))
    num_masked = lax.div(last_token + tile_tokens - 1, jnp.int32(tile_tokens))
  else:
    first = num_masked = 0
  return _confine(first, num_masked, pl.cdiv(seq_len, tile_tokens), segment_range)


def _confine(first, split, end, segment_range):
  """A loop's (first, split, end) intersected with [segment_range[0], segment_range[1]); the split stays
  inside, so the two loops [first, split) and [split, end) cover exactly the intersection."""
  if segment_range is None:
    return first, split, end
  first, end = jnp.maximum(first, segment_range[0]), jnp.minimum(end, segment_range[1])
  return first, jnp.maximum(first, jnp.minimum(split, end)), end
