"""pallas_triton's segment skipping: loops confined to the tiles that hold a tile's segments, exactly.

The kernels skip key blocks (forward, dq) and query tiles (dk/dv) outside [first, last] of the segments of
their tokens (`spec.segment_span`, `block_ranges.segment_blocks`). Checked three ways: the span and the
per-tile bounds against brute force over the ids (tight: the first and the last unit of the bounds hold a
token of a segment of the tile; exact: no such token lies outside); the kernels' loop ranges against the
visibility of every (query, key) pair, by brute force; and out, lse and every gradient against the float64
oracle on layouts where a wrong bound drops visible keys: an id in two separated runs (a bound from run
starts or run ends misses the other run), documents with padding, T not a multiple of any tile, several
batch rows with different layouts, and tiles that differ between the kernels (each must use its own); with
depth (traced depth_len, garbage in the unread slots, chunk-visible depth) and without.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import operator_cases as oc
import segment_layouts as sl
from pallas_kernels import block_ranges, spec as spec_lib, triton
from pallas_kernels import triton_tiles as tt
from pallas_kernels.block_sizes import BlockSizes, KernelBlocks


@pytest.mark.parametrize("layout", list(sl.LAYOUTS))
def test_segment_span_is_first_and_last_occurrence(layout):
  ids = sl.ids([layout, "two_runs"], 53)
  first, last = jax.jit(spec_lib.segment_span)(jnp.asarray(ids))
  for row, ids_T in enumerate(ids):
    want_first, want_last = sl.brute_span(ids_T)
    np.testing.assert_array_equal(first[row], want_first)
    np.testing.assert_array_equal(last[row], want_last)


@pytest.mark.parametrize("seq_len, tile_tokens, unit_tokens", [(53, 4, 16), (53, 16, 4), (64, 8, 8), (47, 64, 16)])
def test_segment_blocks_are_tight_and_exact(seq_len, tile_tokens, unit_tokens):
  ids = sl.ids(list(sl.LAYOUTS), seq_len)
  got = np.asarray(block_ranges.segment_blocks(sl.span(ids), tile_tokens, unit_tokens))
  num_tiles = -(-seq_len // tile_tokens)
  assert got.shape == (len(ids), num_tiles, 2) and got.dtype == np.int32
  for row, ids_T in enumerate(ids):
    for tile in range(num_tiles):
      tile_ids = ids_T[tile * tile_tokens:(tile + 1) * tile_tokens]  # real tokens only: t < T
      tokens = np.nonzero(np.isin(ids_T, tile_ids))[0]                # every token of the tile's segments
      # The first and last unit holding one of those tokens: nothing narrower covers them all.
      np.testing.assert_array_equal(got[row, tile], [tokens.min() // unit_tokens, tokens.max() // unit_tokens + 1],
                                    err_msg=f"row {row} tile {tile}")


def _geometry(seq_len, tokens_per_tile, block_k):
  return tt.Geometry(seq_len=seq_len, num_slots=0, group=1, group_padded=1, head_dim=16,
                     block_q=tokens_per_tile, block_k=block_k, depth_cols=16)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("tokens_per_tile, block_k", [(4, 16), (16, 4), (8, 8)])
def test_loop_ranges_cover_every_visible_pair_and_free_steps_are_visible_by_position(causal, tokens_per_tile,
                                                                                   block_k):
  # The in-kernel ranges of both loop kinds, evaluated outside the kernel on each tile's segment_blocks.
  seq_len = 53
  geom = _geometry(seq_len, tokens_per_tile, block_k)
  ids = sl.ids(list(sl.LAYOUTS), seq_len)
  key_blocks = np.asarray(block_ranges.segment_blocks(sl.span(ids), tokens_per_tile, block_k))
  query_tiles = np.asarray(block_ranges.segment_blocks(sl.span(ids), block_k, tokens_per_tile))
  index = np.arange(seq_len)
  for row, ids_T in enumerate(ids):
    visible = sl.visible(ids_T, causal)
    for tile in range(geom.num_q_tiles):
      first, num_free, end = (int(x) for x in tt.key_block_range(tile * tokens_per_tile, causal, geom,
                                                                 tuple(key_blocks[row, tile])))
      queries = (index // tokens_per_tile) == tile
      seen_blocks = np.unique(index[visible[queries].any(0)] // block_k)
      assert first <= seen_blocks.min() and seen_blocks.max() < end, (row, tile)
      # Free blocks hold real keys that every query of the tile sees by position (only segments to compare).
      assert first <= num_free <= end and num_free * block_k <= seq_len
      assert not causal or num_free * block_k <= tile * tokens_per_tile
    for block in range(-(-seq_len // block_k)):
      first, num_masked, end = (int(x) for x in tt.query_tile_range(block * block_k, causal, geom,
                                                                    tuple(query_tiles[row, block])))
      keys = (index // block_k) == block
      seen_tiles = np.unique(index[visible[:, keys].any(1)] // tokens_per_tile)
      assert first <= seen_tiles.min() and seen_tiles.max() < end, (row, block)
      # Unmasked tiles start after the block's last key: they see all of it by position.
      assert first <= num_masked <= end
      if causal and num_masked < end:
        assert num_masked * tokens_per_tile >= min((block + 1) * block_k, seq_len)
      if not causal:
        assert num_masked == first


# Tiles that differ between the kernels: G = 3 pads to 4 rows per token, so the forward's query tiles hold 8
# tokens against 16-key blocks, the dq kernel's 4 tokens against 32-key blocks, the dk/dv kernel's 16-key
# blocks against tiles of 4 tokens (per kv head) or 16 tokens (per query head).
def _tiles(*, separate, per_query_head):
  return BlockSizes(fwd=KernelBlocks(block_q=32, block_k=16, depth_cols=16),
                    dq=KernelBlocks(block_q=16, block_k=32, depth_cols=16, separate_depth_kernel=separate),
                    dkv=KernelBlocks(block_q=16, block_k=16, depth_cols=16, per_query_head=per_query_head))


# (name, layouts of the two batch rows, T, causal, G, L, depth_chunk, tiles): T = 53 and 37 end mid-tile and
# mid-block. Chunks of 4 tokens fit the smallest query tile (the dq kernel's 4 tokens); their depth reads
# the segment ids of other tokens, and its loops are not bounded by segments.
_CASES = [
    ("two_runs_documents_causal_depth", ("two_runs", "documents_padding"), 53, True, 3, 5, None,
     dict(separate=False, per_query_head=False)),
    ("two_runs_shuffled_noncausal_depth", ("two_runs", "shuffled"), 53, False, 3, 5, None,
     dict(separate=True, per_query_head=True)),
    ("single_own_ids_causal", ("single_document", "own_ids"), 37, True, 2, 0, None,
     dict(separate=False, per_query_head=True)),
    ("documents_interleaved_noncausal_g1", ("documents_padding", "interleaved"), 53, False, 1, 5, None,
     dict(separate=True, per_query_head=False)),
    ("two_runs_interleaved_chunk4", ("interleaved", "two_runs"), 53, True, 3, 5, 4,
     dict(separate=False, per_query_head=True)),
]


@pytest.mark.parametrize("name, layouts, seq_len, causal, group, slots, depth_chunk, tiles", _CASES,
                         ids=[c[0] for c in _CASES])
def test_skipping_matches_oracle(name, layouts, seq_len, causal, group, slots, depth_chunk, tiles):
  case, inputs = sl.case_inputs(name, layouts, seq_len, causal, group, slots, depth_chunk=depth_chunk)
  blocks = _tiles(**tiles)
  out, lse, grads = sl.out_lse_grads(
      case, inputs, lambda prepared, spec: triton.attention(prepared, spec, interpret=True, block_sizes=blocks))
  oc.assert_matches_oracle(case, inputs, out, lse, grads)


def test_oracle_layouts_skip_and_defeat_run_bounds():
  # The oracle cases are a test of skipping only if their tiles skip, and one of bounds by first and last
  # occurrence only if bounds by runs would drop visible keys there.
  ids_T = sl.two_runs(53).astype(np.int32)
  # The oracle cases' tiles: forward, dq, dk/dv per kv head and per query head.
  for tile_tokens, unit_tokens in ((8, 16), (4, 32), (16, 4), (16, 16)):
    got = np.asarray(block_ranges.segment_blocks(sl.span(ids_T[None]), tile_tokens, unit_tokens))[0]
    by_runs = sl.run_bounds(ids_T, tile_tokens, unit_tokens)
    assert (got[:, 0] > 0).any() or (got[:, 1] < -(-53 // unit_tokens)).any(), "nothing skipped"
    assert (by_runs[:, 0] > got[:, 0]).any() and (by_runs[:, 1] < got[:, 1]).any()
