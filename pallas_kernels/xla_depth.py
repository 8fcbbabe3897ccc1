"""The depth phase of one `xla` query block: which depth slots its rows read, their softmax, their grads.

`phase(...)` returns the object for query block i; the forward and the backward call two methods:
  softmax_state(depth_q_BKRD, dtype, start) -> `start(logits, weighted_values)` of every row, the online
    softmax state the forward begins the block with (`start` is the forward's; logits [B, K, r, N] with
    hidden entries -inf, weighted_values(probs) -> [B, K, r, D]);
  backward(depth_q_BKRD, d_out_BKRD, (lse_BKR, delta_BKR), grads_of_logits, dtype, acc) ->
    (d depth_q [B, K, R, D] float32, acc with this block's d depth_k, d depth_v added), where
    `grads_of_logits(logits, d_probs, lse, delta) -> (probs, d_logits)` is the backward's and acc = (dk, dv)
    [B, T', L, K, D] are the depth cotangents carried across query blocks.
The depth cotangents are added into `acc` in place, a token range at a time, so no per-block or full-size
gradient array exists besides the carry itself: the caller seeds it with zeros, or with the cotangent its
caller threads through the call (`api.moda_attention(..., return_depth=True)`), which then comes back with
this call's contribution added.

Plain MoDA (C = depth_chunk = 1, `OwnSlots`): row (token t, head g) reads the L slots of token t only,
so every depth dot is batched over tokens and only `spec.depth_slot_visible` masks (N = L). The block's
tokens run in depth steps of `step_tokens` tokens, each with its own head-major copy of its slots, so a
step's temporaries stay a small fraction of the [B, T, L, K, D] buffers even when one block is the whole
sequence (the linear-memory stack holds the buffers and their cotangent; a block-sized copy next to them
was one more buffer pair at short T).

Chunk-visible depth (C > 1, `ChunkWindows`): a row also reads the slots of the earlier tokens of its
chunk. The block's tokens are cut into n sub-blocks of s tokens, each reading a window of W depth tokens
([B, K, n, W, L, D], N = W * L), masked by `spec.depth_token_visible` and `spec.depth_slot_visible`:
  * C divides the block (`choose_block` makes it so for C <= max_block): each sub-block is one chunk
    (s = W = C), the windows tile the block's own slice, and each depth slot is read by one block only;
  * otherwise (C > max_block, `sliding`): one window of W = block + C - 1 tokens (clipped to the padded
    sequence) ends at the block's last token, so it holds every chunk start of the block; windows of
    neighbouring blocks overlap, so their gradients add up in a float32 carry (`acc_dtype`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import spec as moda_spec
from pallas_kernels.xla_blocks import Geometry, dot

# A depth step of `OwnSlots` covers at most 1 / _STEPS_PER_SEQUENCE of the sequence's tokens.
_STEPS_PER_SEQUENCE = 8


def sliding(geo: Geometry) -> bool:
  """Whether blocks read overlapping depth windows (their gradients then accumulate across blocks)."""
  return geo.spec.depth_chunk > 1 and geo.block % geo.spec.depth_chunk != 0


def acc_dtype(geo: Geometry, dtype):
  """The dtype of the depth cotangent carry: the buffers' own, or float32 where windows overlap."""
  return jnp.float32 if sliding(geo) else dtype


def phase(depth_k_BTLKD, depth_v_BTLKD, segment_ids_BT, depth_start, depth_len, i, geo: Geometry):
  """The depth phase of query block i. Depth arrays and segment ids are padded to geo.padded_len."""
  if geo.spec.depth_chunk == 1:
    return OwnSlots(depth_k_BTLKD, depth_v_BTLKD, depth_start, depth_len, i, geo)
  return ChunkWindows(depth_k_BTLKD, depth_v_BTLKD, segment_ids_BT, depth_start, depth_len, i, geo)


