"""Geometry, tile sizes and the small in-kernel helpers of the Mosaic GPU MoDA kernels.

A CTA holds `compute_wgs` (1 or 2) compute warpgroups and one memory warpgroup (the last). A compute
warpgroup of the forward and dq kernels owns ROWS = 64 *folded rows*: `tokens` consecutive tokens
times `Gp` query heads of one kv head, head-major (row r is head r // tokens, token t0 + r % tokens),
so that each head's rows are one strided TMA box [tokens, D] of q / out. Gp = min(next_pow2(G), 8) keeps
tokens >= 8 (a TMA box and an SMEM tile of 8 rows); G > 8 spreads over `head_groups` programs, and
padded heads (g >= G) load a real head's rows and are never stored or counted.

The rows' vectors (lse, delta, the rows' segment ids) live in *row tiles* outside the kernels
(`to_row_tiles`): [B, Hk * head_groups, row_tiles, ROWS], a warpgroup's 64 rows one contiguous 256-byte
vector, read and written as one TMA box. A box per head would start 32 or 64 bytes into the SMEM vector
for Gp >= 4, and a tiled TMA copy needs a 128-byte aligned SMEM address (else
CUDA_ERROR_MISALIGNED_ADDRESS); a store of a head's [tokens] window of a [B, Hq, T] array also ran past
T into the next head's row (Mosaic GPU clips such contiguous stores at the array's end only).

The forward and dq kernels' memory warpgroup streams one ring of `stages` slots of [ring_rows, D] K and
V tiles (`mosaic_gpu_stream`): first the sequence key blocks of `block_kv` keys, then the depth items.
A depth item gives each compute warpgroup `depth_cols` columns of its own tokens' depth slots: column c
is token tok0 + c % tpp, slot l0 + c // tpp (`tpp` tokens per item, `slots_per_item` = depth_cols / tpp
slots), loaded as one [tpp, D] TMA box per slot. The depth logits are a dense [ROWS, depth_cols] block
whose entries outside a row's own token (or outside [depth_start, depth_len)) are masked: the official
block-diagonal layout, which wastes ROWS / Gp of the depth matmuls' work (the depth stream is
memory-bound; BENCHMARKS.md §1).

Which entries are visible is never decided here: masks come from `pallas_kernels.spec` on iotas.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import spec as spec_lib

ROWS = 64            # wgmma M: rows per compute warpgroup
MAX_HEADS_PER_TILE = 8
LOG2E = math.log2(math.e)
# Finite, so a fully masked block gives exp2(0) = 1 instead of NaN; the next visible key rescales it to 0.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def next_pow2(n: int) -> int:
  return 1 << max(0, (int(n) - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class MosaicBlocks:
  """Tiles of one Mosaic GPU kernel.

  block_kv: sequence keys per ring slot (a multiple of 32, <= 256).
  depth_cols: depth columns per compute warpgroup per depth item (a multiple of 16, <= 128; 64 in the
    backward, where the item's columns are the rows of a wgmma).
  stages: ring slots (>= 2): how many tiles the memory warpgroup may load ahead.
  compute_wgs: compute warpgroups per CTA (1 or 2), each with its own 64 rows (query rows, or keys in
    the dk/dv kernel), sharing the stream.
  ping_pong: (forward with two compute warpgroups) a schedule barrier makes them alternate, one's
    softmax under the other's matmuls (FlashAttention-3's ping-pong).
  """
  block_kv: int = 128
  depth_cols: int = 64
  stages: int = 2
  compute_wgs: int = 2
  ping_pong: bool = True

  def validate(self, name: str = "blocks") -> None:
    if not isinstance(self.block_kv, int) or self.block_kv % 32 or not 32 <= self.block_kv <= 256:
      raise ValueError(f"{name}.block_kv={self.block_kv!r}: expected a multiple of 32 in [32, 256].")
    if not isinstance(self.depth_cols, int) or self.depth_cols % 16 or not 16 <= self.depth_cols <= 128:
      raise ValueError(f"{name}.depth_cols={self.depth_cols!r}: expected a multiple of 16 in [16, 128].")
    if not isinstance(self.stages, int) or not 2 <= self.stages <= 8:
      raise ValueError(f"{name}.stages={self.stages!r}: expected an int in [2, 8].")
    if self.compute_wgs not in (1, 2):
      raise ValueError(f"{name}.compute_wgs={self.compute_wgs!r}: expected 1 or 2.")
    if not isinstance(self.ping_pong, bool):
      raise ValueError(f"{name}.ping_pong={self.ping_pong!r}: expected a bool.")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles of the forward, the dq (+ depth backward) and the dk/dv kernels."""
  fwd: MosaicBlocks
  dq: MosaicBlocks
  dkv: MosaicBlocks

  @classmethod
  def get_default(cls, head_dim: int) -> "BlockSizes":
    """D 64: each kernel's fastest variant, measured on the H200 on 2026-12-02 with
    `python -m pallas_kernels.benchmark --tune --mosaic` (BENCHMARKS.md §0g: T16K G8, T4K G8, B8 T4K G2)
    against the earlier fwd 128 / 64 / 2 and dq, dkv 64 / 64 / 2 (block_kv / depth_cols / stages): the
    forward's 256-key blocks with 128-column depth items (-5.7 to -8.6%), the dq kernel's 128-key blocks
    in 3 ring slots (-1.3 to -2.4%), the dk/dv kernel's 3 slots (-1.7 to -2.1%). D 128: not tuned; the
    SMEM budget (227 KB) still sets them: the dq kernel's two staged [64, D] gradient tiles and its ring
    fit one compute warpgroup only."""
    if head_dim > 64:
      return cls(fwd=MosaicBlocks(block_kv=128, depth_cols=64, stages=2, compute_wgs=2),
                 dq=MosaicBlocks(block_kv=64, depth_cols=ROWS, stages=2, compute_wgs=1),
                 dkv=MosaicBlocks(block_kv=ROWS, depth_cols=ROWS, stages=2, compute_wgs=2))
    return cls(fwd=MosaicBlocks(block_kv=256, depth_cols=128, stages=2, compute_wgs=2),
               dq=MosaicBlocks(block_kv=128, depth_cols=ROWS, stages=3, compute_wgs=2),
               dkv=MosaicBlocks(block_kv=ROWS, depth_cols=ROWS, stages=3, compute_wgs=2))

  def validate(self, *, wgmma_operand: tuple[int, object] | None = None) -> None:
    """`wgmma_operand` (head_dim, dtype), for a compiled (not interpret-mode) launch: every kernel
    contracts its probabilities or dS over `block_kv` (and the forward over `depth_cols`) against a
    [., D] tile, and the tensor cores take such a contraction in whole swizzle rows of that tile
    (`wgmma_k_multiple`). Interpret mode has no such rule, so the CPU tests keep smaller tiles."""
    multiple = None if wgmma_operand is None else wgmma_k_multiple(*wgmma_operand)
    for name in ("fwd", "dq", "dkv"):
      blocks = getattr(self, name)
      if not isinstance(blocks, MosaicBlocks):
        raise ValueError(f"block_sizes.{name}={blocks!r}: expected a MosaicBlocks.")
      blocks.validate(f"block_sizes.{name}")
      if multiple is not None:
        for field in ("block_kv", "depth_cols"):
          if getattr(blocks, field) % multiple:
            raise ValueError(
                f"block_sizes.{name}.{field}={getattr(blocks, field)}: expected a multiple of {multiple} on the "
                f"GPU (the tensor cores contract over it against a [{field}, {wgmma_operand[0]}] "
                f"{jnp.dtype(wgmma_operand[1]).name} tile in whole {multiple}-element swizzle rows).")
    if self.dq.depth_cols != ROWS:
      raise ValueError(f"block_sizes.dq.depth_cols={self.dq.depth_cols}: expected {ROWS} (the depth "
                       "backward's dk / dv matmuls have the item's columns as wgmma rows).")


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Static sizes of one launch."""
  seq_len: int         # T
  num_slots: int       # L (0 without depth)
  group: int           # G
  heads_per_tile: int  # Gp
  head_dim: int        # D
  block_kv: int
  depth_cols: int
  stages: int
  compute_wgs: int
  ping_pong: bool
  interpret: bool      # GPU interpret mode: wgmma operands from SMEM only, no accumulator init

  @property
  def tokens(self) -> int:
    """Tokens per compute warpgroup."""
    return ROWS // self.heads_per_tile

  @property
  def tokens_per_cta(self) -> int:
    return self.compute_wgs * self.tokens

  @property
  def head_groups(self) -> int:
    return pl.cdiv(self.group, self.heads_per_tile)

  @property
  def padded_heads(self) -> bool:
    """Whether some tile rows belong to heads g >= G (loaded as a real head, never counted)."""
    return self.head_groups * self.heads_per_tile != self.group

  @property
  def num_q_tiles(self) -> int:
    return pl.cdiv(self.seq_len, self.tokens_per_cta)

  @property
  def row_tiles(self) -> int:
    """Token tiles of `tokens` tokens that the CTAs cover (the last ones may lie past T)."""
    return self.num_q_tiles * self.compute_wgs

  @property
  def ring_rows(self) -> int:
    """Rows of a ring slot: a sequence block, or both compute warpgroups' depth columns."""
    return max(self.block_kv, self.compute_wgs * self.depth_cols)

  @property
  def tpp(self) -> int:
    """Tokens per depth item."""
    return min(self.tokens, self.depth_cols)

  @property
  def slots_per_item(self) -> int:
    return self.depth_cols // self.tpp

  @property
  def token_groups(self) -> int:
    """Depth items per slot step: the warpgroup's tokens in groups of tpp."""
    return self.tokens // self.tpp


