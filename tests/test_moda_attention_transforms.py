"""`moda_attention` under JAX transformations: vmap, jit(grad), scan over layers; and determinism.

Results are checked against the float64 oracle (or, for the scanned stack's gradient, against the
same stack unrolled in Python with static depth_len), per implementation.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oracle
from operator_cases import (Case, assert_close, call, forward_and_grads, impl_params, jitted,
                            make_inputs, to_f64)

_GRADS = ("dq", "dk", "dv", "ddepth_k", "ddepth_v")


def _arrays(inputs):
  return (inputs.q, inputs.k, inputs.v, inputs.depth_k, inputs.depth_v)


def _oracle(inputs, case, d_out=None, d_lse=None):
  """Oracle (out, lse) and, when cotangents are given, gradients, for one case's inputs."""
  options = dict(depth_len=case.depth_len, causal=case.causal, scale=case.scale,
                 segment_ids=inputs.segment_ids)
  out, lse = oracle.forward(*_arrays(inputs), **options)
  if d_out is None:
    return out, lse, None
  return out, lse, oracle.backward(*_arrays(inputs), d_out=d_out, d_lse=d_lse, **options)


@pytest.mark.parametrize("batched_len", [False, True], ids=["shared_len", "batched_len"])
@pytest.mark.parametrize("impl", impl_params(kernel=True))
def test_vmap_over_leading_axis(impl, batched_len):
  # Three independent problems stacked on a new leading axis, each with its own depth_len when
  # batched_len (as vmapping over layers with different fill levels would).
  lengths = (0, 3, 5) if batched_len else (3, 3, 3)
  cases = [Case(f"vmap{i}", seq_len=13, q_heads=4, kv_heads=2, slots=5, depth_len=n, garbage=True,
                segments="packed") for i, n in enumerate(lengths)]
  per_case = [make_inputs(case) for case in cases]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *per_case)

  def one(arrays, segment_ids, d_out, d_lse, depth_len):
    attend = lambda a: call(impl, *a, depth_len=depth_len, segment_ids=segment_ids, return_lse=True)
    (out, lse), pullback = jax.vjp(attend, arrays)
    return out, lse, pullback((d_out, d_lse))[0]

  depth_len = jnp.asarray(lengths, jnp.int32) if batched_len else jnp.int32(lengths[0])
  batched = jitted(jax.vmap(one, in_axes=(0, 0, 0, 0, 0 if batched_len else None)))
  out, lse, grads = batched(_arrays(stacked), stacked.segment_ids, stacked.d_out, stacked.d_lse,
                            depth_len)
  for i, (case, inputs) in enumerate(zip(cases, per_case)):
    exp_out, exp_lse, exp_grads = _oracle(inputs, case, inputs.d_out, inputs.d_lse)
    for name, actual, expected in zip(("out", "lse", *_GRADS), (out, lse, *grads),
                                      (exp_out, exp_lse, *exp_grads)):
      assert_close(f"{name}[{i}]", actual[i], expected, "float32")


@pytest.mark.parametrize("impl", impl_params(kernel=True))
def test_jit_grad_of_scalar_loss(impl):
  # A nonlinear loss in both outputs: its cotangents are d_out = cos(out) and d_lse = lse.
  case = Case("grad", seq_len=21, q_heads=3, slots=5, depth_len=2, garbage=True, causal=False)
  inputs = make_inputs(case)

  def loss(arrays, depth_len):
    out, lse = call(impl, *arrays, depth_len=depth_len, causal=False, return_lse=True)
    return jnp.sum(jnp.sin(out)) + 0.5 * jnp.sum(lse**2)

  value, grads = jitted(jax.value_and_grad(loss))(_arrays(inputs), jnp.int32(case.depth_len))
  exp_out, exp_lse, _ = _oracle(inputs, case)
  _, _, exp_grads = _oracle(inputs, case, np.cos(exp_out), exp_lse)
  exp_value = np.sum(np.sin(exp_out)) + 0.5 * np.sum(exp_lse**2)
  assert_close("loss", value, exp_value, "float32")
  for name, actual, expected in zip(_GRADS, grads, exp_grads):
    assert_close(name, actual, expected, "float32")


# A 3-layer toy stack: each layer attends over its sequence plus the depth slots of the layers below
# (depth_len = layer index), then writes its own K/V into slot `layer`, as the model does.
_B, _T, _M, _HQ, _HK, _D, _N = 1, 9, 32, 2, 1, 32, 3


