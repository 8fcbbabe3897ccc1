"""`reference.dense_attention` with explicit token positions, as decoding calls it.

Queries, sequence keys and depth tokens each carry their own positions, so one new token can attend to
a KV cache and to the depth slots of its chunk. Checked against the float64 oracle of the full sequence
(decoding must reproduce the rows of a full forward), and for its weights (`return_probs`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oracle
from operator_cases import Case, assert_close, make_inputs, to_f64
from pallas_kernels import api, reference

_CASE = Case("dense", batch=2, seq_len=11, q_heads=4, kv_heads=2, slots=4, depth_start=1, depth_len=3,
             garbage=True, segments="packed")
_CHUNK = 3


def _full(inputs, **options):
  """Oracle rows of the full causal call with depth_chunk=3, depth_start=1, depth_len=3."""
  return oracle.forward(inputs.q, inputs.k, inputs.v, inputs.depth_k, inputs.depth_v, depth_start=1,
                        depth_len=3, depth_chunk=_CHUNK, segment_ids=inputs.segment_ids, **options)


def _spec(inputs):
  return api.prepare(inputs.q, inputs.k, inputs.v, inputs.depth_k, inputs.depth_v,
                     depth_chunk=_CHUNK, segment_ids=inputs.segment_ids)[1]


@pytest.mark.parametrize("query_token", [0, 4, 5, 10])
def test_one_query_against_a_cache_matches_the_full_forward(query_token):
  # Decoding: query token t against every cached key (the Spec's causal mask hides s > t) and the
  # depth of the tokens of its chunk only, passed at their own positions.
  inputs = make_inputs(_CASE)
  expected_out, expected_lse = _full(inputs)
  tokens = jnp.broadcast_to(jnp.arange(_CASE.seq_len, dtype=jnp.int32), (2, _CASE.seq_len))
  chunk = np.arange(query_token // _CHUNK * _CHUNK, query_token + 1)
  at = lambda x: x[:, query_token:query_token + 1]
  out, lse = reference.dense_attention(
      at(inputs.q), inputs.k, inputs.v, None, inputs.depth_k[:, chunk], inputs.depth_v[:, chunk],
      spec=_spec(inputs), q_tokens_BT=at(tokens), k_tokens_BS=tokens, depth_tokens_BX=tokens[:, chunk],
      depth_start=1, depth_len=3, q_segments_BT=at(inputs.segment_ids), k_segments_BS=inputs.segment_ids,
      depth_segments_BX=inputs.segment_ids[:, chunk])
  assert_close("out", out, expected_out[:, query_token:query_token + 1], "float32")
  assert_close("lse", lse, expected_lse[:, query_token:query_token + 1], "float32")


def test_keys_at_or_past_seq_len_are_never_seen():
  # A cache of 11 slots of which only the first 7 are written: spec.seq_len = 7 hides the rest, so the
  # garbage after them changes nothing (non-causal, so position alone would not hide them).
  inputs = make_inputs(_CASE)
  spec = api.prepare(inputs.q, inputs.k, inputs.v, causal=False)[1]
  short_spec = api.prepare(inputs.q[:, :7], inputs.k[:, :7], inputs.v[:, :7], causal=False)[1]
  tokens = jnp.broadcast_to(jnp.arange(11, dtype=jnp.int32), (2, 11))
  garbage_k = inputs.k.at[:, 7:].set(1e4)
  dense = lambda spec, k, v: reference.dense_attention(
      inputs.q[:, :7], k, v, None, None, None, spec=spec, q_tokens_BT=tokens[:, :7], k_tokens_BS=tokens,
      depth_tokens_BX=None, depth_start=None, depth_len=None)
  out, lse = dense(short_spec, garbage_k, inputs.v)
  expected_out, expected_lse = oracle.forward(inputs.q[:, :7], inputs.k[:, :7], inputs.v[:, :7], causal=False)
  assert_close("out", out, expected_out, "float32")
  assert_close("lse", lse, expected_lse, "float32")
  assert not jnp.allclose(dense(spec, garbage_k, inputs.v)[0], out)  # the control: seq_len matters


def test_probs_are_the_weights_in_column_order():
  # probs columns: the S sequence keys, then depth token-major (x * L + l). Rebuilding out from them
  # with the values in that order gives out back; hidden columns are exactly 0; rows sum to 1.
  inputs = make_inputs(_CASE)
  prepared, spec = api.prepare(inputs.q, inputs.k, inputs.v, inputs.depth_k, inputs.depth_v, depth_start=1,
                               depth_len=3, depth_chunk=_CHUNK, segment_ids=inputs.segment_ids)
  tokens = jnp.broadcast_to(jnp.arange(_CASE.seq_len, dtype=jnp.int32), (2, _CASE.seq_len))
  out, lse, probs = reference.dense_attention(
      inputs.q, inputs.k, inputs.v, None, inputs.depth_k, inputs.depth_v, spec=spec, q_tokens_BT=tokens,
      k_tokens_BS=tokens, depth_tokens_BX=tokens, depth_start=1, depth_len=3,
      q_segments_BT=inputs.segment_ids, k_segments_BS=inputs.segment_ids,
      depth_segments_BX=inputs.segment_ids, return_probs=True)
  seq_len, slots = _CASE.seq_len, _CASE.slots
  assert probs.shape == (2, seq_len, 4, seq_len + seq_len * slots)
  np.testing.assert_allclose(to_f64(probs).sum(-1), 1.0, rtol=1e-6)
  values_BCKD = np.concatenate([to_f64(inputs.v), to_f64(inputs.depth_v).reshape(2, -1, 2, 32)], axis=1)
  rebuilt = np.einsum("btkgc,bckd->btkgd", to_f64(probs).reshape(2, seq_len, 2, 2, -1), values_BCKD)
  assert_close("rebuilt out", rebuilt.reshape(out.shape), out, "float32")
  depth_probs = to_f64(probs)[..., seq_len:].reshape(2, seq_len, 4, seq_len, slots)
  assert not depth_probs[..., [0, 3]].any()  # slots outside [depth_start, depth_len)
  assert not np.triu(depth_probs.transpose(0, 2, 4, 1, 3), k=1).any()  # a later token's depth
  assert not np.triu(to_f64(probs)[..., :seq_len].transpose(0, 2, 1, 3), k=1).any()  # causal
  # `attention` visits the queries one at a time with their own depth windows: the same logits in
  # another summation order.
  assert_close("attention", reference.attention(prepared, spec)[0], out, "float32")


def test_a_query_that_sees_nothing_gets_zero_weights_and_gradients():
  # Depth-only with depth_start = depth_len: every row is empty. Random cotangents on out, lse and
  # probs must all pull back to exactly zero, with no NaN from the -inf lse.
  inputs = make_inputs(_CASE)
  _, spec = api.prepare(inputs.q, None, None, inputs.depth_k, inputs.depth_v)
  tokens = jnp.broadcast_to(jnp.arange(_CASE.seq_len, dtype=jnp.int32), (2, _CASE.seq_len))
  dense = lambda q, depth_k, depth_v: reference.dense_attention(
      q, None, None, None, depth_k, depth_v, spec=spec, q_tokens_BT=tokens, k_tokens_BS=None,
      depth_tokens_BX=tokens, depth_start=2, depth_len=2, return_probs=True)
  (out, lse, probs), pullback = jax.vjp(dense, inputs.q, inputs.depth_k, inputs.depth_v)
  assert not np.asarray(out).any() and not np.asarray(probs).any() and np.isneginf(np.asarray(lse)).all()
  rng = np.random.default_rng(9)
  cotangents = tuple(jnp.asarray(rng.normal(size=x.shape), x.dtype) for x in (out, lse, probs))
  for grad in pullback(cotangents):
    assert np.isfinite(np.asarray(grad)).all() and not np.asarray(grad).any()
