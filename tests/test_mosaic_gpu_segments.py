"""pallas_mosaic_gpu's segment skipping: each CTA streams, and each compute warpgroup consumes, only the key
blocks (forward, dq) or query row tiles (dk/dv) that may hold its rows' (keys') segments, exactly.

Checked as pallas_triton's (tests/test_triton_segments.py; the layouts are shared, tests/segment_layouts.py),
two ways. The per-CTA streams and per-warpgroup loops (`mosaic_gpu_stream`, evaluated outside the kernels
on the launchers' bounds) by brute force: each warpgroup's loop covers every (query, key) pair its rows
(keys) see and lies inside its CTA's stream in order, so that its four loops count the items streamed
(another count deadlocks the GPU); blocks run without the causal mask are visible by position; a
warpgroup wholly past T has an empty loop; for contiguous documents loops and streams are tight (their
first and last block hold a visible pair). Then out, lse and every gradient against the float64 oracle in
Mosaic GPU interpret mode, on layouts where a wrong bound drops visible keys: an id in two separated runs,
documents with padding, the rows' padding id (0) in a first document that the last tile's loop skips (the
backward's lse of rows past T), T not a multiple of any tile (warpgroups wholly past T), G 1 to 3, causal
and not, D 128 (one dq warpgroup), traced depth_len with garbage in the unread slots, and tiles that differ
between the kernels (each must use its own).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

import operator_cases as oc
import segment_layouts as sl
from pallas_kernels import block_ranges, mosaic_gpu, spec as spec_lib
from pallas_kernels import mosaic_gpu_stream as stream
from pallas_kernels import mosaic_gpu_tiles as mt

_UNIT = 3  # the shared layouts' documents, scaled to 16-token warpgroups and 32-key blocks (T >= 138)
# The rows' padding id in a first document of whole 32-key blocks, then one document to the end.
_LAYOUTS = {**sl.LAYOUTS, "padding_id_first": lambda t, unit=1: (np.arange(t) >= 32).astype(int)}
_CONTIGUOUS = (*sl.CONTIGUOUS, "padding_id_first")
_SEQ_LEN = 150  # ends mid-tile for every tile here; G 1 and 2 leave the last CTA a warpgroup past T


@pytest.mark.parametrize("seq_len, tile_tokens, unit_tokens", [(53, 4, 16), (53, 16, 4), (64, 8, 8), (47, 64, 16)])
def test_run_blocks_are_the_units_joined_to_a_tile_by_its_own_id(seq_len, tile_tokens, unit_tokens):
  # A unit is run without a mask iff the tile's real tokens and the unit, with everything between them,
  # hold one id and the unit lies inside T; a tile of several ids, or wholly past T, has none.
  ids = sl.ids(list(sl.LAYOUTS), seq_len)
  num_tiles = pl.cdiv(seq_len, tile_tokens) + 1
  got = np.asarray(block_ranges.run_blocks(jnp.asarray(ids), tile_tokens, unit_tokens, num_tiles))
  assert got.shape == (len(ids), num_tiles, 2) and got.dtype == np.int32
  for row, ids_T in enumerate(ids):
    for tile in range(num_tiles):
      t0, t1 = tile * tile_tokens, min((tile + 1) * tile_tokens, seq_len) - 1
      want = set()
      if t0 < seq_len:
        for u in range(seq_len // unit_tokens):
          stretch = ids_T[min(u * unit_tokens, t0):max((u + 1) * unit_tokens - 1, t1) + 1]
          if (stretch == ids_T[t0]).all():
            want.add(u)
      assert set(range(*got[row, tile])) == want, (row, tile, got[row, tile], sorted(want))


def _streams(kind, bounds, row, spec, geom):
  """Per CTA of the forward / dq ("keys": rows step over key blocks) or dk/dv ("queries": keys over query row
  tiles) kernel: (its stream (lo, hi), [(first row or key of warpgroup w, its confined loop)])."""
  own, loop_of, num_ctas = ((geom.tokens, stream.key_blocks, geom.num_q_tiles) if kind == "keys" else
                            (mt.ROWS, stream.query_tiles, pl.cdiv(geom.seq_len, geom.compute_wgs * mt.ROWS)))
  loop = lambda first: loop_of(first, bounds, row, spec, geom)
  ints = lambda xs: tuple(int(x) for x in xs)
  for cta in range(num_ctas):
    cta_first = cta * geom.compute_wgs * own
    lo_hi = stream.cta_stream(loop, cta_first, own, geom)
    firsts = [cta_first + w * own for w in range(geom.compute_wgs)]
    yield ints(lo_hi), [(first, ints(stream.confine(loop(first), lo_hi))) for first in firsts]


@pytest.mark.parametrize("kind", ["keys", "queries"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("group, block_kv, compute_wgs", [(1, 32, 2), (2, 64, 2), (3, 32, 2), (3, 128, 1)])
def test_loops_cover_every_visible_pair_inside_the_stream_and_are_tight_for_documents(kind, causal, group,
                                                                                      block_kv, compute_wgs):
  geom = mt.make_geometry(_SEQ_LEN, 0, group, 64, mt.MosaicBlocks(block_kv=block_kv, compute_wgs=compute_wgs), True)
  spec = spec_lib.Spec(seq_len=_SEQ_LEN, num_slots=0, causal=causal, scale=1.0, has_segments=True)
  ids = sl.ids(list(_LAYOUTS), _SEQ_LEN, _UNIT, _LAYOUTS)
  if kind == "keys":
    bounds, own, unit = stream.key_bounds(sl.span(ids), np.asarray(ids), geom), geom.tokens, block_kv
  else:
    key_tiles = pl.cdiv(_SEQ_LEN, compute_wgs * mt.ROWS) * compute_wgs
    bounds, own, unit = stream.query_bounds(sl.span(ids), key_tiles, geom), mt.ROWS, geom.tokens
  bounds, index = np.asarray(bounds), np.arange(_SEQ_LEN)
  no_mask_blocks = dict.fromkeys(_LAYOUTS, 0)
  for row, (name, ids_T) in enumerate(zip(_LAYOUTS, ids)):
    # [own, other]: queries x keys for the key loops, keys x queries for the query loops.
    seen_by, by_position = sl.visible(ids_T, causal), sl.visible(np.zeros_like(ids_T), causal)
    if kind == "queries":
      seen_by, by_position = seen_by.T, by_position.T
    for (lo, hi), loops in _streams(kind, bounds, row, spec, geom):
      cta_seen = []
      for first_own, loop in loops:
        # Keys: (first, run_first, run_end, split, end), [run_first, run_end) run without any mask.
        first, split, end = loop[0], loop[-2], loop[-1]
        where = f"{name} {kind} from {first_own}"
        assert lo <= first and all(a <= b for a, b in zip(loop, loop[1:])) and end <= hi, where
        mine = (index >= first_own) & (index < first_own + own)
        seen = index[seen_by[mine].any(0)] // unit
        assert ((first <= seen) & (seen < end)).all(), where
        assert mine.any() or first == end, where  # wholly past T: an empty loop
        # The part run without the causal mask (keys: [first, split); queries: [split, end)) is visible by
        # position to every one of mine, and holds no key past T.
        for u in range(first, split) if kind == "keys" else range(split, end):
          assert by_position[np.ix_(mine, index // unit == u)].all(), (where, u)
          assert kind == "queries" or (u + 1) * unit <= _SEQ_LEN, (where, u)
        if kind == "keys":  # the blocks run without any mask: every key seen by every one of mine
          for u in range(loop[1], loop[2]):
            assert seen_by[np.ix_(mine, index // unit == u)].all(), (where, u)
          no_mask_blocks[name] += loop[2] - loop[1]
        if name in _CONTIGUOUS and mine.any():
          assert first == seen.min() and end - 1 == seen.max(), where
        cta_seen.append(seen)
      if name in _CONTIGUOUS:
        assert (lo, hi - 1) == (np.concatenate(cta_seen).min(), np.concatenate(cta_seen).max()), (name, lo, hi)
  if kind == "keys" and causal:  # the long documents' tiles do run blocks without a mask
    assert no_mask_blocks["single_document"] > 0, no_mask_blocks


def _tiles(head_dim):
  """Tiles that differ between the kernels: the forward's 32-key blocks, the dq kernel's 64 (two warpgroups,
  one at D 128), the dk/dv kernel's 64-key warpgroups over row tiles of 64 / Gp tokens."""
  return mt.BlockSizes(fwd=mt.MosaicBlocks(block_kv=32, depth_cols=16, stages=2),
                       dq=mt.MosaicBlocks(block_kv=64, depth_cols=64, stages=3, compute_wgs=2 if head_dim == 64 else 1),
                       dkv=mt.MosaicBlocks(block_kv=64, depth_cols=64, stages=2))


