"""MoDA backward in Pallas Mosaic GPU: the dq (+ depth backward) kernel, and the two kernels' driver.

Given delta = rowsum(o * do) - dlse (the caller's; the lse cotangent enters only there), two kernels,
no atomics, every sum in registers in a fixed order (bitwise-deterministic):
  * the dq kernel (here), one CTA per query tile, laid out like the forward (folded rows, the same key
    stream of sequence blocks then depth items, `mosaic_gpu_stream`): recomputes p = exp2(s - lse)
    per block, ds = p (dp - delta) with dp = do v^T, and sums dq += ds k; its depth items add the
    depth part of dq (or of d depth_q) and write the depth dk = ds^T depth_q and dv = p^T do of the
    item's columns (each depth slot is seen by the rows of its own token only, all in this warpgroup,
    so it is written once, never summed). Slots outside [depth_start, depth_len) are not computed,
    only zero-filled. Given the depth cotangents a caller threads through `return_depth` (`dq_and_depth`'s
    `depth_acc`), the kernel instead adds into them in place: each item's compute warpgroup TMA-loads the
    carried tiles of its columns into the staging tiles of its dk / dv (issued before the item's matmuls,
    so the loads hide behind them), adds in float32 and stores the sums; unread slots are left alone.
  * the dk/dv kernel (`mosaic_gpu_bwd_dkv`), one CTA per key tile, streaming the query row tiles.
G > 8 (several head groups per kv head) would need depth dk/dv summed across programs: the caller
uses pallas_triton's backward there.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import mosaic_gpu_bwd_dkv
from pallas_kernels import mosaic_gpu_stream as stream
from pallas_kernels import mosaic_gpu_tiles as mt
from pallas_kernels import spec as spec_lib


class Operands(NamedTuple):
  """The backward's inputs (absent: None): the forward's (mosaic_gpu_fwd.Operands order, but for
  row_segments and segment_blocks, last here) and the rows' do [B, T, Hq, D], lse and delta float32 in
  row tiles [B, Hk, row_tiles, ROWS] (`mosaic_gpu_tiles.to_row_tiles`; G <= 8: one head group). With
  segments, segment_span [B, T, 2] int32 (`spec.segment_span`): no kernel reads it, each launcher turns
  it into the bounds of its own tiles (`mosaic_gpu_stream.key_bounds`, `query_bounds`): the dq kernel's
  are its segment_blocks."""
  q: Any
  k: Any
  v: Any
  depth_q: Any
  depth_k: Any
  depth_v: Any
  depth_bounds: Any
  segment_ids: Any
  do: Any
  lse: Any
  delta: Any
  row_segments: Any = None
  segment_blocks: Any = None
  segment_span: Any = None


def _dq_kernel(*refs, present, threaded: bool, geom: mt.Geometry, spec: spec_lib.Spec):
  it = iter(refs)
  ops = Operands(*(next(it) if p else None for p in present))
  # Threaded: the depth cotangents are inputs (Refs) updated in place, not outputs.
  ddk_ref, ddv_ref = (next(it), next(it)) if threaded else (None, None)
  dq_ref = next(it)
  d_depth_q_ref = next(it) if ops.depth_q is not None else None
  if ops.depth_k is not None and not threaded:
    ddk_ref, ddv_ref = next(it), next(it)
  scratch = next(it)
  wg = lax.axis_index("wg")
  batch = lax.axis_index("batch")
  tile = geom.num_q_tiles - 1 - lax.axis_index("q_seq")
  kv_head = lax.axis_index("heads")  # one head group (G <= 8)
  cta_token = tile * geom.tokens_per_cta
  where = dict(batch=batch, kv_head=kv_head, geom=geom)
  kv, depth = stream.cta_bounds(cta_token, ops, spec, geom, batch)

  @pl.when(wg < geom.compute_wgs)
  def _compute():
    plgpu.set_max_registers(232, action="increase")
    _dq_compute_wg(wg, cta_token + wg * geom.tokens, (dq_ref, d_depth_q_ref, ddk_ref, ddv_ref), ops=ops,
                   scratch=scratch, spec=spec, kv=kv, threaded=threaded, **where, **depth)

  @pl.when(wg == geom.compute_wgs)
  def _memory():
    plgpu.set_max_registers(40, action="decrease")
    stream.memory_wg(cta_token, k=ops.k, v=ops.v, depth_k=ops.depth_k, depth_v=ops.depth_v,
                     segment_ids=ops.segment_ids, ring=scratch["ring"], kv=kv, **where, **depth)


def _dq_compute_wg(wg, first_token, outs, *, ops: Operands, scratch, batch, kv_head, geom: mt.Geometry,
                   spec: spec_lib.Spec, kv, threaded: bool, depth_start, depth_len, first_step, num_depth):
  dq_ref, d_depth_q_ref, ddk_ref, ddv_ref = outs
  smem = {name: None if scratch[name] is None else scratch[name].at[wg]
          for name in ("q", "do", "depth_q", "q_seg", "lse", "delta", "ds", "p", "dk_out", "dv_out", "ds_seq")}
  q_smem, do_smem = smem["q"], smem["do"]
  dq_smem = q_smem if smem["depth_q"] is None else smem["depth_q"]
  row_bar = scratch["row_bar"].at[wg]
  rows = dict(batch=batch, first_token=first_token, kv_head=kv_head, head_base=0, geom=geom)
  for name in ("q", "do", "depth_q"):
    if smem[name] is not None:
      stream.load_rows(getattr(ops, name), smem[name], row_bar, **rows)
  row_tile = dict(batch=batch, first_token=first_token, geom=geom)
  for name, program in (("lse", kv_head), ("delta", kv_head), ("row_segments", None)):
    if getattr(ops, name) is not None:
      dst = smem["q_seg" if name == "row_segments" else name]
      plgpu.copy_gmem_to_smem(stream.row_vector(getattr(ops, name), program=program, **row_tile), dst, row_bar)
  plgpu.barrier_wait(row_bar)
  row_vector = lambda ref: plgpu.load(ref, layout=plgpu.Layout.WGMMA.reduce(1))
  lse2 = row_vector(smem["lse"]) * mt.LOG2E
  delta = row_vector(smem["delta"])
  q_seg = None if ops.segment_ids is None else row_vector(smem["q_seg"])
  qk_scale = spec.scale * mt.LOG2E
  ring = scratch["ring"]
  zeros = plgpu.layout_cast(jnp.zeros((mt.ROWS, geom.head_dim), jnp.float32), plgpu.Layout.WGMMA)

  def grads_of(s, dp, keep):
    """p and ds = p (dp - delta) of one block (masked entries exactly 0, whatever lse is)."""
    p = jnp.exp2(s * qk_scale - mt.rows_bcast(lse2, s.shape))
    if keep is not None:
      p = jnp.where(keep, p, 0.0)
    return p, p * (dp - mt.rows_bcast(delta, s.shape))

  def seq_step(i, dq, *, mask: str):
    slot = stream.slot_of(i - kv[0], geom)
    k_ref, v_ref = stream.seq_refs(ring, slot, geom)
    plgpu.barrier_wait(ring["k_bar"].at[slot])
    s = mt.matmul(q_smem, k_ref.T, interpret=geom.interpret)
    k_seg = None
    if q_seg is not None and mt.compares_segments(mask):
      k_seg = mt.cols_bcast(plgpu.load(ring["seg"].at[slot], layout=plgpu.Layout.WGMMA.reduce(0)), s.shape)
    plgpu.barrier_wait(ring["v_bar"].at[slot])
    dp = mt.matmul(do_smem, v_ref.T, interpret=geom.interpret)
    plgpu.barrier_arrive(ring["v_consumed"].at[slot])
    keep = mt.sequence_mask(spec, mt.row_tokens(first_token, s.shape, geom), i * geom.block_kv + mt.iota(s.shape, 1),
                            None if q_seg is None else mt.rows_bcast(q_seg, s.shape), k_seg, mask=mask)
    _, ds = grads_of(s, dp, keep)
    dq = mt.matmul(ds.astype(k_ref.dtype), k_ref, acc=dq, staging=smem["ds_seq"], interpret=geom.interpret)
    plgpu.barrier_arrive(ring["k_consumed"].at[slot])
    return dq

  # This warpgroup's blocks inside the CTA's stream (the forward's rule, with this kernel's blocks).
  loop = stream.confine(stream.key_blocks(first_token, ops.segment_blocks, batch, spec, geom), kv)
  skip = functools.partial(stream.skip_item, ring=ring, kv_first=kv[0], geom=geom)
  dq = stream.consume(loop, kv, seq_step, skip, zeros, masks=stream.KEY_LOOP_MASKS)
  if not spec.has_depth or smem["depth_q"] is not None:
    # q is dead: its SMEM stages dq (the depth part of the query gradient goes to d depth_q).
    q_smem[...] = (dq * spec.scale).astype(q_smem.dtype)
    plgpu.commit_smem()
    stream.store_rows(q_smem, dq_ref, **rows)
    dq = zeros
  if not spec.has_depth:
    plgpu.wait_smem_to_gmem(0)
    return

  tokens_of = lambda tok0: pl.ds(first_token + tok0, geom.tpp)

  def depth_step(j, ddq):
    slot = stream.slot_of(stream.depth_base(kv) + j, geom)
    tok0, slot0 = mt.depth_item(j, first_step, geom)
    k_ref, v_ref, k_bar, v_bar = stream.depth_refs(ring, slot, wg, geom)
    if threaded:  # issued first, so the loads hide behind this item's matmuls
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous item's stores have read the staging
      _load_threaded((ddk_ref, ddv_ref), (smem["dk_out"], smem["dv_out"]), scratch["acc_bar"].at[wg],
                     batch=batch, tokens=tokens_of(tok0), kv_head=kv_head, slot0=slot0, depth_start=depth_start,
                     depth_len=depth_len, geom=geom)
    plgpu.barrier_wait(k_bar)
    s = mt.matmul(dq_smem, k_ref.T, interpret=geom.interpret)
    plgpu.barrier_wait(v_bar)
    dp = mt.matmul(do_smem, v_ref.T, interpret=geom.interpret)
    plgpu.barrier_arrive(ring["v_consumed"].at[slot])
    keep = mt.depth_mask(spec, first_token, first_token + tok0, slot0, depth_start, depth_len, geom)
    if geom.padded_heads:  # rows of padded heads hold a real head's data: they must add nothing
      keep = keep & (lax.div(mt.iota(s.shape, 0), jnp.int32(geom.tokens)) < geom.group)
    p, ds = grads_of(s, dp, keep)
    # The columns' gradients sum over this warpgroup's rows: transposed A operands from SMEM.
    smem["ds"][...] = ds.astype(dq_smem.dtype)
    smem["p"][...] = p.astype(dq_smem.dtype)
    plgpu.commit_smem()
    ddq = mt.matmul(smem["ds"], k_ref, acc=ddq, interpret=geom.interpret)
    plgpu.barrier_arrive(ring["k_consumed"].at[slot])
    if threaded:
      plgpu.barrier_wait(scratch["acc_bar"].at[wg])
    else:
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous item's stores have read the staging
    # One [64, D] float32 tile live at a time (with ddq): staged as soon as it is formed (added to the
    # threaded cotangent there: one rounding to the dtype, as a sum of the two would have).
    dk_cols = mt.matmul(smem["ds"].T, dq_smem, interpret=geom.interpret) * spec.scale
    smem["dk_out"][...] = _plus_staged(dk_cols, smem["dk_out"], threaded).astype(ddk_ref.dtype)
    dv_cols = mt.matmul(smem["p"].T, do_smem, interpret=geom.interpret)
    smem["dv_out"][...] = _plus_staged(dv_cols, smem["dv_out"], threaded).astype(ddv_ref.dtype)
    plgpu.commit_smem()
    tokens = tokens_of(tok0)
    for s_ in range(geom.slots_per_item):
      part = pl.ds(s_ * geom.tpp, geom.tpp)

      @pl.when(spec_lib.depth_slot_visible(slot0 + s_, depth_start, depth_len))
      def _store():
        plgpu.copy_smem_to_gmem(smem["dk_out"].at[part], ddk_ref.at[batch, tokens, slot0 + s_, kv_head])
        plgpu.copy_smem_to_gmem(smem["dv_out"].at[part], ddv_ref.at[batch, tokens, slot0 + s_, kv_head])
    return ddq

  ddq = lax.fori_loop(0, num_depth, depth_step, dq)
  plgpu.wait_smem_to_gmem(0, wait_read_only=True)
  dq_smem[...] = (ddq * spec.scale).astype(dq_smem.dtype)
  if threaded:  # the slots this call does not read keep the threaded cotangent
    plgpu.commit_smem()
    stream.store_rows(dq_smem, dq_ref if d_depth_q_ref is None else d_depth_q_ref, **rows)
    plgpu.wait_smem_to_gmem(0)
    return
  # Unread slots got no probability mass: their gradient is zero, stored from a zeroed tile.
  smem["dk_out"][...] = zeros.astype(ddk_ref.dtype)
  plgpu.commit_smem()
  stream.store_rows(dq_smem, dq_ref if d_depth_q_ref is None else d_depth_q_ref, **rows)
  zero_rows = smem["dk_out"].at[pl.ds(0, geom.tokens)]

  def zero_slot(slot, _):
    tokens = pl.ds(first_token, geom.tokens)
    plgpu.copy_smem_to_gmem(zero_rows, ddk_ref.at[batch, tokens, slot, kv_head])
    plgpu.copy_smem_to_gmem(zero_rows, ddv_ref.at[batch, tokens, slot, kv_head])
    return _

  lax.fori_loop(0, jnp.minimum(depth_start, depth_len), zero_slot, None)
  lax.fori_loop(depth_len, geom.num_slots, zero_slot, None)
  plgpu.wait_smem_to_gmem(0)


def _load_threaded(srcs, dsts, bar, *, batch, tokens, kv_head, slot0, depth_start, depth_len, geom: mt.Geometry):
  """TMA loads of a depth item's columns of the threaded cotangents (dk, dv) into their staging tiles:
  one [tpp, D] box per slot, like the item's depth keys. A slot outside [depth_start, depth_len) (a
  partial item's end) loads one of the item's readable slots instead (a fixed number of arrivals on
  `bar`); its columns are never stored, and unreadable slots are never read."""
  for src, dst in zip(srcs, dsts):
    for s in range(geom.slots_per_item):
      slot = jnp.clip(slot0 + s, depth_start, depth_len - 1)
      plgpu.copy_gmem_to_smem(src.at[batch, tokens, slot, kv_head], dst.at[pl.ds(s * geom.tpp, geom.tpp)], bar)


def _plus_staged(cols, staging, threaded: bool):
  """cols [64, D] float32, plus the threaded cotangent staged in `staging` when threaded."""
  if not threaded:
    return cols
  return cols + plgpu.load(staging, layout=plgpu.Layout.WGMMA).astype(jnp.float32)


def _dq_scratch(ops: Operands, geom: mt.Geometry, dtype, threaded: bool):
  wgs, d = geom.compute_wgs, geom.head_dim
  matrix = lambda cols: plgpu.SMEM((wgs, mt.ROWS, cols), dtype, transforms=mt.smem_transforms(cols, dtype))
  vector = lambda dt: plgpu.SMEM((wgs, mt.ROWS), dt)
  depth = ops.depth_k is not None
  copies = geom.heads_per_tile * (2 + (ops.depth_q is not None)) + 2 + (ops.segment_ids is not None)
  return dict(
      q=matrix(d), do=matrix(d), depth_q=matrix(d) if ops.depth_q is not None else None,
      q_seg=vector(jnp.int32) if ops.segment_ids is not None else None,
      lse=vector(jnp.float32), delta=vector(jnp.float32),
      ds=matrix(mt.ROWS) if depth else None, p=matrix(mt.ROWS) if depth else None,
      dk_out=matrix(d) if depth else None, dv_out=matrix(d) if depth else None,
      ds_seq=matrix(geom.block_kv) if geom.interpret else None,
      row_bar=plgpu.Barrier(num_arrivals=copies, num_barriers=wgs),
      acc_bar=plgpu.Barrier(num_arrivals=2 * geom.slots_per_item, num_barriers=wgs) if threaded else None,
      ring=stream.ring_scratch(geom, dtype, segments=ops.segment_ids is not None))


def dq_and_depth(ops: Operands, spec: spec_lib.Spec, geom: mt.Geometry, interpret, depth_acc=None):
  """The dq kernel: (dq, d depth_q if depth_q, d depth_k and d depth_v if depth) in the inputs' layouts.

  `depth_acc` (dk, dv) shaped like the depth arrays, or None: the threaded cotangents. Given, the
  kernel adds its depth dk / dv into them in place (passed as Refs: the call aliases them to its
  outputs) and leaves their unread slots as they are; else it stores its own, zeros at unread slots.
  """
  batch = ops.q.shape[0]
  threaded = depth_acc is not None and ops.depth_k is not None
  ops = ops._replace(segment_span=None, segment_blocks=stream.key_bounds(ops.segment_span, ops.segment_ids, geom))
  like = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
  out_type = [like(ops.q)]
  if ops.depth_q is not None:
    out_type.append(like(ops.depth_q))
  if ops.depth_k is not None and not threaded:
    out_type += [like(ops.depth_k), like(ops.depth_v)]
  kernel = mt.launch(
      functools.partial(_dq_kernel, present=tuple(x is not None for x in ops), threaded=threaded, geom=geom,
                        spec=spec),
      out_type=tuple(out_type), scratch=_dq_scratch(ops, geom, ops.q.dtype, threaded),
      grid=(ops.k.shape[2], geom.num_q_tiles, batch), seq_axis="q_seq", geom=geom, interpret=interpret,
      name="moda_mosaic_backward_dq")
  arrays = [x for x in ops if x is not None]
  if not threaded:
    return kernel(*arrays)
  # A Ref argument of a Mosaic GPU kernel is discharged into an input_output_aliases pair of the call,
  # so XLA updates the caller's buffer in place (plgpu.kernel takes no aliases argument of its own).
  acc_refs = [jax.new_ref(acc.astype(x.dtype)) for acc, x in zip(depth_acc, (ops.depth_k, ops.depth_v))]
  outs = kernel(*arrays, *acc_refs)
  return (*outs, *(jax.freeze(ref) for ref in acc_refs))


def backward(ops: Operands, spec: spec_lib.Spec, block_sizes: mt.BlockSizes, interpret, depth_acc=None):
  """(dq, d depth_q or None, dk, dv, d depth_k or None, d depth_v or None) in the inputs' layouts.

  With depth_q None the depth part of dq is summed into dq inside the dq kernel. `depth_acc`: see
  `dq_and_depth`.
  """
  num_q_heads, head_dim = ops.q.shape[2:]
  group = num_q_heads // ops.k.shape[2]
  num_slots = 0 if ops.depth_k is None else ops.depth_k.shape[2]
  make = lambda blocks: mt.make_geometry(spec.seq_len, num_slots, group, head_dim, blocks, interpret is not None)
  outs = list(dq_and_depth(ops, spec, make(block_sizes.dq), interpret, depth_acc=depth_acc))
  dq = outs.pop(0)
  d_depth_q = outs.pop(0) if ops.depth_q is not None else None
  d_depth_k, d_depth_v = outs if ops.depth_k is not None else (None, None)
  dk, dv = mosaic_gpu_bwd_dkv.dkv(ops, spec, make(block_sizes.dkv), interpret)
  return dq, d_depth_q, dk, dv, d_depth_k, d_depth_v