def _stack_params(seed):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape) / np.sqrt(shape[-2]), jnp.float32)
  weights = (normal(_N, _M, _HQ * _D), normal(_N, _M, _HK * _D), normal(_N, _M, _HK * _D),
             normal(_N, _HQ * _D, _M))
  x_BTM = jnp.asarray(rng.normal(size=(_B, _T, _M)), jnp.float32)
  return weights, x_BTM


def _layer(attend, x_BTM, depth_k_BTLKD, depth_v_BTLKD, layer_weights, layer):
  """One residual attention layer; returns (new x, this layer's k, v) for the caller to write."""
  wq, wk, wv, wo = layer_weights
  q = (x_BTM @ wq).reshape(_B, _T, _HQ, _D)
  k = (x_BTM @ wk).reshape(_B, _T, _HK, _D)
  v = (x_BTM @ wv).reshape(_B, _T, _HK, _D)
  out = attend(q, k, v, depth_k_BTLKD, depth_v_BTLKD, layer)
  return x_BTM + out.reshape(_B, _T, _HQ * _D) @ wo, k, v


def _jax_layer(attend, carry, layer_weights, layer):
  x_BTM, depth_k, depth_v = carry
  x_BTM, k, v = _layer(attend, x_BTM, depth_k, depth_v, layer_weights, layer)
  return x_BTM, depth_k.at[:, :, layer].set(k), depth_v.at[:, :, layer].set(v)


def _empty_depth(zeros):
  return zeros((_B, _T, _N, _HK, _D)), zeros((_B, _T, _N, _HK, _D))


@pytest.mark.parametrize("impl", impl_params(kernel=True))
def test_scan_over_layers(impl):
  weights, x_BTM = _stack_params(11)
  attend = lambda q, k, v, dk, dv, layer: call(impl, q, k, v, dk, dv, depth_len=layer)
  readout_BTM = jnp.asarray(np.random.default_rng(12).normal(size=(_B, _T, _M)), jnp.float32)

  def scanned(weights, x_BTM):
    step = lambda carry, xs: (_jax_layer(attend, carry, *xs), None)
    (x_BTM, _, _), _ = jax.lax.scan(step, (x_BTM, *_empty_depth(jnp.zeros)),
                                    (weights, jnp.arange(_N)))
    return x_BTM

  def unrolled(weights, x_BTM):  # Python ints for depth_len: the static path
    carry = (x_BTM, *_empty_depth(jnp.zeros))
    for layer in range(_N):
      carry = _jax_layer(attend, carry, [w[layer] for w in weights], layer)
    return carry[0]

  # Forward against the same stack run on the float64 oracle.
  def oracle_attend(q, k, v, dk, dv, layer):
    return oracle.forward(q, k, v, dk, dv, depth_len=layer)[0]

  x64, (depth_k64, depth_v64) = to_f64(x_BTM), _empty_depth(np.zeros)
  for layer in range(_N):
    x64, depth_k64[:, :, layer], depth_v64[:, :, layer] = _layer(
        oracle_attend, x64, depth_k64, depth_v64, [to_f64(w[layer]) for w in weights], layer)

  def with_grads(stack):  # one compiled program per stack: forward and the readout's gradients
    def run(weights, x_BTM):
      x_out, pullback = jax.vjp(stack, weights, x_BTM)
      return x_out, pullback(readout_BTM)
    return jitted(run)

  x_scan, grads_scan = with_grads(scanned)(weights, x_BTM)
  x_loop, grads_loop = with_grads(unrolled)(weights, x_BTM)
  assert_close("scan forward", x_scan, x64, "float32")
  assert_close("unrolled forward", x_loop, x64, "float32")
  for name, a, b in zip(("dwq", "dwk", "dwv", "dwo", "dx"), jax.tree.leaves(grads_scan),
                        jax.tree.leaves(grads_loop)):
    assert_close(name, a, b, "float32")


@pytest.mark.parametrize("impl", impl_params(kernel=True))
def test_deterministic(impl):
  # Two separately traced and compiled runs give bitwise equal outputs and gradients.
  case = Case("determinism", batch=2, seq_len=33, q_heads=4, kv_heads=2, slots=5, depth_len=3,
              garbage=True, segments="packed")
  inputs = make_inputs(case)
  runs = [forward_and_grads(impl, _arrays(inputs), inputs.d_out, inputs.d_lse,
                            depth_len=jnp.int32(3), segment_ids=inputs.segment_ids) for _ in range(2)]
  for a, b in zip(jax.tree.leaves(runs[0]), jax.tree.leaves(runs[1])):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8))
