"""Float64 NumPy references of the depth mixers (docs/peers.md), written from the papers' equations.

They run on the raw parameters with Python loops over blocks, sublayers and residual streams, keep
earlier outputs in Python lists (no buffers, no masks, no per-block rows) and reuse only the plain
model oracle's attention, RMSNorm and RoPE (tests/test_model_reference.py). Each mixer is written
the way its paper states it:
  * DenseFormer: Y_i = sum_{j<=i+1} alpha_ij X_j after block i (X_0 the embedding); the next block
    reads Y_i and the model's output is Y_{N-1}.
  * Value residual: V'_n = lambda_n1 V_1 + lambda_n2 V_n for n >= 2.
  * Hyper-connections: H'_j = sum_i A_r[i, j] H_i + B_j T(sum_i A_m[i] H_i) with the dynamic
    A = A_static + s tanh(norm(H) W); mHC: sigmoid / 2 sigmoid / Sinkhorn maps of vec(H).
  * Attention residuals: h_l = sum_i softmax_i(w_l . RMSNorm(v_i)) v_i over v_0 = the embedding and
    every earlier sublayer output v_i = f_i(h_i).
  * Depth attention: the sequence softmax and a separate depth-only softmax over the token's own
    depth slots, added.
"""

import jax
import numpy as np

