"""The Transformer against an independent float64 NumPy transformer written from the raw params.

The oracle keeps the depth stream as a Python list of per-token (K, V) slots and concatenates
whatever has been written so far, with no buffers and no depth_len masking, so it checks the
model's buffer bookkeeping and the semantics of docs/moda.md §3 (raw K/V written before QK-norm and
RoPE; the reader's k-norm at read time; no RoPE on depth keys; FFN K/V from the FFN's input; slot
order; last block writes nothing) rather than re-implementing them the same way.
"""

import jax
import numpy as np
import pytest

import model_cases as cases
from moda_jax.model.param_layout import scan_to_loop

# float32 model vs float64 oracle.
_ATOL, _RTOL = 2e-5, 2e-4


def _rms(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _rope(x_BTHD, pos_BT, theta):
  half = x_BTHD.shape[-1] // 2
  angle = pos_BT[:, :, None, None] * theta ** (-np.arange(half) * 2.0 / x_BTHD.shape[-1])
  x1, x2 = x_BTHD[..., :half], x_BTHD[..., half:]
  return np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle),
                         x2 * np.cos(angle) + x1 * np.sin(angle)], axis=-1)


def _attend(q_BTHD, k_BTKD, v_BTKD, slots, seg_BT):
  """One softmax over visible sequence keys and the token's own depth slots (a list of (k, v))."""
  _, seq_len, num_heads, head_dim = q_BTHD.shape
  group = num_heads // k_BTKD.shape[2]
  k_BTHD, v_BTHD = np.repeat(k_BTKD, group, axis=2), np.repeat(v_BTKD, group, axis=2)
  logits = np.einsum("bthd,bshd->bhts", q_BTHD, k_BTHD) / np.sqrt(head_dim)
  visible = np.tril(np.ones((seq_len, seq_len), bool))[None] & (seg_BT[:, :, None] == seg_BT[:, None, :])
  logits = np.where(visible[:, None], logits, -np.inf)
  values = [np.broadcast_to(v_BTHD[:, None].transpose(0, 3, 2, 1, 4), logits.shape + (head_dim,))]
  if slots:
    dk_BTLHD = np.repeat(np.stack([k for k, _ in slots], axis=2), group, axis=3)
    dv_BTLHD = np.repeat(np.stack([v for _, v in slots], axis=2), group, axis=3)
    depth_logits = np.einsum("bthd,btlhd->bhtl", q_BTHD, dk_BTLHD) / np.sqrt(head_dim)
    logits = np.concatenate([logits, depth_logits], axis=-1)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  out = np.einsum("bhts,bshd->bthd", probs[..., :seq_len], v_BTHD)
  if slots:
    out += np.einsum("bhtl,btlhd->bthd", probs[..., seq_len:], dv_BTLHD)
  return out


def _block(cfg, p, x, slots, pos, seg, writes):
  """Returns (x_out, new slots in order)."""
  a, eps = p["attention"], cfg.norm_eps
  proj = lambda h, w: np.einsum("btm,mkd->btkd", h, w)
  new = []

  def attention(h):
    q, k, v = proj(h, a["query"]["kernel"]), proj(h, a["key"]["kernel"]), proj(h, a["value"]["kernel"])
    if writes and cfg.depth_kv != "none":
      dkv = a.get("depth_kv")
      new.append((proj(h, dkv["key"]["kernel"]), proj(h, dkv["value"]["kernel"])) if dkv else (k, v))
    read = list(slots)
    if cfg.qk_norm:
      q, k = _rms(q, a["query_norm"]["scale"], eps), _rms(k, a["key_norm"]["scale"], eps)
      read = [(_rms(sk, a["key_norm"]["scale"], eps), sv) for sk, sv in read]
    q, k = _rope(q, pos, cfg.rope_theta), _rope(k, pos, cfg.rope_theta)
    return np.einsum("bthd,hdm->btm", _attend(q, k, v, read, seg), a["out"]["kernel"])

  def ffn(h):
    if writes and cfg.depth_kv in ("attn_ffn", "attn_ffn_extra"):
      f = p["ffn_depth_kv"]
      new.append((proj(h, f["key"]["kernel"]), proj(h, f["value"]["kernel"])))
    m = p["mlp"]
    gate, up = h @ m["gate"]["kernel"], h @ m["up"]["kernel"]
    return (gate / (1 + np.exp(-gate)) * up) @ m["down"]["kernel"]

  n1 = lambda h: _rms(h, p["attention_norm"]["scale"], eps)
  n2 = lambda h: _rms(h, p["mlp_norm"]["scale"], eps)
  if cfg.norm == "pre":
    h = x + attention(n1(x))
    out = h + ffn(n2(h))
  elif cfg.norm == "post":
    h = n1(x + attention(x))
    out = n2(h + ffn(h))
  else:
    h = x + n1(attention(x))
    out = h + n2(ffn(h))
  return out, new


def reference_logits(cfg, params, tokens, seg=None, pos=None):
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), scan_to_loop(params))
  batch, seq_len = tokens.shape
  seg = np.zeros((batch, seq_len), int) if seg is None else np.asarray(seg)
  pos = np.broadcast_to(np.arange(seq_len), (batch, seq_len)) if pos is None else np.asarray(pos)
  x = p["embed"]["embedding"][np.asarray(tokens)]
  slots = []
  for i in range(cfg.num_layers - 1):
    x, new = _block(cfg, p[f"block_{i}"], x, slots, pos, seg, writes=True)
    slots += new
  x, new = _block(cfg, p["last_block"], x, slots, pos, seg, writes=False)
  assert not new
  x = _rms(x, p["final_norm"]["scale"], cfg.norm_eps)
  table = p["embed"]["embedding"].T if cfg.tie_embeddings else p["unembed"]
  return x @ table


# Every variant under OLMo2's reordered norm, and the other placements with the default variant.
_CASES = ([dict(depth_kv=v) for v in ("none", "attn", "attn_ffn", "attn_ffn_extra")]
          + [dict(norm="pre"), dict(norm="post"),
             dict(qk_norm=False, tie_embeddings=True, num_layers=2)])


@pytest.mark.parametrize("overrides", _CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_logits_match_float64_reference(overrides):
  cfg = cases.config(**overrides)
  params = cases.random_params(cfg)
  got = cases.forward_fn(cfg)(params, cases.TOKENS)
  want = reference_logits(cfg, params, cases.TOKENS)
  np.testing.assert_allclose(got, want, atol=_ATOL, rtol=_RTOL)


def test_packed_segments_and_positions_match_reference():
  cfg = cases.config(attention_impl="xla")  # the default CPU backend, with segments and depth
  params = cases.random_params(cfg)
  seg = np.array([[0] * 5 + [1] * 7, [0] * 12], np.int32)
  pos = np.array([list(range(5)) + list(range(7)), list(range(12))], np.int32)
  got = cases.forward_fn(cfg)(params, cases.TOKENS, seg, pos)
  want = reference_logits(cfg, params, cases.TOKENS, seg, pos)
  np.testing.assert_allclose(got, want, atol=_ATOL, rtol=_RTOL)
