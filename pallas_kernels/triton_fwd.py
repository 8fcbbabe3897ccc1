"""MoDA forward kernel (Pallas, lowered through Triton): out and lse in one pass.

One program = one tile of folded query rows (tokens x the G heads of one kv head) of one (batch, kv head).
One online-softmax state (running max `m`, sum `l`, accumulator `acc`, base-2 domain) runs over
  1. the sequence keys (absent for depth-only attention): blocks entirely before the tile's first token
     without any mask, then the blocks that overlap the tile's tokens with the causal mask (non-causal: all
     blocks, the last one bounded); with segments only the blocks between the first and the last token of
     the tile's segments (`block_ranges.segment_blocks`), the others hold no key the tile sees;
  2. the depth slots of the tile's own tokens, scored with the tile's `depth_q` rows (loaded after the
     sequence phase, when q is dead: no extra registers). The state is split into parts of `depth_rows`
     rows (whole tokens, whole depth chunks), each finishing its depth phase and storing its rows on its
     own. A step multiplies the part's rows against `slots_per_step` slots of every token of the part, one
     tensor-core [rows x (tokens * slots)] block whose invisible entries are masked (the official
     block-diagonal layout; with depth_chunk C > 1 a row sees the columns of the earlier tokens of its
     chunk too). The step loop covers only the steps that hold slots in [depth_start, depth_len): other
     slots are never loaded or computed.
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


def _kernel(refs: tt.Operands, o_ref, lse_ref, *, geom: tt.Geometry, spec: spec_lib.Spec):
  # Heavy (late) causal tiles first: they start while the short ones fill the tail of the launch.
  tile = pl.num_programs(0) - 1 - pl.program_id(0)
  first_token = tile * geom.tokens_per_tile
  rows = tt.tile_rows(first_token, geom)
  qk_scale = spec.scale * tt.LOG2E
  q_seg = tt.load_segments(refs.segment_ids, rows.token, geom, other=-1)

  carry = (jnp.zeros((geom.block_q, geom.head_dim), jnp.float32),
           jnp.full((geom.block_q,), tt.MASK_VALUE, jnp.float32),
           jnp.zeros((geom.block_q,), jnp.float32))
  if spec.has_sequence:
    carry = _sequence_phase(carry, refs, tile, rows, q_seg, geom, spec, qk_scale)

  # The depth phase continues the same softmax state, one part of `depth_rows` rows at a time. Across
  # tokens (depth chunks) the segments matter; a token's own slots are in its segment.
  chunk_seg = q_seg if spec.depth_chunk > 1 else None
  parts = (tt.split_rows(first_token, (carry, chunk_seg), geom) if spec.has_depth
           else [(first_token, geom, (carry, None))])
  for part_first_token, part_geom, (part_carry, part_chunk_seg) in parts:
    part_rows = tt.tile_rows(part_first_token, part_geom)
    if spec.has_depth:
      part_carry = _depth_phase(part_carry, refs, part_first_token, part_rows, part_chunk_seg, part_geom,
                                spec, qk_scale)
    acc, m, l = part_carry
    out, lse = acc / l[:, None], (m + jnp.log2(l)) / tt.LOG2E
    if not spec.has_sequence:
      # Depth-only rows may see nothing: out 0 and lse -inf, not the average of their masked columns.
      empty = tt.never_visible(m)
      out, lse = jnp.where(empty[:, None], 0.0, out), jnp.where(empty, -jnp.inf, lse)
    tt.store_rows(o_ref, part_rows, out, part_geom)
    tt.store_row_stat(lse_ref, part_rows, lse)


def _sequence_phase(carry, refs: tt.Operands, tile, rows: tt.Rows, q_seg, geom: tt.Geometry,
                    spec: spec_lib.Spec, qk_scale):
  q = tt.load_rows(refs.q, rows, geom)
  first_token = tile * geom.tokens_per_tile

  def seq_step(j, carry, *, masked: bool):
    start = pl.multiple_of(j * geom.block_k, geom.block_k)
    k = tt.load_keys(refs.k, start, geom, bounded=masked)
    v = tt.load_keys(refs.v, start, geom, bounded=masked)
    logits = tt.dot(q, k, trans_b=True) * qk_scale
    cols = start + jnp.arange(geom.block_k)
    k_seg = tt.load_segments(refs.segment_ids, cols, geom, other=-2)
    keep = tt.sequence_mask(spec, rows.token[:, None], cols[None, :],
                            None if q_seg is None else q_seg[:, None], None if k_seg is None else k_seg[None, :],
                            logits.shape, masked=masked)
    if keep is not None:
      logits = jnp.where(keep, logits, tt.MASK_VALUE)
    return _online_update(carry, logits, v)

  # With segments, only the blocks that may hold the tile's segments' keys (`block_ranges.segment_blocks`).
  first, num_free, num_blocks = tt.key_block_range(
      first_token, spec.causal, geom, tt.program_segment_blocks(refs.segment_blocks, tile))
  carry = jax.lax.fori_loop(first, num_free, functools.partial(seq_step, masked=False), carry)
  return jax.lax.fori_loop(num_free, num_blocks, functools.partial(seq_step, masked=True), carry)


def _depth_phase(carry, refs: tt.Operands, first_token, rows: tt.Rows, chunk_seg, geom: tt.Geometry,
                 spec: spec_lib.Spec, qk_scale):
  """Folds the depth slots the rows see (their tokens', or their chunks') into their state (acc, m, l).

  `chunk_seg`: the rows' segment ids when depth_chunk > 1 and segments are given, else None.
  """
  # Loaded only now, when q is dead: depth_q takes its registers.
  depth_q = tt.load_rows(refs.depth_q, rows, geom)
  depth_start, depth_len = tt.depth_bounds(refs.depth_bounds)

  def depth_step(step, carry):
    cols = tt.depth_cols(first_token, step, depth_start, depth_len, geom)
    dk = tt.load_depth(refs.depth_k, cols, geom)
    dv = tt.load_depth(refs.depth_v, cols, geom)
    logits = tt.dot(depth_q, dk, trans_b=True) * qk_scale
    k_seg = None if chunk_seg is None else tt.load_segments(refs.segment_ids, cols.token, geom, other=-2)
    logits = jnp.where(tt.depth_mask(spec, rows, cols, chunk_seg, k_seg), logits, tt.MASK_VALUE)
    return _online_update(carry, logits, dv)

  first_step, end_step = tt.depth_step_range(depth_start, depth_len, geom)
  return jax.lax.fori_loop(first_step, end_step, depth_step, carry)


def forward(operands: tt.Operands, spec: spec_lib.Spec, *, blocks: KernelBlocks, interpret):
  """Returns out [B, T, Hk, G, D] (depth_q's dtype) and lse [B, T, Hk, G] (float32, natural log).

  `operands` hold q / depth_q viewed per kv head ([B, T, Hk, G, D]); D is already a power of two >= 16.
  """
  q_like = operands.depth_q if operands.q is None else operands.q
  batch, seq_len, num_kv_heads, group, head_dim = q_like.shape
  num_slots = 0 if operands.depth_k is None else operands.depth_k.shape[2]
  geom = tt.make_geometry(q_like.shape, num_slots, blocks, spec.depth_chunk)
  # Per query tile, the key blocks that may hold its segments' keys (only the sequence phase skips blocks).
  span = operands.segment_span if spec.has_sequence else None
  operands = operands._replace(segment_span=None,
                               segment_blocks=block_ranges.segment_blocks(span, geom.tokens_per_tile, geom.block_k))
  row_specs = tt.row_grads_specs(seq_len, group, head_dim)
  return pl.pallas_call(
      functools.partial(_kernel, geom=geom, spec=spec),
      grid=(geom.num_q_tiles, batch, num_kv_heads),
      in_specs=[tt.kv_head_specs(operands, seq_len, group, head_dim)],
      out_specs=[row_specs.do, row_specs.lse],
      out_shape=[jax.ShapeDtypeStruct(q_like.shape, q_like.dtype),
                 jax.ShapeDtypeStruct(q_like.shape[:-1], jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
      interpret=interpret,
      name="moda_forward",
  )(operands)
