"""Index math shared by the Triton MoDA kernels: operands, folded rows, token/slot columns, gathered loads.

Inside a kernel, for one (batch, kv head) the refs are views of the native layouts:
  q, depth_q, o, do   [T, G, D]   (q [B, T, Hq, D] reshaped to [B, T, Hk, G, D]; query head h = k * G + g)
  lse, delta          [T, G]
  k, v                [T, D]
  depth k/v           [T, L, D]
  depth_bounds        [2] int32: (depth_start, depth_len)
  segment_ids         [T]
  segment_blocks      [programs, 2] int32: per program, [first, end) of its inner loop's blocks that may
                      hold its segments' tokens (`block_ranges.segment_blocks`; computed in XLA with the kernel's tiles)
A query tile is `block_q` folded rows r = n * Gp + g (token t0 + n, head g). Rows with g >= G or t >= T are
padding: loaded as zero and never stored. Gathers index every axis with an array (interpret mode only
discharges all-array or all-slice indexers) and are left unclamped so that masked-out stores never alias a
real element (interpret mode scatters them; out-of-range indices are dropped there and masked on the GPU).
Which entries are visible is never decided here: the masks come from `pallas_kernels.spec`, called on the
token / slot index arrays built below.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import block_ranges
from pallas_kernels import spec as spec_lib
from pallas_kernels.block_sizes import next_pow2

LOG2E = math.log2(math.e)
# Finite, so a fully masked block gives exp2(0) = 1 instead of NaN; the next real key rescales it to 0. A row
# that never meets a visible entry (depth-only attention) keeps m == MASK_VALUE: `never_visible` finds it.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


class Operands(NamedTuple):
  """What a kernel reads, as arrays (outside, [B, ...] layouts), BlockSpecs or refs (inside); absent: None.

  q is None for depth-only attention; depth_q is q itself when the call scores depth with q. With segments,
  segment_span [B, T, 2] int32 holds `spec.segment_span` (first, last) of every token: no kernel reads it,
  each launcher turns it into the segment_blocks of its own tiles (`block_ranges.segment_blocks`) and drops it.
  """
  q: Any = None
  k: Any = None
  v: Any = None
  depth_q: Any = None
  depth_k: Any = None
  depth_v: Any = None
  depth_bounds: Any = None
  segment_ids: Any = None
  segment_span: Any = None
  segment_blocks: Any = None


class RowGrads(NamedTuple):
  """The backward's per-row inputs: do [T, G, D], lse and delta [T, G]."""
  do: Any
  lse: Any
  delta: Any


def kv_head_specs(operands: Operands, seq_len: int, group: int, head_dim: int) -> Operands:
  """BlockSpecs that give a program of grid (tile, batch, kv head) its (batch, kv head) of each operand."""
  def per_head(*shape):
    return pl.BlockSpec((None, seq_len, None, *shape), lambda i, b, k: (b, 0, k) + (0,) * len(shape))

  if operands.segment_span is not None:
    raise ValueError("segment_span is not a kernel operand: the launcher replaces it by segment_blocks.")
  num_slots = 0 if operands.depth_k is None else operands.depth_k.shape[2]
  depth = pl.BlockSpec((None, seq_len, num_slots, None, head_dim), lambda i, b, k: (b, 0, 0, k, 0))
  num_programs = 0 if operands.segment_blocks is None else operands.segment_blocks.shape[1]
  specs = Operands(q=per_head(group, head_dim), k=per_head(head_dim), v=per_head(head_dim),
                   depth_q=per_head(group, head_dim), depth_k=depth, depth_v=depth,
                   depth_bounds=pl.BlockSpec((2,), lambda i, b, k: (0,)),
                   segment_ids=pl.BlockSpec((None, seq_len), lambda i, b, k: (b, 0)),
                   segment_blocks=segment_blocks_spec(num_programs))
  return Operands(*(None if x is None else s for x, s in zip(operands, specs)))


def segment_blocks_spec(num_programs: int):
  """The BlockSpec giving every program of a grid (tile, batch, head) its batch row of segment_blocks."""
  return pl.BlockSpec((None, num_programs, 2), lambda i, b, h: (b, 0, 0))


