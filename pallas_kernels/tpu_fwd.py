"""Pallas TPU forward kernel of MoDA: online softmax over the sequence keys, then the token's own depth.

Grid (B, Hk, query tiles, key blocks + depth blocks). For one query tile (all G heads of one kv head)
the last axis first walks the sequence key blocks (blocks above the causal diagonal are skipped and
not fetched; only diagonal / segment / padding blocks are masked), then walks the depth slots in
blocks of `block_slots`. Depth step d only runs for the readable slots depth_start <= l < depth_len,
a scalar-prefetch argument: the depth index map clamps into the blocks holding readable slots, so
blocks wholly outside them are never copied into VMEM. Depth logits score `depth_q` (fetched once per
query tile, like q) and are per-row dot products (each query row has its own depth keys), done on the
VPU as multiply + lane reduction; they update the same (max, sum, acc) state as the sequence phase.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import tpu_tiles as tiles
from pallas_kernels.tpu_tiles import KernelConfig


def forward(q_BKGTD, k_BKTD, v_BKTD, depth_q_BKGTD, depth_k_BKLTD, depth_v_BKLTD, depth_range_2, q_seg_BT128,
            kv_seg_B8T, *, cfg: KernelConfig, interpret):
  """`depth_range_2` is int32 [depth_start, depth_len] (`tiles.DEPTH_START`, `tiles.DEPTH_LEN`).

  Returns (out [B, Hk, G, T, D] in q's dtype, lse [B, Hk, G, T, 128] float32 lane-broadcast)."""
  batch, num_kv_heads, group, padded_len, head_dim = q_BKGTD.shape
  blocks = cfg.blocks
  bq, bk, bl = blocks.block_q, blocks.block_k, blocks.block_slots
  num_seq = cfg.num_seq_steps

  def q_map(b, h, i, j, depth_ref):
    return b, h, 0, i, 0

  def kv_map(b, h, i, j, depth_ref):
    return b, h, tiles.fetched_k_block(cfg, i, j), 0

  def depth_map(b, h, i, j, depth_ref):
    return b, h, tiles.fetched_depth_block(cfg, j - num_seq, depth_ref), i, 0

  in_specs = [pl.BlockSpec((None, None, group, bq, head_dim), q_map),
              pl.BlockSpec((None, None, bk, head_dim), kv_map),
              pl.BlockSpec((None, None, bk, head_dim), kv_map)]
  inputs = [q_BKGTD, k_BKTD, v_BKTD]
  if cfg.spec.has_depth:
    in_specs += [pl.BlockSpec((None, None, group, bq, head_dim), q_map)]
    in_specs += [pl.BlockSpec((None, None, bl, bq, head_dim), depth_map)] * 2
    inputs += [depth_q_BKGTD, depth_k_BKLTD, depth_v_BKLTD]
  if cfg.spec.has_segments:
    in_specs += [pl.BlockSpec((None, bq, tiles.LANES), lambda b, h, i, j, depth_ref: (b, i, 0)),
                 pl.BlockSpec((None, tiles.SUBLANES, bk),
                              lambda b, h, i, j, depth_ref: (b, 0, tiles.fetched_k_block(cfg, i, j)))]
    inputs += [q_seg_BT128, kv_seg_B8T]

  out_specs = [pl.BlockSpec((None, None, group, bq, head_dim), q_map),
               pl.BlockSpec((None, None, group, bq, tiles.LANES), q_map)]
  out_shape = [jax.ShapeDtypeStruct(q_BKGTD.shape, q_BKGTD.dtype),
               jax.ShapeDtypeStruct((batch, num_kv_heads, group, padded_len, tiles.LANES), jnp.float32)]
  scratch = [pltpu.VMEM((group, bq, tiles.LANES), jnp.float32),   # running max m
             pltpu.VMEM((group, bq, tiles.LANES), jnp.float32),   # running sum l
             pltpu.VMEM((group, bq, head_dim), jnp.float32)]      # unnormalized output acc
  grid = (batch, num_kv_heads, blocks.num_q_blocks, num_seq + cfg.num_depth_steps)
  return pl.pallas_call(
      functools.partial(_kernel, cfg=cfg),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=grid, in_specs=in_specs, out_specs=out_specs,
          scratch_shapes=scratch),
      out_shape=out_shape,
      compiler_params=tiles.compiler_params(),
      interpret=interpret,
      name="moda_tpu_fwd",
  )(depth_range_2, *inputs)