from moda_jax.model.param_layout import scan_to_loop
from test_model_reference import _attend, _rms, _rope


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _unit_rms(x, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def sinkhorn(logits, iterations=20):
  """exp, then alternately rows and columns normalized to sum 1 (last two axes)."""
  m = np.exp(logits - logits.max(axis=(-2, -1), keepdims=True))
  for _ in range(iterations):
    m = m / m.sum(-1, keepdims=True)
    m = m / m.sum(-2, keepdims=True)
  return m


def _depth_only(q_BTHD, slots):
  """Depth attention's own softmax over the token's own slots (0 without slots)."""
  if not slots:
    return np.zeros_like(q_BTHD)
  group = q_BTHD.shape[2] // slots[0][0].shape[2]
  dk = np.repeat(np.stack([k for k, _ in slots], axis=2), group, axis=3)
  dv = np.repeat(np.stack([v for _, v in slots], axis=2), group, axis=3)
  logits = np.einsum("bthd,btlhd->bthl", q_BTHD, dk) / np.sqrt(q_BTHD.shape[-1])
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("bthl,btlhd->bthd", probs, dv)


class _Block:
  """One block's two sublayer functions, recording the depth K/V they write in `self.new`."""

  def __init__(self, cfg, p, slots, pos, seg, writes, value_mix=None):
    self.cfg, self.p, self.slots, self.pos, self.seg, self.writes = cfg, p, slots, pos, seg, writes
    self.value_mix, self.new, self.values = value_mix, [], None
    eps = cfg.norm_eps
    self.n1 = lambda h: _rms(h, p["attention_norm"]["scale"], eps)
    self.n2 = lambda h: _rms(h, p["mlp_norm"]["scale"], eps)

  def attention(self, h):
    cfg, a, eps = self.cfg, self.p["attention"], self.cfg.norm_eps
    proj = lambda w: np.einsum("btm,mkd->btkd", h, w)
    q, k, v = proj(a["query"]["kernel"]), proj(a["key"]["kernel"]), proj(a["value"]["kernel"])
    self.values = v
    if self.writes and cfg.depth_layout != "none":
      dkv = a.get("depth_kv")
      self.new.append((proj(dkv["key"]["kernel"]), proj(dkv["value"]["kernel"])) if dkv else (k, v))
    if self.value_mix is not None:
      (lam1, lam2), v1 = self.value_mix
      v = lam1 * v1 + lam2 * v
    read = [(_rms(sk, a["key_norm"]["scale"], eps), sv) for sk, sv in self.slots]
    q, k = _rms(q, a["query_norm"]["scale"], eps), _rms(k, a["key_norm"]["scale"], eps)
    q, k = _rope(q, self.pos, cfg.rope_theta), _rope(k, self.pos, cfg.rope_theta)
    if cfg.depth_mixer == "depth_attention":
      out = _attend(q, k, v, [], self.seg) + _depth_only(q, read)
    else:
      out = _attend(q, k, v, read, self.seg)
    return np.einsum("bthd,hdm->btm", out, a["out"]["kernel"])

  def ffn(self, h):
    if self.writes and self.cfg.depth_layout in ("attn_ffn", "attn_ffn_extra"):
      f = self.p["ffn_depth_kv"]
      self.new.append((np.einsum("btm,mkd->btkd", h, f["key"]["kernel"]),
                       np.einsum("btm,mkd->btkd", h, f["value"]["kernel"])))
    m = self.p["mlp"]
    gate, up = h @ m["gate"]["kernel"], h @ m["up"]["kernel"]
    return (gate / (1 + np.exp(-gate)) * up) @ m["down"]["kernel"]


def _residual(norm, h, f, n):
  """The residual step of one sublayer: pre h + f(n(h)), post n(h + f(h)), reordered h + n(f(h))."""
  if norm == "pre":
    return h + f(n(h))
  if norm == "post":
    return n(h + f(h))
  return h + n(f(h))


def _branch(norm, h, f, n):
  """What a sublayer contributes (the part a mixer recombines): f(n(h)), n(f(h)) or f(h)."""
  if norm == "pre":
    return f(n(h))
  return n(f(h)) if norm == "reordered" else f(h)


def _hyper_connection(cfg, mp, kind, b, streams, f, n):
  """One sublayer wrapped in (dynamic or manifold-constrained) hyper-connections."""
  get = lambda name: mp[kind][name][b]
  num, eps = len(streams), cfg.norm_eps
  if not cfg.hyper_connections_manifold:
    unit = [_unit_rms(s, eps) for s in streams]
    a_m = [get("static_alpha_m")[i] + get("scale_alpha") * np.tanh(unit[i] @ get("dynamic_alpha_m"))
           for i in range(num)]
    a_r = [[get("static_alpha_r")[i, j] + get("scale_alpha") * np.tanh(unit[i] @ get("dynamic_alpha_r")[:, j])
            for j in range(num)] for i in range(num)]
    beta = [get("static_beta")[j] + get("scale_beta") * np.tanh(unit[j] @ get("dynamic_beta"))
            for j in range(num)]
    mixed = [sum(a_r[i][j][..., None] * streams[i] for i in range(num)) for j in range(num)]
  else:
    x = _unit_rms(np.concatenate(streams, axis=-1), eps)  # vec(H): stream-major
    a_m = list(np.moveaxis(_sigmoid(get("gate_pre") * (x @ get("phi_pre")) + get("bias_pre")), -1, 0))
    beta = list(np.moveaxis(2 * _sigmoid(get("gate_post") * (x @ get("phi_post")) + get("bias_post")), -1, 0))
    logits = get("gate_res") * (x @ get("phi_res")).reshape(x.shape[:2] + (num, num)) + get("bias_res")
    res = sinkhorn(logits)  # H_res[i, j]: x_{l+1} = H_res x_l
    mixed = [sum(res[..., i, j][..., None] * streams[j] for j in range(num)) for i in range(num)]
  out = _branch(cfg.norm, sum(a_m[i][..., None] * streams[i] for i in range(num)), f, n)
  new = [mixed[j] + beta[j][..., None] * out for j in range(num)]
  return [n(s) for s in new] if cfg.norm == "post" else new


def _attention_residual(query, values, eps):
  logits = np.stack([_unit_rms(v, eps) @ query for v in values], axis=-1)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return sum(weights[..., i, None] * v for i, v in enumerate(values))


def reference_logits(cfg, params, tokens):
  """The model's float64 logits under `cfg.depth_mixer`, written from the mixer's equations."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), scan_to_loop(params))
  mp = p.get("depth_mixer", {})
  batch, seq_len = tokens.shape
  seg = np.zeros((batch, seq_len), int)
  pos = np.broadcast_to(np.arange(seq_len), (batch, seq_len))
  x = p["embed"]["embedding"][np.asarray(tokens)]
  num, norm, mixer = cfg.num_layers, cfg.norm, cfg.depth_mixer
  slots, outputs, v1 = [], [x], None  # depth K/V; X_0.. (DenseFormer) or v_0.. (attention residuals)
  streams = [x] * cfg.hyper_connections_streams
  if mixer == "denseformer":  # the flat DWA vector: block i's i + 2 weights after block i - 1's
    sizes = [i + 2 for i in range(num)]
    alphas = np.split(mp["dwa"], np.cumsum(sizes)[:-1])
  for i in range(num):
    writes = i < num - 1
    bp = p[f"block_{i}"] if writes else p["last_block"]
    value_mix = None
    if mixer == "value_residual" and i > 0:
      value_mix = (mp["lambdas"][i - 1], v1)
    blk = _Block(cfg, bp, slots, pos, seg, writes, value_mix)
    if mixer == "hyper_connections":
      streams = _hyper_connection(cfg, mp, "attention", i, streams, blk.attention, blk.n1)
      streams = _hyper_connection(cfg, mp, "mlp", i, streams, blk.ffn, blk.n2)
    elif mixer == "attention_residuals":
      outputs.append(_branch(norm, x, blk.attention, blk.n1))
      h = _attention_residual(mp["query_mlp"][i], outputs, cfg.norm_eps)
      outputs.append(_branch(norm, blk.n1(h) if norm == "post" else h, blk.ffn, blk.n2))
      x = _attention_residual(mp["query_next"][i], outputs, cfg.norm_eps)
      x = blk.n2(x) if norm == "post" else x
    else:
      out = _residual(norm, _residual(norm, x, blk.attention, blk.n1), blk.ffn, blk.n2)
      if mixer == "denseformer":
        outputs.append(out)
        out = sum(alphas[i][j] * outputs[j] for j in range(i + 2))
      x = out
      if i == 0:
        v1 = blk.values
    slots = slots + blk.new
  if mixer == "hyper_connections":
    x = sum(streams)
  x = _rms(x, p["final_norm"]["scale"], cfg.norm_eps)
  table = p["embed"]["embedding"].T if cfg.tie_embeddings else p["unembed"]
  return x @ table
