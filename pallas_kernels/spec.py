"""The MoDA contract, stated once: what each query sees, and the structured inputs of a call.

Every backend (reference, xla, pallas_triton, pallas_tpu, and decoding in the model) reads these
definitions instead of re-deriving them. For a query at token t (segment seg[t]):

  * sequence key s is visible iff s < T, (s <= t when causal) and (seg[s] == seg[t] when segments);
  * depth slot l of token t' is visible iff depth_start <= l < depth_len, t' is in the same segment
    and (t // C) * C <= t' <= t, with C = `depth_chunk` (C = 1: only t' = t, plain MoDA).

The functions below are elementwise `jnp` comparisons that broadcast, so the same code builds the
dense masks of `reference`, the tile masks of `xla` and the in-kernel masks of the Pallas backends
(where the operands are iotas of token and slot indices). A backend passes whatever index arrays its
layout has; it never writes its own comparison. `segment_span` is the one bound the segment rule implies
for backends that skip whole tiles of keys or queries.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Spec:
  """The static part of one `moda_attention` call. Hashable: a `custom_vjp` non-diff argument.

  Attributes:
    seq_len: T, the number of query (and key) tokens.
    num_slots: L, depth slots per token in the depth arrays (0: no depth).
    causal: sequence keys s <= t only. Depth is always causal (own token, or earlier in its chunk).
    scale: the logit scale (D ** -0.5 unless given).
    has_sequence: whether k / v are given (False: depth-only attention).
    has_segments: whether segment ids are given.
    depth_chunk: C >= 1: a query sees the depth slots of the tokens of its chunk up to itself.
  """

  seq_len: int
  num_slots: int
  causal: bool
  scale: float
  has_sequence: bool = True
  has_segments: bool = False
  depth_chunk: int = 1

  @property
  def has_depth(self) -> bool:
    return self.num_slots > 0


class Inputs(NamedTuple):
  """The arrays of one call, normalized by `api.moda_attention`; absent ones are None.

  q [B, T, Hq, D]; k, v [B, T, Hk, D] (None for depth-only); depth_q [B, T, Hq, D] (None: score
  depth keys with q); depth_k, depth_v [B, T, L, Hk, D] (None without depth); depth_start and
  depth_len int32 scalars with 0 <= depth_start, depth_len <= L (None without depth; may be
  traced); segment_ids [B, T] int32 (None without segments). Depth-only calls have Hk from
  depth_k.
  """

  q: jax.Array
  k: jax.Array | None
  v: jax.Array | None
  depth_q: jax.Array | None
  depth_k: jax.Array | None
  depth_v: jax.Array | None
  depth_start: jax.Array | None
  depth_len: jax.Array | None
  segment_ids: jax.Array | None

  @property
  def num_kv_heads(self) -> int:
    return (self.k if self.k is not None else self.depth_k).shape[-2]


def sequence_visible(spec: Spec, q_token, k_token, q_segment=None, k_segment=None):
  """Whether the query at `q_token` sees the sequence key at `k_token` (bool, broadcast).

  Keys at or past T (a backend's padding) are never visible. Segment ids are compared when both
  are given (pass None when `spec.has_segments` is False).
  """
  visible = k_token < spec.seq_len
  if spec.causal:
    visible = visible & (k_token <= q_token)
  return _same_segment(visible, q_segment, k_segment)


def depth_slot_visible(slot, depth_start, depth_len):
  """Whether depth slot `slot` is readable: depth_start <= slot < depth_len (bool, broadcast)."""
  return (slot >= depth_start) & (slot < depth_len)


def depth_token_visible(spec: Spec, q_token, k_token, q_segment=None, k_segment=None):
  """Whether the query at `q_token` sees the depth slots of token `k_token` (bool, broadcast).

  C = 1: its own token only. C > 1: the tokens of its chunk [(t // C) * C, t], same segment only.
  """
  if spec.depth_chunk == 1:
    visible = k_token == q_token
  else:
    visible = (k_token >= chunk_start(spec, q_token)) & (k_token <= q_token)
  visible = visible & (k_token < spec.seq_len)
  return _same_segment(visible, q_segment, k_segment)


def chunk_start(spec: Spec, q_token):
  """The first token whose depth slots the query at `q_token` may see (before segment masking)."""
  return (q_token // spec.depth_chunk) * spec.depth_chunk


def same_segment(q_segment, k_segment):
  """Whether two tokens share a segment (bool, broadcast): the segment part of both rules above.

  On its own it serves blocks a backend already knows to be visible by position (e.g. keys wholly
  before a causal query tile and below T), where nothing else of `sequence_visible` is left to check.
  """
  return q_segment == k_segment


def segment_span(segment_ids_BT):
  """(first_BT, last_BT) int32: the first and the last token of each token's segment, per batch row.

  No key outside [first[t], last[t]] shares the segment of the token at t (if `same_segment` holds for
  s and t, then first[t] <= s <= last[t]), so a backend may skip tiles outside the span of its tokens.
  Ids need not be contiguous runs: in [1, 1, 2, 2, 1, 1] the 1s span the whole row. O(T log T), no T x T
  array: a stable sort groups equal ids with their tokens in increasing order, so the first and last
  sorted entries of a group are its segment's first and last token.
  """
  batch, seq_len = segment_ids_BT.shape
  order_BT = jnp.argsort(segment_ids_BT, axis=1, stable=True)
  sorted_BT = jnp.take_along_axis(segment_ids_BT, order_BT, axis=1)
  boundary_BT1 = ~same_segment(sorted_BT[:, 1:], sorted_BT[:, :-1])  # a new group starts at i + 1
  edge_B1 = jnp.ones((batch, 1), bool)
  starts_BT = jnp.concatenate([edge_B1, boundary_BT1], axis=1)
  ends_BT = jnp.concatenate([boundary_BT1, edge_B1], axis=1)
  index_BT = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32)[None, :], (batch, seq_len))
  group_start_BT = jax.lax.cummax(jnp.where(starts_BT, index_BT, 0), axis=1)
  group_end_BT = jax.lax.cummin(jnp.where(ends_BT, index_BT, seq_len - 1), axis=1, reverse=True)

  def unsort(sorted_position_BT):  # the token at sorted entry i is order[i]
    token_BT = jnp.take_along_axis(order_BT, sorted_position_BT, axis=1).astype(jnp.int32)
    return jax.vmap(lambda order_T, token_T: jnp.zeros_like(token_T).at[order_T].set(token_T))(order_BT, token_BT)

  return unsort(group_start_BT), unsort(group_end_BT)


def _same_segment(visible, q_segment, k_segment):
  if q_segment is None or k_segment is None:
    return visible
  return visible & same_segment(q_segment, k_segment)
