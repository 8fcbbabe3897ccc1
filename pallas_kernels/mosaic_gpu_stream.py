"""The key stream of the Mosaic GPU forward and dq kernels, and the folded rows' TMA boxes.

The memory warpgroup fills a ring of `stages` slots, each a [ring_rows, D] K tile and V tile, with one
*item* at a time: items [0, max_kv) are sequence key blocks (keys i * block_kv + [0, block_kv), plus
their segment ids), the next `num_depth` are depth items (both compute warpgroups' columns of their own
tokens' slots, `mosaic_gpu_tiles`). Each compute warpgroup consumes every item in order: it waits on the
slot's K (V) barrier, reads, and releases the slot's K (V) half with an arrive; the memory warpgroup
refills a half once both compute warpgroups released it. Depth items are tracked by barriers of their
own per warpgroup (a warpgroup waits on its own columns only).

Barrier phases are tracked per thread in Mosaic GPU, so a consumer that has no use for an item still
waits on it (`skip_item`): every consumer observes every phase of the barriers it waits on.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import mosaic_gpu_tiles as mt


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


def skip_item(i, _, *, ring, geom: mt.Geometry, schedule=None):
  """Releases a sequence item these rows do not need (the sibling warpgroup does) without reading it.

  `schedule`: the forward's ping-pong barrier, passed twice per item like a computed one.
  """
  slot = slot_of(i, geom)
  if schedule is not None:
    for _step in range(2):
      plgpu.barrier_arrive(schedule)
      plgpu.barrier_wait(schedule)
  plgpu.barrier_wait(ring["k_bar"].at[slot])
  plgpu.barrier_arrive(ring["k_consumed"].at[slot])
  plgpu.barrier_wait(ring["v_bar"].at[slot])
  plgpu.barrier_arrive(ring["v_consumed"].at[slot])
  return _


def memory_wg(cta_token, *, k, v, depth_k, depth_v, segment_ids, ring, batch, kv_head, geom: mt.Geometry,
              max_kv, depth_start, depth_len, first_step, num_depth):
  """The memory warpgroup: streams items [0, max_kv + num_depth) through the ring (see the module doc)."""
  total = max_kv + num_depth

  def load_half(i, slot, src, depth_src, buf, bar, depth_bars, seg=False):
    @pl.when(i < max_kv)
    def _seq():
      keys = pl.ds(i * geom.block_kv, geom.block_kv)
      plgpu.copy_gmem_to_smem(src.at[batch, keys, kv_head], buf.at[slot, pl.ds(0, geom.block_kv)], bar.at[slot])
      if seg:
        plgpu.copy_gmem_to_smem(segment_ids.at[batch, keys], ring["seg"].at[slot], bar.at[slot])

    if depth_src is not None:
      pl.when(i >= max_kv)(lambda: _load_depth(depth_src, buf, depth_bars, i - max_kv, slot))

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
