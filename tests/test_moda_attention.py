"""`moda_attention` against the float64 oracle: out, lse and all gradients, per implementation.

Each case runs forward + `jax.vjp` under `jit` with random cotangents on both out and lse, and compares
with `oracle.py` evaluated on the *same* (dtype-rounded) inputs, so bf16 / f16 errors measure the
backend and not the input rounding. Invariances and identities live in
test_moda_attention_properties.py, jit / vmap / grad / scan in test_moda_attention_transforms.py, bad
inputs in test_moda_attention_errors.py; the case table and tolerances in operator_cases.py.
"""

import jax.numpy as jnp
import numpy as np
import pytest

import oracle
from operator_cases import (CASES, IMPLEMENTATIONS, Case, Impl, assert_close, forward_and_grads,
                            impl_marks, make_inputs)

_GRAD_NAMES = ("q", "k", "v", "depth_k", "depth_v", "depth_q")


def _case_params():
  return [pytest.param(impl, case, id=f"{impl.name}-{case.name}", marks=impl_marks(impl))
          for impl in IMPLEMENTATIONS for case in CASES if impl.spread == "full" or case.kernel]


def run_vjp(impl: Impl, case: Case, inputs):
  """Returns (out, lse, grads) of the implementation for one case, computed under jit."""
  arrays = (inputs.q, inputs.k, inputs.v, inputs.depth_k, inputs.depth_v)
  if case.depth_q:
    arrays += (inputs.depth_q,)
  depth_len = jnp.int32(case.written) if case.traced else case.depth_len
  return forward_and_grads(impl, arrays, inputs.d_out, inputs.d_lse, depth_len=depth_len,
                           segment_ids=inputs.segment_ids, causal=case.causal, scale=case.scale)


@pytest.mark.parametrize("impl, case", _case_params())
def test_forward_and_gradients_match_oracle(impl, case):
  inputs = make_inputs(case)
  out, lse, grads = run_vjp(impl, case, inputs)

  expected_out, expected_lse = oracle.forward(
      inputs.q, inputs.k, inputs.v, inputs.depth_k, inputs.depth_v, depth_len=case.depth_len,
      causal=case.causal, scale=case.scale, segment_ids=inputs.segment_ids, depth_q=inputs.depth_q)
  expected_grads = oracle.backward(
      inputs.q, inputs.k, inputs.v, inputs.depth_k, inputs.depth_v, d_out=inputs.d_out,
      d_lse=inputs.d_lse, depth_len=case.depth_len, causal=case.causal, scale=case.scale,
      segment_ids=inputs.segment_ids, depth_q=inputs.depth_q)

  assert out.dtype == inputs.q.dtype and out.shape == inputs.q.shape
  assert lse.dtype == jnp.float32 and lse.shape == inputs.q.shape[:3]
  assert_close("out", out, expected_out, case.dtype)
  # lse is float32 whatever the input dtype, but a backend may legitimately round scale * q to the
  # input dtype before the dot, so its tolerance follows the input dtype too.
  assert_close("lse", lse, expected_lse, case.dtype)
  primals = (inputs.q, inputs.k, inputs.v, inputs.depth_k, inputs.depth_v, inputs.depth_q)
  assert len(grads) == 6 if case.depth_q else len(grads) == 5
  for name, grad, expected, primal in zip(_GRAD_NAMES, grads, expected_grads, primals):
    if primal is None:
      continue
    assert grad.dtype == primal.dtype and grad.shape == primal.shape, name
    if expected is None:  # empty depth arrays: L = 0, nothing to compare
      assert grad.size == 0, name
      continue
    assert_close(f"d{name}", grad, expected, case.dtype)

  if case.has_depth and case.written < case.slots:
    # Unwritten slots (holding garbage when case.garbage) must get exactly zero gradient.
    for name, grad in (("ddepth_k", grads[3]), ("ddepth_v", grads[4])):
      unwritten = np.asarray(grad[:, :, case.written:]).astype(np.float64)
      assert not unwritten.any(), f"{name}: unwritten slots got gradient up to {np.abs(unwritten).max()}"


def test_kernel_spread_is_small_but_covers_every_feature():
  kernel_cases = [c for c in CASES if c.kernel]
  assert len(kernel_cases) <= 15
  covered = lambda attr: {getattr(c, attr) for c in kernel_cases}
  assert {1, 2, 3, 4, 8} <= {c.q_heads // c.kv_heads for c in kernel_cases}
  assert {0, 1, 5, 16, 40} <= covered("slots")
  assert {"float32", "bfloat16", "float16"} <= covered("dtype")
  assert {True, False} <= covered("causal") and {True, False} <= covered("traced")
  assert {True, False} <= covered("garbage") and {None, "packed", "shuffled"} <= covered("segments")
  assert any(c.slots > c.seq_len for c in kernel_cases) and 1 in covered("seq_len")
  assert max(covered("head_dim")) == 256 and max(covered("seq_len")) > 128
  # depth_q != q with a traced depth_len over garbage slots, and with several tiles of tokens.
  assert any(c.depth_q and c.traced and c.garbage for c in kernel_cases)
  assert any(c.depth_q and c.seq_len > 64 and c.segments for c in kernel_cases)
