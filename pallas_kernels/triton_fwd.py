"""MoDA forward kernel (Pallas, lowered through Triton): out and lse in one pass.

One program = one tile of folded query rows (tokens x the G heads of one kv head) of one (batch, kv head).
One online-softmax state (running max `m`, sum `l`, accumulator `acc`, base-2 domain) runs over
  1. the sequence keys: blocks entirely before the tile's first token without any mask, then the blocks
     that overlap the tile's tokens with the causal mask (non-causal: all blocks, the last one bounded);
  2. the depth slots of the tile's own tokens, scored with the tile's `depth_q` rows (loaded after the
     sequence phase, when q is dead: no extra registers). The state is split into parts of `depth_rows`
     rows (whole tokens), each finishing its depth phase and storing its rows on its own: the dense
     block-diagonal logits of a part waste tokens_per_part x the FLOPs and exps, not tokens_per_tile x.
     "dense": `slots_per_step` slots of every token of the part per step, as one tensor-core
     [rows x (tokens * slots)] block whose off-token entries are masked (the official block-diagonal
     layout). "per_token": every row gathers its own token's slot and the logit is a row-wise
     multiply-reduce over D on the CUDA cores (no masked FLOPs). Either way the step loop stops at
     cdiv(depth_len, slots per step): unwritten slots are never loaded or computed.
     "dense" is the default: on the H200 it beat "per_token" on every benchmark shape, G = 2 included
     (helper_notes/gpu_results.md; BENCHMARKS.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import triton_tiles as tt
from pallas_kernels.block_sizes import KernelBlocks


def _online_update(carry, logits, values):
  """Folds one block of base-2 logits [R, C] and its values [C, D] into (acc, m, l)."""
  acc, m_prev, l_prev = carry
  m_next = jnp.maximum(m_prev, jnp.max(logits, axis=1))
  correction = jnp.exp2(m_prev - m_next)
  p = jnp.exp2(logits - m_next[:, None])
  l_next = l_prev * correction + jnp.sum(p, axis=1)
  acc = acc * correction[:, None] + tt.dot(p.astype(values.dtype), values)
  return acc, m_next, l_next


def _kernel(*refs, geom: tt.Geometry, causal: bool, scale: float, has_depth: bool, has_segments: bool):
  refs = list(refs)
  q_ref, k_ref, v_ref = refs[:3]
  del refs[:3]
  if has_depth:
    depth_len_ref, depth_q_ref, depth_k_ref, depth_v_ref = refs[:4]
    del refs[:4]
  seg_ref = refs.pop(0) if has_segments else None
  o_ref, lse_ref = refs

  # Heavy (late) causal tiles first: they start while the short ones fill the tail of the launch.
  tile = pl.num_programs(0) - 1 - pl.program_id(0)
  first_token = tile * geom.tokens_per_tile
  rows = tt.tile_rows(first_token, geom)
  q = tt.load_rows(q_ref, rows, geom)
  qk_scale = scale * tt.LOG2E
  q_seg = plgpu.load(seg_ref.at[rows.token], mask=rows.token < geom.seq_len, other=-1) if has_segments else None

  def seq_step(j, carry, *, masked: bool):
    start = pl.multiple_of(j * geom.block_k, geom.block_k)
    k = tt.load_keys(k_ref, start, geom, bounded=masked)
    v = tt.load_keys(v_ref, start, geom, bounded=masked)
    logits = tt.dot(q, k, trans_b=True) * qk_scale
    cols = start + jnp.arange(geom.block_k)
    keep = None
    if masked:
      keep = jnp.broadcast_to((cols < geom.seq_len)[None, :], logits.shape)
      if causal:
        keep = keep & (cols[None, :] <= rows.token[:, None])
    if has_segments:
      k_seg = plgpu.load(seg_ref.at[cols], mask=cols < geom.seq_len, other=-2)
      same = q_seg[:, None] == k_seg[None, :]
      keep = same if keep is None else keep & same
    if keep is not None:
      logits = jnp.where(keep, logits, tt.MASK_VALUE)
    return _online_update(carry, logits, v)

  carry = (jnp.zeros((geom.block_q, geom.head_dim), jnp.float32),
           jnp.full((geom.block_q,), tt.MASK_VALUE, jnp.float32),
           jnp.zeros((geom.block_q,), jnp.float32))
  num_free, num_blocks = tt.key_block_range(first_token, causal, geom)
  carry = jax.lax.fori_loop(0, num_free, functools.partial(seq_step, masked=False), carry)
  carry = jax.lax.fori_loop(num_free, num_blocks, functools.partial(seq_step, masked=True), carry)

  # The depth phase continues the same softmax state, one part of `depth_rows` rows at a time.
  parts = tt.split_rows(first_token, carry, geom) if has_depth else [(first_token, geom, carry)]
  for part_first_token, part_geom, part_carry in parts:
    part_rows = tt.tile_rows(part_first_token, part_geom)
    if has_depth:
      part_carry = _depth_phase(part_carry, depth_q_ref, depth_k_ref, depth_v_ref, depth_len_ref[0],
                                part_first_token, part_rows, part_geom, qk_scale)
    acc, m, l = part_carry
    tt.store_rows(o_ref, part_rows, acc / l[:, None], part_geom)
    tt.store_row_stat(lse_ref, part_rows, (m + jnp.log2(l)) / tt.LOG2E)


def _depth_phase(carry, depth_q_ref, depth_k_ref, depth_v_ref, depth_len, first_token, rows: tt.Rows,
                 geom: tt.Geometry, qk_scale):
  """Folds the depth slots of the rows' own tokens into their softmax state (acc, m, l)."""
  # Loaded only now, when q is dead: depth_q takes its registers.
  depth_q = tt.load_rows(depth_q_ref, rows, geom)
  local_token = jnp.arange(geom.block_q) // geom.group_padded

  def depth_step(step, carry):
    cols = tt.depth_cols(first_token, step, depth_len, geom)
    dk = tt.load_depth(depth_k_ref, cols, geom)
    dv = tt.load_depth(depth_v_ref, cols, geom)
    logits = tt.dot(depth_q, dk, trans_b=True) * qk_scale
    logits = jnp.where(tt.depth_visible(local_token, cols), logits, tt.MASK_VALUE)
    return _online_update(carry, logits, dv)

  def per_token_step(step, carry):
    # Every load of the step is issued before the first use; one rescale serves all its slots.
    acc, m_prev, l_prev = carry
    slots = [step * geom.per_token_slots + j for j in range(geom.per_token_slots)]
    dks = [tt.load_token_slot(depth_k_ref, rows, s, depth_len, geom) for s in slots]
    dvs = [tt.load_token_slot(depth_v_ref, rows, s, depth_len, geom) for s in slots]
    logits = [jnp.where(s < depth_len, tt.row_dot(depth_q, dk) * qk_scale, tt.MASK_VALUE)
              for s, dk in zip(slots, dks)]
    m_next = functools.reduce(jnp.maximum, logits, m_prev)
    correction = jnp.exp2(m_prev - m_next)
    probs = [jnp.exp2(c - m_next) for c in logits]
    l_next = l_prev * correction + functools.reduce(jnp.add, probs)
    acc = acc * correction[:, None]
    for p, dv in zip(probs, dvs):
      acc = acc + p[:, None] * dv.astype(jnp.float32)
    return acc, m_next, l_next

  if geom.depth_mode == "per_token":
    num_steps = (depth_len + geom.per_token_slots - 1) // geom.per_token_slots
    return jax.lax.fori_loop(0, num_steps, per_token_step, carry)
  num_steps = (depth_len + geom.slots_per_step - 1) // geom.slots_per_step
  return jax.lax.fori_loop(0, num_steps, depth_step, carry)


