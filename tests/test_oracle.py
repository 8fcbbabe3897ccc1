"""The float64 oracle's own checks: hand-computed values and central finite differences.

Everything else in the operator suite trusts `oracle.py`, so it is checked here against things that
do not share its code: closed forms on tiny inputs, and numerical derivatives of its own forward.
"""

import numpy as np
import pytest

import oracle


def test_single_key_is_identity_on_values():
  # T = 1 and no depth: the only visible key gets weight 1, and lse is just its logit.
  rng = np.random.default_rng(0)
  q, k, v = (rng.normal(size=(1, 1, 1, 4)) for _ in range(3))
  out, lse = oracle.forward(q, k, v, scale=0.7)
  np.testing.assert_allclose(out, v, rtol=1e-14)
  np.testing.assert_allclose(lse[0, 0, 0], 0.7 * q[0, 0, 0] @ k[0, 0, 0], rtol=1e-14)


def test_two_tokens_one_depth_slot_by_hand():
  # Token 1 (causal) sees sequence keys 0, 1 and its own depth slot 0; slot 1 is unwritten.
  q = np.array([0.0, 0.0, 1.0, 2.0]).reshape(1, 2, 1, 2)
  k = np.array([1.0, 0.0, 0.0, 1.0]).reshape(1, 2, 1, 2)
  v = np.array([1.0, 2.0, 3.0, 4.0]).reshape(1, 2, 1, 2)
  depth_k = np.zeros((1, 2, 2, 1, 2))
  depth_v = np.zeros((1, 2, 2, 1, 2))
  depth_k[0, 1, 0, 0] = [1.0, 1.0]
  depth_v[0, 1, 0, 0] = [5.0, 6.0]
  depth_k[0, 1, 1, 0] = [1e3, 1e3]  # unwritten: must not matter
  out, lse = oracle.forward(q, k, v, depth_k, depth_v, depth_len=1, scale=1.0)
  logits = np.array([1.0, 2.0, 3.0])  # q1 . [k0, k1, depth_k[1, 0]]
  weights = np.exp(logits) / np.exp(logits).sum()
  expected = weights @ np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
  np.testing.assert_allclose(out[0, 1, 0], expected, rtol=1e-14)
  np.testing.assert_allclose(lse[0, 1, 0], np.log(np.exp(logits).sum()), rtol=1e-14)
  # Token 0: logits q0 . [k0, depth_k[0, 0]] are both 0 -> the plain average of v0 and depth_v[0, 0].
  np.testing.assert_allclose(out[0, 0, 0], [0.5, 1.0], rtol=1e-14)


def test_segments_and_non_causal_by_masking_out_keys():
  # Non-causal with segments [0, 1, 0]: token 0 sees tokens 0 and 2, exactly like a 2-token sequence.
  rng = np.random.default_rng(1)
  q, k, v = (rng.normal(size=(1, 3, 2, 3)) for _ in range(3))
  out, lse = oracle.forward(q, k, v, causal=False, segment_ids=np.array([[0, 1, 0]]))
  keep = [0, 2]
  out_sub, lse_sub = oracle.forward(q[:, keep], k[:, keep], v[:, keep], causal=False)
  np.testing.assert_allclose(out[:, keep], out_sub, rtol=1e-13)
  np.testing.assert_allclose(lse[:, keep], lse_sub, rtol=1e-13)
  np.testing.assert_allclose(out[:, 1], v[:, 1], rtol=1e-13)  # alone in its segment


_FD_VARIANTS = {
    "causal": dict(causal=True),
    "noncausal": dict(causal=False),
    "depth_q": dict(causal=True, with_depth_q=True),
    "chunk2_depth_start": dict(causal=True, depth_chunk=2, depth_start=1),
    "depth_only_chunk3": dict(causal=True, depth_only=True, depth_chunk=3, with_depth_q=True),
}


@pytest.mark.parametrize("variant", list(_FD_VARIANTS))
def test_gradients_match_central_differences(variant):
  options = dict(_FD_VARIANTS[variant])
  with_depth_q = options.pop("with_depth_q", False)
  depth_only = options.pop("depth_only", False)
  rng = np.random.default_rng(len(variant))
  batch, seq_len, q_heads, kv_heads, head_dim, slots, depth_len = 1, 4, 4, 2, 3, 3, 2
  arrays = {
      "q": rng.normal(size=(batch, seq_len, q_heads, head_dim)),
      "k": rng.normal(size=(batch, seq_len, kv_heads, head_dim)),
      "v": rng.normal(size=(batch, seq_len, kv_heads, head_dim)),
      "depth_k": rng.normal(size=(batch, seq_len, slots, kv_heads, head_dim)),
      "depth_v": rng.normal(size=(batch, seq_len, slots, kv_heads, head_dim)),
  }
  if depth_only:
    arrays["k"] = arrays["v"] = None
  if with_depth_q:
    arrays["depth_q"] = rng.normal(size=(batch, seq_len, q_heads, head_dim))
  d_out = rng.normal(size=(batch, seq_len, q_heads, head_dim))
  d_lse = rng.normal(size=(batch, seq_len, q_heads))
  options.update(depth_len=depth_len, scale=0.8, segment_ids=np.array([[3, 3, 3, 5]]))

  def loss(values):
    out, lse = oracle.forward(**values, **options)
    return np.sum(out * d_out) + np.sum(lse * d_lse)

  grads = oracle.backward(**arrays, d_out=d_out, d_lse=d_lse, **options)._asdict()
  eps = 1e-6
  for name, x in arrays.items():
    if x is None:
      assert grads[name] is None, name
      continue
    numeric = np.zeros_like(x)
    for index in np.ndindex(x.shape):
      plus, minus = dict(arrays), dict(arrays)
      plus[name], minus[name] = x.copy(), x.copy()
      plus[name][index] += eps
      minus[name][index] -= eps
      numeric[index] = (loss(plus) - loss(minus)) / (2 * eps)
    np.testing.assert_allclose(grads[name], numeric, rtol=1e-6, atol=1e-8, err_msg=name)
  # Hidden slots are omitted from every key list, so their gradient is exactly zero.
  hidden = np.ones(slots, bool)
  hidden[options.get("depth_start", 0):depth_len] = False
  assert not grads["depth_k"][:, :, hidden].any() and not grads["depth_v"][:, :, hidden].any()