def make_geometry(seq_len, num_slots, group, head_dim, blocks: MosaicBlocks, interpret: bool) -> Geometry:
  return Geometry(seq_len=seq_len, num_slots=num_slots, group=group,
                  heads_per_tile=min(next_pow2(group), MAX_HEADS_PER_TILE), head_dim=head_dim,
                  block_kv=blocks.block_kv, depth_cols=blocks.depth_cols, stages=blocks.stages,
                  compute_wgs=blocks.compute_wgs, ping_pong=blocks.ping_pong and blocks.compute_wgs == 2,
                  interpret=interpret)


def to_row_tiles(x_BTH, num_tiles: int, geom: Geometry):
  """[B, T, Hk * G] -> [B, Hk * head_groups, num_tiles, ROWS] row tiles (module doc); tokens past T and
  padded heads are zeros (num_tiles * tokens >= T)."""
  batch, seq_len, num_q_heads = x_BTH.shape
  num_kv_heads, tokens, heads = num_q_heads // geom.group, geom.tokens, geom.heads_per_tile
  x = x_BTH.reshape(batch, seq_len, num_kv_heads, geom.group)
  x = jnp.pad(x, [(0, 0), (0, num_tiles * tokens - seq_len), (0, 0), (0, geom.head_groups * heads - geom.group)])
  x = x.reshape(batch, num_tiles, tokens, num_kv_heads, geom.head_groups, heads).transpose(0, 3, 4, 1, 5, 2)
  return x.reshape(batch, num_kv_heads * geom.head_groups, num_tiles, ROWS)


