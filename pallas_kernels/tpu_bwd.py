"""Pallas TPU backward kernels of MoDA (FA2 structure; the delta pre-pass runs in XLA in `tpu`).

`dq_and_depth`: query-tile parallel, grid (B, Hk, query tiles, key blocks + depth blocks), like the
forward. The sequence steps accumulate dq, the depth steps d depth_q (a separate output); each depth
step owns its (slots x tile tokens) block of the depth cotangents outright (a depth key is read by its
own token's G query heads only, all in this tile), so it writes them directly: computed for the
readable slots depth_start <= l < depth_len, exactly zero for the rest.

`dk_dv`: key-block parallel, grid (B, Hk, key blocks, query tiles); sums over the G query heads of the
kv head in VMEM, so no per-head partial cotangents reach HBM. Causal tiles before the block are skipped.

Probabilities are recomputed from the forward's lse: p = exp(scale * q.k - lse), ds = p (dp - delta).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import tpu_tiles as tiles
from pallas_kernels.tpu_tiles import KernelConfig


class Operands(NamedTuple):
  """Backward inputs in the kernel layouts of `tpu_tiles` (depth and segments may be None)."""

  q: jax.Array          # [B, Hk, G, T, D]
  k: jax.Array          # [B, Hk, T, D]
  v: jax.Array
  d_out: jax.Array      # [B, Hk, G, T, D]
  lse: jax.Array        # [B, Hk, G, T, 128] float32
  delta: jax.Array      # [B, Hk, G, T, 128] float32: rowsum(out * d_out) - d_lse
  depth_q: jax.Array | None   # [B, Hk, G, T, D]: the queries scored against depth keys
  depth_k: jax.Array | None   # [B, Hk, L, T, D]
  depth_v: jax.Array | None
  depth_range: jax.Array  # int32 [depth_start, depth_len], scalar prefetch
  q_seg: jax.Array | None     # [B, T, 128] int32
  kv_seg: jax.Array | None    # [B, 8, T] int32


def vmem_bytes(cfg: KernelConfig, itemsize: int) -> int:
  """Upper estimate of the VMEM the largest kernel (`dq_and_depth`) holds: blocks x2 for pipelining."""
  b = cfg.blocks
  rows = cfg.group * b.block_q
  blocks = (3 * rows * cfg.head_dim * itemsize            # q, depth_q, d_out
            + 2 * rows * tiles.LANES * 4                  # lse, delta
            + 2 * b.block_k * cfg.head_dim * itemsize     # k, v
            + 4 * b.block_slots * b.block_q * cfg.head_dim * itemsize  # depth in + cotangents out
            + 2 * rows * cfg.head_dim * itemsize          # dq, d depth_q out
            + b.block_q * tiles.LANES * 4 + tiles.SUBLANES * b.block_k * 4)  # segment ids
  scratch = 2 * rows * cfg.head_dim * 4
  temporaries = 4 * b.block_q * max(b.block_k, cfg.head_dim) * 4
  return 2 * blocks + scratch + temporaries


def dq_and_depth(ops: Operands, *, cfg: KernelConfig, interpret):
  """Returns (dq, d_depth_q [B, Hk, G, T, D], d_depth_k, d_depth_v [B, Hk, L, T, D]), in q's dtype.

  dq is the sequence part; the depth cotangents are None without depth."""
  batch, num_kv_heads, group, _, head_dim = ops.q.shape
  b = cfg.blocks
  num_seq = cfg.num_seq_steps

  def row_map(bi, h, i, j, depth_ref):
    return bi, h, 0, i, 0

  def kv_map(bi, h, i, j, depth_ref):
    return bi, h, tiles.fetched_k_block(cfg, i, j), 0

  def depth_in_map(bi, h, i, j, depth_ref):
    return bi, h, tiles.fetched_depth_block(cfg, j - num_seq, depth_ref), i, 0

  def depth_out_map(bi, h, i, j, depth_ref):
    # Every depth block is visited (unread ones get their zeros here), so no clamp to the readable ones.
    return bi, h, jnp.clip(j - num_seq, 0, cfg.num_depth_steps - 1), i, 0

  rows_spec = pl.BlockSpec((None, None, group, b.block_q, head_dim), row_map)
  stat_spec = pl.BlockSpec((None, None, group, b.block_q, tiles.LANES), row_map)
  kv_spec = pl.BlockSpec((None, None, b.block_k, head_dim), kv_map)
  in_specs = [rows_spec, kv_spec, kv_spec, rows_spec, stat_spec, stat_spec]
  inputs = [ops.q, ops.k, ops.v, ops.d_out, ops.lse, ops.delta]
  out_specs = [rows_spec]
  out_shape = [jax.ShapeDtypeStruct(ops.q.shape, ops.q.dtype)]
  scratch = [pltpu.VMEM((group, b.block_q, head_dim), jnp.float32)]   # dq accumulator
  if cfg.spec.has_depth:
    in_specs += [rows_spec] + [pl.BlockSpec((None, None, b.block_slots, b.block_q, head_dim), depth_in_map)] * 2
    inputs += [ops.depth_q, ops.depth_k, ops.depth_v]
    out_specs += [rows_spec] + [pl.BlockSpec((None, None, b.block_slots, b.block_q, head_dim), depth_out_map)] * 2
    out_shape += [jax.ShapeDtypeStruct(ops.q.shape, ops.q.dtype)]
    out_shape += [jax.ShapeDtypeStruct(ops.depth_k.shape, ops.depth_k.dtype)] * 2
    scratch.append(pltpu.VMEM((group, b.block_q, head_dim), jnp.float32))   # d depth_q accumulator
  if cfg.spec.has_segments:
    in_specs += [pl.BlockSpec((None, b.block_q, tiles.LANES), lambda bi, h, i, j, depth_ref: (bi, i, 0)),
                 pl.BlockSpec((None, tiles.SUBLANES, b.block_k),
                              lambda bi, h, i, j, depth_ref: (bi, 0, tiles.fetched_k_block(cfg, i, j)))]
    inputs += [ops.q_seg, ops.kv_seg]

  results = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(batch, num_kv_heads, b.num_q_blocks, num_seq + cfg.num_depth_steps),
          in_specs=in_specs, out_specs=out_specs,
          scratch_shapes=scratch),
      out_shape=out_shape,
      compiler_params=tiles.compiler_params(),
      interpret=interpret,
      name="moda_tpu_bwd_dq_depth",
  )(ops.depth_range, *inputs)
  return tuple(results) if cfg.spec.has_depth else (results[0], None, None, None)


def _dq_kernel(depth_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
               cfg: KernelConfig):
  refs = list(refs)
  depth_q_ref = dk_ref = dv_ref = q_seg_ref = kv_seg_ref = None
  d_depth_q_ref = d_depth_k_ref = d_depth_v_ref = ddq_acc_ref = None
  if cfg.spec.has_depth:
    depth_q_ref, dk_ref, dv_ref = refs.pop(0), refs.pop(0), refs.pop(0)
  if cfg.spec.has_segments:
    q_seg_ref, kv_seg_ref = refs.pop(0), refs.pop(0)
  dq_ref = refs.pop(0)
  if cfg.spec.has_depth:
    d_depth_q_ref, d_depth_k_ref, d_depth_v_ref = refs.pop(0), refs.pop(0), refs.pop(0)
  dq_acc_ref = refs.pop(0)
  if cfg.spec.has_depth:
    (ddq_acc_ref,) = refs

  i, j = pl.program_id(2), pl.program_id(3)
  num_seq = cfg.num_seq_steps

  @pl.when(j == 0)
  def _init():
    dq_acc_ref[...] = jnp.zeros(dq_acc_ref.shape, jnp.float32)
    if cfg.spec.has_depth:
      ddq_acc_ref[...] = jnp.zeros(ddq_acc_ref.shape, jnp.float32)

  def sequence_step(masked: bool):
    k, v = k_ref[...], v_ref[...]
    visible = tiles.visible_logits(cfg, i, j, q_seg_ref, kv_seg_ref) if masked else None
    width = k.shape[0]

    def head(g):
      s = tiles.matmul(q_ref[g], k, tiles.NT_DIMS) * cfg.spec.scale
      if visible is not None:
        s = jnp.where(visible, s, tiles.MASK_VALUE)
      p = jnp.exp(s - tiles.lanes(lse_ref[g], width))
      dp = tiles.matmul(do_ref[g], v, tiles.NT_DIMS)
      ds = p * (dp - tiles.lanes(delta_ref[g], width))
      dq_acc_ref[g] += tiles.matmul(ds.astype(k.dtype), k, tiles.NN_DIMS) * cfg.spec.scale

    tiles.for_each(cfg.group, head)

  tiles.run_sequence_step(cfg, i, j, jnp.less(j, num_seq), sequence_step)

  if cfg.spec.has_depth:
    @pl.when(j >= num_seq)
    def _depth():
      lo, hi = tiles.readable_slots(cfg, j - num_seq, depth_ref)
      tiles.for_each(hi, functools.partial(
          _depth_slot_grads, depth_q_ref=depth_q_ref, do_ref=do_ref, lse_ref=lse_ref, delta_ref=delta_ref,
          dk_ref=dk_ref, dv_ref=dv_ref, ddq_acc_ref=ddq_acc_ref, d_depth_k_ref=d_depth_k_ref,
          d_depth_v_ref=d_depth_v_ref, cfg=cfg), start=lo)

      # This step owns the block's cotangents: the unread slots (below lo, at or past hi) get exact zeros.
      def zero(slot):
        d_depth_k_ref[slot] = jnp.zeros(d_depth_k_ref.shape[1:], d_depth_k_ref.dtype)
        d_depth_v_ref[slot] = jnp.zeros(d_depth_v_ref.shape[1:], d_depth_v_ref.dtype)

      tiles.for_each(lo, zero)
      tiles.for_each(cfg.blocks.block_slots, zero, start=hi)

  @pl.when(j == num_seq + cfg.num_depth_steps - 1)
  def _finalize():
    dq_ref[...] = dq_acc_ref[...].astype(dq_ref.dtype)
    if cfg.spec.has_depth:
      d_depth_q_ref[...] = ddq_acc_ref[...].astype(d_depth_q_ref.dtype)


def _depth_slot_grads(slot_in_block, *, depth_q_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
                      ddq_acc_ref, d_depth_k_ref, d_depth_v_ref, cfg: KernelConfig):
  """One written depth slot: its d depth_q contribution and the slot's whole d_depth_k / d_depth_v rows."""
  depth_k = dk_ref[slot_in_block].astype(jnp.float32)   # [bq, D]: row t is token t's key
  depth_v = dv_ref[slot_in_block].astype(jnp.float32)

  def head(g, cotangents):
    d_depth_k, d_depth_v = cotangents
    q = depth_q_ref[g].astype(jnp.float32)
    do = do_ref[g].astype(jnp.float32)
    c = jnp.sum(q * depth_k, axis=-1, keepdims=True) * cfg.spec.scale       # [bq, 1]
    p = jnp.exp(c - lse_ref[g][:, :1])
    dp = jnp.sum(do * depth_v, axis=-1, keepdims=True)
    ds_scaled = p * (dp - delta_ref[g][:, :1]) * cfg.spec.scale
    ddq_acc_ref[g] += ds_scaled * depth_k
    return d_depth_k + ds_scaled * q, d_depth_v + p * do

  zeros = jnp.zeros(depth_k.shape, jnp.float32)
  d_depth_k, d_depth_v = jax.lax.fori_loop(0, cfg.group, head, (zeros, zeros))
  d_depth_k_ref[slot_in_block] = d_depth_k.astype(d_depth_k_ref.dtype)
  d_depth_v_ref[slot_in_block] = d_depth_v.astype(d_depth_v_ref.dtype)


