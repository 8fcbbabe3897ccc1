"""Index math shared by the Triton MoDA kernels: folded rows, token/slot columns, gathered loads.

Inside a kernel, for one (batch, kv head) the refs are views of the native layouts:
  q, o, do   [T, G, D]   (q [B, T, Hq, D] reshaped to [B, T, Hk, G, D]; query head h = k * G + g)
  lse, delta [T, G]
  k, v       [T, D]
  depth k/v  [T, L, D]
A query tile is `block_q` folded rows r = n * Gp + g (token t0 + n, head g). Rows with g >= G or t >= T are
padding: loaded as zero and never stored. Gathers index every axis with an array (interpret mode only
discharges all-array or all-slice indexers) and are left unclamped so that masked-out stores never alias a
real element (interpret mode scatters them; out-of-range indices are dropped there and masked on the GPU).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.block_sizes import next_pow2

LOG2E = math.log2(math.e)
# Finite, so a fully masked block gives exp2(0) = 1 instead of NaN; the next real key rescales it to 0.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


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
  depth_cols: int     # depth columns per depth step ("dense" mode)
  depth_mode: str = "dense"
  per_token_slots: int = 2
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


def make_geometry(q_shape_BTKGD, num_slots: int, blocks) -> Geometry:
  _, seq_len, _, group, head_dim = q_shape_BTKGD
  return Geometry(seq_len=seq_len, num_slots=num_slots, group=group, group_padded=next_pow2(group),
                  head_dim=head_dim, block_q=blocks.block_q, block_k=blocks.block_k,
                  depth_cols=blocks.depth_cols, depth_mode=blocks.depth_mode,
                  per_token_slots=blocks.per_token_slots, depth_rows=blocks.depth_rows)


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
  Parts hold whole tokens (depth_rows >= Gp), so each part's depth slots are its own.
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


def key_block_range(first_token, causal: bool, geom: Geometry):
  """(num_free, num_blocks) for the query tile starting at `first_token`: key blocks [0, num_free)
  need no mask; [num_free, num_blocks) need the causal / padding mask; later ones are invisible."""
  if causal:
    last_token = jnp.minimum(first_token + geom.tokens_per_tile, geom.seq_len)
    return first_token // geom.block_k, (last_token + geom.block_k - 1) // geom.block_k
  return geom.seq_len // geom.block_k, pl.cdiv(geom.seq_len, geom.block_k)


def load_keys(ref, start, geom: Geometry, *, bounded: bool):
  """[block_k, D] contiguous keys (or values) from `start`; `bounded` zero-fills keys >= T."""
  if not bounded and geom.block_k <= geom.seq_len:
    return ref[pl.ds(start, geom.block_k), :]
  cols = start + jnp.arange(geom.block_k)
  return plgpu.load(ref.at[pl.ds(start, geom.block_k), :], mask=(cols < geom.seq_len)[:, None], other=0.0)


@dataclasses.dataclass(frozen=True)
class DepthCols:
  """Depth columns of one depth step: c = n * slots_per_step + j is token t0 + n, slot l0 + j."""
  token: jax.Array   # [depth_cols]
  slot: jax.Array    # [depth_cols]
  local: jax.Array   # [depth_cols] token index inside the tile
  valid: jax.Array   # [depth_cols] token < T and slot < depth_len


def depth_cols(first_token, step, depth_len, geom: Geometry) -> DepthCols:
  per = geom.slots_per_step
  c = jnp.arange(geom.tokens_per_tile * per)
  local = c // per
  token = first_token + local
  slot = step * per + c % per
  return DepthCols(token, slot, local, (token < geom.seq_len) & (slot < depth_len))


def load_depth(ref, cols: DepthCols, geom: Geometry):
  """[depth_cols, D] gathered depth keys (or values), zero where the column is invalid."""
  d = jnp.arange(geom.head_dim)[None, :]
  return plgpu.load(ref.at[cols.token[:, None], cols.slot[:, None], d], mask=cols.valid[:, None], other=0.0)


def store_depth(ref, cols: DepthCols, value, geom: Geometry, *, in_range):
  d = jnp.arange(geom.head_dim)[None, :]
  plgpu.store(ref.at[cols.token[:, None], cols.slot[:, None], d], value.astype(ref.dtype),
              mask=in_range[:, None])


def load_token_slot(ref, rows: Rows, slot, depth_len, geom: Geometry):
  """[block_q, D]: for every row, slot `slot` of its own token ("per_token" mode); 0 if unwritten."""
  d = jnp.arange(geom.head_dim)[None, :]
  slot_BR = jnp.full_like(rows.token, slot)
  keep = rows.valid & (slot < depth_len)
  return plgpu.load(ref.at[rows.token[:, None], slot_BR[:, None], d], mask=keep[:, None], other=0.0)


def store_token_slot(ref, first_token, slot, value_ND, geom: Geometry):
  """Stores [tokens_per_tile, D] at (first_token + n, slot) of a [T, L, D] ref, skipping t >= T, slot >= L.

  The slot bound matters: slot L of token t is slot 0 of token t + 1 in memory.
  """
  token = first_token + jnp.arange(geom.tokens_per_tile)
  slot_N = jnp.full_like(token, slot)
  d = jnp.arange(geom.head_dim)[None, :]
  keep = (token < geom.seq_len) & (slot_N < geom.num_slots)
  plgpu.store(ref.at[token[:, None], slot_N[:, None], d], value_ND.astype(ref.dtype), mask=keep[:, None])


def sum_over_group(x_RD, geom: Geometry):
  """[block_q, D] folded rows -> [tokens_per_tile, D]: sums the Gp rows of each token."""
  if geom.group_padded == 1:
    return x_RD
  return jnp.sum(x_RD.reshape(geom.tokens_per_tile, geom.group_padded, x_RD.shape[1]), axis=1)


def row_dot(a, b):
  """[R]: per-row dot products of two [R, D] tiles on the CUDA cores, in float32."""
  return jnp.sum(a.astype(jnp.float32) * b.astype(jnp.float32), axis=1)


def depth_visible(rows_local_token, cols: DepthCols):
  """[block_q, depth_cols]: a row sees a depth column only of its own token (and a written slot)."""
  return (rows_local_token[:, None] == cols.local[None, :]) & cols.valid[None, :]


def dot(a, b, *, trans_a: bool = False, trans_b: bool = False):
  """2D matmul with float32 accumulation; float32 operands stay IEEE float32 (no TF32)."""
  return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=jax.lax.Precision.HIGHEST)