def from_row_tiles(x, seq_len: int, geom: Geometry):
  """The inverse of `to_row_tiles`: [B, T, Hk * G] (padded heads and tokens >= T dropped)."""
  batch, programs, num_tiles, _ = x.shape
  num_kv_heads, tokens, heads = programs // geom.head_groups, geom.tokens, geom.heads_per_tile
  x = x.reshape(batch, num_kv_heads, geom.head_groups, num_tiles, heads, tokens).transpose(0, 3, 5, 1, 2, 4)
  x = x.reshape(batch, num_tiles * tokens, num_kv_heads, geom.head_groups * heads)[:, :seq_len, :, :geom.group]
  return x.reshape(batch, seq_len, num_kv_heads * geom.group)


def row_segments(segment_ids_BT, num_tiles: int, geom: Geometry):
  """[B, T] -> [B, num_tiles, ROWS]: the rows' segment ids in row tiles (the same for every head)."""
  batch, seq_len = segment_ids_BT.shape
  x = jnp.pad(segment_ids_BT, [(0, 0), (0, num_tiles * geom.tokens - seq_len)])
  x = x.reshape(batch, num_tiles, 1, geom.tokens)
  return jnp.broadcast_to(x, (batch, num_tiles, geom.heads_per_tile, geom.tokens)).reshape(batch, num_tiles, ROWS)


def _swizzle_bytes(cols: int, dtype) -> int:
  return plgpu.find_swizzle(cols * jnp.dtype(dtype).itemsize * 8)


def wgmma_k_multiple(cols: int, dtype) -> int:
  """A wgmma whose B operand is an SMEM [K, cols] matrix (`smem_transforms`) takes K in multiples of
  this: one swizzle row of elements (64 for D 64 or 128 at 2 bytes; Mosaic GPU's wgmma raises
  "K must be a multiple of ..." otherwise)."""
  return _swizzle_bytes(cols, dtype) // jnp.dtype(dtype).itemsize


def smem_transforms(cols: int, dtype):
  """Tiling + swizzle of an SMEM matrix whose minor dim has `cols` elements (a wgmma operand)."""
  swizzle = _swizzle_bytes(cols, dtype)
  return (plgpu.TilingTransform((8, wgmma_k_multiple(cols, dtype))), plgpu.SwizzleTransform(swizzle))


