"""Float64 numpy oracle for MoDA attention, written from the math in DESIGN.md §1.

Deliberately independent of `pallas_kernels`: instead of one dense softmax over masked logit matrices,
it visits one (batch, query head, token) at a time, gathers the keys that query may see into one list
(its visible sequence keys, then the visible depth slots of the tokens of its chunk) and applies the
textbook softmax to that list. Slow, but every line maps onto the formula, and masking is by
*omission*, so hidden slots and masked keys cannot leak into the result or receive gradient. A query
whose list is empty (depth-only attention with no visible slot) gets out 0 and lse -inf, and gives
and receives no gradient.

The backward pass is the analytic gradient of `sum(out * d_out) + sum(lse * d_lse)`. For one query
with visible keys i, logits x_i = scale * query_i . key_i where query_i is q for a sequence key and
depth_q (q when not given) for a depth key, p = softmax(x), out = sum_i p_i value_i,
lse = log sum_i e^{x_i}:
    d value_i  = p_i d_out
    dp_i       = d_out . value_i,   delta = sum_i p_i dp_i = out . d_out
    dx_i       = p_i (dp_i - delta) + p_i d_lse          (d lse / d x_i = p_i)
    d query_i += scale * dx_i key_i  (summed into d q or d depth_q),   d key_i += scale * dx_i query_i
"""

from __future__ import annotations

from typing import Iterator, NamedTuple

import numpy as np


class Grads(NamedTuple):
  q: np.ndarray
  k: np.ndarray | None        # None for depth-only attention
  v: np.ndarray | None
  depth_k: np.ndarray | None
  depth_v: np.ndarray | None
  depth_q: np.ndarray | None = None  # only when depth_q was given; else its part is in q


class _Query(NamedTuple):
  """Everything one query row sees: where its keys came from, and the keys themselves."""
  b: int
  t: int
  h: int
  kv_head: int
  seq_pos: np.ndarray      # [S'] visible sequence positions
  depth_tokens: np.ndarray  # [X'] the token of each visible depth key
  slots: np.ndarray        # [X'] the slot of each visible depth key
  keys_ND: np.ndarray      # [S' + X', D] sequence keys, then depth keys
  values_ND: np.ndarray    # [S' + X', D]


def _f64(x):
  return None if x is None else np.asarray(x).astype(np.float64)