# (name, layouts of the two batch rows, T, causal, G, L, D): T 150 and 143 end mid-tile and mid-block.
_CASES = [
    ("two_runs_padding_id_first_causal_g3_depth", ("two_runs", "padding_id_first"), 150, True, 3, 5, 64),
    ("documents_shuffled_noncausal_g1_depth", ("documents_padding", "shuffled"), 150, False, 1, 5, 64),
    ("own_ids_two_runs_causal_g2", ("own_ids", "two_runs"), 143, True, 2, 0, 64),
    ("interleaved_documents_noncausal_g2_d128_depth", ("interleaved", "documents_padding"), 143, False, 2, 5, 128),
]


def _matches_oracle(case, inputs, head_dim):
  tiles = _tiles(head_dim)
  out, lse, grads = sl.out_lse_grads(
      case, inputs, lambda prepared, spec: mosaic_gpu.attention(prepared, spec, interpret=True, block_sizes=tiles))
  oc.assert_matches_oracle(case, inputs, out, lse, grads)


@pytest.mark.parametrize("name, layouts, seq_len, causal, group, slots, head_dim", _CASES, ids=[c[0] for c in _CASES])
def test_skipping_matches_oracle(name, layouts, seq_len, causal, group, slots, head_dim):
  case, inputs = sl.case_inputs(name, layouts, seq_len, causal, group, slots, unit=_UNIT, table=_LAYOUTS,
                                kv_heads=1, head_dim=head_dim, dtype="bfloat16")
  _matches_oracle(case, inputs, head_dim)