def forward(q_BTKGD, k_BTKD, v_BTKD, depth_q_BTKGD, depth_k_BTLKD, depth_v_BTLKD, depth_len, segment_ids_BT,
            *, causal: bool, scale: float, blocks: KernelBlocks, interpret):
  """Returns out [B, T, Hk, G, D] (q's dtype) and lse [B, T, Hk, G] (float32, natural log).

  `q_BTKGD` / `depth_q_BTKGD` are q / depth_q viewed per kv head; D is already a power of two >= 16.
  """
  batch, seq_len, num_kv_heads, group, head_dim = q_BTKGD.shape
  has_depth = depth_k_BTLKD is not None
  has_segments = segment_ids_BT is not None
  geom = tt.make_geometry(q_BTKGD.shape, depth_k_BTLKD.shape[2] if has_depth else 0, blocks)
  grid = (geom.num_q_tiles, batch, num_kv_heads)
  per_head = lambda *shape: pl.BlockSpec((None, seq_len, None, *shape), lambda i, b, k: (b, 0, k) + (0,) * len(shape))
  in_specs = [per_head(group, head_dim), per_head(head_dim), per_head(head_dim)]
  args = [q_BTKGD, k_BTKD, v_BTKD]
  if has_depth:
    num_slots = geom.num_slots
    depth_spec = pl.BlockSpec((None, seq_len, num_slots, None, head_dim), lambda i, b, k: (b, 0, 0, k, 0))
    in_specs += [pl.BlockSpec((1,), lambda i, b, k: (0,)), per_head(group, head_dim), depth_spec, depth_spec]
    args += [jnp.reshape(depth_len, (1,)).astype(jnp.int32), depth_q_BTKGD, depth_k_BTLKD, depth_v_BTLKD]
  if has_segments:
    in_specs.append(pl.BlockSpec((None, seq_len), lambda i, b, k: (b, 0)))
    args.append(segment_ids_BT)
  kernel = functools.partial(_kernel, geom=geom, causal=causal, scale=scale, has_depth=has_depth,
                             has_segments=has_segments)
  return pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=in_specs,
      out_specs=[per_head(group, head_dim), per_head(group)],
      out_shape=[jax.ShapeDtypeStruct(q_BTKGD.shape, q_BTKGD.dtype),
                 jax.ShapeDtypeStruct(q_BTKGD.shape[:-1], jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
      interpret=interpret,
      name="moda_forward",
  )(*args)