def _queries(q_BTHD, k_BTKD, v_BTKD, depth_k_BTLKD, depth_v_BTLKD, depth_len, causal,
             segment_ids_BT, depth_chunk=None, depth_start=None) -> Iterator[_Query]:
  batch, seq_len, num_q_heads, head_dim = q_BTHD.shape
  kv_heads = (k_BTKD if k_BTKD is not None else depth_k_BTLKD).shape[-2]
  group = num_q_heads // kv_heads
  num_slots = 0 if depth_k_BTLKD is None else depth_k_BTLKD.shape[2]
  written = num_slots if depth_len is None else int(depth_len)
  first_slot = 0 if depth_start is None else int(depth_start)
  chunk = 1 if depth_chunk is None else int(depth_chunk)
  if not 0 <= written <= num_slots or not 0 <= first_slot <= num_slots:
    raise ValueError(f"oracle: depth_start={depth_start}, depth_len={depth_len} outside [0, {num_slots}]")
  if chunk > 1 and not causal:
    raise ValueError("oracle: depth_chunk > 1 is causal only")
  positions = np.arange(seq_len)
  for b in range(batch):
    same_segment = lambda s, t: segment_ids_BT is None or segment_ids_BT[b, s] == segment_ids_BT[b, t]
    for h in range(num_q_heads):
      kv_head = h // group
      for t in range(seq_len):
        visible = np.full(seq_len, k_BTKD is not None)
        if causal:
          visible &= positions <= t
        if segment_ids_BT is not None:
          visible &= segment_ids_BT[b] == segment_ids_BT[b, t]
        seq_pos = positions[visible]
        # The depth slots of the tokens of t's chunk, from the chunk's first token up to t itself.
        chunk_tokens = [u for u in range((t // chunk) * chunk, t + 1) if same_segment(u, t)]
        pairs = [(u, l) for u in chunk_tokens for l in range(first_slot, written)]
        depth_tokens = np.array([u for u, _ in pairs], int)
        slots = np.array([l for _, l in pairs], int)
        keys, values = [np.zeros((0, head_dim))], [np.zeros((0, head_dim))]
        if len(seq_pos):
          keys.append(k_BTKD[b, seq_pos, kv_head])
          values.append(v_BTKD[b, seq_pos, kv_head])
        if len(pairs):
          keys.append(depth_k_BTLKD[b, depth_tokens, slots, kv_head])
          values.append(depth_v_BTLKD[b, depth_tokens, slots, kv_head])
        yield _Query(b, t, h, kv_head, seq_pos, depth_tokens, slots, np.concatenate(keys),
                     np.concatenate(values))


def _row_queries(q, depth_q, row: _Query):
  """[S' + L', D]: the query that scores each visible key (q for sequence keys, depth_q for depth)."""
  depth_q = q if depth_q is None else depth_q
  num_seq = len(row.seq_pos)
  return np.concatenate([np.repeat(q[row.b, row.t, row.h][None], num_seq, axis=0),
                         np.repeat(depth_q[row.b, row.t, row.h][None], len(row.slots), axis=0)])


def _softmax_row(queries_ND, keys_ND, scale):
  """(p [N], lse) of one query's visible keys; an empty list gives (p [0], -inf)."""
  if not len(keys_ND):
    return np.zeros(0), -np.inf
  logits_N = scale * np.sum(keys_ND * queries_ND, axis=-1)
  peak = logits_N.max()
  weights_N = np.exp(logits_N - peak)
  total = weights_N.sum()
  return weights_N / total, peak + np.log(total)


def forward(q, k, v, depth_k=None, depth_v=None, *, depth_len=None, causal=True, scale=None,
            segment_ids=None, depth_q=None, depth_chunk=None, depth_start=None):
  """Returns (out [B,T,Hq,D], lse [B,T,Hq]) in float64. Arguments as in `moda_attention` (k = v =
  None: depth-only attention)."""
  q, k, v, depth_k, depth_v, depth_q = map(_f64, (q, k, v, depth_k, depth_v, depth_q))
  scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
  seg = None if segment_ids is None else np.asarray(segment_ids)
  out = np.zeros_like(q)
  lse = np.zeros(q.shape[:3])
  for row in _queries(q, k, v, depth_k, depth_v, depth_len, causal, seg, depth_chunk, depth_start):
    p_N, lse[row.b, row.t, row.h] = _softmax_row(_row_queries(q, depth_q, row), row.keys_ND, scale)
    out[row.b, row.t, row.h] = p_N @ row.values_ND
  return out, lse


def backward(q, k, v, depth_k=None, depth_v=None, *, d_out, d_lse, depth_len=None, causal=True,
             scale=None, segment_ids=None, depth_q=None, depth_chunk=None, depth_start=None) -> Grads:
  """Gradients of sum(out * d_out) + sum(lse * d_lse) w.r.t. q, k, v, depth_k, depth_v and depth_q
  when given (float64; None for an array not given)."""
  q, k, v, depth_k, depth_v, depth_q, d_out, d_lse = map(
      _f64, (q, k, v, depth_k, depth_v, depth_q, d_out, d_lse))
  scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
  seg = None if segment_ids is None else np.asarray(segment_ids)
  grads = Grads(*(None if x is None else np.zeros_like(x)
                  for x in (q, k, v, depth_k, depth_v, depth_q)))
  d_depth_q = grads.q if depth_q is None else grads.depth_q
  for row in _queries(q, k, v, depth_k, depth_v, depth_len, causal, seg, depth_chunk, depth_start):
    if not len(row.keys_ND):
      continue  # sees nothing: no logits, so no gradient either way
    queries_ND = _row_queries(q, depth_q, row)
    do_D = d_out[row.b, row.t, row.h]
    p_N, _ = _softmax_row(queries_ND, row.keys_ND, scale)
    dp_N = row.values_ND @ do_D
    delta = p_N @ dp_N
    dx_N = p_N * (dp_N - delta) + p_N * d_lse[row.b, row.t, row.h]
    num_seq = len(row.seq_pos)
    grads.q[row.b, row.t, row.h] += scale * (dx_N[:num_seq] @ row.keys_ND[:num_seq])
    d_depth_q[row.b, row.t, row.h] += scale * (dx_N[num_seq:] @ row.keys_ND[num_seq:])
    dkey_ND = scale * dx_N[:, None] * queries_ND
    dvalue_ND = np.outer(p_N, do_D)
    # The keys within one row are distinct (positions, or (token, slot) pairs), so plain fancy-index
    # += does not drop duplicates.
    if num_seq:
      grads.k[row.b, row.seq_pos, row.kv_head] += dkey_ND[:num_seq]
      grads.v[row.b, row.seq_pos, row.kv_head] += dvalue_ND[:num_seq]
    if len(row.slots):
      grads.depth_k[row.b, row.depth_tokens, row.slots, row.kv_head] += dkey_ND[num_seq:]
      grads.depth_v[row.b, row.depth_tokens, row.slots, row.kv_head] += dvalue_ND[num_seq:]
  return grads