def matmul(a, b_ref, *, acc=None, staging=None, after_issue=None, interpret: bool):
  """acc + a @ b_ref on the tensor cores (wgmma), float32; `acc` None starts from zero.

  `after_issue` (with acc None) runs between issuing the wgmma and waiting for it (a schedule barrier).

  `a` is an SMEM ref, or a register array (e.g. the probabilities) when `staging` is given. GPU
  interpret mode in jax 0.11.2 reads both wgmma operands from SMEM and runs no `pl.run_state`
  accumulator: there the register operand is staged through `staging` (an SMEM ref of a's shape) and
  the sum is formed in registers. On the GPU the wgmma takes the register operand directly and
  accumulates into `acc`.
  """
  if interpret:
    if staging is not None:
      staging[...] = a
      plgpu.commit_smem()
      a = staging
  elif acc is not None:
    return pl.run_state(lambda acc_ref: plgpu.wgmma(acc_ref, a, b_ref))(plgpu.ACC.init(acc))

  def product(acc_ref):
    plgpu.wgmma(acc_ref, a, b_ref)
    if after_issue is not None:
      after_issue()
    return acc_ref[...]

  shape = (ROWS, b_ref.shape[1])
  out = pl.run_scoped(product, plgpu.ACC(shape, jnp.float32))
  return out if acc is None else acc + out


def iota(shape, dim):
  return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


def rows_bcast(x, shape):
  """A per-row vector [ROWS] (WGMMA row layout) broadcast to `shape`."""
  return lax.broadcast_in_dim(x, shape, [0])


def cols_bcast(x, shape):
  """A per-column vector [C] (WGMMA column layout) broadcast to `shape`."""
  return lax.broadcast_in_dim(x, shape, [1])


def row_tokens(first_token, shape, geom: Geometry):
  """[ROWS, C]: the token of each folded row (head-major rows)."""
  return first_token + lax.rem(iota(shape, 0), jnp.int32(geom.tokens))


# What a block of sequence logits is known to be, which decides the mask it needs (`sequence_mask`).
FULL = "full"          # anything: the whole `spec.sequence_visible` mask
SEGMENTS = "segments"  # visible by position (wholly before the rows' tokens, inside T): segments compared
NO_MASK = "no_mask"    # visible by position, its keys inside the run of all its rows (`block_ranges.run_blocks`)


def compares_segments(mask: str) -> bool:
  """Whether a block known to be `mask` compares segment ids (so its keys' ids must be read)."""
  return mask != NO_MASK


def sequence_mask(spec: spec_lib.Spec, q_token, k_token, q_segment, k_segment, *, mask: str):
  """The visibility of a block of sequence logits (None: all visible), from `spec`, for a block known to be
  `mask` (FULL, SEGMENTS or NO_MASK)."""
  if mask == FULL:
    return spec_lib.sequence_visible(spec, q_token, k_token, q_segment, k_segment)
  if compares_segments(mask) and q_segment is not None:
    return spec_lib.same_segment(q_segment, k_segment)
  return None


def depth_mask(spec: spec_lib.Spec, first_token, tok0, slot0, depth_start, depth_len, geom: Geometry):
  """[ROWS, depth_cols]: which depth logits of an item each row sees (its own token's readable slots)."""
  shape = (ROWS, geom.depth_cols)
  col = iota(shape, 1)
  col_token = tok0 + lax.rem(col, jnp.int32(geom.tpp))
  col_slot = slot0 + lax.div(col, jnp.int32(geom.tpp))
  visible = spec_lib.depth_token_visible(spec, row_tokens(first_token, shape, geom), col_token)
  return visible & spec_lib.depth_slot_visible(col_slot, depth_start, depth_len)


def depth_items(depth_start, depth_len, geom: Geometry):
  """(first slot step, number of depth items): only slot steps holding slots in [start, len) are run."""
  per = geom.slots_per_item
  first = lax.div(depth_start, jnp.int32(per))
  end = lax.div(depth_len + per - 1, jnp.int32(per))
  return first, jnp.maximum(end - first, 0) * geom.token_groups


def depth_item(j, first_step, geom: Geometry):
  """(token offset inside the warpgroup's tokens, first slot) of depth item j."""
  step = first_step + lax.div(j, jnp.int32(geom.token_groups))
  group = lax.rem(j, jnp.int32(geom.token_groups))
  return group * geom.tpp, step * geom.slots_per_item


def launch(body, *, out_type, scratch, grid, seq_axis: str, geom: Geometry, interpret, name: str):
  """`plgpu.kernel` with the launch every pallas_mosaic_gpu kernel shares: grid axes ("heads", `seq_axis`,
  "batch"), `geom.compute_wgs` compute warpgroups plus the memory warpgroup (thread axis "wg"), one
  scratch tree, approximate exp."""
  return plgpu.kernel(body, out_type=out_type, scratch_types=[scratch], grid=grid,
                      grid_names=("heads", seq_axis, "batch"), num_threads=geom.compute_wgs + 1,
                      thread_name="wg", compiler_params=plgpu.CompilerParams(approx_math=True),
                      interpret=interpret, kernel_name=name)
