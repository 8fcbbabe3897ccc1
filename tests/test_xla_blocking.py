"""The `xla` backend's tiling against the float64 oracle: many blocks, padding, every mask kind.

test_moda_attention.py runs `xla` through the public API, where the 128-token default tile makes
most cases a single block. Here tiny tiles (`max_block`) force many query/key blocks on short inputs,
so the causal loop bounds, the diagonal tile, the padded last tile (causal and not), segment masks
across tile borders and the per-block depth slices are all exercised.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oracle
from operator_cases import FAST_COMPILE, Case, assert_close, make_inputs
from pallas_kernels import xla
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
)


@pytest.mark.parametrize("seq_len", [1, 7, 8, 9, 129, 300, 1000, 4097])
@pytest.mark.parametrize("max_block", [1, 3, 8, 128])
def test_choose_block_pads_only_the_last_tile(seq_len, max_block):
  block, num_blocks = choose_block(seq_len, max_block)
  assert 1 <= block <= max_block
  assert 0 <= block * num_blocks - seq_len < block  # the sweeps mask padding in the last tile only


@pytest.mark.parametrize("case, max_block", [pytest.param(c, m, id=c.name) for c, m in _CASES])
def test_many_tiles_match_oracle(case, max_block):
  assert choose_block(case.seq_len, max_block)[1] >= 3  # the case really is multi-block
  inputs = make_inputs(case)

  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  def run(arrays, segment_ids, d_out, d_lse, depth_len):
    attend = lambda a: xla.attention(*a, depth_len, segment_ids, causal=case.causal,
                                     scale=case.scale or case.head_dim ** -0.5, max_block=max_block)
    (out, lse), pullback = jax.vjp(attend, arrays)
    return out, lse, pullback((d_out, d_lse))[0]

  arrays = (inputs.q, inputs.k, inputs.v, inputs.depth_k, inputs.depth_v)
  depth_len = jnp.int32(case.written) if case.has_depth else None
  out, lse, grads = run(arrays, inputs.segment_ids, inputs.d_out, inputs.d_lse, depth_len)

  options = dict(depth_len=case.depth_len, causal=case.causal, scale=case.scale,
                 segment_ids=inputs.segment_ids)
  expected_out, expected_lse = oracle.forward(*arrays, **options)
  expected_grads = oracle.backward(*arrays, d_out=inputs.d_out, d_lse=inputs.d_lse, **options)
  assert_close("out", out, expected_out, case.dtype)
  assert_close("lse", lse, expected_lse, "float32" if case.dtype == "float32" else case.dtype)
  for name, grad, expected in zip(("q", "k", "v", "depth_k", "depth_v"), grads, expected_grads):
    if expected is not None:
      assert_close(f"d{name}", grad, expected, case.dtype)
  if case.has_depth:
    for grad in grads[3:]:
      assert not np.asarray(grad[:, :, case.written:]).astype(np.float64).any()


def test_rejects_bad_max_block():
  q = jnp.zeros((1, 4, 1, 8))
  with pytest.raises(ValueError, match="max_block=0"):
    xla.attention(q, q, q, None, None, None, None, causal=True, scale=1.0, max_block=0)