def _kernel(depth_ref, q_ref, k_ref, v_ref, *refs, cfg: KernelConfig):
  refs = list(refs)
  depth_q_ref = dk_ref = dv_ref = q_seg_ref = kv_seg_ref = None
  if cfg.spec.has_depth:
    depth_q_ref, dk_ref, dv_ref = refs.pop(0), refs.pop(0), refs.pop(0)
  if cfg.spec.has_segments:
    q_seg_ref, kv_seg_ref = refs.pop(0), refs.pop(0)
  out_ref, lse_ref, m_ref, l_ref, acc_ref = refs

  i, j = pl.program_id(2), pl.program_id(3)
  num_seq = cfg.num_seq_steps

  @pl.when(j == 0)
  def _init():
    m_ref[...] = jnp.full(m_ref.shape, tiles.MASK_VALUE, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  def sequence_step(masked: bool):
    k, v = k_ref[...], v_ref[...]
    visible = tiles.visible_logits(cfg, i, j, q_seg_ref, kv_seg_ref) if masked else None

    def head(g):
      s = tiles.matmul(q_ref[g], k, tiles.NT_DIMS) * cfg.spec.scale       # [bq, bk] float32
      if visible is not None:
        s = jnp.where(visible, s, tiles.MASK_VALUE)
      m_prev = m_ref[g]
      m_next = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))   # [bq, 128]
      p = jnp.exp(s - tiles.lanes(m_next, s.shape[-1]))
      alpha = jnp.exp(m_prev - m_next)
      l_ref[g] = alpha * l_ref[g] + jnp.sum(p, axis=-1, keepdims=True)
      m_ref[g] = m_next
      pv = tiles.matmul(p.astype(v.dtype), v, tiles.NN_DIMS)
      acc_ref[g] = acc_ref[g] * tiles.lanes(alpha, cfg.head_dim) + pv

    tiles.for_each(cfg.group, head)

  tiles.run_sequence_step(cfg, i, j, jnp.less(j, num_seq), sequence_step)

  if cfg.spec.has_depth:
    @pl.when(j >= num_seq)
    def _depth():
      # Only the readable slots of this block; the others may hold anything (even inf): a loop
      # bound, not a mask, keeps them out of the arithmetic.
      lo, hi = tiles.readable_slots(cfg, j - num_seq, depth_ref)
      tiles.for_each(hi, functools.partial(
          _depth_slot, depth_q_ref=depth_q_ref, dk_ref=dk_ref, dv_ref=dv_ref, m_ref=m_ref, l_ref=l_ref,
          acc_ref=acc_ref, cfg=cfg), start=lo)

  @pl.when(j == num_seq + cfg.num_depth_steps - 1)
  def _finalize():
    def head(g):
      l = l_ref[g]
      out_ref[g] = (acc_ref[g] * tiles.lanes(1.0 / l, cfg.head_dim)).astype(out_ref.dtype)
      lse_ref[g] = m_ref[g] + jnp.log(l)

    tiles.for_each(cfg.group, head)


def _depth_slot(slot_in_block, *, depth_q_ref, dk_ref, dv_ref, m_ref, l_ref, acc_ref, cfg: KernelConfig):
  """Merges one depth slot (one key per query row: its own token's) into the softmax state."""
  depth_k = dk_ref[slot_in_block].astype(jnp.float32)   # [bq, D]
  depth_v = dv_ref[slot_in_block].astype(jnp.float32)

  def head(g):
    c = jnp.sum(depth_q_ref[g].astype(jnp.float32) * depth_k, axis=-1, keepdims=True) * cfg.spec.scale  # [bq, 1]
    m_prev = m_ref[g]
    m_next = jnp.maximum(m_prev, c)                       # [bq, 128]
    alpha = jnp.exp(m_prev - m_next)
    p = jnp.exp(c - m_next)
    l_ref[g] = alpha * l_ref[g] + p
    m_ref[g] = m_next
    acc_ref[g] = acc_ref[g] * tiles.lanes(alpha, cfg.head_dim) + p[:, :1] * depth_v

  tiles.for_each(cfg.group, head)
