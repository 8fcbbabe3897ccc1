"""Packed documents as cuDNN's ragged (THD) layout describes them: each row's segment runs as offsets.

`moda_attention`'s rule for segments (`spec.sequence_visible`): a query sees the keys of its own segment
id, wherever they lie in the row. cuDNN's packed layout describes a row as at most M contiguous runs
(an offset and a length each; `jax._src.cudnn.fused_attention_stablehlo.dot_product_attention`'s
`q_offsets` / `q_seqlen`), each attended on its own. The two agree exactly when every id of a row is one
contiguous run and a row has at most M runs: then "same id" and "same run" are the same relation, and
cuDNN's causal mask inside a run (offsets shared by queries and keys) is the causal mask of the row.
The training pipeline packs that way (ids 1, 2, ... per document piece, then one padding run of 0), with
at most 6 runs per row at B8 x T4096 over 320 rows of the 700M config's data, at most 4 at B32 x T1024 over
1280 rows of the width-384 study's; `fits` says whether a batch does, so a caller can take another kernel
where it does not.

cuDNN's time grows with the room M a row is given, used or not (BENCHMARKS.md §0j: at B32 x T1024, one run
per row, fwd+bwd 0.55 ms with M = 1 and 1.08 ms with M = 16), so a batch takes the smallest of
`CAPACITIES` that holds every row's runs (`capacity_index`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

# The rooms M (runs per row) a batch may be given, smallest first: each is a cuDNN graph of its own in the
# compiled program. cuDNN's softmax statistics take (B * M, Hq, T) float32, M times the unpacked ones, so
# the largest stays small; a batch with more runs in a row than it takes the fallback (`fits`).
CAPACITIES = (4, 8, 16)
MAX_SEGMENTS = CAPACITIES[-1]


class Packing(NamedTuple):
  """A batch's rows as runs, in the form cuDNN's packed layout takes (B rows, M = max runs per row)."""
  seqlen_BM: jax.Array      # int32: run lengths in row order, -1 past a row's runs
  offsets_BM1: jax.Array    # int32: run starts (token index in the row), -1 past a row's runs
  run_BT: jax.Array         # int32: the run of each token (its index among its row's runs)
  fits: jax.Array           # bool []: every id is one run and no row has more than M runs

  def at_capacity(self, max_segments: int) -> Packing:
    """The same runs with room for `max_segments` (<= M) per row: what `describe` gives at that room
    for a batch whose rows have at most that many runs (`capacity_index` picks one that holds them)."""
    batch = self.seqlen_BM.shape[0]
    offsets_BM1 = jnp.concatenate([self.offsets_BM1[:, :max_segments], jnp.full((batch, 1), -1, jnp.int32)],
                                  axis=1)
    return Packing(self.seqlen_BM[:, :max_segments], offsets_BM1, self.run_BT,
                   self.fits & (self.most_runs() <= max_segments))

  def most_runs(self) -> jax.Array:
    """int32 []: the most runs any row has (those past M included)."""
    return jnp.max(self.run_BT[:, -1]) + 1


def describe(segment_ids_BT: jax.Array, max_segments: int = MAX_SEGMENTS) -> Packing:
  """The runs of every row of `segment_ids_BT` [B, T] (any integer ids), at most `max_segments` each."""
  batch, seq_len = segment_ids_BT.shape
  ids_BT = segment_ids_BT.astype(jnp.int32)
  starts_BT = jnp.concatenate([jnp.ones((batch, 1), bool), ids_BT[:, 1:] != ids_BT[:, :-1]], axis=1)
  run_BT = jnp.cumsum(starts_BT, axis=1, dtype=jnp.int32) - 1
  runs_B = run_BT[:, -1] + 1
  sorted_BT = jnp.sort(ids_BT, axis=1)
  distinct_B = 1 + jnp.sum(sorted_BT[:, 1:] != sorted_BT[:, :-1], axis=1, dtype=jnp.int32)
  fits = jnp.all((runs_B == distinct_B) & (runs_B <= max_segments))

  # Start of run r = the first token whose run is r (T where there is none); runs past M are dropped.
  tokens_BT = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len))
  rows_BT = jnp.broadcast_to(jnp.arange(batch, dtype=jnp.int32)[:, None], (batch, seq_len))
  starts_BM = jnp.full((batch, max_segments + 1), seq_len, jnp.int32).at[rows_BT, run_BT].min(
      tokens_BT, mode="drop")
  present_BM = jnp.arange(max_segments, dtype=jnp.int32)[None, :] < runs_B[:, None]
  seqlen_BM = jnp.where(present_BM, starts_BM[:, 1:] - starts_BM[:, :-1], -1)
  offsets_BM1 = jnp.concatenate([jnp.where(present_BM, starts_BM[:, :-1], -1),
                                 jnp.full((batch, 1), -1, jnp.int32)], axis=1)
  return Packing(seqlen_BM, offsets_BM1, run_BT, fits)


def capacity_index(packing: Packing, capacities: tuple[int, ...] = CAPACITIES) -> jax.Array:
  """int32 []: the index of the smallest of `capacities` (ascending, the last one `packing`'s room M)
  that holds every row's runs, or len(capacities) where none does or an id is split into several runs."""
  if packing.seqlen_BM.shape[1] != capacities[-1]:
    raise ValueError(f"capacity_index: the packing has room for {packing.seqlen_BM.shape[1]} runs per row; "
                     f"expected the largest capacity, {capacities[-1]} (describe(segment_ids, {capacities[-1]})).")
  fitting = jnp.sum(jnp.asarray(capacities, jnp.int32) < packing.most_runs(), dtype=jnp.int32)
  return jnp.where(packing.fits, fitting, len(capacities))


def lse_from_stats(stats_SNT: jax.Array, packing: Packing) -> jax.Array:
  """[B, T, N] softmax statistics from cuDNN's packed ones, (B * M, N, T): one row per run, in batch
  order with the rows' runs packed to the front, each run's tokens from position 0."""
  seq_len = packing.run_BT.shape[1]
  runs_B = jnp.sum(packing.seqlen_BM >= 0, axis=1, dtype=jnp.int32)
  first_run_B = jnp.cumsum(runs_B) - runs_B
  run_BT = packing.run_BT
  packed_run_BT = first_run_B[:, None] + run_BT
  start_BT = jnp.take_along_axis(packing.offsets_BM1, jnp.minimum(run_BT, packing.seqlen_BM.shape[1]), axis=1)
  local_BT = jnp.arange(seq_len, dtype=jnp.int32)[None, :] - start_BT
  return stats_SNT[packed_run_BT, :, local_BT]
