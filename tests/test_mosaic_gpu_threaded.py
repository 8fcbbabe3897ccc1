"""pallas_mosaic_gpu's threaded depth cotangent (`return_depth=True`), in Mosaic GPU interpret mode on CPU.

1. The shared contract of tests/test_return_depth.py (its test, on its cases mapped onto the backend's
   support matrix, and on cases of this backend's own corners): the depth arrays come back bit for bit;
   the cotangent threaded back along them returns as theirs with the float64 oracle's added, exactly
   unchanged at the slots the call does not read. Causal and not, segments, traced depth_start /
   depth_len with unwritten (garbage) slots, depth_len 0, G 2 and 3 (padded heads), T not a multiple
   of 8 (the padded copy), partial depth items at both ends of the window, and G 16 (Triton's backward).
2. A zero carry gives the plain call's gradients bit for bit (the same kernels; the plain call stores).
3. The dq kernel takes the carried cotangents as Refs (what plgpu.kernel discharges into the call's
   input_output_aliases: updated in place) and returns no depth gradient of its own; the plain call's
   returns it and takes no Ref. The GPU lowering's aliases: tests/test_mosaic_gpu_lowering.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import core  # jaxprs_in_params: the kernel calls nested in the traced backward
from jax._src.state import AbstractRef

import test_return_depth as shared
from operator_cases import Case, Impl, make_inputs
from pallas_kernels import api, mosaic_gpu
from test_mosaic_gpu import supported

IMPL = Impl("pallas_mosaic_gpu", interpret=True, spread="kernel")

_OWN = (
    # G 3: 16 tokens per warpgroup, 4 slots per depth item: the window [2, 5) starts mid-item and its last
    # item runs past L (clamped loads).
    Case("thread_g3_noncausal_shuffled_depth_q", seq_len=13, q_heads=6, kv_heads=2, head_dim=64, slots=5,
         depth_len=5, depth_start=2, traced=True, garbage=True, causal=False, segments="shuffled", depth_q=True,
         dtype="bfloat16"),
    Case("thread_g16_triton_backward", seq_len=8, q_heads=16, head_dim=64, slots=3, depth_len=2, depth_start=1,
         traced=True, garbage=True, dtype="bfloat16"),
)
# The shared table's cases this backend takes (no depth-only, no depth_chunk), then its own.
_CASES = [supported(c) for c in shared.CASES if not c.depth_only and not c.depth_chunk] + list(_OWN)


@pytest.mark.parametrize("case", _CASES, ids=[c.name for c in _CASES])
def test_threaded_cotangent_comes_back_with_the_calls_added(case):
  shared.test_threaded_cotangent_comes_back_with_the_calls_added(IMPL, case)


def _grads(inputs, case, carry=None):
  """The gradients of every floating input: plain (carry None) or threaded with `carry`."""
  arrays = (inputs.q, inputs.k, inputs.v, inputs.depth_k, inputs.depth_v, inputs.depth_q)

  @jax.jit
  def run(arrays, depth_start, depth_len):
    def attend(a):
      return api.moda_attention(*a[:5], depth_q=a[5], depth_start=depth_start, depth_len=depth_len,
                                causal=case.causal, segment_ids=inputs.segment_ids, return_lse=True,
                                return_depth=carry is not None, implementation=IMPL.name, interpret=True)
    _, pullback = jax.vjp(attend, arrays)
    cotangents = (inputs.d_out, inputs.d_lse) + (() if carry is None else carry)
    return pullback(cotangents)[0]

  return run(arrays, jnp.int32(case.first), jnp.int32(case.written))


def test_zero_carry_gives_the_plain_gradients_bit_for_bit():
  case = _OWN[0]
  inputs = make_inputs(case)
  zeros = tuple(jnp.zeros_like(x) for x in (inputs.depth_k, inputs.depth_v))
  for name, threaded, plain in zip(("dq", "dk", "dv", "ddepth_k", "ddepth_v", "ddepth_q"),
                                   _grads(inputs, case, carry=zeros), _grads(inputs, case)):
    np.testing.assert_array_equal(np.asarray(threaded), np.asarray(plain), name)


def _kernel_calls(jaxpr):
  """{kernel name: its equation} of the Mosaic GPU calls anywhere inside `jaxpr`."""
  calls = {}
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "mpmd_map":
      calls[eqn.params["name"]] = eqn
    for sub in core.jaxprs_in_params(eqn.params):
      calls.update(_kernel_calls(sub))
  return calls


@pytest.mark.parametrize("threaded", [True, False], ids=["threaded", "plain"])
def test_dq_kernel_updates_the_carried_cotangent_in_place(threaded):
  depth = jax.ShapeDtypeStruct((1, 20, 3, 2, 64), jnp.bfloat16)  # T 20: padded to 24 first
  q, kv = jax.ShapeDtypeStruct((1, 20, 4, 64), jnp.bfloat16), jax.ShapeDtypeStruct((1, 20, 2, 64), jnp.bfloat16)

  def backward(q, k, v, depth_k, depth_v, carry_k, carry_v):
    def attend(*arrays):
      inputs, spec = api.prepare(*arrays, depth_len=jnp.int32(2))
      # The plain call drops the depth outputs: their cotangents are symbolic zeros.
      return (mosaic_gpu.attention_with_depth if threaded else mosaic_gpu.attention)(inputs, spec, interpret=True)
    outputs, pullback = jax.vjp(attend, q, k, v, depth_k, depth_v)
    return pullback(outputs[:2] + ((carry_k, carry_v) if threaded else ()))

  jaxpr = jax.make_jaxpr(backward)(q, kv, kv, depth, depth, depth, depth).jaxpr
  dq_call = _kernel_calls(jaxpr)["moda_mosaic_backward_dq"]
  padded = (1, 24) + depth.shape[2:]
  refs = [v.aval.inner_aval.shape for v in dq_call.invars if isinstance(v.aval, AbstractRef)]
  outs = [v.aval.shape for v in dq_call.outvars]
  if threaded:
    assert refs == [padded, padded] and padded not in outs
  else:
    assert refs == [] and outs.count(padded) == 2
