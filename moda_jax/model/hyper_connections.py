"""Hyper-connections around a sublayer: n residual streams H [B, T, n, M] (docs/peers.md).

A sublayer T (attention or FFN, with its norm placement) reads one mix of the streams and writes
back to every stream:

    h_0 = sum_i a_i H_i              (width connection, the sublayer's input)
    H'_j = sum_i r_ij H_i + b_j T(h_0)   (depth connection; post-norm then normalizes each stream)

Dynamic HC (Zhu et al., ICLR 2025), per token, with H^ = H / rms(H) per stream:
    a = A_m + s_a tanh(H^ W_m),  r = A_r + s_a tanh(H^ W_r),  b = B + s_b tanh(H^ W_b)
mHC (Xie et al., arXiv 2512.24880), with x = vec(H) / rms(vec(H)) (the n M flattened streams):
    a = sigmoid(alpha_pre x phi_pre + b_pre),  b = 2 sigmoid(alpha_post x phi_post + b_post),
    r^T = Sinkhorn-Knopp(alpha_res mat(x phi_res) + b_res)   (doubly stochastic, t_max = 20)
The norms' gains are folded into the projections they feed (H^ W = (H / rms) (diag(g) W)): the
same function class, and no parameter whose gradient is structurally zero at init.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moda_jax.model.config import ModelConfig
from moda_jax.model.layers import rms_normalize

SINKHORN_ITERATIONS = 20  # mHC's t_max


def sinkhorn(logits_XNN: jax.Array, iterations: int = SINKHORN_ITERATIONS) -> jax.Array:
  """Sinkhorn-Knopp: exp, then `iterations` rounds of row then column normalization (float32)."""
  logits = logits_XNN.astype(jnp.float32)
  # Shifting every entry of a matrix by one constant leaves the normalized result unchanged.
  matrix = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=(-2, -1), keepdims=True)))

  def normalize_rows_then_columns(_, matrix):
    matrix = matrix / jnp.sum(matrix, axis=-1, keepdims=True)
    return matrix / jnp.sum(matrix, axis=-2, keepdims=True)
  # A loop, not unrolled rounds: the same operations in the same order, and with a static trip count
  # it is a scan, reverse-differentiable, saving the same per-round values. Unrolled, the 20 rounds
  # doubled an mHC model's compiled gradient program (HLO) and made its CPU compile 2.7x slower.
  return jax.lax.fori_loop(0, iterations, normalize_rows_then_columns, matrix)


def _dynamic(p, streams_BTNM, eps: float):
  """Dynamic HC's (a [B,T,n], r [B,T,n,n] with r[i, j] from stream i to j, b [B,T,n])."""
  h = rms_normalize(streams_BTNM.astype(jnp.float32), eps)
  f32 = lambda name: p[name].astype(jnp.float32)
  static = lambda name: f32(name)[None, None]  # broadcast over [B, T]
  project = lambda spec, name: jnp.einsum(spec, h, f32(name))
  a = static("static_alpha_m") + f32("scale_alpha") * jnp.tanh(project("btnm,m->btn", "dynamic_alpha_m"))
  r = static("static_alpha_r") + f32("scale_alpha") * jnp.tanh(project("btnm,mk->btnk", "dynamic_alpha_r"))
  b = static("static_beta") + f32("scale_beta") * jnp.tanh(project("btnm,m->btn", "dynamic_beta"))
  return a, r, b


def _manifold(p, streams_BTNM, eps: float):
  """mHC's (a, r, b) in the same convention: r[i, j] = H_res[j, i] from stream i to stream j."""
  batch, seq_len, n, m = streams_BTNM.shape
  x = rms_normalize(streams_BTNM.astype(jnp.float32).reshape(batch, seq_len, n * m), eps)
  f32 = lambda name: p[name].astype(jnp.float32)
  static = lambda name: f32(name)[None, None]  # broadcast over [B, T]
  project = lambda name: jnp.einsum("btc,ck->btk", x, f32(name))
  a = jax.nn.sigmoid(f32("gate_pre") * project("phi_pre") + static("bias_pre"))
  b = 2.0 * jax.nn.sigmoid(f32("gate_post") * project("phi_post") + static("bias_post"))
  res_BTNN = sinkhorn(f32("gate_res") * project("phi_res").reshape(batch, seq_len, n, n) + static("bias_res"))
  return a, jnp.swapaxes(res_BTNN, -1, -2), b


def width(cfg: ModelConfig, p, streams_BTNM):
  """(h_0 [B, T, M] the sublayer's input, the mixed streams [B, T, n, M], b [B, T, n])."""
  mix = _manifold if cfg.hyper_connections_manifold else _dynamic
  a, r, b = mix(p, streams_BTNM, cfg.norm_eps)
  streams = streams_BTNM.astype(jnp.float32)
  h0_BTM = jnp.einsum("btn,btnm->btm", a, streams)
  mixed_BTNM = jnp.einsum("btij,btim->btjm", r, streams)
  dtype = streams_BTNM.dtype
  return h0_BTM.astype(dtype), mixed_BTNM.astype(dtype), b


def depth(mixed_BTNM, b_BTN, out_BTM):
  """H'_j = mixed_j + b_j * out: the sublayer's output written back to every stream."""
  written = b_BTN[..., None] * out_BTM.astype(jnp.float32)[:, :, None]
  return (mixed_BTNM.astype(jnp.float32) + written).astype(mixed_BTNM.dtype)
