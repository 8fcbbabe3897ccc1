"""The `xla` backend's tiling against the float64 oracle: many blocks, padding, every mask kind.

test_moda_attention.py runs `xla` through the public API, where the 128-token default tile makes
most cases a single block. Here tiny tiles (`max_block`) force many query/key blocks on short inputs,
so the causal loop bounds, the diagonal tile, the padded last tile (causal and not), segment masks
across tile borders and the per-block depth slices are all exercised; with depth_chunk, both depth
layouts of `xla_depth`: chunks inside blocks (C <= max_block) and sliding windows whose gradients
add up across blocks (C > max_block, up to C > T), with segments, depth_start and depth-only.
"""

import functools

import jax
import jax.numpy as jnp
import pytest

from operator_cases import FAST_COMPILE, Case, assert_matches_oracle, make_inputs
from pallas_kernels import api, xla
from pallas_kernels.xla_blocks import choose_block

_CASES = (
    # (case, max_block): T not a multiple of the tile, so the last tile holds padding.
    (Case("causal_g3_l5_traced_garbage", batch=2, seq_len=29, q_heads=3, slots=5, depth_len=2,
          traced=True, garbage=True), 8),
    (Case("noncausal_g2_l16_shuffled", seq_len=23, q_heads=4, kv_heads=2, slots=16, depth_len=16,
          causal=False, segments="shuffled", scale=0.5), 5),
    (Case("causal_packed_no_depth_t1_tiles", seq_len=9, q_heads=2, kv_heads=2, segments="packed"), 1),
    (Case("noncausal_bf16_g4_l40", seq_len=37, q_heads=4, slots=40, depth_len=33, garbage=True,
          causal=False, dtype="bfloat16"), 16),
    (Case("depth_start_g2_traced_garbage", seq_len=26, q_heads=4, kv_heads=2, slots=6, depth_start=2,
          depth_len=5, traced=True, garbage=True, segments="packed"), 8),
    # Chunks inside blocks: max_block 8 -> blocks of 6 tokens, two chunks each.
    (Case("chunk3_in_blocks_packed_garbage", batch=2, seq_len=29, q_heads=4, kv_heads=2, slots=5,
          depth_start=1, depth_len=4, garbage=True, segments="packed", depth_chunk=3), 8),
    # Sliding windows: chunks cross block borders; each depth slot is read by up to 3 blocks.
    (Case("chunk5_sliding_shuffled_depth_q", seq_len=23, q_heads=2, slots=3, segments="shuffled",
          depth_chunk=5, depth_q=True), 4),
    (Case("chunk11_sliding_bf16_traced", seq_len=30, q_heads=4, slots=4, depth_len=3, traced=True,
          garbage=True, dtype="bfloat16", depth_chunk=11), 8),
    (Case("chunk40_longer_than_sequence", seq_len=27, q_heads=2, slots=2, segments="packed",
          depth_chunk=40), 8),
    (Case("depth_only_chunk6_sliding_start", batch=2, seq_len=25, q_heads=4, kv_heads=2, slots=4,
          depth_start=1, depth_len=3, garbage=True, segments="packed", depth_only=True, depth_chunk=6), 4),
    (Case("depth_only_chunk2_in_blocks", seq_len=19, q_heads=3, slots=3, depth_only=True,
          depth_chunk=2, depth_q=True), 8),
)


@pytest.mark.parametrize("seq_len", [1, 7, 8, 9, 129, 300, 1000, 4097])
@pytest.mark.parametrize("max_block", [1, 3, 8, 128])
def test_choose_block_pads_only_the_last_tile(seq_len, max_block):
  block, num_blocks = choose_block(seq_len, max_block)
  assert 1 <= block <= max_block
  assert 0 <= block * num_blocks - seq_len < block  # the sweeps mask padding in the last tile only


@pytest.mark.parametrize("case, max_block", [pytest.param(c, m, id=c.name) for c, m in _CASES])
def test_many_tiles_match_oracle(case, max_block):
  assert choose_block(case.seq_len, max_block, case.depth_chunk or 1)[1] >= 3  # really multi-block
  inputs = make_inputs(case)

  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  def run(arrays, segment_ids, d_out, d_lse, bounds):
    def attend(a):
      prepared, spec = api.prepare(
          *a[:5], depth_q=a[5] if case.depth_q else None, segment_ids=segment_ids, causal=case.causal,
          scale=case.scale, depth_chunk=case.depth_chunk, **bounds)
      return xla.attention(prepared, spec, max_block=max_block)
    (out, lse), pullback = jax.vjp(attend, arrays)
    return out, lse, pullback((d_out, d_lse))[0]

  arrays = (inputs.q, inputs.k, inputs.v, inputs.depth_k, inputs.depth_v)
  if case.depth_q:
    arrays += (inputs.depth_q,)
  bounds = dict(depth_len=case.depth_len, depth_start=case.depth_start)
  if case.traced:
    bounds = {name: None if value is None else jnp.int32(value) for name, value in bounds.items()}
  out, lse, grads = run(arrays, inputs.segment_ids, inputs.d_out, inputs.d_lse, bounds)
  assert_matches_oracle(case, inputs, out, lse, grads)


@pytest.mark.parametrize("chunk", [2, 3, 8, 40])
@pytest.mark.parametrize("max_block", [4, 8, 128])
def test_chunks_lie_inside_blocks_when_they_fit(chunk, max_block):
  block, _ = choose_block(300, max_block, chunk)
  assert block % chunk == 0 if chunk <= max_block else block <= max_block


def test_rejects_bad_max_block():
  q = jnp.zeros((1, 4, 1, 8))
  with pytest.raises(ValueError, match="max_block=0"):
    xla.attention(*api.prepare(q, q, q), max_block=0)