def test_chunk_by_hand():
  # C = 2, four tokens: token 1 sees the depth of tokens 0 and 1, token 2 only its own, token 3 of
  # tokens 2 and 3. Depth-only with one slot, scale 1 and zero queries: equal logits, so each output
  # is the plain average of the visible depth values.
  q = np.zeros((1, 4, 1, 1))
  depth_k = np.zeros((1, 4, 1, 1, 1))
  depth_v = np.array([1.0, 2.0, 4.0, 8.0]).reshape(1, 4, 1, 1, 1)
  out, lse = oracle.forward(q, None, None, depth_k, depth_v, depth_chunk=2, scale=1.0)
  np.testing.assert_allclose(out[0, :, 0, 0], [1.0, 1.5, 4.0, 6.0], rtol=1e-14)
  np.testing.assert_allclose(lse[0, :, 0], np.log([1, 2, 1, 2]), rtol=1e-14, atol=1e-15)
  # Segments [0, 1, 1, 1]: token 1 starts a segment, so it no longer sees token 0's depth.
  out, _ = oracle.forward(q, None, None, depth_k, depth_v, depth_chunk=2, scale=1.0,
                          segment_ids=np.array([[0, 1, 1, 1]]))
  np.testing.assert_allclose(out[0, :, 0, 0], [1.0, 2.0, 4.0, 6.0], rtol=1e-14)


def test_depth_start_and_empty_rows_by_hand():
  # Slots [0, 1, 2] with depth_start=1, depth_len=2: only slot 1 is visible, so depth-only attention
  # returns it exactly and lse is its logit; with depth_start = depth_len nothing is visible.
  rng = np.random.default_rng(4)
  q = rng.normal(size=(1, 2, 1, 3))
  depth_k, depth_v = rng.normal(size=(1, 2, 3, 1, 3)), rng.normal(size=(1, 2, 3, 1, 3))
  out, lse = oracle.forward(q, None, None, depth_k, depth_v, depth_start=1, depth_len=2, scale=1.0)
  np.testing.assert_allclose(out[0, :, 0], depth_v[0, :, 1, 0], rtol=1e-14)
  np.testing.assert_allclose(lse[0, :, 0], np.sum(q[0, :, 0] * depth_k[0, :, 1, 0], axis=-1), rtol=1e-14)
  out, lse = oracle.forward(q, None, None, depth_k, depth_v, depth_start=2, depth_len=2)
  assert not out.any() and np.isneginf(lse).all()
  grads = oracle.backward(q, None, None, depth_k, depth_v, d_out=np.ones_like(q), d_lse=np.ones((1, 2, 1)),
                          depth_start=2, depth_len=2)
  assert grads.k is None and not grads.q.any() and not grads.depth_k.any() and not grads.depth_v.any()
  # With a sequence, depth_start = depth_len is plain attention.
  k, v = rng.normal(size=(1, 2, 1, 3)), rng.normal(size=(1, 2, 1, 3))
  np.testing.assert_allclose(oracle.forward(q, k, v, depth_k, depth_v, depth_start=1, depth_len=1)[0],
                             oracle.forward(q, k, v)[0], rtol=1e-14)


def test_depth_q_scores_only_depth_keys():
  # depth_q equal to q is the default; a different depth_q changes the depth logits only, so with
  # depth_len=0 it changes nothing, and q's gradient splits into a sequence and a depth part.
  rng = np.random.default_rng(7)
  q, k, v = (rng.normal(size=(1, 3, 2, 4)) for _ in range(3))
  depth_k, depth_v = (rng.normal(size=(1, 3, 2, 2, 4)) for _ in range(2))
  depth_q = rng.normal(size=q.shape)
  d_out, d_lse = rng.normal(size=q.shape), rng.normal(size=q.shape[:3])
  default = oracle.forward(q, k, v, depth_k, depth_v)
  same = oracle.forward(q, k, v, depth_k, depth_v, depth_q=q)
  other = oracle.forward(q, k, v, depth_k, depth_v, depth_q=depth_q)
  np.testing.assert_allclose(same[0], default[0], rtol=1e-14)
  assert np.abs(other[0] - default[0]).max() > 1e-3
  unread = oracle.forward(q, k, v, depth_k, depth_v, depth_len=0, depth_q=depth_q)
  np.testing.assert_allclose(unread[0], oracle.forward(q, k, v)[0], rtol=1e-14)
  joint = oracle.backward(q, k, v, depth_k, depth_v, d_out=d_out, d_lse=d_lse)
  split = oracle.backward(q, k, v, depth_k, depth_v, d_out=d_out, d_lse=d_lse, depth_q=q)
  assert joint.depth_q is None
  np.testing.assert_allclose(split.q + split.depth_q, joint.q, rtol=1e-12, atol=1e-14)
  np.testing.assert_allclose(split.depth_k, joint.depth_k, rtol=1e-12)
