"""The key stream of the Mosaic GPU forward and dq kernels, which blocks a CTA streams, and the folded rows'
TMA boxes.

The memory warpgroup fills a ring of `stages` slots, each a [ring_rows, D] K tile and V tile, with one
*item* at a time: the first are the sequence key blocks [kv_first, kv_end) (keys i * block_kv + [0,
block_kv), plus their segment ids), the next `num_depth` are depth items (both compute warpgroups'
columns of their own tokens' slots, `mosaic_gpu_tiles`; `depth_base`). Each compute warpgroup consumes
every item in order: it waits on the slot's K (V) barrier, reads, and releases the slot's K (V) half
with an arrive; the memory warpgroup refills a half once both compute warpgroups released it. Depth items
are tracked by barriers of their own per warpgroup (a warpgroup waits on its own columns only).

Barrier phases are tracked per thread in Mosaic GPU, so a consumer that has no use for an item still
waits on it (`skip_item`): every consumer observes every phase of the barriers it waits on, and the
producer and every consumer count the same items (`consume`), or the kernel deadlocks on the GPU.

Which key blocks (forward, dq) or query row tiles (dk/dv) a CTA streams: the smallest range holding
each compute warpgroup's own (`cta_stream`), which is the causal range of its rows (keys) intersected
with the blocks of their segments (`block_ranges`, from `spec.segment_span` per call: exact for any
ids); a warpgroup releases the items of its CTA's range outside its own unread (`confine`, `consume`).
How each block it reads is masked follows from where it lies (`KEY_LOOP_MASKS`): the blocks inside the
run of ids around all of a warpgroup's rows (`block_ranges.run_blocks`), visible by position, run with no
mask at all, which a long document's rows meet almost everywhere.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import block_ranges
from pallas_kernels import mosaic_gpu_tiles as mt
from pallas_kernels import spec as spec_lib


def key_bounds(span_BT2, segment_ids_BT, geom: mt.Geometry):
  """[B, row_tiles, 4] int32 (None without segments): per row tile (a compute warpgroup's rows of the
  forward or dq kernel), [first, end) of the key blocks of its segments (`block_ranges.segment_blocks`),
  then [first, end) of those wholly inside the tile's one run (`block_ranges.run_blocks`; empty if none)."""
  if span_BT2 is None:
    return None
  segment_ids_BT = segment_ids_BT[:, :span_BT2.shape[1]]  # the launchers' ids may be padded past T
  return jnp.concatenate(
      [block_ranges.segment_blocks(span_BT2, geom.tokens, geom.block_kv, num_tiles=geom.row_tiles),
       block_ranges.run_blocks(segment_ids_BT, geom.tokens, geom.block_kv, num_tiles=geom.row_tiles)], axis=-1)


def query_bounds(span_BT2, num_key_tiles: int, geom: mt.Geometry):
  """[B, num_key_tiles, 2] int32 (None without segments): per key tile of ROWS keys (a compute warpgroup of
  the dk/dv kernel), [first, end) of the query row tiles of its segments."""
  return block_ranges.segment_blocks(span_BT2, mt.ROWS, geom.tokens, num_tiles=num_key_tiles)


def segment_range(bounds, batch, tile, column: int = 0):
  """(first, end) of row `tile` of `bounds` (`key_bounds` / `query_bounds`: a GMEM ref in a kernel, an
  array outside) from `column` (2: `key_bounds`' run blocks); None without segments."""
  return None if bounds is None else (bounds[batch, tile, column], bounds[batch, tile, column + 1])


# How a block of a loop is masked (`mt.sequence_mask`), per part of `key_blocks`' loop: visible by position
# (segments compared), wholly inside the rows' run (no mask), by position again, then the causal edge.
KEY_LOOP_MASKS = (mt.SEGMENTS, mt.NO_MASK, mt.SEGMENTS, mt.FULL)


