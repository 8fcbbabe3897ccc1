"""The MoDA family through `moda_attention`: chunk-visible depth, depth-only attention, depth_start.

Against the float64 oracle (out, lse and every gradient), then exact reductions that need no oracle:
C = 1 is plain MoDA bitwise, the first token of a chunk sees what plain MoDA sees, a single visible
depth slot is returned exactly with zero logit gradients, and rows that see nothing give 0 / -inf /
zero gradients. `reference` and `xla` support every case; a kernel backend (interpret mode) either
passes or raises NotImplementedError, which skips the test visibly (FAMILY_IMPLEMENTATIONS is the hook
for backends that learn a case). The xla backend's multi-tile paths for chunks are in
test_xla_blocking.py; bad arguments in test_moda_attention_errors.py.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oracle
from operator_cases import (Case, Impl, assert_close, assert_matches_oracle, call, forward_and_grads,
                            impl_params, jitted, make_inputs, run_case, to_f64)
from pallas_kernels import api
from pallas_kernels.spec import Spec

FAMILY_CASES = (
    Case("chunk3_packed_segments_g2_garbage", batch=2, seq_len=19, q_heads=4, kv_heads=2, slots=5,
         depth_len=4, garbage=True, segments="packed", depth_chunk=3, kernel=True),
    Case("chunk4_shuffled_traced_start", seq_len=21, q_heads=2, slots=6, depth_start=2, depth_len=5,
         traced=True, garbage=True, segments="shuffled", depth_chunk=4, kernel=True),
    Case("chunk8_bf16_g4_depth_q", seq_len=24, q_heads=8, kv_heads=2, slots=3, dtype="bfloat16",
         depth_chunk=8, depth_q=True, kernel=True),
    Case("chunk_longer_than_sequence", seq_len=9, slots=2, depth_chunk=16),
    Case("depth_only_g2_segments_start", seq_len=13, q_heads=4, kv_heads=2, slots=5, depth_start=1,
         depth_len=4, garbage=True, segments="packed", depth_only=True, kernel=True),
    Case("depth_only_chunk3_traced_depth_q", batch=2, seq_len=14, slots=4, depth_start=1, depth_len=3,
         traced=True, garbage=True, segments="packed", depth_only=True, depth_chunk=3, depth_q=True),
    Case("depth_only_f16_all_hidden", seq_len=6, slots=3, depth_start=2, depth_len=2, garbage=True,
         depth_only=True, dtype="float16", kernel=True),
    Case("depth_start_noncausal_garbage", seq_len=11, q_heads=3, slots=6, depth_start=2, depth_len=5,
         garbage=True, causal=False),
    Case("depth_start_at_len_is_no_depth", seq_len=10, slots=4, depth_start=3, depth_len=3,
         traced=True, garbage=True, kernel=True),
)

FAMILY_IMPLEMENTATIONS = impl_params(kernel=True)


def _run_or_skip(impl: Impl, fn):
  """fn(); a kernel backend may answer NotImplementedError (skipped visibly), reference / xla may not."""
  try:
    return fn()
  except NotImplementedError as e:
    if impl.spread == "full":
      raise
    pytest.skip(f"{impl.name} does not support this case: {e}")


def _family_params():
  return [pytest.param(param.values[0], case, id=f"{param.id}-{case.name}", marks=param.marks)
          for param in FAMILY_IMPLEMENTATIONS for case in FAMILY_CASES
          if param.values[0].spread == "full" or case.kernel]


@pytest.mark.parametrize("impl, case", _family_params())
def test_family_matches_oracle(impl, case):
  inputs = make_inputs(case)
  assert_matches_oracle(case, inputs, *_run_or_skip(impl, lambda: run_case(impl, case, inputs)))


def _bitwise_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and np.array_equal(x.view(np.uint8), y.view(np.uint8))


_SMALL = Case("family_small", batch=2, seq_len=13, q_heads=4, kv_heads=2, slots=4, depth_len=3,
              garbage=True, segments="packed")


def _arrays(inputs):
  return (inputs.q, inputs.k, inputs.v, inputs.depth_k, inputs.depth_v)


@pytest.mark.parametrize("impl", FAMILY_IMPLEMENTATIONS)
def test_chunk_of_one_and_start_zero_are_plain_moda_bitwise(impl):
  inputs = make_inputs(_SMALL)
  run = lambda **kw: _run_or_skip(impl, lambda: forward_and_grads(
      impl, _arrays(inputs), inputs.d_out, inputs.d_lse, depth_len=3, segment_ids=inputs.segment_ids,
      **kw))
  plain = run()
  _bitwise_equal(run(depth_chunk=1), plain)
  _bitwise_equal(run(depth_chunk=1, depth_start=0), plain)


@pytest.mark.parametrize("impl", FAMILY_IMPLEMENTATIONS)
def test_first_token_of_each_chunk_is_plain_moda(impl):
  # A token with no earlier token of its own chunk and segment sees exactly what plain MoDA shows
  # it, so its out, lse and dq row (which only depends on its own softmax) agree; later tokens differ.
  inputs = make_inputs(_SMALL)
  chunk = 4
  run = lambda **kw: _run_or_skip(impl, lambda: forward_and_grads(
      impl, _arrays(inputs), inputs.d_out, inputs.d_lse, depth_len=3, segment_ids=inputs.segment_ids,
      **kw))
  out, lse, grads = run(depth_chunk=chunk)
  plain_out, plain_lse, plain_grads = run()
  segments = np.asarray(inputs.segment_ids)
  tokens = np.arange(_SMALL.seq_len)
  starts_chunk = np.array([[all(segments[b, u] != segments[b, t] for u in range(t // chunk * chunk, t))
                            for t in tokens] for b in range(_SMALL.batch)])
  assert starts_chunk.any() and not starts_chunk.all()
  for name, a, e in (("out", out, plain_out), ("lse", lse, plain_lse), ("dq", grads[0], plain_grads[0])):
    assert_close(name, to_f64(a)[starts_chunk], to_f64(e)[starts_chunk], "float32")
  assert np.abs(to_f64(out)[~starts_chunk] - to_f64(plain_out)[~starts_chunk]).max() > 1e-3


def _integer_valued(rng, shape, dtype):
  """Small integers: every product and sum of them is exact in float32, whatever the order."""
  return jnp.asarray(rng.integers(-3, 4, size=shape), dtype)


@pytest.mark.parametrize("impl", FAMILY_IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_depth_only_single_visible_slot_is_exact(impl, dtype):
  # depth_start = 2, depth_len = 3: each query sees the one slot 2 of its own token, so p = 1 exactly,
  # out is that slot's value, and with d_lse = 0 the logit gradient p * (dp - delta) is exactly 0:
  # dq = 0 and d depth_k = 0, while d depth_v[t, 2] sums p * d_out over the kv head's query heads. The
  # values and d_out are small integers, so no summation order can make any of this inexact. Only
  # d depth_v may be off by an ulp: the backward recomputes p from the saved lse, which a kernel may
  # hold in another base (exp2 of a log2 lse); its hidden slots must still be exactly 0.
  case = Case("single_slot", batch=2, seq_len=7, q_heads=4, kv_heads=2, slots=4, garbage=True,
              depth_start=2, depth_len=3, depth_only=True, dtype=dtype)
  inputs = make_inputs(case)
  rng = np.random.default_rng(3)
  depth_v = inputs.depth_v.at[:, :, 2].set(_integer_valued(rng, (2, 7, 2, 32), dtype))
  d_out = _integer_valued(rng, inputs.q.shape, dtype)
  arrays = (inputs.q, None, None, inputs.depth_k, depth_v)
  out, lse, (dq, _, _, d_depth_k, d_depth_v) = _run_or_skip(impl, lambda: forward_and_grads(
      impl, arrays, d_out, jnp.zeros_like(inputs.d_lse), depth_start=2, depth_len=3))
  slot_per_query_head = np.repeat(to_f64(depth_v[:, :, 2]), 2, axis=2)  # [B, T, Hq, D]
  np.testing.assert_array_equal(to_f64(out), slot_per_query_head)
  assert np.isfinite(to_f64(lse)).all()
  assert not to_f64(dq).any() and not to_f64(d_depth_k).any()
  expected_dv = np.zeros(depth_v.shape)
  expected_dv[:, :, 2] = to_f64(d_out).reshape(2, 7, 2, 2, 32).sum(axis=3)
  assert_close("ddepth_v", d_depth_v, expected_dv, dtype)
  assert not to_f64(d_depth_v)[:, :, [0, 1, 3]].any()
  if impl.spread == "full":  # reference and xla recompute p = exp(x - lse) = exp(0) = 1 exactly
    np.testing.assert_array_equal(to_f64(d_depth_v), expected_dv)


@pytest.mark.parametrize("impl", FAMILY_IMPLEMENTATIONS)
def test_rows_that_see_nothing_give_zeros(impl):
  # Depth-only attention under vmap with a per-problem depth_start: problem 0 hides every slot
  # (start = len = 3), problem 1 shows slots 1 and 2. Rows of problem 0 return 0 and lse -inf with
  # gradients exactly 0 (random d_out and d_lse, so nothing hides a NaN); problem 1 is unaffected.
  case = Case("empty_rows", seq_len=9, q_heads=2, slots=4, garbage=True, depth_only=True,
              depth_chunk=3)
  per_problem = [make_inputs(case), make_inputs(dataclasses.replace(case, name="empty_rows_1"))]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *per_problem)
  starts = jnp.asarray([3, 1], jnp.int32)

  def one(arrays, d_out, d_lse, depth_start):
    attend = lambda a: call(impl, a[0], None, None, *a[1:], depth_start=depth_start, depth_len=3,
                            depth_chunk=3, return_lse=True)
    (out, lse), pullback = jax.vjp(attend, arrays)
    return out, lse, pullback((d_out, d_lse))[0]

  arrays = (stacked.q, stacked.depth_k, stacked.depth_v)
  out, lse, grads = _run_or_skip(impl, lambda: jitted(jax.vmap(one))(arrays, stacked.d_out,
                                                                     stacked.d_lse, starts))
  assert not to_f64(out[0]).any() and np.isneginf(to_f64(lse[0])).all()
  for name, grad in zip(("dq", "ddepth_k", "ddepth_v"), grads):
    assert np.isfinite(to_f64(grad)).all(), name
    assert not to_f64(grad[0]).any(), name
  second = per_problem[1]
  options = dict(depth_start=1, depth_len=3, depth_chunk=3)
  expected_out, expected_lse = oracle.forward(second.q, None, None, second.depth_k, second.depth_v,
                                              **options)
  expected_grads = oracle.backward(second.q, None, None, second.depth_k, second.depth_v,
                                   d_out=second.d_out, d_lse=second.d_lse, **options)
  assert_close("out[1]", out[1], expected_out, "float32")
  assert_close("lse[1]", lse[1], expected_lse, "float32")
  for name, grad, expected in zip(("dq", "ddepth_k", "ddepth_v"), grads,
                                  (expected_grads.q, expected_grads.depth_k, expected_grads.depth_v)):
    assert_close(f"{name}[1]", grad[1], expected, "float32")


def test_prepare_normalizes_the_call():
  # What every backend receives: absent arrays None, depth bounds as int32 scalars, C = 1 by default,
  # and depth arrays with L = 0 dropped (no depth at all).
  inputs = make_inputs(_SMALL)
  prepared, spec = api.prepare(*_arrays(inputs), segment_ids=inputs.segment_ids.astype(jnp.int8))
  assert spec == Spec(seq_len=13, num_slots=4, causal=True, scale=32 ** -0.5, has_sequence=True,
                      has_segments=True, depth_chunk=1)
  assert int(prepared.depth_start) == 0 and int(prepared.depth_len) == 4
  assert prepared.depth_len.dtype == jnp.int32 and prepared.segment_ids.dtype == jnp.int32
  assert prepared.depth_q is None and prepared.num_kv_heads == 2
  depth_only, spec = api.prepare(inputs.q, None, None, inputs.depth_k, inputs.depth_v, depth_chunk=3,
                                 depth_start=1, depth_len=jnp.int32(3))
  assert (depth_only.k, depth_only.v, spec.has_sequence, spec.depth_chunk) == (None, None, False, 3)
  assert int(depth_only.depth_start) == 1 and depth_only.num_kv_heads == 2
  empty = inputs.depth_k[:, :, :0]
  no_depth, spec = api.prepare(inputs.q, inputs.k, inputs.v, empty, empty, depth_q=inputs.q, depth_chunk=2)
  assert no_depth.depth_k is None and no_depth.depth_q is None and no_depth.depth_len is None
  assert spec.num_slots == 0 and spec.depth_chunk == 1 and not spec.has_depth
