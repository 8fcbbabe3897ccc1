"""MoDA backward kernels (Pallas, lowered through Triton), FlashAttention-2 style, no atomics.

Given delta = rowsum(o * do) - dlse (computed by the caller; the lse cotangent enters only there):
  * `_dq_kernel`, one program per query tile: recomputes p = exp2(logits - lse) over the same sequence blocks
    as the forward and stores dq; then its depth phase (scored with depth_q, whose tile replaces the dead q
    and dq registers) writes d depth_q and the depth dk/dv of the tile's own tokens. A tile holds whole
    tokens (and whole depth chunks), so every depth slot gets its gradient from exactly one program. Given a
    cotangent that a caller threads through `return_depth`, the kernel adds into it in place (its buffers
    are the outputs, input_output_aliases; a load-add-store of the readable slots, the others untouched).
    Without one (the depth outputs unused: a symbolic zero) it stores its gradient, and slots outside
    [depth_start, depth_len) are only zero-filled: no cotangent-sized zeros are made, read or added. With
    `separate_depth_kernel` (and always for depth-only attention) the same kernel body runs as a sequence
    kernel and a depth kernel (the official kernel's split; keeps the depth phase's registers out of the
    T^2 loop); the two share no output, since d depth_q is its own array.
  * `_dkv_kernel`, one program per key block (absent for depth-only attention): loops over the query tiles
    that see it (causal: from the block's first token on; with segments only the tiles between the first
    and the last token of the block's segments, `block_ranges.segment_blocks`, as the dq kernel's key loop),
    summing over the G heads of the kv head inside the tile rows, or (`block_sizes.dkv_per_query_head`) one
    program per query head whose G float32 partials `_sequence_dkv` sums.
Every cotangent comes back as a `triton_tiles.Operands` (dq in `q`, d depth_q in `depth_q`, ...).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import block_ranges
from pallas_kernels import spec as spec_lib
from pallas_kernels import triton_tiles as tt
from pallas_kernels.block_sizes import BlockSizes, dkv_per_query_head


def _probs(logits, lse2, keep):
  """exp2(logits - lse) with masked entries exactly 0 (also for rows with lse = -inf). lse2 broadcasts."""
  p = jnp.exp2(logits - lse2)
  return p if keep is None else jnp.where(keep, p, 0.0)


def _dq_kernel(refs: tt.Operands, row_refs: tt.RowGrads, acc_refs: tt.Operands, out: tt.Operands, *,
               geom: tt.Geometry, spec: spec_lib.Spec):
  """Writes the sequence dq when `out.q` is given, the depth cotangents when `out.depth_q` is: d depth_q,
  and the depth dk / dv (plus acc_refs', the same buffers as out's, when given)."""
  tile = pl.num_programs(0) - 1 - pl.program_id(0)
  first_token = tile * geom.tokens_per_tile
  rows = tt.tile_rows(first_token, geom)
  do = tt.load_rows(row_refs.do, rows, geom)
  lse2 = (tt.load_row_stat(row_refs.lse, rows) * tt.LOG2E)[:, None]
  delta = tt.load_row_stat(row_refs.delta, rows)[:, None]
  qk_scale = spec.scale * tt.LOG2E
  q_seg = tt.load_segments(refs.segment_ids, rows.token, geom, other=-1)

  def seq_step(j, dq, *, masked: bool):
    start = pl.multiple_of(j * geom.block_k, geom.block_k)
    k = tt.load_keys(refs.k, start, geom, bounded=masked)
    v = tt.load_keys(refs.v, start, geom, bounded=masked)
    cols = start + jnp.arange(geom.block_k)
    k_seg = tt.load_segments(refs.segment_ids, cols, geom, other=-2)
    keep = tt.sequence_mask(spec, rows.token[:, None], cols[None, :],
                            None if q_seg is None else q_seg[:, None], None if k_seg is None else k_seg[None, :],
                            (geom.block_q, geom.block_k), masked=masked)
    p = _probs(tt.dot(q, k, trans_b=True) * qk_scale, lse2, keep)
    ds = p * (tt.dot(do, v, trans_b=True) - delta)
    return dq + tt.dot(ds.astype(k.dtype), k)

  if out.q is not None:
    q = tt.load_rows(refs.q, rows, geom)
    dq = jnp.zeros((geom.block_q, geom.head_dim), jnp.float32)
    first, num_free, num_blocks = tt.key_block_range(
        first_token, spec.causal, geom, tt.program_segment_blocks(refs.segment_blocks, tile))
    dq = jax.lax.fori_loop(first, num_free, functools.partial(seq_step, masked=False), dq)
    dq = jax.lax.fori_loop(num_free, num_blocks, functools.partial(seq_step, masked=True), dq)
    # Stored before the depth phase: q and dq are dead there, depth_q and d depth_q take their place.
    tt.store_rows(out.q, rows, dq * spec.scale, geom)

  if out.depth_q is not None:
    depth_start, depth_len = tt.depth_bounds(refs.depth_bounds)
    # Across tokens (depth chunks) the segments matter; a token's own slots are in its segment.
    chunk_seg = q_seg if spec.depth_chunk > 1 else None
    # One part of `depth_rows` rows (whole tokens) at a time: a step then multiplies the part's rows against
    # its own tokens' slots only.
    for part_first_token, part_geom, (part_do, part_lse2, part_delta, part_chunk_seg) in tt.split_rows(
        first_token, (do, lse2, delta, chunk_seg), geom):
      # The same for every part: they share the geometry and the bounds.
      first_written, end_written = _depth_backward(refs, acc_refs, out, depth_start, depth_len,
                                                   part_first_token, part_geom, part_do, part_lse2,
                                                   part_delta, part_chunk_seg, spec)
    if acc_refs.depth_k is not None:  # the slots this call does not read keep the threaded cotangent
      return
    # Unwritten slots got no probability mass: their gradient is zero, stored without any math.
    zeros = jnp.zeros((geom.tokens_per_tile, geom.head_dim), jnp.float32)

    def zero_slot(slot, _):
      tt.store_token_slot(out.depth_k, first_token, slot, zeros, geom)
      tt.store_token_slot(out.depth_v, first_token, slot, zeros, geom)
      return _

    jax.lax.fori_loop(0, jnp.minimum(first_written, geom.num_slots), zero_slot, jnp.int32(0))
    jax.lax.fori_loop(jnp.minimum(end_written, geom.num_slots), geom.num_slots, zero_slot, jnp.int32(0))


def _depth_backward(refs: tt.Operands, acc_refs: tt.Operands, out: tt.Operands, depth_start, depth_len,
                    first_token, geom: tt.Geometry, do, lse2, delta, chunk_seg, spec: spec_lib.Spec):
  """Writes d depth_q of the rows starting at `first_token` and the depth dk/dv of their tokens' slots in
  the steps that hold readable ones (added to acc_refs' when given); returns [first, end) of the slots
  those steps cover."""
  rows = tt.tile_rows(first_token, geom)
  qk_scale = spec.scale * tt.LOG2E
  depth_q = tt.load_rows(refs.depth_q, rows, geom)

  def depth_step(step, ddq):
    cols = tt.depth_cols(first_token, step, depth_start, depth_len, geom)
    dk = tt.load_depth(refs.depth_k, cols, geom)
    dv = tt.load_depth(refs.depth_v, cols, geom)
    # The threaded cotangent is loaded before the dots, so its latency hides behind them (nothing
    # pipelines a load that feeds no dot).
    acc_k, acc_v = ((None, None) if acc_refs.depth_k is None else
                    (tt.load_depth(acc_refs.depth_k, cols, geom), tt.load_depth(acc_refs.depth_v, cols, geom)))
    k_seg = None if chunk_seg is None else tt.load_segments(refs.segment_ids, cols.token, geom, other=-2)
    keep = tt.depth_mask(spec, rows, cols, chunk_seg, k_seg)
    p = _probs(tt.dot(depth_q, dk, trans_b=True) * qk_scale, lse2, keep)
    ds = p * (tt.dot(do, dv, trans_b=True) - delta)
    # Every row that sees a column is in this part: the sums over rows are the slots' whole gradients.
    d_keys = tt.dot(ds.astype(depth_q.dtype), depth_q, trans_a=True) * spec.scale
    tt.store_depth(out.depth_k, cols, d_keys, geom, acc=acc_k)
    tt.store_depth(out.depth_v, cols, tt.dot(p.astype(do.dtype), do, trans_a=True), geom, acc=acc_v)
    return ddq + tt.dot(ds.astype(dk.dtype), dk)

  ddq = jnp.zeros((geom.block_q, geom.head_dim), jnp.float32)
  first_step, end_step = tt.depth_step_range(depth_start, depth_len, geom)
  ddq = jax.lax.fori_loop(first_step, end_step, depth_step, ddq)
  tt.store_rows(out.depth_q, rows, ddq * spec.scale, geom)
  per = geom.slots_per_step
  return first_step * per, jnp.maximum(first_step, end_step) * per


def _dkv_kernel(refs: tt.Operands, row_refs: tt.RowGrads, out: tt.Operands, *, geom: tt.Geometry,
                spec: spec_lib.Spec):
  block = pl.num_programs(0) - 1 - pl.program_id(0)
  start = block * geom.block_k
  cols = start + jnp.arange(geom.block_k)
  k = tt.load_keys(refs.k, start, geom, bounded=True)
  v = tt.load_keys(refs.v, start, geom, bounded=True)
  qk_scale = spec.scale * tt.LOG2E
  k_seg = tt.load_segments(refs.segment_ids, cols, geom, other=-2)

  # Keys as rows: logits_T [block_k, block_q]. Padding query rows carry do = 0 and delta = 0, so they add 0.
  def q_step(i, carry, *, masked: bool):
    dk, dv = carry
    rows = tt.tile_rows(i * geom.tokens_per_tile, geom)
    q = tt.load_rows(refs.q, rows, geom)
    do = tt.load_rows(row_refs.do, rows, geom)
    lse2 = (tt.load_row_stat(row_refs.lse, rows) * tt.LOG2E)[None, :]
    delta = tt.load_row_stat(row_refs.delta, rows)[None, :]
    q_seg = tt.load_segments(refs.segment_ids, rows.token, geom, other=-1)
    keep = tt.sequence_mask(spec, rows.token[None, :], cols[:, None],
                            None if q_seg is None else q_seg[None, :], None if k_seg is None else k_seg[:, None],
                            (geom.block_k, geom.block_q), masked=masked)
    p_T = _probs(tt.dot(k, q, trans_b=True) * qk_scale, lse2, keep)
    ds_T = p_T * (tt.dot(v, do, trans_b=True) - delta)
    dv = dv + tt.dot(p_T.astype(do.dtype), do)
    dk = dk + tt.dot(ds_T.astype(q.dtype), q)
    return dk, dv

  zeros = jnp.zeros((geom.block_k, geom.head_dim), jnp.float32)
  # Causal: tiles holding tokens of this key block need the causal mask, later tiles see every key of the
  # block; with segments only the tiles between the first and last token of the block's segments.
  first, num_masked, end = tt.query_tile_range(start, spec.causal, geom,
                                               tt.program_segment_blocks(refs.segment_blocks, block))
  carry = jax.lax.fori_loop(first, num_masked, functools.partial(q_step, masked=True), (zeros, zeros))
  dk, dv = jax.lax.fori_loop(num_masked, end, functools.partial(q_step, masked=False), carry)
  in_range = (cols < geom.seq_len)[:, None]
  d = jnp.arange(geom.head_dim)[None, :]
  plgpu.store(out.k.at[cols[:, None], d], (dk * spec.scale).astype(out.k.dtype), mask=in_range)
  plgpu.store(out.v.at[cols[:, None], d], dv.astype(out.v.dtype), mask=in_range)


def backward(operands: tt.Operands, rows: tt.RowGrads, spec: spec_lib.Spec, *, block_sizes: BlockSizes,
             interpret, depth_acc=None) -> tt.Operands:
  """The cotangents of `operands` (None where absent or integer): dq is the sequence part, d depth_q the
  depth part of the query gradient. `depth_acc` = (dk, dv) shaped like the depth operands, or None (a
  zero cotangent), is what the depth cotangents are added into; its buffers become theirs."""
  q_like = operands.depth_q if operands.q is None else operands.q
  batch, seq_len, num_kv_heads, group, head_dim = q_like.shape
  num_slots = 0 if operands.depth_k is None else operands.depth_k.shape[2]
  geom = tt.make_geometry(q_like.shape, num_slots, block_sizes.dq, spec.depth_chunk)
  like = lambda x: None if x is None else jax.ShapeDtypeStruct(x.shape, x.dtype)

  def dq_call(*, sequence: bool, depth: bool):
    """The dq kernel writing the sequence dq, the depth cotangents, or both."""
    ins, outs, acc = tt.Operands(), tt.Operands(), tt.Operands()
    if sequence:
      ins = ins._replace(q=operands.q, k=operands.k, v=operands.v, segment_ids=operands.segment_ids,
                         segment_blocks=block_ranges.segment_blocks(operands.segment_span, geom.tokens_per_tile,
                                                                    geom.block_k))
      outs = outs._replace(q=like(operands.q))
    if depth:
      ins = ins._replace(depth_q=operands.depth_q, depth_k=operands.depth_k, depth_v=operands.depth_v,
                         depth_bounds=operands.depth_bounds)
      if spec.depth_chunk > 1:
        ins = ins._replace(segment_ids=operands.segment_ids)
      outs = outs._replace(depth_q=like(operands.depth_q), depth_k=like(operands.depth_k),
                           depth_v=like(operands.depth_v))
      if depth_acc is not None:
        acc = acc._replace(**{name: x.astype(getattr(operands, name).dtype)
                              for name, x in zip(("depth_k", "depth_v"), depth_acc)})
    blocks = block_sizes.dq
    # The depth cotangents are updated in place: each given buffer is its output's.
    first_acc = len(jax.tree.leaves((ins, rows)))
    out_names = [name for name, x in zip(tt.Operands._fields, outs) if x is not None]
    aliases = {first_acc + i: out_names.index(name) for i, name in enumerate(("depth_k", "depth_v"))
               if getattr(acc, name) is not None}
    return pl.pallas_call(
        functools.partial(_dq_kernel, geom=geom, spec=spec),
        grid=(geom.num_q_tiles, batch, num_kv_heads),
        in_specs=[tt.kv_head_specs(ins, seq_len, group, head_dim), tt.row_grads_specs(seq_len, group, head_dim),
                  tt.kv_head_specs(acc, seq_len, group, head_dim)],
        out_specs=[tt.kv_head_specs(outs, seq_len, group, head_dim)],
        out_shape=[outs],
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
        interpret=interpret,
        name="moda_backward_dq" if sequence else "moda_backward_depth",
    )(ins, rows, acc)[0]

  has_sequence, has_depth = operands.q is not None, operands.depth_k is not None
  if has_sequence and has_depth and not block_sizes.dq.separate_depth_kernel:
    grads = dq_call(sequence=True, depth=True)
  else:
    grads = tt.Operands()
    if has_sequence:
      grads = grads._replace(q=dq_call(sequence=True, depth=False).q)
    if has_depth:
      depth = dq_call(sequence=False, depth=True)
      grads = grads._replace(depth_q=depth.depth_q, depth_k=depth.depth_k, depth_v=depth.depth_v)
  if has_sequence:
    dk, dv = _sequence_dkv(operands, rows, spec, block_sizes=block_sizes, interpret=interpret)
    grads = grads._replace(k=dk, v=dv)
  return grads


def _sequence_dkv(operands: tt.Operands, rows: tt.RowGrads, spec: spec_lib.Spec, *, block_sizes: BlockSizes,
                  interpret):
  """Sequence dk, dv [B, T, Hk, D]: one program per key block and kv head (its G heads folded into the
  query tiles), or per key block and query head, summing the G float32 partials here."""
  batch, seq_len, num_kv_heads, group, head_dim = operands.q.shape
  blocks = block_sizes.dkv
  num_programs = pl.cdiv(seq_len, blocks.block_k) * batch * num_kv_heads
  split = dkv_per_query_head(blocks, group, num_programs)
  row_group = 1 if split else group
  geom = tt.make_geometry((batch, seq_len, num_kv_heads, row_group, head_dim), 0, blocks)
  # Per key block, the query tiles that may hold its segments' tokens.
  ins = tt.Operands(q=operands.q, k=operands.k, v=operands.v, segment_ids=operands.segment_ids,
                    segment_blocks=block_ranges.segment_blocks(operands.segment_span, geom.block_k,
                                                               geom.tokens_per_tile))
  if split:
    # Grid (key block, batch, query head h = k * G + g); the query-side refs hold that one head (a block of
    # 1 at g) instead of all G, and each program writes a float32 partial of its own.
    rows_of = lambda *shape: pl.BlockSpec((None, seq_len, None, *shape),
                                          lambda i, b, h: (b, 0, h // group, h % group) + (0,) * (len(shape) - 1))
    keys = pl.BlockSpec((None, seq_len, None, head_dim), lambda i, b, h: (b, 0, h // group, 0))
    in_specs = [tt.Operands(q=rows_of(1, head_dim), k=keys, v=keys,
                            segment_ids=None if ins.segment_ids is None else pl.BlockSpec(
                                (None, seq_len), lambda i, b, h: (b, 0)),
                            segment_blocks=None if ins.segment_blocks is None else tt.segment_blocks_spec(
                                ins.segment_blocks.shape[1])),
                tt.RowGrads(do=rows_of(1, head_dim), lse=rows_of(1), delta=rows_of(1))]
    partial = pl.BlockSpec((None, seq_len, None, None, head_dim), lambda i, b, h: (b, 0, h // group, h % group, 0))
    out_specs = tt.Operands(k=partial, v=partial)
    out_shape = jax.ShapeDtypeStruct(operands.q.shape, jnp.float32)
  else:
    in_specs = [tt.kv_head_specs(ins, seq_len, group, head_dim), tt.row_grads_specs(seq_len, group, head_dim)]
    out_specs = tt.kv_head_specs(tt.Operands(k=operands.k, v=operands.v), seq_len, group, head_dim)
    out_shape = jax.ShapeDtypeStruct(operands.k.shape, operands.k.dtype)
  grads = pl.pallas_call(
      functools.partial(_dkv_kernel, geom=geom, spec=spec),
      grid=(pl.cdiv(seq_len, geom.block_k), batch, num_kv_heads * (group if split else 1)),
      in_specs=in_specs,
      out_specs=[out_specs],
      out_shape=[tt.Operands(k=out_shape, v=out_shape)],
      compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
      interpret=interpret,
      name="moda_backward_dkv",
  )(ins, rows)[0]
  if split:
    return tuple(jnp.sum(x, axis=3).astype(operands.k.dtype) for x in (grads.k, grads.v))
  return grads.k, grads.v