def row_grads_specs(seq_len: int, group: int, head_dim: int) -> RowGrads:
  per_head = lambda *shape: pl.BlockSpec((None, seq_len, None, *shape), lambda i, b, k: (b, 0, k) + (0,) * len(shape))
  return RowGrads(do=per_head(group, head_dim), lse=per_head(group), delta=per_head(group))


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Static sizes of one launch."""
  seq_len: int        # T
  num_slots: int      # L (0 without depth)
  group: int          # G
  group_padded: int   # Gp = next_pow2(G)
  head_dim: int       # D (already a power of two >= 16)
  block_q: int        # folded rows per tile
  block_k: int        # keys per sequence step
  depth_cols: int     # depth columns per depth step
  depth_rows: int = 0  # rows per depth-phase part (0: the whole tile)

  @property
  def tokens_per_tile(self) -> int:
    return self.block_q // self.group_padded

  @property
  def slots_per_step(self) -> int:
    return max(1, self.depth_cols // self.tokens_per_tile)

  @property
  def num_q_tiles(self) -> int:
    return pl.cdiv(self.seq_len, self.tokens_per_tile)


def make_geometry(q_shape_BTKGD, num_slots: int, blocks, depth_chunk: int = 1) -> Geometry:
  """`depth_chunk` C > 1 widens depth parts to whole chunks (C * Gp rows): a part's dense depth columns
  then cover every token its rows may see (the caller checked that C divides the tile's tokens)."""
  _, seq_len, _, group, head_dim = q_shape_BTKGD
  group_padded = next_pow2(group)
  depth_rows = blocks.depth_rows and max(blocks.depth_rows, depth_chunk * group_padded)
  return Geometry(seq_len=seq_len, num_slots=num_slots, group=group, group_padded=group_padded,
                  head_dim=head_dim, block_q=blocks.block_q, block_k=blocks.block_k,
                  depth_cols=blocks.depth_cols, depth_rows=depth_rows)


@dataclasses.dataclass(frozen=True)
class Rows:
  """Folded query rows of one tile: token, head-in-group and validity, each [block_q]."""
  token: jax.Array
  head: jax.Array
  valid: jax.Array


def tile_rows(first_token, geom: Geometry) -> Rows:
  r = jnp.arange(geom.block_q)
  token = first_token + r // geom.group_padded
  head = r % geom.group_padded
  return Rows(token, head, (head < geom.group) & (token < geom.seq_len))


def split_rows(first_token, values, geom: Geometry):
  """Splits a tile's row-major values (a pytree of [block_q, ...] arrays) into parts of `depth_rows` rows.

  Returns [(first token of the part, the part's geometry (block_q = depth_rows), the part's values)].
  Parts hold whole tokens (depth_rows >= Gp) and whole depth chunks, so each part's depth slots are its own.
  """
  part_rows = geom.depth_rows or geom.block_q
  num_parts = geom.block_q // part_rows
  if num_parts == 1:
    return [(first_token, geom, values)]
  part_geom = dataclasses.replace(geom, block_q=part_rows)
  leaves, treedef = jax.tree.flatten(values)
  split = [jnp.split(leaf, num_parts, axis=0) for leaf in leaves]
  return [(first_token + i * part_geom.tokens_per_tile, part_geom,
           jax.tree.unflatten(treedef, [parts[i] for parts in split])) for i in range(num_parts)]


def load_rows(ref, rows: Rows, geom: Geometry):
  """[block_q, D] rows of a [T, G, D] ref, zero for padding rows."""
  d = jnp.arange(geom.head_dim)[None, :]
  return plgpu.load(ref.at[rows.token[:, None], rows.head[:, None], d], mask=rows.valid[:, None], other=0.0)


def store_rows(ref, rows: Rows, value, geom: Geometry):
  d = jnp.arange(geom.head_dim)[None, :]
  plgpu.store(ref.at[rows.token[:, None], rows.head[:, None], d], value.astype(ref.dtype),
              mask=rows.valid[:, None])


def load_row_stat(ref, rows: Rows):
  """[block_q] entries of a [T, G] float32 ref (lse or delta), zero for padding rows."""
  return plgpu.load(ref.at[rows.token, rows.head], mask=rows.valid, other=0.0)


def store_row_stat(ref, rows: Rows, value):
  plgpu.store(ref.at[rows.token, rows.head], value, mask=rows.valid)


def load_segments(ref, token, geom: Geometry, *, other: int):
  """Segment ids at `token` (any shape) of a [T] ref; `other` past T (queries and keys use different ones)."""
  if ref is None:
    return None
  return plgpu.load(ref.at[token], mask=token < geom.seq_len, other=other)


def program_segment_blocks(ref, program):
  """(first, end) of this program's row of the [programs, 2] segment_blocks ref; None without segments."""
  if ref is None:
    return None
  return ref[program, 0], ref[program, 1]


def key_block_range(first_token, causal: bool, geom: Geometry, segment_range=None):
  """`block_ranges.key_block_range` of the query tile starting at `first_token`, in this geometry's tiles:
  (first, num_free, end); `segment_range` from `program_segment_blocks` of
  `block_ranges.segment_blocks(span, tokens_per_tile, block_k)`."""
  return block_ranges.key_block_range(first_token, tile_tokens=geom.tokens_per_tile, block_keys=geom.block_k,
                                      seq_len=geom.seq_len, causal=causal, segment_range=segment_range)


def query_tile_range(start, causal: bool, geom: Geometry, segment_range=None):
  """`block_ranges.query_tile_range` of the key block starting at `start`, in this geometry's tiles:
  (first, num_masked, end); `segment_range` from `program_segment_blocks` of
  `block_ranges.segment_blocks(span, block_k, tokens_per_tile)`."""
  return block_ranges.query_tile_range(start, block_keys=geom.block_k, tile_tokens=geom.tokens_per_tile,
                                       seq_len=geom.seq_len, causal=causal, segment_range=segment_range)


def sequence_mask(spec: spec_lib.Spec, q_token, k_token, q_segment, k_segment, shape, *, masked: bool):
  """The visibility of a block of sequence logits of `shape` (None: all visible), from `spec`.

  The token / segment arrays are already laid out to broadcast to `shape`. `masked=False` is a block the
  tile-skipping (`key_block_range`, `query_tile_range`) knows visible by position, so only the segments
  are compared.
  """
  if masked:
    visible = spec_lib.sequence_visible(spec, q_token, k_token, q_segment, k_segment)
  elif q_segment is not None:
    visible = spec_lib.same_segment(q_segment, k_segment)
  else:
    return None
  return jnp.broadcast_to(visible, shape)


def load_keys(ref, start, geom: Geometry, *, bounded: bool):
  """[block_k, D] contiguous keys (or values) from `start`; `bounded` zero-fills keys >= T."""
  if not bounded and geom.block_k <= geom.seq_len:
    return ref[pl.ds(start, geom.block_k), :]
  cols = start + jnp.arange(geom.block_k)
  return plgpu.load(ref.at[pl.ds(start, geom.block_k), :], mask=(cols < geom.seq_len)[:, None], other=0.0)


def depth_bounds(ref):
  """(depth_start, depth_len) from the [2] int32 ref."""
  return ref[0], ref[1]


def depth_step_range(depth_start, depth_len, geom: Geometry):
  """[first, end) of the depth steps that hold readable slots: slots outside [depth_start, depth_len) of
  the other steps are never loaded or computed."""
  per = geom.slots_per_step
  return depth_start // per, (depth_len + per - 1) // per


@dataclasses.dataclass(frozen=True)
class DepthCols:
  """Depth columns of one depth step: c = n * slots_per_step + j is token t0 + n, slot l0 + j."""
  token: jax.Array     # [depth_cols]
  slot: jax.Array      # [depth_cols]
  readable: jax.Array  # [depth_cols] spec.depth_slot_visible
  load: jax.Array      # [depth_cols] readable and token < T: the gather's mask


def depth_cols(first_token, step, depth_start, depth_len, geom: Geometry) -> DepthCols:
  per = geom.slots_per_step
  c = jnp.arange(geom.tokens_per_tile * per)
  token = first_token + c // per
  slot = step * per + c % per
  readable = spec_lib.depth_slot_visible(slot, depth_start, depth_len)
  return DepthCols(token, slot, readable, readable & (token < geom.seq_len))


def depth_mask(spec: spec_lib.Spec, rows: Rows, cols: DepthCols, q_segment=None, k_segment=None):
  """[block_q, depth_cols]: which depth logits of a step each row sees, from `spec` (its tokens' readable
  slots). Segments matter only across tokens (depth_chunk > 1); pass None otherwise."""
  token_visible = spec_lib.depth_token_visible(spec, rows.token[:, None], cols.token[None, :],
                                               None if q_segment is None else q_segment[:, None],
                                               None if k_segment is None else k_segment[None, :])
  return token_visible & cols.readable[None, :]


def load_depth(ref, cols: DepthCols, geom: Geometry):
  """[depth_cols, D] gathered depth keys (or values), zero where the column is not loaded."""
  d = jnp.arange(geom.head_dim)[None, :]
  return plgpu.load(ref.at[cols.token[:, None], cols.slot[:, None], d], mask=cols.load[:, None], other=0.0)


def store_depth(ref, cols: DepthCols, value, geom: Geometry, acc=None):
  """Stores [depth_cols, D] float32 `value` at the columns' (token, slot).

  Without `acc`: at every column with t < T and slot < L (unreadable columns carry value's zeros; the
  slot bound matters: slot L of token t is slot 0 of token t + 1 in memory). With `acc` (`load_depth` of
  the cotangent being added into, the same buffer as `ref`): value + acc at the loaded columns only, so
  every other slot keeps its value.
  """
  d = jnp.arange(geom.head_dim)[None, :]
  if acc is None:
    keep = (cols.token < geom.seq_len) & (cols.slot < geom.num_slots)
  else:
    keep, value = cols.load, value + acc.astype(jnp.float32)
  plgpu.store(ref.at[cols.token[:, None], cols.slot[:, None], d], value.astype(ref.dtype), mask=keep[:, None])


def store_token_slot(ref, first_token, slot, value_ND, geom: Geometry):
  """Stores [tokens_per_tile, D] at (first_token + n, slot) of a [T, L, D] ref, skipping t >= T, slot >= L."""
  token = first_token + jnp.arange(geom.tokens_per_tile)
  slot_N = jnp.full_like(token, slot)
  d = jnp.arange(geom.head_dim)[None, :]
  keep = (token < geom.seq_len) & (slot_N < geom.num_slots)
  plgpu.store(ref.at[token[:, None], slot_N[:, None], d], value_ND.astype(ref.dtype), mask=keep[:, None])


def never_visible(m):
  """[rows] bool: rows whose running max never left MASK_VALUE, i.e. that saw no visible entry."""
  return m == MASK_VALUE


def dot(a, b, *, trans_a: bool = False, trans_b: bool = False):
  """2D matmul with float32 accumulation; float32 operands stay IEEE float32 (no TF32)."""
  return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=jax.lax.Precision.HIGHEST)
