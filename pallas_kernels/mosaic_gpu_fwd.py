"""MoDA forward kernel in Pallas Mosaic GPU (Hopper: wgmma, TMA, warp specialization): out and lse.

One CTA = one (query tile of compute_wgs x `tokens` tokens, head group of one kv head, batch):
  * the memory warpgroup streams a ring of `stages` K/V slots with TMA (`mosaic_gpu_stream`): the
    sequence key blocks the tile needs (causal: up to its last token; with segments only those between
    the first and the last token of its rows' segments), then the depth items of the compute
    warpgroups (their own tokens' slots in [depth_start, depth_len) only: slots outside are never
    loaded; a partial item loads a readable slot in their place, masked). It refills a slot once every
    compute warpgroup released it.
  * each compute warpgroup owns 64 folded rows (`mosaic_gpu_tiles`) and runs one online softmax (base 2,
    running max m, sum l, accumulator acc in registers) over
      1. the sequence blocks: wholly visible ones first (segment mask only), then the ones overlapping
         the rows' tokens with the whole `spec.sequence_visible` mask; a warpgroup releases the blocks
         of the stream that only its sibling needs unread;
      2. the depth items: a dense [64, depth_cols] wgmma block of the rows against their tokens' slots,
         masked by `spec.depth_token_visible` and `spec.depth_slot_visible`.
    q (and depth_q) stay in SMEM for the whole pass; S = q k^T and acc += p v are wgmma with the
    probabilities p from registers. out goes through SMEM (q's buffer) to TMA stores, lse too (one
    box of the warpgroup's row tile, `mosaic_gpu_tiles.to_row_tiles`).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import mosaic_gpu_stream as stream
from pallas_kernels import mosaic_gpu_tiles as mt
from pallas_kernels import spec as spec_lib


class Operands(NamedTuple):
  """The forward's inputs (absent: None). q, depth_q [B, T, Hq, D]; k, v [B, T, Hk, D]; depth_k,
  depth_v [B, T, L, Hk, D]; depth_bounds [2] int32 (start, len); segment_ids [B, T] int32 (the keys')
  and row_segments [B, row_tiles, ROWS] int32 (the same in row tiles: the rows'), with segment_blocks
  [B, row_tiles, 4] int32 (`mosaic_gpu_stream.key_bounds`: per row tile, the key blocks of its segments
  and those inside its run), all or none. T is a multiple of 8 (tiled TMA boxes); spec.seq_len may be
  smaller (the padding is masked)."""
  q: Any
  k: Any
  v: Any
  depth_q: Any = None
  depth_k: Any = None
  depth_v: Any = None
  depth_bounds: Any = None
  segment_ids: Any = None
  row_segments: Any = None
  segment_blocks: Any = None


def _kernel(*refs, present, geom: mt.Geometry, spec: spec_lib.Spec):
  it = iter(refs)
  ops = Operands(*(next(it) if p else None for p in present))
  out_ref, lse_ref, scratch = next(it), next(it), next(it)
  wg = lax.axis_index("wg")
  batch = lax.axis_index("batch")
  tile = geom.num_q_tiles - 1 - lax.axis_index("q_seq")  # heavy causal tiles first
  kv_head = lax.div(lax.axis_index("heads"), jnp.int32(geom.head_groups))
  head_base = lax.rem(lax.axis_index("heads"), jnp.int32(geom.head_groups)) * geom.heads_per_tile
  cta_token = tile * geom.tokens_per_cta
  where = dict(batch=batch, kv_head=kv_head, geom=geom)

  kv, depth = stream.cta_bounds(cta_token, ops, spec, geom, batch)

  @pl.when(wg < geom.compute_wgs)
  def _compute():
    plgpu.set_max_registers(232, action="increase")
    _compute_wg(wg, cta_token + wg * geom.tokens, out_ref, lse_ref, ops=ops, scratch=scratch, spec=spec,
                program=lax.axis_index("heads"), head_base=head_base, kv=kv, **where, **depth)

  @pl.when(wg == geom.compute_wgs)
  def _memory():
    plgpu.set_max_registers(40, action="decrease")
    stream.memory_wg(cta_token, k=ops.k, v=ops.v, depth_k=ops.depth_k, depth_v=ops.depth_v,
                     segment_ids=ops.segment_ids, ring=scratch["ring"], kv=kv, **where, **depth)


def online_update(carry, logits, v_ref, *, v_bar, release, staging, schedule, geom: mt.Geometry):
  """Folds one block of base-2 logits [64, C] and its values (SMEM [C, D]) into (acc, m, l).

  With the ping-pong `schedule` barrier, the softmax's end is where this warpgroup hands the tensor
  cores over: it arrives, and waits for the sibling's arrival before its own P V.
  """
  acc, m_prev, l_prev = carry
  m_next = jnp.maximum(m_prev, logits.max(axis=1))
  alpha = jnp.exp2(m_prev - m_next)
  p = jnp.exp2(logits - mt.rows_bcast(m_next, logits.shape))
  l_next = l_prev * alpha + p.sum(axis=1)
  acc = acc * mt.rows_bcast(alpha, acc.shape)
  if schedule is not None:
    plgpu.barrier_arrive(schedule)
  plgpu.barrier_wait(v_bar)
  if schedule is not None:
    plgpu.barrier_wait(schedule)
  acc = mt.matmul(p.astype(v_ref.dtype), v_ref, acc=acc, staging=staging, interpret=geom.interpret)
  plgpu.barrier_arrive(release)
  return acc, m_next, l_next


def _compute_wg(wg, first_token, out_ref, lse_ref, *, ops: Operands, scratch, batch, program, kv_head, head_base,
                geom: mt.Geometry, spec: spec_lib.Spec, kv, depth_start, depth_len, first_step, num_depth):
  q_smem = scratch["q"].at[wg]
  dq_smem = q_smem if scratch["depth_q"] is None else scratch["depth_q"].at[wg]
  row_bar = scratch["row_bar"].at[wg]
  rows = dict(batch=batch, first_token=first_token, kv_head=kv_head, head_base=head_base, geom=geom)
  stream.load_rows(ops.q, q_smem, row_bar, **rows)
  if ops.depth_q is not None:
    stream.load_rows(ops.depth_q, dq_smem, row_bar, **rows)
  row_tile = dict(batch=batch, first_token=first_token, geom=geom)
  if ops.segment_ids is not None:
    plgpu.copy_gmem_to_smem(stream.row_vector(ops.row_segments, program=None, **row_tile), scratch["q_seg"].at[wg],
                            row_bar)
  plgpu.barrier_wait(row_bar)
  q_seg = None
  if ops.segment_ids is not None:
    q_seg = plgpu.load(scratch["q_seg"].at[wg], layout=plgpu.Layout.WGMMA.reduce(1))

  qk_scale = spec.scale * mt.LOG2E
  carry = (plgpu.layout_cast(jnp.zeros((mt.ROWS, geom.head_dim), jnp.float32), plgpu.Layout.WGMMA),
           plgpu.layout_cast(jnp.full((mt.ROWS,), mt.MASK_VALUE, jnp.float32), plgpu.Layout.WGMMA.reduce(1)),
           plgpu.layout_cast(jnp.zeros((mt.ROWS,), jnp.float32), plgpu.Layout.WGMMA.reduce(1)))
  ring = scratch["ring"]
  schedule = scratch["schedule"]

  def handover():
    plgpu.barrier_arrive(schedule)
    plgpu.barrier_wait(schedule)

  after_issue = None if schedule is None else handover
  update = functools.partial(online_update, schedule=schedule, geom=geom)

  def seq_step(i, carry, *, mask: str):
    slot = stream.slot_of(i - kv[0], geom)
    k_ref, v_ref = stream.seq_refs(ring, slot, geom)
    plgpu.barrier_wait(ring["k_bar"].at[slot])
    s = mt.matmul(q_smem, k_ref.T, after_issue=after_issue, interpret=geom.interpret)
    k_seg = None
    if q_seg is not None and mt.compares_segments(mask):  # read before the release: they come with the keys
      k_seg = mt.cols_bcast(plgpu.load(ring["seg"].at[slot], layout=plgpu.Layout.WGMMA.reduce(0)), s.shape)
    plgpu.barrier_arrive(ring["k_consumed"].at[slot])
    logits = s * qk_scale
    keep = mt.sequence_mask(spec, mt.row_tokens(first_token, s.shape, geom), i * geom.block_kv + mt.iota(s.shape, 1),
                            None if q_seg is None else mt.rows_bcast(q_seg, s.shape), k_seg, mask=mask)
    if keep is not None:
      logits = jnp.where(keep, logits, mt.MASK_VALUE)
    return update(carry, logits, v_ref, v_bar=ring["v_bar"].at[slot], release=ring["v_consumed"].at[slot],
                  staging=None if scratch["p_seq"] is None else scratch["p_seq"].at[wg])

  # This warpgroup's blocks inside the CTA's stream: the others' are released unread.
  loop = stream.confine(stream.key_blocks(first_token, ops.segment_blocks, batch, spec, geom), kv)
  if schedule is not None:  # warpgroup 0 takes the tensor cores first
    pl.when(wg == 1)(handover)
  skip = functools.partial(stream.skip_item, ring=ring, kv_first=kv[0], geom=geom, schedule=schedule)
  carry = stream.consume(loop, kv, seq_step, skip, carry, masks=stream.KEY_LOOP_MASKS)

  if spec.has_depth:
    def depth_step(j, carry):
      slot = stream.slot_of(stream.depth_base(kv) + j, geom)
      tok0, slot0 = mt.depth_item(j, first_step, geom)
      k_ref, v_ref, k_bar, v_bar = stream.depth_refs(ring, slot, wg, geom)
      plgpu.barrier_wait(k_bar)
      s = mt.matmul(dq_smem, k_ref.T, after_issue=after_issue, interpret=geom.interpret)
      plgpu.barrier_arrive(ring["k_consumed"].at[slot])
      keep = mt.depth_mask(spec, first_token, first_token + tok0, slot0, depth_start, depth_len, geom)
      logits = jnp.where(keep, s * qk_scale, mt.MASK_VALUE)
      return update(carry, logits, v_ref, v_bar=v_bar, release=ring["v_consumed"].at[slot],
                    staging=None if scratch["p_depth"] is None else scratch["p_depth"].at[wg])

    carry = lax.fori_loop(0, num_depth, depth_step, carry)
  if schedule is not None:  # the matching last handover
    pl.when(wg == 0)(handover)

  acc, m, l = carry
  # A row that met no entry at all (only rows wholly past T can, when their loop is empty) stores 0
  # and lse -inf, as the contract's rows that see nothing; acc is 0 there.
  l_safe = jnp.where(l == 0.0, 1.0, l)
  q_smem[...] = (acc / mt.rows_bcast(l_safe, acc.shape)).astype(q_smem.dtype)
  lse_smem = scratch["lse"].at[wg]
  lse_smem[...] = (m + jnp.log2(l)) / mt.LOG2E
  plgpu.commit_smem()
  stream.store_rows(q_smem, out_ref, **rows)
  plgpu.copy_smem_to_gmem(lse_smem, stream.row_vector(lse_ref, program=program, **row_tile))
  plgpu.wait_smem_to_gmem(0)


def _scratch(ops: Operands, geom: mt.Geometry, dtype):
  wgs = geom.compute_wgs
  rows = plgpu.SMEM((wgs, mt.ROWS, geom.head_dim), dtype, transforms=mt.smem_transforms(geom.head_dim, dtype))
  copies = geom.heads_per_tile * (1 + (ops.depth_q is not None)) + (ops.segment_ids is not None)
  staging = lambda cols: (plgpu.SMEM((wgs, mt.ROWS, cols), dtype, transforms=mt.smem_transforms(cols, dtype))
                          if geom.interpret else None)
  return dict(
      q=rows, depth_q=rows if ops.depth_q is not None else None,
      q_seg=None if ops.segment_ids is None else plgpu.SMEM((wgs, mt.ROWS), jnp.int32),
      lse=plgpu.SMEM((wgs, mt.ROWS), jnp.float32),
      row_bar=plgpu.Barrier(num_arrivals=copies, num_barriers=wgs),
      p_seq=staging(geom.block_kv),
      p_depth=staging(geom.depth_cols) if ops.depth_k is not None else None,
      schedule=plgpu.Barrier(num_arrivals=wgs) if geom.ping_pong else None,
      ring=stream.ring_scratch(geom, dtype, segments=ops.segment_ids is not None))


def forward(ops: Operands, spec: spec_lib.Spec, geom: mt.Geometry, interpret):
  """(out [B, T, Hq, D] in q's dtype, lse float32 natural log in row tiles [B, Hk * head_groups,
  row_tiles, ROWS] (`mosaic_gpu_tiles.from_row_tiles` reads it))."""
  batch = ops.q.shape[0]
  num_kv_heads = ops.k.shape[2]
  present = tuple(x is not None for x in ops)
  kernel = mt.launch(
      functools.partial(_kernel, present=present, geom=geom, spec=spec),
      out_type=(jax.ShapeDtypeStruct(ops.q.shape, ops.q.dtype),
                jax.ShapeDtypeStruct((batch, num_kv_heads * geom.head_groups, geom.row_tiles, mt.ROWS), jnp.float32)),
      scratch=_scratch(ops, geom, ops.q.dtype), grid=(num_kv_heads * geom.head_groups, geom.num_q_tiles, batch),
      seq_axis="q_seq", geom=geom, interpret=interpret, name="moda_mosaic_forward")
  return kernel(*(x for x in ops if x is not None))