def step_tokens(geo: Geometry) -> int:
  """Tokens per depth step of `OwnSlots`: the largest divisor of the block that is at most
  T / _STEPS_PER_SEQUENCE, or the whole block when that divisor would make the steps much smaller
  (a block of prime length: one step per token would be slow)."""
  cap = max(1, geo.seq_len // _STEPS_PER_SEQUENCE)
  tokens = max(d for d in range(1, min(cap, geo.block) + 1) if geo.block % d == 0)
  return tokens if 2 * tokens >= min(cap, geo.block) else geo.block


def depth_block(depth_BTLKD, first_token, num_tokens: int):
  """The depth slots of `num_tokens` tokens from `first_token`, head-major: [B, K, t, L, D], one copy.

  A depth dot's batch axes (b, t, k) are not the major axes of the [B, T, L, K, D] layout, so XLA
  copies its operand into a dot layout anyway, once per dot; made explicit here, one copy serves every
  dot of a step. With the buffer on the left of the score dots (`bktld,bktgd`) no dot needs another
  (the model's compiled training step: 4.36 -> 3.36 buffer pairs at 32 layers, tests/test_model_memory.py)."""
  block_BtLKD = jax.lax.dynamic_slice_in_dim(depth_BTLKD, first_token, num_tokens, axis=1)
  return jnp.transpose(block_BtLKD, (0, 3, 1, 2, 4))


def _to_buffer(x_BKtLD):
  """[B, K, t, L, D] as the dots produce it -> the buffers' [B, t, L, K, D] layout, float32."""
  return jnp.transpose(x_BKtLD.astype(jnp.float32), (0, 2, 3, 1, 4))


def add_tokens(acc_BTLKD, grads_BtLKD, first_token):
  """acc[:, first_token : first_token + t] += grads (float32, rounded once to acc's dtype), in place."""
  current = jax.lax.dynamic_slice_in_dim(acc_BTLKD, first_token, grads_BtLKD.shape[1], axis=1)
  total = (current.astype(jnp.float32) + grads_BtLKD).astype(acc_BTLKD.dtype)
  return jax.lax.dynamic_update_slice_in_dim(acc_BTLKD, total, first_token, axis=1)


class OwnSlots:
  """C = 1: each row reads its own token's slots depth_start <= l < depth_len, `step_tokens` at a time."""

  def __init__(self, depth_k_BTLKD, depth_v_BTLKD, depth_start, depth_len, i, geo: Geometry):
    self.geo = geo
    self.depth_k_BTLKD, self.depth_v_BTLKD = depth_k_BTLKD, depth_v_BTLKD
    self.first_token = i * geo.block
    self.tokens = step_tokens(geo)
    self.num_steps = geo.block // self.tokens
    self.visible_L = moda_spec.depth_slot_visible(jnp.arange(geo.num_slots), depth_start, depth_len)

  def _step(self, s, *rows_BKR_):
    """Step s: its first token, its head-major K and V slots, and its rows of each [B, K, R, ...]."""
    rows = self.tokens * self.geo.group
    first_token = self.first_token + s * self.tokens
    slots = (depth_block(self.depth_k_BTLKD, first_token, self.tokens),
             depth_block(self.depth_v_BTLKD, first_token, self.tokens))
    return first_token, slots, [jax.lax.dynamic_slice_in_dim(x, s * rows, rows, axis=2) for x in rows_BKR_]

  def _steps(self, fn, carry=()):
    """Runs `carry, rows = fn(carry, s)` over the steps; rows (a tuple of [B, K, r, ...]) -> [B, K, R, ...]."""
    carry, rows_S = jax.lax.scan(fn, carry, jnp.arange(self.num_steps))
    merge = lambda x_SBKr_: jnp.moveaxis(x_SBKr_, 0, 2).reshape(*x_SBKr_.shape[1:3], self.geo.rows,
                                                                *x_SBKr_.shape[4:])
    return carry, jax.tree.map(merge, rows_S)

  def _split(self, x_BKr_):
    geo = self.geo
    return x_BKr_.reshape(geo.batch, geo.num_kv_heads, self.tokens, geo.group, -1)

  def _merge_rows(self, x_BKtG_):
    return x_BKtG_.reshape(self.geo.batch, self.geo.num_kv_heads, self.tokens * self.geo.group, -1)

  def _logits(self, k_BKtLD, depth_q_BKrD):
    scores = self.geo.scale * dot("bktld,bktgd->bktgl", k_BKtLD, self._split(depth_q_BKrD))
    return jnp.where(self.visible_L[None, None, None, :], self._merge_rows(scores), -jnp.inf)

  def _d_probs(self, v_BKtLD, d_out_BKrD):
    return self._merge_rows(dot("bktld,bktgd->bktgl", v_BKtLD, self._split(d_out_BKrD)))

  def _weighted_values(self, v_BKtLD, probs_BKrL, dtype):
    return self._merge_rows(dot("bktgl,bktld->bktgd", self._split(probs_BKrL).astype(dtype), v_BKtLD))

  def softmax_state(self, depth_q_BKRD, dtype, start):
    def step(carry, s):
      _, (k_BKtLD, v_BKtLD), (depth_q_BKrD,) = self._step(s, depth_q_BKRD)
      return carry, start(self._logits(k_BKtLD, depth_q_BKrD), lambda p: self._weighted_values(v_BKtLD, p, dtype))
    return self._steps(step)[1]

  def backward(self, depth_q_BKRD, d_out_BKRD, row_stats, grads_of_logits, dtype, acc):
    def step(acc, s):
      first_token, (k_BKtLD, v_BKtLD), (depth_q_BKrD, d_out_BKrD, *stats) = self._step(
          s, depth_q_BKRD, d_out_BKRD, *row_stats)
      probs, d_logits = grads_of_logits(self._logits(k_BKtLD, depth_q_BKrD), self._d_probs(v_BKtLD, d_out_BKrD),
                                        *stats)
      # The scale goes on the logit-sized operand, never on a [B, t, L, K, D] result.
      probs_BKtGL = self._split(probs).astype(dtype)
      d_scores_BKtGL = self._split(self.geo.scale * d_logits).astype(dtype)
      d_depth_q = self._merge_rows(dot("bktgl,bktld->bktgd", d_scores_BKtGL, k_BKtLD))
      d_depth_k = _to_buffer(dot("bktgl,bktgd->bktld", d_scores_BKtGL, self._split(depth_q_BKrD)))
      d_depth_v = _to_buffer(dot("bktgl,bktgd->bktld", probs_BKtGL, self._split(d_out_BKrD)))
      acc = (add_tokens(acc[0], d_depth_k, first_token), add_tokens(acc[1], d_depth_v, first_token))
      return acc, (d_depth_q,)
    acc, (d_depth_q,) = self._steps(step, acc)
    return d_depth_q, acc


class ChunkWindows:
  """C > 1: each row reads the slots of the tokens of its chunk up to itself (module docstring)."""

  def __init__(self, depth_k_BTLKD, depth_v_BTLKD, segment_ids_BT, depth_start, depth_len, i,
               geo: Geometry):
    self.geo = geo
    chunk, block = geo.spec.depth_chunk, geo.block
    first_row_token = i * block
    row_tokens = first_row_token + jnp.arange(block)
    if not sliding(geo):
      self.windows, self.sub_block, self.width = block // chunk, chunk, chunk
      self.start = first_row_token
      to_windows = lambda x_BKtLD: x_BKtLD.reshape(geo.batch, geo.num_kv_heads, self.windows, chunk,
                                                   *x_BKtLD.shape[3:])
      self.k_BKnWLD = to_windows(depth_block(depth_k_BTLKD, first_row_token, block))
      self.v_BKnWLD = to_windows(depth_block(depth_v_BTLKD, first_row_token, block))
      window_tokens_nW = row_tokens.reshape(self.windows, chunk)
    else:
      self.windows, self.sub_block = 1, block
      self.width = min(block + chunk - 1, geo.padded_len)
      # Ends at the block's last token unless clipped at either end of the padded sequence; either way
      # it starts at or before the block's first chunk start (t0 // C) * C >= t0 - (C - 1).
      self.start = jnp.clip(first_row_token - (chunk - 1), 0, geo.padded_len - self.width)
      self.k_BKnWLD = depth_block(depth_k_BTLKD, self.start, self.width)[:, :, None]
      self.v_BKnWLD = depth_block(depth_v_BTLKD, self.start, self.width)[:, :, None]
      window_tokens_nW = (self.start + jnp.arange(self.width))[None]
    q_tokens_nS = row_tokens.reshape(self.windows, self.sub_block)

    if segment_ids_BT is None:
      token_visible = moda_spec.depth_token_visible(geo.spec, q_tokens_nS[:, :, None],
                                                    window_tokens_nW[:, None, :])[None]
    else:
      q_segments_BnS = jax.lax.dynamic_slice_in_dim(segment_ids_BT, first_row_token, block, axis=1).reshape(
          geo.batch, self.windows, self.sub_block)
      if sliding(geo):
        w_segments_BnW = jax.lax.dynamic_slice_in_dim(segment_ids_BT, self.start, self.width, axis=1)[:, None]
      else:
        w_segments_BnW = q_segments_BnS
      token_visible = moda_spec.depth_token_visible(
          geo.spec, q_tokens_nS[None, :, :, None], window_tokens_nW[None, :, None, :],
          q_segments_BnS[:, :, :, None], w_segments_BnW[:, :, None, :])
    slot_visible_L = moda_spec.depth_slot_visible(jnp.arange(geo.num_slots), depth_start, depth_len)
    visible_BnsWL = token_visible[..., None] & slot_visible_L[None, None, None, None, :]
    self.mask = visible_BnsWL[:, None, :, :, None]  # [B or 1, 1, n, s, 1, W, L] like the logits

  def _split(self, x_BKR_):
    geo = self.geo
    return x_BKR_.reshape(geo.batch, geo.num_kv_heads, self.windows, self.sub_block, geo.group,
                          *x_BKR_.shape[3:])

  def _split_columns(self, x_BKRN):
    x_BKnsGN = self._split(x_BKRN)
    return x_BKnsGN.reshape(*x_BKnsGN.shape[:5], self.width, self.geo.num_slots)

  def _merge_rows(self, x_BKnsG_):
    return x_BKnsG_.reshape(self.geo.batch, self.geo.num_kv_heads, self.geo.rows, -1)

  def softmax_state(self, depth_q_BKRD, dtype, start):
    return start(self._logits(depth_q_BKRD), lambda p: self._weighted_values(p, dtype))

  def backward(self, depth_q_BKRD, d_out_BKRD, row_stats, grads_of_logits, dtype, acc):
    probs, d_logits = grads_of_logits(self._logits(depth_q_BKRD), self._d_probs(d_out_BKRD), *row_stats)
    d_depth_q, d_depth_k, d_depth_v = self._grads(probs, d_logits, depth_q_BKRD, d_out_BKRD, dtype)
    # The windows' tokens: the block's own (they tile it), or one window that may overlap its neighbours'.
    return d_depth_q, (add_tokens(acc[0], d_depth_k, self.start), add_tokens(acc[1], d_depth_v, self.start))

  def _logits(self, depth_q_BKRD):
    scores = self.geo.scale * dot("bknsgd,bknwld->bknsgwl", self._split(depth_q_BKRD), self.k_BKnWLD)
    return self._merge_rows(jnp.where(self.mask, scores, -jnp.inf))

  def _weighted_values(self, probs_BKRN, dtype):
    probs = self._split_columns(probs_BKRN).astype(dtype)
    return self._merge_rows(dot("bknsgwl,bknwld->bknsgd", probs, self.v_BKnWLD))

  def _d_probs(self, d_out_BKRD):
    return self._merge_rows(dot("bknsgd,bknwld->bknsgwl", self._split(d_out_BKRD), self.v_BKnWLD))

  def _grads(self, probs_BKRN, d_logits_BKRN, depth_q_BKRD, d_out_BKRD, dtype):
    """(d depth_q [B, K, R, D], d depth_k, d depth_v [B, t, L, K, D] of the windows' t tokens), float32."""
    probs = self._split_columns(probs_BKRN).astype(dtype)
    d_scores = self._split_columns(self.geo.scale * d_logits_BKRN).astype(dtype)
    d_depth_q = self._merge_rows(dot("bknsgwl,bknwld->bknsgd", d_scores, self.k_BKnWLD))
    d_depth_k = dot("bknsgwl,bknsgd->bknwld", d_scores, self._split(depth_q_BKRD))
    d_depth_v = dot("bknsgwl,bknsgd->bknwld", probs, self._split(d_out_BKRD))
    if sliding(self.geo):
      return d_depth_q, _to_buffer(d_depth_k[:, :, 0]), _to_buffer(d_depth_v[:, :, 0])
    tokens = lambda x_BKnWLD: x_BKnWLD.reshape(self.geo.batch, self.geo.num_kv_heads, self.geo.block,
                                               *x_BKnWLD.shape[4:])
    return d_depth_q, _to_buffer(tokens(d_depth_k)), _to_buffer(tokens(d_depth_v))
