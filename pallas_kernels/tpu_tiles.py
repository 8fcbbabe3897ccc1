"""Tile geometry shared by the Pallas TPU forward and backward kernels.

Kernel-side layouts, per batch b and kv head h (G query heads per kv head, T padded to `padded_len`):

    q, out, do    [B, Hk, G, T, D]      one tile = all G heads x block_q tokens
    k, v          [B, Hk, T, D]         one step = block_k tokens
    depth k, v    [B, Hk, L, T, D]      slot-major: one step = block_slots slots x block_q tokens
    lse, delta    [B, Hk, G, T, 128]    per-row statistics broadcast over the 128 lanes, because a TPU
                                        block's minor dimension must be 128-divisible or span the array
    q segment ids [B, T, 128]           lane-broadcast, compared against
    kv segment ids[B, 8, T]             sublane-broadcast key ids

This module decides which (query tile, key block) pairs and depth steps are visited, which need a mask,
and the index maps that keep skipped blocks from being fetched (a block whose index does not change
between two grid steps is not copied again). Which entries are visible is `pallas_kernels.spec`'s rule,
evaluated here on the tile's token indices.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.spec import Spec, sequence_visible
from pallas_kernels.tpu_block_sizes import FittedBlocks

LANES = 128
SUBLANES = 8
# Finite stand-in for -inf: masked logits stay finite, so exp() of a masked entry is exactly 0 without
# inf - inf = nan when a whole block of a row is masked.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


# The scalar-prefetch operand int32[2] that every kernel gets first: the readable depth slots are
# [depth_start, depth_len) (spec.depth_slot_visible); [0, 0] without depth.
DEPTH_START, DEPTH_LEN = 0, 1


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Everything static a kernel body needs: the call's `Spec` plus the tile geometry.

  Causality, scale, segments and depth are the Spec's facts (read through `cfg.spec`), not copies.
  """

  spec: Spec
  blocks: FittedBlocks
  group: int           # G = Hq // Hk
  head_dim: int

  @property
  def num_seq_steps(self) -> int:
    return self.blocks.num_k_blocks

  @property
  def num_depth_steps(self) -> int:
    return self.blocks.num_depth_blocks if self.spec.has_depth else 0

  @property
  def pads_keys(self) -> bool:
    return self.blocks.padded_len != self.spec.seq_len


def last_k_block(cfg: KernelConfig, q_block):
  """Last key block a query tile sees (the diagonal one when causal)."""
  if not cfg.spec.causal:
    return cfg.blocks.num_k_blocks - 1
  return lax.div((q_block + 1) * cfg.blocks.block_q - 1, cfg.blocks.block_k)


def fetched_k_block(cfg: KernelConfig, q_block, step):
  """The key block fetched at sequence step `step` of query block `q_block`: clamped to the last
  visible one, so steps above the causal diagonal re-use the resident block instead of a DMA."""
  return jnp.minimum(step, last_k_block(cfg, q_block))


def first_q_block(cfg: KernelConfig, k_block):
  """First query tile that sees a key block (causal: the one holding the block's first token)."""
  if not cfg.spec.causal:
    return 0
  return lax.div(k_block * cfg.blocks.block_k, cfg.blocks.block_q)


def fetched_depth_block(cfg: KernelConfig, step, depth_ref):
  """The depth block fetched at depth step `step`: clamped into the blocks holding readable slots, so
  steps wholly below depth_start or at / past depth_len re-use a resident block instead of a DMA (and
  are never computed: see `readable_slots`)."""
  first = lax.div(depth_ref[DEPTH_START], cfg.blocks.block_slots)
  last = lax.div(jnp.maximum(depth_ref[DEPTH_LEN] - 1, 0), cfg.blocks.block_slots)
  return jnp.minimum(jnp.maximum(step, first), last)