def dk_dv(ops: Operands, *, cfg: KernelConfig, interpret):
  """Returns (dk, dv) [B, Hk, T, D] in k's dtype: sequence-key cotangents summed over the G heads."""
  batch, num_kv_heads, group, _, head_dim = ops.q.shape
  b = cfg.blocks

  def q_index(j, i):
    # Causal: query tiles before the key block see none of it; clamp so they are not fetched.
    return jnp.maximum(i, tiles.first_q_block(cfg, j))

  def row_map(bi, h, j, i, depth_ref):
    return bi, h, 0, q_index(j, i), 0

  def kv_map(bi, h, j, i, depth_ref):
    return bi, h, j, 0

  rows_spec = pl.BlockSpec((None, None, group, b.block_q, head_dim), row_map)
  stat_spec = pl.BlockSpec((None, None, group, b.block_q, tiles.LANES), row_map)
  kv_spec = pl.BlockSpec((None, None, b.block_k, head_dim), kv_map)
  in_specs = [rows_spec, kv_spec, kv_spec, rows_spec, stat_spec, stat_spec]
  inputs = [ops.q, ops.k, ops.v, ops.d_out, ops.lse, ops.delta]
  if cfg.spec.has_segments:
    in_specs += [pl.BlockSpec((None, b.block_q, tiles.LANES),
                              lambda bi, h, j, i, depth_ref: (bi, q_index(j, i), 0)),
                 pl.BlockSpec((None, tiles.SUBLANES, b.block_k), lambda bi, h, j, i, depth_ref: (bi, 0, j))]
    inputs += [ops.q_seg, ops.kv_seg]

  return pl.pallas_call(
      functools.partial(_dk_dv_kernel, cfg=cfg),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(batch, num_kv_heads, b.num_k_blocks, b.num_q_blocks),
          in_specs=in_specs, out_specs=[kv_spec, kv_spec],
          scratch_shapes=[pltpu.VMEM((b.block_k, head_dim), jnp.float32)] * 2),
      out_shape=[jax.ShapeDtypeStruct(ops.k.shape, ops.k.dtype)] * 2,
      compiler_params=tiles.compiler_params(),
      interpret=interpret,
      name="moda_tpu_bwd_dk_dv",
  )(ops.depth_range, *inputs)


