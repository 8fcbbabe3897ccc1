"""MoDA forward kernel in Pallas Mosaic GPU (Hopper: wgmma, TMA, warp specialization): out and lse.

One CTA = one (query tile of 2 x `tokens` tokens, head group of one kv head, batch), three warpgroups:
  * WG 2, the memory warpgroup, streams a ring of `stages` K/V slots with TMA: the sequence key blocks
    the tile needs, then the depth items of both compute warpgroups (their own tokens' slots in
    [depth_start, depth_len) only: slots outside are never loaded; a partial item loads a readable slot
    in their place, masked). It refills a slot once both compute warpgroups released it.
  * WG 0 and 1 each own 64 folded rows (`mosaic_gpu_tiles`) and run one online softmax (base 2, running
    max m, sum l, accumulator acc in registers) over
      1. the sequence blocks: wholly visible ones first (segment mask only), then the ones overlapping
         the rows' tokens with the whole `spec.sequence_visible` mask; a warpgroup with fewer causal
         blocks than its sibling releases the extra slots unread;
      2. the depth items: a dense [64, depth_cols] wgmma block of the rows against their tokens' slots,
         masked by `spec.depth_token_visible` and `spec.depth_slot_visible`.
    q (and depth_q) stay in SMEM for the whole pass; S = q k^T and acc += p v are wgmma with the
    probabilities p from registers. out goes through SMEM (q's buffer) to TMA stores, lse too.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import mosaic_gpu_tiles as mt
from pallas_kernels import spec as spec_lib


class Operands(NamedTuple):
  """The forward's inputs (absent: None). q, depth_q [B, T, Hq, D]; k, v [B, T, Hk, D]; depth_k,
  depth_v [B, T, L, Hk, D]; depth_bounds [2] int32 (start, len); segment_ids [B, T] int32. T is a
  multiple of 8 (tiled TMA boxes); spec.seq_len may be smaller (the padding is masked)."""
  q: Any
  k: Any
  v: Any
  depth_q: Any = None
  depth_k: Any = None
  depth_v: Any = None
  depth_bounds: Any = None
  segment_ids: Any = None


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

  if spec.causal:
    max_kv = mt.causal_kv_steps(cta_token + (mt.COMPUTE_WGS - 1) * geom.tokens, geom)[1]
  else:
    max_kv = jnp.int32(geom.num_kv_blocks)
  if spec.has_depth:
    depth_start, depth_len = ops.depth_bounds[0], ops.depth_bounds[1]
    first_step, num_depth = mt.depth_items(depth_start, depth_len, geom)
  else:
    depth_start = depth_len = first_step = None
    num_depth = jnp.int32(0)
  ctx = dict(ops=ops, scratch=scratch, batch=batch, kv_head=kv_head, head_base=head_base, geom=geom,
             spec=spec, max_kv=max_kv, depth_start=depth_start, depth_len=depth_len, first_step=first_step,
             num_depth=num_depth)

  @pl.when(wg < mt.COMPUTE_WGS)
  def _compute():
    _compute_wg(wg, cta_token + wg * geom.tokens, out_ref, lse_ref, **ctx)

  @pl.when(wg == mt.COMPUTE_WGS)
  def _memory():
    plgpu.set_max_registers(40, action="decrease")
    _memory_wg(cta_token, **ctx)


def _head(head_base, g, geom: mt.Geometry):
  """Query head index (inside the kv head's G) of tile head g; padded heads read the last real one."""
  return jnp.minimum(head_base + g, geom.group - 1)


def _compute_wg(wg, first_token, out_ref, lse_ref, *, ops: Operands, scratch, batch, kv_head, head_base,
                geom: mt.Geometry, spec: spec_lib.Spec, max_kv, depth_start, depth_len, first_step, num_depth):
  plgpu.set_max_registers(232, action="increase")
  q_smem = scratch["q"].at[wg]
  dq_smem = q_smem if scratch["depth_q"] is None else scratch["depth_q"].at[wg]
  row_bar = scratch["row_bar"].at[wg]
  rows = pl.ds(first_token, geom.tokens)
  for g in range(geom.heads_per_tile):
    h = kv_head * geom.group + _head(head_base, g, geom)
    part = pl.ds(g * geom.tokens, geom.tokens)
    plgpu.copy_gmem_to_smem(ops.q.at[batch, rows, h], q_smem.at[part], row_bar)
    if scratch["depth_q"] is not None:
      plgpu.copy_gmem_to_smem(ops.depth_q.at[batch, rows, h], dq_smem.at[part], row_bar)
    if ops.segment_ids is not None:
      plgpu.copy_gmem_to_smem(ops.segment_ids.at[batch, rows], scratch["q_seg"].at[wg, part], row_bar)
  plgpu.barrier_wait(row_bar)
  q_seg = None
  if ops.segment_ids is not None:
    q_seg = plgpu.load(scratch["q_seg"].at[wg], layout=plgpu.Layout.WGMMA.reduce(1))

  qk_scale = spec.scale * mt.LOG2E
  d = geom.head_dim
  carry = (plgpu.layout_cast(jnp.zeros((mt.ROWS, d), jnp.float32), plgpu.Layout.WGMMA),
           plgpu.layout_cast(jnp.full((mt.ROWS,), mt.MASK_VALUE, jnp.float32), plgpu.Layout.WGMMA.reduce(1)),
           plgpu.layout_cast(jnp.zeros((mt.ROWS,), jnp.float32), plgpu.Layout.WGMMA.reduce(1)))
  ring = scratch["ring"]
  dtype = ops.q.dtype

  def update(carry, logits, v_ref, v_bar, slot, staging):
    acc, m_prev, l_prev = carry
    m_next = jnp.maximum(m_prev, logits.max(axis=1))
    alpha = jnp.exp2(m_prev - m_next)
    p = jnp.exp2(logits - mt.rows_bcast(m_next, logits.shape))
    l_next = l_prev * alpha + p.sum(axis=1)
    acc = acc * mt.rows_bcast(alpha, acc.shape)
    plgpu.barrier_wait(v_bar)
    acc = mt.matmul(p.astype(dtype), v_ref, acc=acc, staging=staging, interpret=geom.interpret)
    plgpu.barrier_arrive(ring["v_consumed"].at[slot])
    return acc, m_next, l_next

  def seq_step(i, carry, *, masked: bool):
    slot = lax.rem(i, jnp.int32(geom.stages))
    plgpu.barrier_wait(ring["k_bar"].at[slot])
    s = mt.matmul(q_smem, ring["k"].at[slot].T, interpret=geom.interpret)
    shape = s.shape
    k_seg = None
    if q_seg is not None:
      k_seg = mt.cols_bcast(plgpu.load(ring["seg"].at[slot], layout=plgpu.Layout.WGMMA.reduce(0)), shape)
    plgpu.barrier_arrive(ring["k_consumed"].at[slot])
    logits = s * qk_scale
    keep = mt.sequence_mask(spec, mt.row_tokens(first_token, shape, geom), i * geom.block_kv + mt.iota(shape, 1),
                            None if q_seg is None else mt.rows_bcast(q_seg, shape), k_seg, masked=masked)
    if keep is not None:
      logits = jnp.where(keep, logits, mt.MASK_VALUE)
    staging = None if scratch["p_seq"] is None else scratch["p_seq"].at[wg]
    return update(carry, logits, ring["v"].at[slot], ring["v_bar"].at[slot], slot, staging)

  def skip_step(i, _):
    # Blocks the sibling warpgroup needs and these rows do not: released unread (waiting keeps each
    # barrier's phase in step with the memory warpgroup).
    slot = lax.rem(i, jnp.int32(geom.stages))
    plgpu.barrier_wait(ring["k_bar"].at[slot])
    plgpu.barrier_arrive(ring["k_consumed"].at[slot])
    plgpu.barrier_wait(ring["v_bar"].at[slot])
    plgpu.barrier_arrive(ring["v_consumed"].at[slot])
    return _

  if spec.causal:
    num_free, num_steps = mt.causal_kv_steps(first_token, geom)
  else:
    num_free, num_steps = jnp.int32(geom.seq_len // geom.block_kv), max_kv
  carry = lax.fori_loop(0, num_free, functools.partial(seq_step, masked=False), carry)
  carry = lax.fori_loop(num_free, num_steps, functools.partial(seq_step, masked=True), carry)
  lax.fori_loop(num_steps, max_kv, skip_step, None)

  if spec.has_depth:
    cols = pl.ds(wg * geom.depth_cols, geom.depth_cols)

    def depth_step(j, carry):
      i = max_kv + j
      slot = lax.rem(i, jnp.int32(geom.stages))
      tok0, slot0 = mt.depth_item(j, first_step, geom)
      plgpu.barrier_wait(ring["dk_bar"].at[slot * mt.COMPUTE_WGS + wg])
      s = mt.matmul(dq_smem, ring["k"].at[slot, cols].T, interpret=geom.interpret)
      plgpu.barrier_arrive(ring["k_consumed"].at[slot])
      keep = mt.depth_mask(spec, first_token, first_token + tok0, slot0, depth_start, depth_len, geom)
      logits = jnp.where(keep, s * qk_scale, mt.MASK_VALUE)
      staging = None if scratch["p_depth"] is None else scratch["p_depth"].at[wg]
      return update(carry, logits, ring["v"].at[slot, cols], ring["dv_bar"].at[slot * mt.COMPUTE_WGS + wg],
                    slot, staging)

    carry = lax.fori_loop(0, num_depth, depth_step, carry)

  acc, m, l = carry
  out = acc / mt.rows_bcast(l, acc.shape)
  q_smem[...] = out.astype(dtype)
  lse_smem = scratch["lse"].at[wg]
  lse_smem[...] = (m + jnp.log2(l)) / mt.LOG2E
  plgpu.commit_smem()
  for g in range(geom.heads_per_tile):
    part = pl.ds(g * geom.tokens, geom.tokens)

    @pl.when(head_base + g < geom.group)
    def _store():
      h = kv_head * geom.group + head_base + g
      plgpu.copy_smem_to_gmem(q_smem.at[part], out_ref.at[batch, rows, h])
      plgpu.copy_smem_to_gmem(lse_smem.at[part], lse_ref.at[batch, h, rows])
  plgpu.wait_smem_to_gmem(0)


def _memory_wg(cta_token, *, ops: Operands, scratch, batch, kv_head, head_base, geom: mt.Geometry,
               spec: spec_lib.Spec, max_kv, depth_start, depth_len, first_step, num_depth):
  del head_base, spec
  ring = scratch["ring"]
  total = max_kv + num_depth

  def load_k_part(i, slot):
    @pl.when(i < max_kv)
    def _seq():
      keys = pl.ds(i * geom.block_kv, geom.block_kv)
      plgpu.copy_gmem_to_smem(ops.k.at[batch, keys, kv_head], ring["k"].at[slot], ring["k_bar"].at[slot])
      if ops.segment_ids is not None:
        plgpu.copy_gmem_to_smem(ops.segment_ids.at[batch, keys], ring["seg"].at[slot], ring["k_bar"].at[slot])

    if ops.depth_k is not None:
      pl.when(i >= max_kv)(lambda: _load_depth(ops.depth_k, ring["k"], ring["dk_bar"], i - max_kv, slot))

  def load_v_part(i, slot):
    @pl.when(i < max_kv)
    def _seq():
      keys = pl.ds(i * geom.block_kv, geom.block_kv)
      plgpu.copy_gmem_to_smem(ops.v.at[batch, keys, kv_head], ring["v"].at[slot], ring["v_bar"].at[slot])

    if ops.depth_v is not None:
      pl.when(i >= max_kv)(lambda: _load_depth(ops.depth_v, ring["v"], ring["dv_bar"], i - max_kv, slot))

  def _load_depth(src, buf, bars, j, slot):
    # Each compute warpgroup's columns of this item: one [tpp, D] box per slot. A slot outside
    # [depth_start, depth_len) (a partial item's tail) loads a readable slot instead: its columns are
    # masked, and unreadable slots are never touched.
    tok0, slot0 = mt.depth_item(j, first_step, geom)
    for w in range(mt.COMPUTE_WGS):
      tokens = pl.ds(cta_token + w * geom.tokens + tok0, geom.tpp)
      for s in range(geom.slots_per_item):
        slot_index = jnp.clip(slot0 + s, depth_start, depth_len - 1)
        rows = pl.ds(w * geom.depth_cols + s * geom.tpp, geom.tpp)
        plgpu.copy_gmem_to_smem(src.at[batch, tokens, slot_index, kv_head], buf.at[slot, rows],
                                bars.at[slot * mt.COMPUTE_WGS + w])

  @pl.loop(0, total)
  def _stream(i):
    slot = lax.rem(i, jnp.int32(geom.stages))
    pl.when(i >= geom.stages)(lambda: plgpu.barrier_wait(ring["k_consumed"].at[slot]))
    load_k_part(i, slot)
    pl.when(i >= geom.stages)(lambda: plgpu.barrier_wait(ring["v_consumed"].at[slot]))
    load_v_part(i, slot)

  # Observe the last releases too, so every barrier ends the kernel in a completed phase.
  @pl.loop(jnp.maximum(total - geom.stages, 0), total)
  def _drain(i):
    slot = lax.rem(i, jnp.int32(geom.stages))
    plgpu.barrier_wait(ring["k_consumed"].at[slot])
    plgpu.barrier_wait(ring["v_consumed"].at[slot])


def _scratch(ops: Operands, geom: mt.Geometry, dtype):
  d, wgs = geom.head_dim, mt.COMPUTE_WGS
  rows = functools.partial(plgpu.SMEM, transforms=mt.smem_transforms(d, dtype))
  ring = dict(
      k=rows((geom.stages, geom.block_kv, d), dtype), v=rows((geom.stages, geom.block_kv, d), dtype),
      seg=None if ops.segment_ids is None else plgpu.SMEM((geom.stages, geom.block_kv), jnp.int32),
      k_bar=plgpu.Barrier(num_arrivals=1 + (ops.segment_ids is not None), num_barriers=geom.stages),
      v_bar=plgpu.Barrier(num_arrivals=1, num_barriers=geom.stages),
      dk_bar=plgpu.Barrier(num_arrivals=geom.slots_per_item, num_barriers=geom.stages * wgs),
      dv_bar=plgpu.Barrier(num_arrivals=geom.slots_per_item, num_barriers=geom.stages * wgs),
      k_consumed=plgpu.Barrier(num_arrivals=wgs, num_barriers=geom.stages),
      v_consumed=plgpu.Barrier(num_arrivals=wgs, num_barriers=geom.stages))
  separate_depth_q = ops.depth_q is not None
  copies_per_head = 1 + separate_depth_q + (ops.segment_ids is not None)
  staging = lambda cols: (plgpu.SMEM((wgs, mt.ROWS, cols), dtype, transforms=mt.smem_transforms(cols, dtype))
                          if geom.interpret else None)
  return dict(
      q=rows((wgs, mt.ROWS, d), dtype),
      depth_q=rows((wgs, mt.ROWS, d), dtype) if separate_depth_q else None,
      q_seg=None if ops.segment_ids is None else plgpu.SMEM((wgs, mt.ROWS), jnp.int32),
      lse=plgpu.SMEM((wgs, mt.ROWS), jnp.float32),
      row_bar=plgpu.Barrier(num_arrivals=geom.heads_per_tile * copies_per_head, num_barriers=wgs),
      p_seq=staging(geom.block_kv),
      p_depth=staging(geom.depth_cols) if ops.depth_k is not None else None,
      ring=ring)


def forward(ops: Operands, spec: spec_lib.Spec, geom: mt.Geometry, interpret):
  """(out [B, T, Hq, D] in q's dtype, lse [B, Hq, T] float32 natural log)."""
  batch, seq_len, num_q_heads, head_dim = ops.q.shape
  num_kv_heads = ops.k.shape[2]
  present = tuple(x is not None for x in ops)
  kernel = plgpu.kernel(
      functools.partial(_kernel, present=present, geom=geom, spec=spec),
      out_type=(jax.ShapeDtypeStruct(ops.q.shape, ops.q.dtype),
                jax.ShapeDtypeStruct((batch, num_q_heads, seq_len), jnp.float32)),
      scratch_types=[_scratch(ops, geom, ops.q.dtype)],
      grid=(num_kv_heads * geom.head_groups, geom.num_q_tiles, batch),
      grid_names=("heads", "q_seq", "batch"),
      num_threads=mt.COMPUTE_WGS + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=interpret,
      kernel_name="moda_mosaic_forward",
  )
  return kernel(*(x for x in ops if x is not None))