def readable_slots(cfg: KernelConfig, step, depth_ref):
  """The readable slots of depth step `step` as in-block indices [lo, hi), lo <= hi.

  Readable means `spec.depth_slot_visible` (depth_start <= slot < depth_len), here as the interval
  it is, because the kernels bound their slot loops instead of masking: unread slots may hold
  anything (even inf or NaN) and must stay out of the arithmetic.
  """
  first_slot = step * cfg.blocks.block_slots
  lo = jnp.clip(depth_ref[DEPTH_START] - first_slot, 0, cfg.blocks.block_slots)
  hi = jnp.clip(depth_ref[DEPTH_LEN] - first_slot, lo, cfg.blocks.block_slots)
  return lo, hi


def seq_block_visible(cfg: KernelConfig, q_block, k_block):
  """Whether any query of the tile sees any key of the block."""
  if not cfg.spec.causal:
    return True
  return k_block * cfg.blocks.block_k <= (q_block + 1) * cfg.blocks.block_q - 1


def seq_block_needs_mask(cfg: KernelConfig, q_block, k_block):
  """Whether the (query tile, key block) pair has any invisible entry to mask (static when possible)."""
  if cfg.spec.has_segments:
    return True
  if cfg.spec.causal:
    # Some key of the block is later than the tile's first query: the diagonal blocks.
    return (k_block + 1) * cfg.blocks.block_k - 1 > q_block * cfg.blocks.block_q
  if cfg.pads_keys:
    return k_block == cfg.blocks.num_k_blocks - 1
  return False


def visible_logits(cfg: KernelConfig, q_block, k_block, q_seg_ref, kv_seg_ref):
  """[block_q, block_k] bool: which query rows of the tile see which keys of the block.

  `spec.sequence_visible` on the tile's token indices (and segment ids); padded keys (>= T) are
  invisible by that rule too.
  """
  shape = (cfg.blocks.block_q, cfg.blocks.block_k)
  q_token = lax.broadcasted_iota(jnp.int32, shape, 0) + q_block * cfg.blocks.block_q
  k_token = lax.broadcasted_iota(jnp.int32, shape, 1) + k_block * cfg.blocks.block_k
  q_segment = k_segment = None
  if cfg.spec.has_segments:
    q_segment = lanes(q_seg_ref[...], cfg.blocks.block_k)     # [block_q, block_k]
    k_segment = kv_seg_ref[0:1, :]                             # [1, block_k]
  return sequence_visible(cfg.spec, q_token, k_token, q_segment, k_segment)


def lanes(x_R128: jax.Array, width: int) -> jax.Array:
  """Widens (or narrows) a lane-broadcast [rows, 128] array to [rows, width]."""
  if width == LANES:
    return x_R128
  if width < LANES:
    return x_R128[:, :width]
  repeats = -(-width // LANES)
  return jnp.tile(x_R128, (1, repeats))[:, :width]


def compiler_params() -> pltpu.CompilerParams:
  """Batch, head and query/key tile axes are independent; the last grid axis accumulates."""
  return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


NT_DIMS = (((1,), (1,)), ((), ()))   # a @ b.T
NN_DIMS = (((1,), (0,)), ((), ()))   # a @ b


def matmul(a: jax.Array, b: jax.Array, dims) -> jax.Array:
  """MXU matmul with float32 accumulation; float32 inputs get full precision (TPU default is bf16)."""
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def for_each(stop, body, start=0) -> None:
  """Runs body(index) for index in [start, stop) as a rolled loop (bounds may be traced).

  Rolled rather than unrolled over heads and slots: the kernel stays small to compile (and to
  interpret on CPU) whatever G and block_slots are.
  """
  lax.fori_loop(start, stop, lambda index, carry: (body(index), carry)[1], None)


def run_sequence_step(cfg: KernelConfig, q_block, k_block, active, step) -> None:
  """Runs `step(masked)` when the block pair is visible, masking only the blocks that need it."""
  visible_block = jnp.logical_and(active, seq_block_visible(cfg, q_block, k_block))
  needs_mask = seq_block_needs_mask(cfg, q_block, k_block)
  if needs_mask is True or needs_mask is False:  # static: one branch
    pl.when(visible_block)(lambda: step(needs_mask))
    return
  pl.when(jnp.logical_and(visible_block, needs_mask))(lambda: step(True))
  pl.when(jnp.logical_and(visible_block, jnp.logical_not(needs_mask)))(lambda: step(False))