def _dk_dv_kernel(depth_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
                  cfg: KernelConfig):
  del depth_ref  # depth does not touch the sequence keys
  refs = list(refs)
  q_seg_ref = kv_seg_ref = None
  if cfg.spec.has_segments:
    q_seg_ref, kv_seg_ref = refs.pop(0), refs.pop(0)
  dk_ref, dv_ref, dk_acc_ref, dv_acc_ref = refs

  j, i = pl.program_id(2), pl.program_id(3)

  @pl.when(i == 0)
  def _init():
    dk_acc_ref[...] = jnp.zeros(dk_acc_ref.shape, jnp.float32)
    dv_acc_ref[...] = jnp.zeros(dv_acc_ref.shape, jnp.float32)

  def step(masked: bool):
    k, v = k_ref[...], v_ref[...]
    visible = tiles.visible_logits(cfg, i, j, q_seg_ref, kv_seg_ref) if masked else None
    width = k.shape[0]

    def head(g):
      q, do = q_ref[g], do_ref[g]
      s = tiles.matmul(q, k, tiles.NT_DIMS) * cfg.spec.scale              # [bq, bk]
      if visible is not None:
        s = jnp.where(visible, s, tiles.MASK_VALUE)
      p = jnp.exp(s - tiles.lanes(lse_ref[g], width))
      dv_acc_ref[...] += tiles.matmul(p.T.astype(do.dtype), do, tiles.NN_DIMS)
      dp = tiles.matmul(do, v, tiles.NT_DIMS)
      ds = p * (dp - tiles.lanes(delta_ref[g], width))
      dk_acc_ref[...] += tiles.matmul(ds.T.astype(q.dtype), q, tiles.NN_DIMS) * cfg.spec.scale

    tiles.for_each(cfg.group, head)

  tiles.run_sequence_step(cfg, i, j, True, step)

  @pl.when(i == cfg.blocks.num_q_blocks - 1)
  def _finalize():
    dk_ref[...] = dk_acc_ref[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_acc_ref[...].astype(dv_ref.dtype)