@pytest.mark.parametrize("segments", [True, False])
def test_warpgroup_wholly_past_t_matches_oracle(segments):
  # G 1, T 20: the second warpgroup of the forward and dq kernels and of the dk/dv kernel holds no real row
  # or key (an empty loop with segments; without, more blocks visible by position than its CTA streams,
  # which hung before its loop was confined to the stream).
  case, inputs = sl.case_inputs("past_t", ("single_document", "interleaved"), 20, True, 1, 0, kv_heads=1,
                                head_dim=64, dtype="bfloat16")
  _matches_oracle(case, inputs if segments else inputs._replace(segment_ids=None), 64)


@pytest.mark.parametrize("name, layouts, seq_len, causal, group, slots, head_dim", _CASES, ids=[c[0] for c in _CASES])
def test_oracle_cases_skip_and_defeat_run_bounds(name, layouts, seq_len, causal, group, slots, head_dim):
  # An oracle case is a test of a kernel's skipping only if its tiles skip there, and one of bounds by first
  # and last occurrence only if bounds by runs would drop visible keys (at both ends) in one of its rows.
  ids = sl.ids(layouts, seq_len, _UNIT, _LAYOUTS)
  tiles, tokens = _tiles(head_dim), mt.ROWS // min(mt.next_pow2(group), mt.MAX_HEADS_PER_TILE)
  for kernel, tile_tokens, unit_tokens in (("fwd", tokens, tiles.fwd.block_kv), ("dq", tokens, tiles.dq.block_kv),
                                           ("dkv", mt.ROWS, tokens)):
    got = np.asarray(block_ranges.segment_blocks(sl.span(ids), tile_tokens, unit_tokens))
    assert ((got[..., 0] > 0) | (got[..., 1] < pl.cdiv(seq_len, unit_tokens))).any(), f"{kernel}: nothing skipped"
    by_runs = [sl.run_bounds(ids_T, tile_tokens, unit_tokens) for ids_T in ids]
    assert any((runs[:, 0] > ours[:, 0]).any() and (runs[:, 1] < ours[:, 1]).any()
               for runs, ours in zip(by_runs, got)), kernel


def test_oracle_cases_run_blocks_without_a_mask_in_both_key_loop_kernels():
  # The no-mask part of the forward's and the dq kernel's loops (`mosaic_gpu_stream.key_blocks`) is tested
  # against the oracle only if some case's warpgroups run it.
  runs_without_mask = {"fwd": 0, "dq": 0}
  for _, layouts, seq_len, causal, group, _, head_dim in _CASES:
    ids = np.asarray(sl.ids(layouts, seq_len, _UNIT, _LAYOUTS))
    tiles = _tiles(head_dim)
    for kernel in runs_without_mask:
      geom = mt.make_geometry(seq_len, 0, group, head_dim, getattr(tiles, kernel), True)
      spec = spec_lib.Spec(seq_len=seq_len, num_slots=0, causal=causal, scale=1.0, has_segments=True)
      bounds = np.asarray(stream.key_bounds(sl.span(ids), ids, geom))
      for row in range(len(ids)):
        for tile in range(geom.row_tiles):
          loop = stream.key_blocks(tile * geom.tokens, bounds, row, spec, geom)
          runs_without_mask[kernel] += int(loop[2]) - int(loop[1])
  assert all(runs_without_mask.values()), runs_without_mask
