"""`moda_attention(..., return_depth=True)`: the depth arrays threaded through the call.

Forward: the returned depth arrays are the inputs, bit for bit. Backward: the cotangent sent back along
them comes back as the depth arrays' cotangent with the call's own (the float64 oracle's) added, and
exactly unchanged at the slots the call does not read. The xla and pallas_triton backends add into it
in place (and pallas_mosaic_gpu: tests/test_mosaic_gpu_threaded.py runs this test on it); the others
return the inputs and JAX adds: the same contract. Compiled memory (xla, CPU): the
threaded backward needs no buffer-sized array besides the carried cotangent.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oracle
from operator_cases import (Case, assert_close, call, impl_params, jitted, make_inputs, oracle_options,
                            rng_for)
from pallas_kernels import moda_attention

CASES = (
    Case("thread_g2_l5_window_segments_traced", batch=2, seq_len=19, q_heads=4, kv_heads=2, head_dim=64,
         slots=5, depth_len=4, depth_start=1, traced=True, garbage=True, segments="packed", kernel=True),
    Case("thread_bf16_depth_only_l16", seq_len=13, q_heads=2, slots=16, depth_len=9, garbage=True,
         depth_only=True, dtype="bfloat16", kernel=True),
    Case("thread_chunk4_depth_q_d40", seq_len=16, q_heads=3, head_dim=40, slots=5, depth_len=3, depth_chunk=4,
         depth_q=True, causal=True, kernel=True),
    Case("thread_noncausal_len0", seq_len=9, slots=5, depth_len=0, garbage=True, causal=False),
)


def _params():
  return [pytest.param(impl, case, id=f"{impl.name}-{case.name}", marks=impl_param.marks)
          for impl_param in impl_params(kernel=True) for impl in impl_param.values
          for case in CASES if case.kernel or impl.spread == "full"]


@pytest.mark.parametrize("impl, case", _params())
def test_threaded_cotangent_comes_back_with_the_calls_added(impl, case):
  inputs = make_inputs(case)
  arrays = (inputs.q, inputs.k, inputs.v, inputs.depth_k, inputs.depth_v, inputs.depth_q)
  options = oracle_options(case, inputs)
  want = oracle.backward(*arrays[:5], d_out=inputs.d_out, d_lse=inputs.d_lse, **options)
  # A carry a quarter of the call's own gradient (RMS): the sum's rounding in the dtype stays within the
  # dtype's tolerance of the call's part, and a dropped carry would not.
  rng = rng_for(case.name + "/carry")
  rms = lambda w: float(np.sqrt(np.mean(w**2))) or 1.0  # 1 where the call reads nothing
  carry_k, carry_v = (jnp.asarray(0.25 * rms(w) * rng.normal(size=w.shape), inputs.depth_k.dtype)
                      for w in want[3:5])
  depth_len = jnp.int32(case.written) if case.traced else case.depth_len
  depth_start = jnp.int32(case.first) if case.traced and case.depth_start is not None else case.depth_start

  @jitted
  def run(arrays, cotangents, depth_len):
    def attend(a):
      return call(impl, *a[:5], depth_q=a[5], depth_len=depth_len, depth_start=depth_start, causal=case.causal,
                  segment_ids=inputs.segment_ids, depth_chunk=case.depth_chunk, return_lse=True,
                  return_depth=True)
    outputs, pullback = jax.vjp(attend, arrays)
    return outputs, pullback(cotangents)[0]

  try:
    (out, lse, depth_k, depth_v), grads = run(arrays, (inputs.d_out, inputs.d_lse, carry_k, carry_v),
                                              depth_len)
  except NotImplementedError as e:  # a kernel backend may not do the case (visible skip); reference / xla must
    if impl.spread == "full":
      raise
    pytest.skip(f"{impl.name} does not support this case: {e}")
  np.testing.assert_array_equal(np.asarray(depth_k), np.asarray(inputs.depth_k))
  np.testing.assert_array_equal(np.asarray(depth_v), np.asarray(inputs.depth_v))
  assert_close("out", out, oracle.forward(*arrays[:5], **options)[0], case.dtype)
  hidden = np.ones(case.slots, bool)
  hidden[case.first:case.written] = False
  for name, grad, expected, carry in zip(("dq", "dk", "dv", "ddepth_k", "ddepth_v", "ddepth_q"), grads, want,
                                         (None, None, None, carry_k, carry_v, None)):
    if expected is None:
      assert grad is None, name
      continue
    if carry is None:
      assert_close(name, grad, expected, case.dtype)
      continue
    # The call's own part, then the carry where the call reads nothing: untouched, bit for bit.
    own = np.asarray(grad).astype(np.float64) - np.asarray(carry).astype(np.float64)
    assert_close(name, own, expected, case.dtype)
    np.testing.assert_array_equal(np.asarray(grad)[:, :, hidden], np.asarray(carry)[:, :, hidden], name)


def test_return_depth_arguments():
  q = jnp.ones((1, 4, 2, 16))
  with pytest.raises(ValueError, match="return_depth=True"):
    moda_attention(q, q[:, :, :1], q[:, :, :1], return_depth=True)
  empty = jnp.zeros((1, 4, 0, 1, 16))
  with pytest.raises(ValueError, match="return_depth=1"):
    moda_attention(q, q[:, :, :1], q[:, :, :1], empty, empty, return_depth=1)
  out, depth_k, depth_v = moda_attention(q, q[:, :, :1], q[:, :, :1], empty, empty, return_depth=True)
  assert out.shape == q.shape and depth_k is empty and depth_v is empty  # L = 0: returned as given


def test_xla_threaded_backward_needs_no_other_buffer_sized_array():
  """The cotangent carried in (donated, as a layer stack's carry is) is updated in place; a plain call
  builds a zero-filled depth gradient of the same size for the caller to add."""
  batch, seq_len, q_heads, kv_heads, head_dim, slots = 2, 256, 4, 2, 32, 64
  shape = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  q, kv, depth = shape(batch, seq_len, q_heads, head_dim), shape(batch, seq_len, kv_heads, head_dim), shape(
      batch, seq_len, slots, kv_heads, head_dim)
  attend = lambda q, k, v, **kw: (lambda dk, dv: moda_attention(q, k, v, dk, dv, depth_len=slots // 2,
                                                                implementation="xla", **kw))

  def threaded(q, k, v, depth_k, depth_v, d_out, carry_k, carry_v):
    _, pullback = jax.vjp(attend(q, k, v, return_depth=True), depth_k, depth_v)
    return pullback((d_out, carry_k, carry_v))

  def plain(q, k, v, depth_k, depth_v, d_out, carry_k, carry_v):
    _, pullback = jax.vjp(attend(q, k, v), depth_k, depth_v)
    g_k, g_v = pullback(d_out)
    return g_k + carry_k, g_v + carry_v

  temp = lambda f: jax.jit(f, donate_argnums=(6, 7)).lower(q, kv, kv, depth, depth, q, depth, depth).compile(
      ).memory_analysis().temp_size_in_bytes
  pair = 2 * np.prod(depth.shape) * 4
  # Measured 0.31 vs 1.31 pairs: the plain call's zero-filled gradient is the difference.
  assert temp(threaded) <= 0.5 * pair
  assert temp(threaded) + 0.9 * pair <= temp(plain)
