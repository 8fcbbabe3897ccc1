"""Dense float32 MoDA: one softmax over the concatenated [sequence | depth] logits of each query.

Readable above all: this is the formulation the fast backends are checked against, and the one the
model's decoding calls with explicit token positions (`dense_attention`: queries, sequence keys and
depth tokens each at their own positions, e.g. one new token against a KV cache). Which logits a query
sees comes only from `pallas_kernels.spec`. `attention` visits the queries one at a time
(`query_aligned_attention`), each against the T keys and the depth slots of the C tokens its chunk can
hold: memory O(T * (T + C * L)) per head; use `xla` or a Pallas backend for long sequences.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import spec as moda_spec

_HIGHEST = jax.lax.Precision.HIGHEST


def check_supported(inputs: moda_spec.Inputs, spec: moda_spec.Spec, interpret) -> None:
  """Every combination the api accepts is supported: depth-only, chunks, depth_start, segments, GQA."""
  del inputs, spec, interpret


def attention(inputs: moda_spec.Inputs, spec: moda_spec.Spec, *, interpret=False):
  """See `pallas_kernels.api` for the backend protocol. `interpret` is ignored.

  `query_aligned_attention` with every token at its own position arange(T).
  """
  check_supported(inputs, spec, interpret)
  batch, seq_len = inputs.q.shape[:2]
  tokens_BT = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len))
  return query_aligned_attention(
      inputs.q, inputs.k, inputs.v, inputs.depth_q, inputs.depth_k, inputs.depth_v, spec=spec,
      q_tokens_BT=tokens_BT, k_tokens_BS=tokens_BT, depth_start=inputs.depth_start,
      depth_len=inputs.depth_len, q_segments_BT=inputs.segment_ids, k_segments_BS=inputs.segment_ids)


def query_aligned_attention(q_BTHD, k_BSKD, v_BSKD, depth_q_BTHD, depth_k_BTLKD, depth_v_BTLKD, *, spec,
                            q_tokens_BT, k_tokens_BS, depth_start, depth_len, q_segments_BT=None,
                            k_segments_BS=None, return_probs=False):
  """`dense_attention` one query at a time, where the depth arrays belong to the query tokens.

  Query i reads the depth slots of the window of query tokens i - C + 1 .. i (C = spec.depth_chunk:
  the only ones its chunk can hold; `spec.depth_token_visible` decides which of them it sees), so
  memory is O(T * (S + C * L)) per head instead of the O(T * (S + T * L)) of one dense call. Same
  arguments and results as `dense_attention` (depth tokens = the queries' own); probs has
  S + C * L columns, the depth ones ordered window token-major (the query's own token last).
  """
  num_queries = q_BTHD.shape[1]
  chunk = spec.depth_chunk
  has_depth = depth_k_BTLKD is not None

  def one_query(i):
    window_C = i - chunk + 1 + jnp.arange(chunk)
    inside_C = window_C >= 0  # before the first query token: no token (position -1 is seen by none)
    index_C = jnp.maximum(window_C, 0)
    pick = lambda x_BT_: None if x_BT_ is None else jax.lax.dynamic_slice_in_dim(x_BT_, i, 1, axis=1)
    window = lambda x_BT_: None if x_BT_ is None else jnp.take(x_BT_, index_C, axis=1)
    depth_tokens_BC = None
    if has_depth:
      depth_tokens_BC = jnp.where(inside_C[None, :], window(q_tokens_BT), -1)
    result = dense_attention(
        pick(q_BTHD), k_BSKD, v_BSKD, pick(depth_q_BTHD), window(depth_k_BTLKD), window(depth_v_BTLKD),
        spec=spec, q_tokens_BT=pick(q_tokens_BT), k_tokens_BS=k_tokens_BS, depth_tokens_BX=depth_tokens_BC,
        depth_start=depth_start, depth_len=depth_len, q_segments_BT=pick(q_segments_BT),
        k_segments_BS=k_segments_BS, depth_segments_BX=window(q_segments_BT), return_probs=return_probs)
    return tuple(x[:, 0] for x in result)

  results = jax.vmap(one_query, out_axes=1)(jnp.arange(num_queries))
  return results


def dense_attention(q_BTHD, k_BSKD, v_BSKD, depth_q_BTHD, depth_k_BXLKD, depth_v_BXLKD, *, spec,
                    q_tokens_BT, k_tokens_BS, depth_tokens_BX, depth_start, depth_len,
                    q_segments_BT=None, k_segments_BS=None, depth_segments_BX=None,
                    return_probs=False):
  """MoDA for T queries against S sequence keys and the L depth slots of X depth tokens.

  Args:
    q_BTHD: queries; query head h reads kv head h // (Hq // Hk).
    k_BSKD, v_BSKD: sequence keys / values (both None: depth-only attention).
    depth_q_BTHD: the queries scored against depth keys (None: q).
    depth_k_BXLKD, depth_v_BXLKD: depth keys / values of X tokens, L slots each (both None: no depth).
    spec: the call's `Spec` (causal, scale, depth_chunk; keys at token >= spec.seq_len are never seen).
    q_tokens_BT, k_tokens_BS, depth_tokens_BX: integer token positions of the queries, the sequence
      keys and the depth tokens.
    depth_start, depth_len: only slots depth_start <= l < depth_len are visible (ints or int32 scalars;
      ignored without depth).
    q_segments_BT, k_segments_BS, depth_segments_BX: segment ids (all None: no segments).
    return_probs: also return the attention weights.

  Returns:
    (out_BTHD in q's dtype, lse_BTH float32[, probs_BTHC float32]) where the C = S + X * L columns
    of probs are the sequence keys, then the depth slots ordered token-major (x * L + l). A query that
    sees nothing gets out 0, lse -inf and probs 0, and its gradients are 0 (not NaN).
  """
  batch, num_queries, num_q_heads, head_dim = q_BTHD.shape
  num_kv_heads = (k_BSKD if k_BSKD is not None else depth_k_BXLKD).shape[-2]
  group = num_q_heads // num_kv_heads
  # Query head h reads kv head h // G: view the queries as [B, T, Hk, G, D].
  heads = lambda x_BTHD: x_BTHD.astype(jnp.float32).reshape(batch, num_queries, num_kv_heads, group, head_dim)
  q_tokens_BT1 = q_tokens_BT[:, :, None]
  q_segments_BT1 = None if q_segments_BT is None else q_segments_BT[:, :, None]

  logits, values = [], []  # per kind: [B, Hk, G, T, columns] and [B, columns, Hk, D]
  if k_BSKD is not None:
    seq_logits = spec.scale * jnp.einsum("btkgd,bskd->bkgts", heads(q_BTHD), k_BSKD.astype(jnp.float32),
                                         precision=_HIGHEST)
    visible_BTS = moda_spec.sequence_visible(
        spec, q_tokens_BT1, k_tokens_BS[:, None, :], q_segments_BT1,
        None if k_segments_BS is None else k_segments_BS[:, None, :])
    logits.append(jnp.where(visible_BTS[:, None, None], seq_logits, -jnp.inf))
    values.append(v_BSKD.astype(jnp.float32))

  if depth_k_BXLKD is not None:
    num_depth_tokens, num_slots = depth_k_BXLKD.shape[1:3]
    depth_q = heads(q_BTHD if depth_q_BTHD is None else depth_q_BTHD)
    depth_logits = spec.scale * jnp.einsum("btkgd,bxlkd->bkgtxl", depth_q,
                                           depth_k_BXLKD.astype(jnp.float32), precision=_HIGHEST)
    token_visible_BTX = moda_spec.depth_token_visible(
        spec, q_tokens_BT1, depth_tokens_BX[:, None, :], q_segments_BT1,
        None if depth_segments_BX is None else depth_segments_BX[:, None, :])
    slot_visible_L = moda_spec.depth_slot_visible(jnp.arange(num_slots), depth_start, depth_len)
    visible_BTXL = token_visible_BTX[:, :, :, None] & slot_visible_L[None, None, None, :]
    depth_logits = jnp.where(visible_BTXL[:, None, None], depth_logits, -jnp.inf)
    logits.append(depth_logits.reshape(*depth_logits.shape[:4], num_depth_tokens * num_slots))
    values.append(depth_v_BXLKD.astype(jnp.float32).reshape(
        batch, num_depth_tokens * num_slots, num_kv_heads, head_dim))

  probs_BKGTC, lse_BKGT = _softmax(jnp.concatenate(logits, axis=-1))
  out_BTKGD = jnp.einsum("bkgtc,bckd->btkgd", probs_BKGTC, jnp.concatenate(values, axis=1),
                         precision=_HIGHEST)
  out_BTHD = out_BTKGD.reshape(q_BTHD.shape).astype(q_BTHD.dtype)
  lse_BTH = jnp.transpose(lse_BKGT, (0, 3, 1, 2)).reshape(batch, num_queries, num_q_heads)
  if not return_probs:
    return out_BTHD, lse_BTH
  probs_BTHC = jnp.transpose(probs_BKGTC, (0, 3, 1, 2, 4)).reshape(batch, num_queries, num_q_heads, -1)
  return out_BTHD, lse_BTH, probs_BTHC


def _softmax(logits):
  """(probs, logsumexp) over the last axis, where masked logits are -inf.

  A row whose logits are all -inf gets probs 0 and lse -inf. Every division and log only ever sees a
  positive total (the empty rows' is replaced by 1), so their gradients are 0, never NaN.
  """
  peak = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True, initial=-jnp.inf))
  peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
  weights = jnp.exp(logits - peak)
  total = jnp.sum(weights, axis=-1, keepdims=True)
  nonempty = total > 0
  safe_total = jnp.where(nonempty, total, 1.0)
  lse = jnp.where(nonempty, peak + jnp.log(safe_total), -jnp.inf)
  return weights / safe_total, lse[..., 0]