def key_blocks(first_token, bounds, batch, spec: spec_lib.Spec, geom: mt.Geometry):
  """(first, run_first, run_end, num_free, end) of the key blocks of the compute warpgroup whose rows start
  at `first_token`, before `confine`: `block_ranges.key_block_range`'s (first, num_free, end) with the
  blocks [run_first, run_end) of [first, num_free) that lie inside the rows' run (`key_bounds`; none
  without segments) split out. The parts are masked as `KEY_LOOP_MASKS` says."""
  tile = lax.div(first_token, jnp.int32(geom.tokens))
  first, num_free, end = block_ranges.key_block_range(
      first_token, tile_tokens=geom.tokens, block_keys=geom.block_kv, seq_len=geom.seq_len, causal=spec.causal,
      segment_range=segment_range(bounds, batch, tile))
  if bounds is None:
    return first, first, first, num_free, end
  run = segment_range(bounds, batch, tile, column=2)
  run_first = jnp.clip(run[0], first, num_free)
  return first, run_first, jnp.clip(run[1], run_first, num_free), num_free, end


def query_tiles(first_key, bounds, batch, spec: spec_lib.Spec, geom: mt.Geometry):
  """(first, num_masked, end) of the query row tiles of the dk/dv warpgroup whose ROWS keys start at
  `first_key` (`block_ranges.query_tile_range`), before `confine`."""
  seg = segment_range(bounds, batch, lax.div(first_key, jnp.int32(mt.ROWS)))
  return block_ranges.query_tile_range(first_key, block_keys=mt.ROWS, tile_tokens=geom.tokens, seq_len=geom.seq_len,
                                       causal=spec.causal, segment_range=seg)


def cta_stream(loop, cta_first, step: int, geom: mt.Geometry):
  """[first, end) of the blocks one CTA's memory warpgroup streams: the smallest range holding each
  compute warpgroup's (`loop(w_first)`, warpgroup w's rows or keys from cta_first + w * step). A
  warpgroup wholly past T (in the last CTA) widens nothing: its loop starts no earlier and ends no later
  than the real warpgroup's before it (with segments it is empty). Every CTA holds a real row or key, so
  the stream is never empty."""
  loops = [loop(cta_first + w * step) for w in range(geom.compute_wgs)]
  first = functools.reduce(jnp.minimum, [bounds[0] for bounds in loops])
  end = functools.reduce(jnp.maximum, [bounds[-1] for bounds in loops])
  return first, jnp.maximum(first, end)


def confine(loop, stream):
  """A compute warpgroup's loop (first, split..., end: nondecreasing boundaries of its parts) clamped into
  its CTA's stream [lo, hi), so that [lo, first) + its parts + [end, hi) counts exactly the hi - lo items
  streamed (`consume`; another count deadlocks the GPU). An empty loop becomes first = end."""
  lo, hi = stream
  first = jnp.clip(loop[0], lo, hi)
  end = jnp.clip(loop[-1], first, hi)
  splits, prev = [], first
  for split in loop[1:-1]:
    prev = jnp.clip(split, prev, end)
    splits.append(prev)
  return (first, *splits, end)


def cta_bounds(cta_token, ops, spec, geom: mt.Geometry, batch):
  """What one CTA's compute warpgroups visit, shared by the forward and the dq kernel: (the key blocks
  [first, end) of its stream, `cta_stream` of `key_blocks`; the depth bounds as keyword arguments of the
  compute warpgroups)."""
  loop = lambda first_token: key_blocks(first_token, ops.segment_blocks, batch, spec, geom)
  kv = cta_stream(loop, cta_token, geom.tokens, geom)
  depth = dict(depth_start=None, depth_len=None, first_step=None, num_depth=jnp.int32(0))
  if spec.has_depth:
    depth_start, depth_len = ops.depth_bounds[0], ops.depth_bounds[1]
    first_step, num_depth = mt.depth_items(depth_start, depth_len, geom)
    depth = dict(depth_start=depth_start, depth_len=depth_len, first_step=first_step, num_depth=num_depth)
  return kv, depth


