"""Properties of `moda_attention` that hold for any correct implementation, per implementation.

Invariances (depth-slot permutation, key and value translation), exact gradient-sum identities, the
no-depth limit against `jax.nn.dot_product_attention`, composition with jit / vmap / grad / scan, and
determinism. Tests marked `kernel=True` also run for the Pallas backends in interpret mode.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from operator_cases import (TOLERANCES, Case, assert_close, call, forward_and_grads, impl_params,
                            jitted, make_inputs, rng_for, to_f64)

# One small float32 problem with every feature switched on: GQA, segments, garbage in unwritten slots.
_BASE = Case("properties", batch=2, seq_len=23, q_heads=6, kv_heads=2, slots=6, depth_len=4,
             garbage=True, segments="packed")


def _arrays(inputs):
  return (inputs.q, inputs.k, inputs.v, inputs.depth_k, inputs.depth_v)


def _run(impl, arrays, inputs, **options):
  options.setdefault("depth_len", _BASE.depth_len)
  return forward_and_grads(impl, arrays, inputs.d_out, inputs.d_lse, segment_ids=inputs.segment_ids,
                           **options)


def _assert_all_close(names, actual, expected):
  for name, a, e in zip(names, actual, expected):
    assert_close(name, a, e, "float32")


_GRADS = ("dq", "dk", "dv", "ddepth_k", "ddepth_v")


@pytest.mark.parametrize("impl", impl_params(kernel=True))
def test_no_depth_is_gqa_attention(impl):
  case = Case("no_depth", seq_len=37, q_heads=4, kv_heads=2, head_dim=64, slots=5, depth_len=0,
              garbage=True)
  inputs = make_inputs(case)
  q, k, v = inputs.q, inputs.k, inputs.v
  zero_lse = jnp.zeros_like(inputs.d_lse)
  @jitted
  def dot_product_attention_vjp(q, k, v, d_out):
    expected, pullback = jax.vjp(lambda *a: jax.nn.dot_product_attention(*a, is_causal=True), q, k, v)
    return expected, pullback(d_out)

  expected, expected_grads = dot_product_attention_vjp(q, k, v, inputs.d_out)
  for depth in ((None, None), (inputs.depth_k, inputs.depth_v)):  # L = 0, and depth_len = 0
    out, _, grads = forward_and_grads(impl, (q, k, v, *depth), inputs.d_out, zero_lse,
                                      depth_len=None if depth[0] is None else 0)
    _assert_all_close(("out", "dq", "dk", "dv"), (out, *grads[:3]), (expected, *expected_grads))


@pytest.mark.parametrize("impl", impl_params(kernel=True))
def test_depth_slot_permutation(impl):
  # Written slots permuted among themselves, unwritten ones among themselves: out and the sequence
  # grads unchanged, depth grads permuted the same way.
  inputs = make_inputs(_BASE)
  perm = np.array([2, 0, 3, 1, 5, 4])
  permuted = (*_arrays(inputs)[:3], inputs.depth_k[:, :, perm], inputs.depth_v[:, :, perm])
  out, lse, grads = _run(impl, _arrays(inputs), inputs)
  out_p, lse_p, grads_p = _run(impl, permuted, inputs)
  permuted_grads = (*grads[:3], grads[3][:, :, perm], grads[4][:, :, perm])
  _assert_all_close(("out", "lse", *_GRADS), (out_p, lse_p, *grads_p), (out, lse, *permuted_grads))


def _per_kv_head_shift(rng, inputs):
  """A vector c[b, kv_head] broadcast to sequence [B,T,K,D], depth [B,T,L,K,D] and query heads."""
  c_BKD = rng.normal(size=(inputs.q.shape[0], inputs.k.shape[2], inputs.q.shape[3]))
  group = inputs.q.shape[2] // inputs.k.shape[2]
  return c_BKD[:, None], c_BKD[:, None, None], np.repeat(c_BKD, group, axis=1)[:, None]


@pytest.mark.parametrize("impl", impl_params(kernel=True))
def test_key_translation(impl):
  # Adding c to every key (sequence and depth) of a kv head shifts each logit of query (t, h) by
  # scale * q_t,h . c: the same for all its keys. So out, dk, dv and the depth grads are unchanged,
  # lse shifts by scale * q . c, and dq = scale * sum_i dlogit_i key_i moves by scale * d_lse * c
  # because the logit cotangents of one query sum to d_lse.
  inputs = make_inputs(_BASE)
  scale = _BASE.head_dim ** -0.5
  c_seq, c_depth, c_query = _per_kv_head_shift(np.random.default_rng(5), inputs)
  shifted = (inputs.q, inputs.k + c_seq.astype(np.float32), inputs.v,
             inputs.depth_k + c_depth.astype(np.float32), inputs.depth_v)
  out, lse, grads = _run(impl, _arrays(inputs), inputs)
  out_s, lse_s, grads_s = _run(impl, shifted, inputs)
  q_c = np.sum(to_f64(inputs.q) * c_query, axis=-1)
  expected_lse = to_f64(lse) + scale * q_c
  expected_dq = to_f64(grads[0]) + scale * to_f64(inputs.d_lse)[..., None] * c_query
  _assert_all_close(("out", "lse", *_GRADS), (out_s, lse_s, *grads_s),
                    (out, expected_lse, expected_dq, *grads[1:]))


@pytest.mark.parametrize("impl", impl_params(kernel=False))
def test_value_translation(impl):
  # The weights of one query sum to 1, so adding u to every value of a kv head adds u to out; the
  # extra d_out . u enters every dp_i and delta alike, so no gradient changes.
  inputs = make_inputs(_BASE)
  u_seq, u_depth, u_query = _per_kv_head_shift(np.random.default_rng(6), inputs)
  shifted = (inputs.q, inputs.k, inputs.v + u_seq.astype(np.float32), inputs.depth_k,
             inputs.depth_v + u_depth.astype(np.float32))
  out, lse, grads = _run(impl, _arrays(inputs), inputs)
  out_s, lse_s, grads_s = _run(impl, shifted, inputs)
  _assert_all_close(("out", "lse", *_GRADS), (out_s, lse_s, *grads_s),
                    (to_f64(out) + u_query, lse, *grads))


@pytest.mark.parametrize("impl", impl_params(kernel=True))
def test_gradient_sum_identities(impl):
  # Per query, the logit cotangents dx_i sum to d_lse and the weights p_i to 1. Summing the analytic
  # gradients (see oracle.py) over everything a kv head feeds gives, for each batch row and kv head:
  #   sum_s dk_s + sum_{t,l} ddepth_k[t,l] = scale * sum_{t, h in group} d_lse[t,h] q[t,h]
  #   sum_s dv_s + sum_{t,l} ddepth_v[t,l] = sum_{t, h in group} d_out[t,h]
  # and, since logits are bilinear in q and the keys, and out is linear in the values:
  #   <q, dq> = <k, dk> + <depth_k, ddepth_k>,      <v, dv> + <depth_v, ddepth_v> = <out, d_out>
  inputs = make_inputs(_BASE)
  out, _, grads = _run(impl, _arrays(inputs), inputs)
  q, k, v, depth_k, depth_v, d_out, d_lse = map(to_f64, (*_arrays(inputs), inputs.d_out, inputs.d_lse))
  dq, dk, dv, ddk, ddv = map(to_f64, grads)
  batch, seq_len, q_heads, head_dim = q.shape
  kv_heads = k.shape[2]
  per_kv = lambda x_BTHD: x_BTHD.reshape(batch, seq_len, kv_heads, q_heads // kv_heads, head_dim).sum((1, 3))
  scale = head_dim ** -0.5
  assert_close("sum dk", dk.sum(1) + ddk.sum((1, 2)), scale * per_kv(d_lse[..., None] * q), "float32")
  assert_close("sum dv", dv.sum(1) + ddv.sum((1, 2)), per_kv(d_out), "float32")
  # The inner products cancel heavily, so their error is measured against the sum of |terms|.
  key_side = (k * dk, depth_k * ddk)
  value_side = (v * dv, depth_v * ddv)
  for name, lhs, rhs in (("<q,dq> = <k,dk>", (q * dq,), key_side),
                         ("<v,dv> = <out,d_out>", value_side, (to_f64(out) * d_out,))):
    gap = abs(sum(x.sum() for x in lhs) - sum(x.sum() for x in rhs))
    magnitude = sum(np.abs(x).sum() for x in (*lhs, *rhs))
    assert gap <= TOLERANCES["float32"][0] * magnitude, f"{name}: gap {gap:.3g} of {magnitude:.3g}"


@pytest.mark.parametrize("impl", impl_params(kernel=False))
def test_causal_prefix_ignores_later_tokens(impl):
  inputs = make_inputs(_BASE)
  prefix = 11
  cut = lambda x: x[:, :prefix]
  attend = jitted(lambda *a, segment_ids: call(impl, *a, depth_len=4, segment_ids=segment_ids))
  out = attend(*_arrays(inputs), segment_ids=inputs.segment_ids)
  out_prefix = attend(*map(cut, _arrays(inputs)), segment_ids=cut(inputs.segment_ids))
  assert_close("out[:prefix]", out_prefix, cut(out), "float32")


@pytest.mark.parametrize("impl", impl_params(kernel=False))
def test_api_defaults(impl):
  # return_lse=False returns out alone; scale=None is D ** -0.5; depth_len=None is L.
  inputs = make_inputs(_BASE)
  explicit = jitted(lambda *a: call(impl, *a, depth_len=6, scale=_BASE.head_dim ** -0.5,
                                    return_lse=True))
  out, lse = explicit(*_arrays(inputs))
  plain = jitted(lambda *a: call(impl, *a))(*_arrays(inputs))
  assert isinstance(plain, jax.Array)
  np.testing.assert_array_equal(plain, out)
  assert lse.shape == inputs.q.shape[:3] and lse.dtype == jnp.float32


@pytest.mark.parametrize("impl", impl_params(kernel=True))
def test_depth_q_folds_a_key_gain(impl):
  # The model's identity: a per-feature gain on the depth keys equals the same gain on the depth
  # query, q . (gain * k) = (q * gain) . k, with the gradients related by the chain rule
  # (d depth_k = gain * d(gain * depth_k), dq = dq_sequence + gain * d depth_q). Checks out, lse and
  # all six gradients of the depth_q path against the plain path, independently of the oracle.
  inputs = make_inputs(_BASE)
  gain_111D = jnp.asarray(rng_for("gain").uniform(0.5, 1.5, size=(1, 1, 1, _BASE.head_dim)),
                          jnp.float32)
  gain_1111D = gain_111D[None]
  q, k, v, depth_k, depth_v = _arrays(inputs)
  out_a, lse_a, grads_a = _run(impl, (q, k, v, depth_k * gain_1111D, depth_v), inputs)
  out_b, lse_b, grads_b = _run(impl, (q, k, v, depth_k, depth_v, q * gain_111D), inputs)
  dq_b, dk_b, dv_b, ddepth_k_b, ddepth_v_b, ddepth_q_b = grads_b
  _assert_all_close(("out", "lse", "dq", "dk", "dv", "ddepth_k", "ddepth_v"),
                    (out_b, lse_b, dq_b + ddepth_q_b * gain_111D, dk_b, dv_b, ddepth_k_b, ddepth_v_b),
                    (out_a, lse_a, grads_a[0], grads_a[1], grads_a[2], grads_a[3] * gain_1111D,
                     grads_a[4]))
  # depth_q = q is the default: identical outputs, and its gradient is the depth part of dq.
  out_c, lse_c, grads_c = _run(impl, (q, k, v, depth_k, depth_v, q), inputs)
  out_d, lse_d, grads_d = _run(impl, (q, k, v, depth_k, depth_v), inputs)
  _assert_all_close(("out", "lse", "dq", "ddepth_k"),
                    (out_c, lse_c, grads_c[0] + grads_c[5], grads_c[3]), (out_d, lse_d, grads_d[0], grads_d[3]))
