"""MoDA backward kernels (Pallas, lowered through Triton), FlashAttention-2 style, no atomics.

Given delta = rowsum(o * do) - dlse (computed by the caller; the lse cotangent enters only there):
  * `_dq_kernel`, one program per query tile: recomputes p = exp2(logits - lse) over the same sequence blocks
    as the forward and stores dq; then its depth phase (scored with depth_q, whose tile replaces the dead q
    and dq registers) writes d depth_q and the depth dk/dv of the tile's own tokens. A tile holds whole
    tokens, so every depth slot gets its gradient from exactly one program and is stored directly. Slots
    >= depth_len are not computed, only zero-filled. With `separate_depth_kernel` the same kernel body runs
    twice, sequence only and depth only (the official kernel's split; keeps the depth phase's registers out
    of the T^2 loop); the two share no output, since d depth_q is its own array.
  * `_dkv_kernel`, one program per key block: loops over the query tiles that see it (causal: from the block's
    first token on), summing over the G heads of the kv head inside the tile rows (or, for small launches,
    `per_query_head_below`, one program per query head whose G float32 partials `_sequence_dkv` sums).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import triton_tiles as tt
from pallas_kernels.block_sizes import KernelBlocks


def _probs(logits, lse2, keep):
  """exp2(logits - lse) with masked entries exactly 0. lse2 broadcasts against logits."""
  p = jnp.exp2(logits - lse2)
  return p if keep is None else jnp.where(keep, p, 0.0)


def _dq_kernel(*refs, geom: tt.Geometry, causal: bool, scale: float, has_depth: bool, has_segments: bool,
               sequence: bool = True):
  """`sequence=False` is the separate depth kernel: no dq output, only the depth cotangents."""
  refs = list(refs)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[:6]
  del refs[:6]
  if has_depth:
    depth_len_ref, depth_q_ref, depth_k_ref, depth_v_ref = refs[:4]
    del refs[:4]
  seg_ref = refs.pop(0) if has_segments else None
  dq_ref = refs.pop(0) if sequence else None
  if has_depth:
    ddq_ref, ddk_ref, ddv_ref = refs

  tile = pl.num_programs(0) - 1 - pl.program_id(0)
  first_token = tile * geom.tokens_per_tile
  rows = tt.tile_rows(first_token, geom)
  do = tt.load_rows(do_ref, rows, geom)
  lse2 = (tt.load_row_stat(lse_ref, rows) * tt.LOG2E)[:, None]
  delta = tt.load_row_stat(delta_ref, rows)[:, None]
  qk_scale = scale * tt.LOG2E
  q_seg = plgpu.load(seg_ref.at[rows.token], mask=rows.token < geom.seq_len, other=-1) if has_segments else None

  def seq_step(j, dq, *, masked: bool):
    start = pl.multiple_of(j * geom.block_k, geom.block_k)
    k = tt.load_keys(k_ref, start, geom, bounded=masked)
    v = tt.load_keys(v_ref, start, geom, bounded=masked)
    cols = start + jnp.arange(geom.block_k)
    keep = None
    if masked:
      keep = jnp.broadcast_to((cols < geom.seq_len)[None, :], (geom.block_q, geom.block_k))
      if causal:
        keep = keep & (cols[None, :] <= rows.token[:, None])
    if has_segments:
      k_seg = plgpu.load(seg_ref.at[cols], mask=cols < geom.seq_len, other=-2)
      same = q_seg[:, None] == k_seg[None, :]
      keep = same if keep is None else keep & same
    p = _probs(tt.dot(q, k, trans_b=True) * qk_scale, lse2, keep)
    ds = p * (tt.dot(do, v, trans_b=True) - delta)
    return dq + tt.dot(ds.astype(k.dtype), k)

  if sequence:
    q = tt.load_rows(q_ref, rows, geom)
    dq = jnp.zeros((geom.block_q, geom.head_dim), jnp.float32)
    num_free, num_blocks = tt.key_block_range(first_token, causal, geom)
    dq = jax.lax.fori_loop(0, num_free, functools.partial(seq_step, masked=False), dq)
    dq = jax.lax.fori_loop(num_free, num_blocks, functools.partial(seq_step, masked=True), dq)
    # Stored before the depth phase: q and dq are dead there, depth_q and d depth_q take their place.
    tt.store_rows(dq_ref, rows, dq * scale, geom)

  if has_depth:
    depth_len = depth_len_ref[0]
    depth_refs = (depth_q_ref, depth_k_ref, depth_v_ref, ddq_ref, ddk_ref, ddv_ref)
    # One part of `depth_rows` rows (whole tokens) at a time: a dense step then multiplies the part's rows
    # against its own tokens' slots only.
    for part_first_token, part_geom, (part_do, part_lse2, part_delta) in tt.split_rows(
        first_token, (do, lse2, delta), geom):
      # The same for every part: they share the geometry and depth_len.
      first_unwritten = _depth_backward(depth_refs, depth_len, part_first_token, part_geom, part_do,
                                        part_lse2, part_delta, scale)
    # Unwritten slots got no probability mass: their gradient is zero, stored without any math.
    zeros = jnp.zeros((geom.tokens_per_tile, geom.head_dim), jnp.float32)

    def zero_slot(slot, _):
      tt.store_token_slot(ddk_ref, first_token, slot, zeros, geom)
      tt.store_token_slot(ddv_ref, first_token, slot, zeros, geom)
      return _

    jax.lax.fori_loop(jnp.minimum(first_unwritten, geom.num_slots), geom.num_slots, zero_slot, jnp.int32(0))


def _depth_backward(depth_refs, depth_len, first_token, geom: tt.Geometry, do, lse2, delta, scale):
  """Writes d depth_q of the rows starting at `first_token` and the depth dk/dv of their tokens' written
  slots; returns the first slot it did not write (the caller zero-fills the slots from there on)."""
  depth_q_ref, depth_k_ref, depth_v_ref, ddq_ref, ddk_ref, ddv_ref = depth_refs
  rows = tt.tile_rows(first_token, geom)
  qk_scale = scale * tt.LOG2E
  local_token = jnp.arange(geom.block_q) // geom.group_padded
  depth_q = tt.load_rows(depth_q_ref, rows, geom)

  def depth_step(step, ddq):
    cols = tt.depth_cols(first_token, step, depth_len, geom)
    dk = tt.load_depth(depth_k_ref, cols, geom)
    dv = tt.load_depth(depth_v_ref, cols, geom)
    p = _probs(tt.dot(depth_q, dk, trans_b=True) * qk_scale, lse2, tt.depth_visible(local_token, cols))
    ds = p * (tt.dot(do, dv, trans_b=True) - delta)
    in_range = (cols.token < geom.seq_len) & (cols.slot < geom.num_slots)
    ddk = tt.dot(ds.astype(depth_q.dtype), depth_q, trans_a=True) * scale
    tt.store_depth(ddk_ref, cols, ddk, geom, in_range=in_range)
    tt.store_depth(ddv_ref, cols, tt.dot(p.astype(do.dtype), do, trans_a=True), geom, in_range=in_range)
    return ddq + tt.dot(ds.astype(dk.dtype), dk)

  lse2_R, delta_R = lse2[:, 0], delta[:, 0]

  def per_token_step(step, ddq):
    for j in range(geom.per_token_slots):
      slot = step * geom.per_token_slots + j
      dk = tt.load_token_slot(depth_k_ref, rows, slot, depth_len, geom)
      dv = tt.load_token_slot(depth_v_ref, rows, slot, depth_len, geom)
      keep = rows.valid & (slot < depth_len)
      p = jnp.where(keep, jnp.exp2(tt.row_dot(depth_q, dk) * qk_scale - lse2_R), 0.0)
      ds = p * (tt.row_dot(do, dv) - delta_R)
      ddq = ddq + ds[:, None] * dk.astype(jnp.float32)
      # Rows of one token share its slot: their contributions sum inside the tile, no atomics.
      ddk = tt.sum_over_group(ds[:, None] * depth_q.astype(jnp.float32), geom) * scale
      ddv = tt.sum_over_group(p[:, None] * do.astype(jnp.float32), geom)
      tt.store_token_slot(ddk_ref, first_token, slot, ddk, geom)
      tt.store_token_slot(ddv_ref, first_token, slot, ddv, geom)
    return ddq

  ddq = jnp.zeros((geom.block_q, geom.head_dim), jnp.float32)
  per_token = geom.depth_mode == "per_token"
  per_step = geom.per_token_slots if per_token else geom.slots_per_step
  num_steps = (depth_len + per_step - 1) // per_step
  ddq = jax.lax.fori_loop(0, num_steps, per_token_step if per_token else depth_step, ddq)
  tt.store_rows(ddq_ref, rows, ddq * scale, geom)
  return num_steps * per_step


def _dkv_kernel(*refs, geom: tt.Geometry, causal: bool, scale: float, has_segments: bool):
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[:6]
  seg_ref = refs[6] if has_segments else None
  dk_ref, dv_ref = refs[-2:]

  block = pl.num_programs(0) - 1 - pl.program_id(0)
  start = block * geom.block_k
  cols = start + jnp.arange(geom.block_k)
  k = tt.load_keys(k_ref, start, geom, bounded=True)
  v = tt.load_keys(v_ref, start, geom, bounded=True)
  qk_scale = scale * tt.LOG2E
  k_seg = plgpu.load(seg_ref.at[cols], mask=cols < geom.seq_len, other=-2) if has_segments else None

  # Keys as rows: logits_T [block_k, block_q]. Padding query rows carry do = 0 and delta = 0, so they add 0.
  def q_step(i, carry, *, masked: bool):
    dk, dv = carry
    rows = tt.tile_rows(i * geom.tokens_per_tile, geom)
    q = tt.load_rows(q_ref, rows, geom)
    do = tt.load_rows(do_ref, rows, geom)
    lse2 = (tt.load_row_stat(lse_ref, rows) * tt.LOG2E)[None, :]
    delta = tt.load_row_stat(delta_ref, rows)[None, :]
    keep = None
    if masked:
      keep = cols[:, None] <= rows.token[None, :]
    if has_segments:
      q_seg = plgpu.load(seg_ref.at[rows.token], mask=rows.token < geom.seq_len, other=-1)
      same = k_seg[:, None] == q_seg[None, :]
      keep = same if keep is None else keep & same
    p_T = _probs(tt.dot(k, q, trans_b=True) * qk_scale, lse2, keep)
    ds_T = p_T * (tt.dot(v, do, trans_b=True) - delta)
    dv = dv + tt.dot(p_T.astype(do.dtype), do)
    dk = dk + tt.dot(ds_T.astype(q.dtype), q)
    return dk, dv

  zeros = jnp.zeros((geom.block_k, geom.head_dim), jnp.float32)
  carry = (zeros, zeros)
  if causal:
    # Tiles holding tokens of this key block need the causal mask; later tiles see every key of the block.
    first_tile = start // geom.tokens_per_tile
    last_token = jnp.minimum(start + geom.block_k, geom.seq_len)
    free_tile = (last_token + geom.tokens_per_tile - 1) // geom.tokens_per_tile
    carry = jax.lax.fori_loop(first_tile, free_tile, functools.partial(q_step, masked=True), carry)
    carry = jax.lax.fori_loop(free_tile, geom.num_q_tiles, functools.partial(q_step, masked=False), carry)
  else:
    carry = jax.lax.fori_loop(0, geom.num_q_tiles, functools.partial(q_step, masked=False), carry)
  dk, dv = carry
  in_range = (cols < geom.seq_len)[:, None]
  d = jnp.arange(geom.head_dim)[None, :]
  plgpu.store(dk_ref.at[cols[:, None], d], (dk * scale).astype(dk_ref.dtype), mask=in_range)
  plgpu.store(dv_ref.at[cols[:, None], d], dv.astype(dv_ref.dtype), mask=in_range)


def backward(q_BTKGD, k_BTKD, v_BTKD, depth_q_BTKGD, depth_k_BTLKD, depth_v_BTLKD, depth_len, segment_ids_BT,
             do_BTKGD, lse_BTKG, delta_BTKG, *, causal: bool, scale: float, dq_blocks: KernelBlocks,
             dkv_blocks: KernelBlocks, interpret):
  """Returns (dq, dk, dv, d_depth_q, d_depth_k, d_depth_v) in the input layouts; dq is the sequence part
  and the depth grads are None without depth."""
  batch, seq_len, num_kv_heads, group, head_dim = q_BTKGD.shape
  has_depth = depth_k_BTLKD is not None
  has_segments = segment_ids_BT is not None
  num_slots = depth_k_BTLKD.shape[2] if has_depth else 0
  per_head = lambda *shape: pl.BlockSpec((None, seq_len, None, *shape),
                                         lambda i, b, k: (b, 0, k) + (0,) * len(shape))
  common_specs = [per_head(group, head_dim), per_head(head_dim), per_head(head_dim), per_head(group, head_dim),
                  per_head(group), per_head(group)]
  common_args = [q_BTKGD, k_BTKD, v_BTKD, do_BTKGD, lse_BTKG, delta_BTKG]
  seg_specs = [pl.BlockSpec((None, seq_len), lambda i, b, k: (b, 0))] if has_segments else []
  seg_args = [segment_ids_BT] if has_segments else []

  # dq + depth cotangents: one kernel, or a sequence-only dq kernel plus a depth-only kernel.
  geom = tt.make_geometry(q_BTKGD.shape, num_slots, dq_blocks)
  separate = has_depth and dq_blocks.separate_depth_kernel
  depth_args = [jnp.reshape(depth_len, (1,)).astype(jnp.int32), depth_q_BTKGD, depth_k_BTLKD,
                depth_v_BTLKD] if has_depth else []
  depth_spec = pl.BlockSpec((None, seq_len, num_slots, None, head_dim), lambda i, b, k: (b, 0, 0, k, 0))
  depth_in_specs = [pl.BlockSpec((1,), lambda i, b, k: (0,)), per_head(group, head_dim), depth_spec, depth_spec]
  depth_out_specs = [per_head(group, head_dim), depth_spec, depth_spec]
  depth_out_shape = ([jax.ShapeDtypeStruct(q_BTKGD.shape, q_BTKGD.dtype)]
                     + [jax.ShapeDtypeStruct(depth_k_BTLKD.shape, depth_k_BTLKD.dtype)] * 2 if has_depth else [])

  def dq_call(*, depth: bool, sequence: bool):
    segments = has_segments and sequence
    in_specs = common_specs + (depth_in_specs if depth else []) + (seg_specs if segments else [])
    args = common_args + (depth_args if depth else []) + (seg_args if segments else [])
    out_specs = ([per_head(group, head_dim)] if sequence else []) + (depth_out_specs if depth else [])
    out_shape = (([jax.ShapeDtypeStruct(q_BTKGD.shape, q_BTKGD.dtype)] if sequence else [])
                 + (depth_out_shape if depth else []))
    return pl.pallas_call(
        functools.partial(_dq_kernel, geom=geom, causal=causal, scale=scale, has_depth=depth,
                          has_segments=segments, sequence=sequence),
        grid=(geom.num_q_tiles, batch, num_kv_heads),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=dq_blocks.num_warps, num_stages=dq_blocks.num_stages),
        interpret=interpret,
        name="moda_backward_dq" if sequence else "moda_backward_depth",
    )(*args)

  if separate:
    outs = dq_call(depth=False, sequence=True) + dq_call(depth=True, sequence=False)
  else:
    outs = dq_call(depth=has_depth, sequence=True)
  dq = outs[0]
  d_depth_q, d_depth_k, d_depth_v = outs[1:4] if has_depth else (None, None, None)

  dk, dv = _sequence_dkv(q_BTKGD, k_BTKD, v_BTKD, do_BTKGD, lse_BTKG, delta_BTKG, segment_ids_BT, causal=causal,
                         scale=scale, blocks=dkv_blocks, interpret=interpret)
  return dq, dk, dv, d_depth_q, d_depth_k, d_depth_v


def _sequence_dkv(q_BTKGD, k_BTKD, v_BTKD, do_BTKGD, lse_BTKG, delta_BTKG, segment_ids_BT, *, causal: bool,
                  scale: float, blocks: KernelBlocks, interpret):
  """Sequence dk, dv [B, T, Hk, D]: one program per key block and kv head (its G heads folded into the
  query tiles), or, when that launch would have fewer than `blocks.per_query_head_below` programs, per key
  block and query head, summing the G float32 partials here."""
  batch, seq_len, num_kv_heads, group, head_dim = q_BTKGD.shape
  has_segments = segment_ids_BT is not None
  num_programs = pl.cdiv(seq_len, blocks.block_k) * batch * num_kv_heads
  split = group > 1 and num_programs < blocks.per_query_head_below
  # Grid (key block, batch, head): head is the kv head, or the query head h = k * G + g when split; the
  # query-side refs then hold that one head (a block of 1 at g) instead of all G.
  kv_head = (lambda h: h // group) if split else (lambda h: h)
  head_in_group = (lambda h: h % group) if split else (lambda h: 0)
  rows_of = lambda *shape: pl.BlockSpec((None, seq_len, None, *shape),
                                        lambda i, b, h: (b, 0, kv_head(h), head_in_group(h)) + (0,) * (len(shape) - 1))
  row_group = 1 if split else group
  keys = pl.BlockSpec((None, seq_len, None, head_dim), lambda i, b, h: (b, 0, kv_head(h), 0))
  in_specs = [rows_of(row_group, head_dim), keys, keys, rows_of(row_group, head_dim), rows_of(row_group),
              rows_of(row_group)]
  args = [q_BTKGD, k_BTKD, v_BTKD, do_BTKGD, lse_BTKG, delta_BTKG]
  if has_segments:
    in_specs.append(pl.BlockSpec((None, seq_len), lambda i, b, h: (b, 0)))
    args.append(segment_ids_BT)
  if split:
    out_spec = pl.BlockSpec((None, seq_len, None, None, head_dim), lambda i, b, h: (b, 0, h // group, h % group, 0))
    out_shape = jax.ShapeDtypeStruct(q_BTKGD.shape, jnp.float32)
  else:
    out_spec, out_shape = keys, jax.ShapeDtypeStruct(k_BTKD.shape, k_BTKD.dtype)
  geom = tt.make_geometry((batch, seq_len, num_kv_heads, row_group, head_dim), 0, blocks)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, geom=geom, causal=causal, scale=scale, has_segments=has_segments),
      grid=(pl.cdiv(seq_len, geom.block_k), batch, num_kv_heads * (group if split else 1)),
      in_specs=in_specs,
      out_specs=[out_spec, out_spec],
      out_shape=[out_shape, out_shape],
      compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
      interpret=interpret,
      name="moda_backward_dkv",
  )(*args)
  if split:
    dk, dv = (jnp.sum(x, axis=3).astype(k_BTKD.dtype) for x in (dk, dv))
  return dk, dv