def ring_scratch(geom: mt.Geometry, dtype, *, segments: bool) -> dict:
  rows = functools.partial(plgpu.SMEM, transforms=mt.smem_transforms(geom.head_dim, dtype))
  shape = (geom.stages, geom.ring_rows, geom.head_dim)
  wgs = geom.compute_wgs
  return dict(
      k=rows(shape, dtype), v=rows(shape, dtype),
      seg=plgpu.SMEM((geom.stages, geom.block_kv), jnp.int32) if segments else None,
      k_bar=plgpu.Barrier(num_arrivals=1 + segments, num_barriers=geom.stages),
      v_bar=plgpu.Barrier(num_arrivals=1, num_barriers=geom.stages),
      dk_bar=plgpu.Barrier(num_arrivals=geom.slots_per_item, num_barriers=geom.stages * wgs),
      dv_bar=plgpu.Barrier(num_arrivals=geom.slots_per_item, num_barriers=geom.stages * wgs),
      k_consumed=plgpu.Barrier(num_arrivals=wgs, num_barriers=geom.stages),
      v_consumed=plgpu.Barrier(num_arrivals=wgs, num_barriers=geom.stages))


def slot_of(i, geom: mt.Geometry):
  return lax.rem(i, jnp.int32(geom.stages))


def seq_refs(ring, slot, geom: mt.Geometry):
  """(k [block_kv, D], v [block_kv, D]) SMEM views of a sequence item's slot."""
  keys = pl.ds(0, geom.block_kv)
  return ring["k"].at[slot, keys], ring["v"].at[slot, keys]


def depth_refs(ring, slot, wg, geom: mt.Geometry):
  """(depth k [depth_cols, D], depth v, their barriers) of compute warpgroup `wg` in a depth item's slot."""
  cols = pl.ds(wg * geom.depth_cols, geom.depth_cols)
  bar = slot * geom.compute_wgs + wg
  return ring["k"].at[slot, cols], ring["v"].at[slot, cols], ring["dk_bar"].at[bar], ring["dv_bar"].at[bar]


def skip_item(i, _, *, ring, kv_first, geom: mt.Geometry, schedule=None):
  """Releases key block i (stream item i - kv_first), which these rows do not need but a sibling
  warpgroup does, without reading it.

  `schedule`: the forward's ping-pong barrier, passed twice per item like a computed one.
  """
  slot = slot_of(i - kv_first, geom)
  if schedule is not None:
    for _step in range(2):
      plgpu.barrier_arrive(schedule)
      plgpu.barrier_wait(schedule)
  plgpu.barrier_wait(ring["k_bar"].at[slot])
  plgpu.barrier_arrive(ring["k_consumed"].at[slot])
  plgpu.barrier_wait(ring["v_bar"].at[slot])
  plgpu.barrier_arrive(ring["v_consumed"].at[slot])
  return _


def consume(loop, stream, step, skip, carry, *, masks):
  """A compute warpgroup's pass over its CTA's stream [lo, hi) of blocks, given its `confine`d loop
  (first, split..., end): releases [lo, first) unread (`skip(i, None)`), runs `step(i, carry, mask=...)`
  over each part with its entry of `masks` (`mt.sequence_mask`), releases [end, hi) unread. That is
  hi - lo items, each once, in the stream's order: what the memory warpgroup streams."""
  lo, hi = stream
  lax.fori_loop(lo, loop[0], skip, None)
  for start, stop, mask in zip(loop[:-1], loop[1:], masks, strict=True):
    carry = lax.fori_loop(start, stop, functools.partial(step, mask=mask), carry)
  lax.fori_loop(loop[-1], hi, skip, None)
  return carry


def depth_base(kv):
  """The stream index of the first depth item: the key blocks [kv[0], kv[1]) come first."""
  return kv[1] - kv[0]


