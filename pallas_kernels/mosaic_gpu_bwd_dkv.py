"""MoDA backward in Pallas Mosaic GPU: the sequence dk / dv kernel.

One CTA = `compute_wgs` key blocks of 64 keys of one (kv head, batch); each compute warpgroup keeps its
keys and values in SMEM and dk, dv in registers, keys as the rows of every product:
    s^T = k q^T,  p^T = exp2(s^T - lse),  dv += p^T do,  dp^T = v do^T,  ds^T = p^T (dp^T - delta),
    dk += ds^T q.
The memory warpgroup streams the query row tiles (64 folded rows: the `tokens` tokens of a tile times
the Gp heads of a head group, as in the forward) with their do, lse, delta and segment ids (one row-tile
box each, `mosaic_gpu_tiles.to_row_tiles`) through a ring; the G heads of the kv head are summed by
looping over the head groups (in registers, in order: deterministic). The CTA streams the tiles that
may see one of its warpgroups' keys (`mosaic_gpu_stream.cta_stream`): causal, from the first one
holding the CTA's first key; with segments only those between the first and the last token of the
keys' segments (either way round). The tiles overlapping a warpgroup's keys take the whole
`spec.sequence_visible` mask, later ones the segment mask only; a warpgroup releases the tiles that only
its sibling needs unread.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import mosaic_gpu_stream as stream
from pallas_kernels import mosaic_gpu_tiles as mt
from pallas_kernels import spec as spec_lib

KEYS = mt.ROWS  # keys per compute warpgroup (wgmma M of every product)


def _kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest, segments: bool, geom: mt.Geometry,
            spec: spec_lib.Spec):
  seg_ref, row_seg_ref, bounds_ref = rest[:3] if segments else (None, None, None)
  dk_ref, dv_ref, scratch = rest[3:] if segments else rest
  wg = lax.axis_index("wg")
  batch = lax.axis_index("batch")
  kv_head = lax.axis_index("heads")
  cta_key = lax.axis_index("kv_seq") * (geom.compute_wgs * KEYS)
  loop = lambda first_key: stream.query_tiles(first_key, bounds_ref, batch, spec, geom)
  tiles = stream.cta_stream(loop, cta_key, KEYS, geom)  # the query row tiles [first, end) streamed
  per_group = tiles[1] - tiles[0]
  ring = scratch["ring"]

  @pl.when(wg < geom.compute_wgs)
  def _compute():
    plgpu.set_max_registers(232, action="increase")
    first_key = cta_key + wg * KEYS
    _compute_wg(wg, first_key, dict(k=k_ref, v=v_ref, seg=seg_ref, dk=dk_ref, dv=dv_ref), scratch, batch=batch,
                kv_head=kv_head, tiles=tiles, loop=stream.confine(loop(first_key), tiles), geom=geom, spec=spec)

  @pl.when(wg == geom.compute_wgs)
  def _memory():
    plgpu.set_max_registers(40, action="decrease")

    def load(i, slot, names):
      group = lax.div(i, per_group)
      first_token = (tiles[0] + lax.rem(i, per_group)) * geom.tokens
      rows = dict(batch=batch, first_token=first_token, kv_head=kv_head, head_base=group * geom.heads_per_tile,
                  geom=geom)
      bar = ring[names[0] + "_bar"].at[slot]
      for name in names:
        if name in ("q", "do"):
          stream.load_rows(dict(q=q_ref, do=do_ref)[name], ring[name].at[slot], bar, **rows)
        else:
          src, program = dict(seg=(row_seg_ref, None), lse=(lse_ref, kv_head * geom.head_groups + group),
                              delta=(delta_ref, kv_head * geom.head_groups + group))[name]
          vector = stream.row_vector(src, batch=batch, program=program, first_token=first_token, geom=geom)
          plgpu.copy_gmem_to_smem(vector, ring[name].at[slot], bar)

    total = geom.head_groups * per_group
    halves = (("q", "seg") if segments else ("q",), ("do", "lse", "delta"))

    @pl.loop(0, total)
    def _stream(i):
      slot = stream.slot_of(i, geom)
      for names in halves:
        pl.when(i >= geom.stages)(lambda: plgpu.barrier_wait(ring[names[0] + "_consumed"].at[slot]))
        load(i, slot, names)

    @pl.loop(jnp.maximum(total - geom.stages, 0), total)
    def _drain(i):
      slot = stream.slot_of(i, geom)
      plgpu.barrier_wait(ring["q_consumed"].at[slot])
      plgpu.barrier_wait(ring["do_consumed"].at[slot])


def _compute_wg(wg, first_key, refs, scratch, *, batch, kv_head, tiles, loop, geom: mt.Geometry,
                spec: spec_lib.Spec):
  """`loop`: this warpgroup's (first, num_masked, end) of the query row tiles, `confine`d to the CTA's
  `tiles`."""
  k_smem, v_smem = scratch["k"].at[wg], scratch["v"].at[wg]
  key_bar = scratch["key_bar"].at[wg]
  keys = pl.ds(first_key, KEYS)
  plgpu.copy_gmem_to_smem(refs["k"].at[batch, keys, kv_head], k_smem, key_bar)
  plgpu.copy_gmem_to_smem(refs["v"].at[batch, keys, kv_head], v_smem, key_bar)
  if refs["seg"] is not None:
    plgpu.copy_gmem_to_smem(refs["seg"].at[batch, keys], scratch["k_seg"].at[wg], key_bar)
  plgpu.barrier_wait(key_bar)
  k_seg = None
  if refs["seg"] is not None:
    k_seg = plgpu.load(scratch["k_seg"].at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
  qk_scale = spec.scale * mt.LOG2E
  ring = scratch["ring"]
  shape = (KEYS, mt.ROWS)
  col_vector = lambda ref: mt.cols_bcast(plgpu.load(ref, layout=plgpu.Layout.WGMMA.reduce(0)), shape)
  staging = None if scratch["p"] is None else scratch["p"].at[wg]
  per_group = tiles[1] - tiles[0]

  def step(i, carry, *, mask: str, group: int):
    dk, dv = carry
    slot = stream.slot_of(group * per_group + i - tiles[0], geom)
    q_rows, do_rows = ring["q"].at[slot], ring["do"].at[slot]
    plgpu.barrier_wait(ring["q_bar"].at[slot])
    s_t = mt.matmul(k_smem, q_rows.T, interpret=geom.interpret)
    q_seg = None if refs["seg"] is None else col_vector(ring["seg"].at[slot])
    plgpu.barrier_wait(ring["do_bar"].at[slot])
    lse2, delta = col_vector(ring["lse"].at[slot]) * mt.LOG2E, col_vector(ring["delta"].at[slot])
    # Columns are the tile's folded rows (head-major): token i * tokens + c % tokens, head c // tokens.
    col = mt.iota(shape, 1)
    q_token = i * geom.tokens + lax.rem(col, jnp.int32(geom.tokens))
    keep = mt.sequence_mask(spec, q_token, first_key + mt.iota(shape, 0), q_seg,
                            None if k_seg is None else mt.rows_bcast(k_seg, shape), mask=mask)
    if geom.padded_heads:  # padded heads hold a real head's rows: they must add nothing
      real = group * geom.heads_per_tile + lax.div(col, jnp.int32(geom.tokens)) < geom.group
      keep = real if keep is None else keep & real
    p_t = jnp.exp2(s_t * qk_scale - lse2)
    if keep is not None:
      p_t = jnp.where(keep, p_t, 0.0)
    dv = mt.matmul(p_t.astype(do_rows.dtype), do_rows, acc=dv, staging=staging, interpret=geom.interpret)
    dp_t = mt.matmul(v_smem, do_rows.T, interpret=geom.interpret)
    plgpu.barrier_arrive(ring["do_consumed"].at[slot])
    ds_t = p_t * (dp_t - delta)
    dk = mt.matmul(ds_t.astype(q_rows.dtype), q_rows, acc=dk, staging=staging, interpret=geom.interpret)
    plgpu.barrier_arrive(ring["q_consumed"].at[slot])
    return dk, dv

  def skip(i, _, *, group: int):
    slot = stream.slot_of(group * per_group + i - tiles[0], geom)
    for name in ("q", "do"):
      plgpu.barrier_wait(ring[name + "_bar"].at[slot])
      plgpu.barrier_arrive(ring[name + "_consumed"].at[slot])
    return _

  zeros = plgpu.layout_cast(jnp.zeros((KEYS, geom.head_dim), jnp.float32), plgpu.Layout.WGMMA)
  carry = (zeros, zeros)
  for group in range(geom.head_groups):  # the tiles of each head group in turn, as streamed
    carry = stream.consume(loop, tiles, functools.partial(step, group=group), functools.partial(skip, group=group),
                           carry, masks=(mt.FULL, mt.SEGMENTS))
  dk, dv = carry
  # Keys and values are dead: their SMEM stages dk, dv (keys >= T are clipped by the TMA store).
  k_smem[...] = (dk * spec.scale).astype(k_smem.dtype)
  v_smem[...] = dv.astype(v_smem.dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(k_smem, refs["dk"].at[batch, keys, kv_head])
  plgpu.copy_smem_to_gmem(v_smem, refs["dv"].at[batch, keys, kv_head])
  plgpu.wait_smem_to_gmem(0)


def _scratch(geom: mt.Geometry, dtype, segments: bool):
  wgs, d, st = geom.compute_wgs, geom.head_dim, geom.stages
  tiled = lambda shape: plgpu.SMEM(shape, dtype, transforms=mt.smem_transforms(shape[-1], dtype))
  heads = geom.heads_per_tile
  ring = dict(q=tiled((st, mt.ROWS, d)), do=tiled((st, mt.ROWS, d)),
              seg=plgpu.SMEM((st, mt.ROWS), jnp.int32) if segments else None,
              lse=plgpu.SMEM((st, mt.ROWS), jnp.float32), delta=plgpu.SMEM((st, mt.ROWS), jnp.float32),
              q_bar=plgpu.Barrier(num_arrivals=heads + segments, num_barriers=st),
              do_bar=plgpu.Barrier(num_arrivals=heads + 2, num_barriers=st),
              q_consumed=plgpu.Barrier(num_arrivals=wgs, num_barriers=st),
              do_consumed=plgpu.Barrier(num_arrivals=wgs, num_barriers=st))
  return dict(k=tiled((wgs, KEYS, d)), v=tiled((wgs, KEYS, d)),
              k_seg=plgpu.SMEM((wgs, KEYS), jnp.int32) if segments else None,
              key_bar=plgpu.Barrier(num_arrivals=2 + segments, num_barriers=wgs),
              p=tiled((wgs, KEYS, mt.ROWS)) if geom.interpret else None,
              ring=ring)


def dkv(ops, spec: spec_lib.Spec, geom: mt.Geometry, interpret):
  """Sequence dk, dv [B, T, Hk, D] of `ops` (a mosaic_gpu_bwd.Operands)."""
  batch, seq_len, _, _ = ops.q.shape
  num_kv_heads = ops.k.shape[2]
  segments = ops.segment_ids is not None
  like = jax.ShapeDtypeStruct(ops.k.shape, ops.k.dtype)
  grid = (num_kv_heads, pl.cdiv(seq_len, geom.compute_wgs * KEYS), batch)
  kernel = mt.launch(
      functools.partial(_kernel, segments=segments, geom=geom, spec=spec),
      out_type=(like, like), scratch=_scratch(geom, ops.q.dtype, segments), grid=grid, seq_axis="kv_seq",
      geom=geom, interpret=interpret, name="moda_mosaic_backward_dkv")
  num_key_tiles = grid[1] * geom.compute_wgs  # the last CTA's last warpgroup may lie wholly past T
  segment_arrays = [ops.segment_ids, ops.row_segments, stream.query_bounds(ops.segment_span, num_key_tiles, geom)]
  arrays = [ops.q, ops.k, ops.v, ops.do, ops.lse, ops.delta] + (segment_arrays if segments else [])
  return kernel(*arrays)