def memory_wg(cta_token, *, k, v, depth_k, depth_v, segment_ids, ring, batch, kv_head, geom: mt.Geometry,
              kv, depth_start, depth_len, first_step, num_depth):
  """The memory warpgroup: streams the key blocks [kv[0], kv[1]) then `num_depth` depth items through the
  ring (see the module doc)."""
  kv_first, num_kv = kv[0], depth_base(kv)
  total = num_kv + num_depth

  def load_half(i, slot, src, depth_src, buf, bar, depth_bars, seg=False):
    @pl.when(i < num_kv)
    def _seq():
      keys = pl.ds((kv_first + i) * geom.block_kv, geom.block_kv)
      plgpu.copy_gmem_to_smem(src.at[batch, keys, kv_head], buf.at[slot, pl.ds(0, geom.block_kv)], bar.at[slot])
      if seg:
        plgpu.copy_gmem_to_smem(segment_ids.at[batch, keys], ring["seg"].at[slot], bar.at[slot])

    if depth_src is not None:
      pl.when(i >= num_kv)(lambda: _load_depth(depth_src, buf, depth_bars, i - num_kv, slot))

  def _load_depth(src, buf, bars, j, slot):
    # Each compute warpgroup's columns of this item: one [tpp, D] box per slot. A slot outside
    # [depth_start, depth_len) (a partial item's tail) loads a readable slot instead: its columns are
    # masked, and unreadable slots are never touched.
    tok0, slot0 = mt.depth_item(j, first_step, geom)
    for w in range(geom.compute_wgs):
      tokens = pl.ds(cta_token + w * geom.tokens + tok0, geom.tpp)
      for s in range(geom.slots_per_item):
        slot_index = jnp.clip(slot0 + s, depth_start, depth_len - 1)
        rows = pl.ds(w * geom.depth_cols + s * geom.tpp, geom.tpp)
        plgpu.copy_gmem_to_smem(src.at[batch, tokens, slot_index, kv_head], buf.at[slot, rows],
                                bars.at[slot * geom.compute_wgs + w])

  @pl.loop(0, total)
  def _stream(i):
    slot = slot_of(i, geom)
    pl.when(i >= geom.stages)(lambda: plgpu.barrier_wait(ring["k_consumed"].at[slot]))
    load_half(i, slot, k, depth_k, ring["k"], ring["k_bar"], ring["dk_bar"], seg=segment_ids is not None)
    pl.when(i >= geom.stages)(lambda: plgpu.barrier_wait(ring["v_consumed"].at[slot]))
    load_half(i, slot, v, depth_v, ring["v"], ring["v_bar"], ring["dv_bar"])

  # Observe the last releases too, so every barrier ends the kernel in a completed phase.
  @pl.loop(jnp.maximum(total - geom.stages, 0), total)
  def _drain(i):
    slot = slot_of(i, geom)
    plgpu.barrier_wait(ring["k_consumed"].at[slot])
    plgpu.barrier_wait(ring["v_consumed"].at[slot])


def tile_head(head_base, g, geom: mt.Geometry):
  """The head (inside the kv head's G) whose rows tile head g loads: padded heads load the last real one."""
  return jnp.minimum(head_base + g, geom.group - 1)


def load_rows(src, dst, bar, *, batch, first_token, kv_head, head_base, geom: mt.Geometry):
  """Gp TMA boxes: rows [g * tokens, (g + 1) * tokens) of `dst` from head g's `tokens` tokens of `src`
  [B, T, Hq, D] (q-like)."""
  tokens = pl.ds(first_token, geom.tokens)
  for g in range(geom.heads_per_tile):
    h = kv_head * geom.group + tile_head(head_base, g, geom)
    plgpu.copy_gmem_to_smem(src.at[batch, tokens, h], dst.at[pl.ds(g * geom.tokens, geom.tokens)], bar)


def store_rows(src, dst, *, batch, first_token, kv_head, head_base, geom: mt.Geometry):
  """The inverse of `load_rows` for the real heads (padded heads are never stored)."""
  tokens = pl.ds(first_token, geom.tokens)
  for g in range(geom.heads_per_tile):
    part = src.at[pl.ds(g * geom.tokens, geom.tokens)]

    @pl.when(head_base + g < geom.group)
    def _store():
      plgpu.copy_smem_to_gmem(part, dst.at[batch, tokens, kv_head * geom.group + head_base + g])


def row_vector(src, *, batch, program, first_token, geom: mt.Geometry):
  """The GMEM row tile (`mt.to_row_tiles`) of the rows starting at `first_token` (a multiple of tokens):
  src [B, Hk * head_groups, tiles, ROWS] (lse, delta; `program` = kv_head * head_groups + head group) or
  [B, tiles, ROWS] (segment ids). One 256-byte TMA box, at a 256-byte multiple of an SMEM vector."""
  tile = lax.div(first_token, jnp.int32(geom.tokens))
  return src.at[batch, program, tile] if len(src.shape) == 4 else src.at[batch, tile]
