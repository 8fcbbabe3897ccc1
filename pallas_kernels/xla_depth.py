"""The depth phase of one `xla` query block: which depth slots its rows read, and their logits, values, grads.

`phase(...)` returns the object for query block i; the forward and the backward only call its methods:
  logits(depth_q_BKRD) -> [B, K, R, N] (hidden entries -inf), weighted_values(probs) -> [B, K, R, D],
  d_probs(d_out_BKRD) -> [B, K, R, N], grads(probs, d_logits, depth_q_BKRD, d_out_BKRD) ->
  (d depth_q [B, K, R, D] float32, d depth_k, d depth_v of the tokens it read).

Plain MoDA (C = depth_chunk = 1, `OwnSlots`): row (token t, head g) reads the L slots of token t only,
so the block's depth is its own [B, K, block, L, D] slice, every depth dot is batched over tokens and
only `spec.depth_slot_visible` masks (N = L).

Chunk-visible depth (C > 1, `ChunkWindows`): a row also reads the slots of the earlier tokens of its
chunk. The block's tokens are cut into n sub-blocks of s tokens, each reading a window of W depth tokens
([B, K, n, W, L, D], N = W * L), masked by `spec.depth_token_visible` and `spec.depth_slot_visible`:
  * C divides the block (`choose_block` makes it so for C <= max_block): each sub-block is one chunk
    (s = W = C), the windows tile the block's own slice, and each depth slot is read by one block only,
    so its gradient is complete when that block's backward ends;
  * otherwise (C > max_block, `sliding`): one window of W = block + C - 1 tokens (clipped to the padded
    sequence) ends at the block's last token, so it holds every chunk start of the block; windows of
    neighbouring blocks overlap and the backward adds each window's gradient into a float32 carry.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import spec as moda_spec
from pallas_kernels.xla_blocks import Geometry, dot


def sliding(geo: Geometry) -> bool:
  """Whether blocks read overlapping depth windows (their gradients then accumulate across blocks)."""
  return geo.spec.depth_chunk > 1 and geo.block % geo.spec.depth_chunk != 0


def phase(depth_k_BTLKD, depth_v_BTLKD, segment_ids_BT, depth_start, depth_len, i, geo: Geometry):
  """The depth phase of query block i. Depth arrays and segment ids are padded to geo.padded_len."""
  if geo.spec.depth_chunk == 1:
    return OwnSlots(depth_k_BTLKD, depth_v_BTLKD, depth_start, depth_len, i, geo)
  return ChunkWindows(depth_k_BTLKD, depth_v_BTLKD, segment_ids_BT, depth_start, depth_len, i, geo)


def depth_block(depth_BTLKD, i, geo: Geometry):
  """The depth slots of query block i's tokens, head-major: [B, K, block, L, D], one explicit copy.

  A depth dot's batch axes (b, t, k) are not the major axes of the [B, T, L, K, D] layout, so XLA
  copies its operand into a dot layout anyway, once per dot (per layer in training: the whole
  [B, T, L_max, Hk, D] buffer); made explicit here, one copy serves every dot of the block. With
  the buffer on the left of the score dots (`bktld,bktgd`) no dot needs another (the model's
  compiled training step: 4.36 -> 3.36 buffer pairs at 32 layers, tests/test_model_memory.py)."""
  block_BtLKD = jax.lax.dynamic_slice_in_dim(depth_BTLKD, i * geo.block, geo.block, axis=1)
  return jnp.transpose(block_BtLKD, (0, 3, 1, 2, 4))


def _to_buffer(x_BKtLD, dtype):
  """[B, K, t, L, D] as the dots produce it -> the buffers' [B, t, L, K, D] layout, once."""
  return jnp.transpose(x_BKtLD.astype(dtype), (0, 2, 3, 1, 4))


class OwnSlots:
  """C = 1: each row reads its own token's slots depth_start <= l < depth_len."""

  def __init__(self, depth_k_BTLKD, depth_v_BTLKD, depth_start, depth_len, i, geo: Geometry):
    self.geo = geo
    self.k_BKtLD = depth_block(depth_k_BTLKD, i, geo)
    self.v_BKtLD = depth_block(depth_v_BTLKD, i, geo)
    self.visible_L = moda_spec.depth_slot_visible(jnp.arange(geo.num_slots), depth_start, depth_len)

  def _split(self, x_BKR_):
    geo = self.geo
    return x_BKR_.reshape(geo.batch, geo.num_kv_heads, geo.block, geo.group, -1)

  def _merge_rows(self, x_BKtG_):
    return x_BKtG_.reshape(self.geo.batch, self.geo.num_kv_heads, self.geo.rows, -1)

  def logits(self, depth_q_BKRD):
    scores = self.geo.scale * dot("bktld,bktgd->bktgl", self.k_BKtLD, self._split(depth_q_BKRD))
    return jnp.where(self.visible_L[None, None, None, :], self._merge_rows(scores), -jnp.inf)

  def weighted_values(self, probs_BKRL, dtype):
    return self._merge_rows(dot("bktgl,bktld->bktgd", self._split(probs_BKRL).astype(dtype), self.v_BKtLD))

  def d_probs(self, d_out_BKRD):
    return self._merge_rows(dot("bktld,bktgd->bktgl", self.v_BKtLD, self._split(d_out_BKRD)))

  def grads(self, probs_BKRL, d_logits_BKRL, depth_q_BKRD, d_out_BKRD, dtype):
    """(d depth_q [B, K, R, D] f32, d depth_k, d depth_v [B, block, L, K, D] in dtype)."""
    # The scale goes on the logit-sized operand, never on a [B, t, L, K, D] result.
    probs_BKtGL = self._split(probs_BKRL).astype(dtype)
    d_scores_BKtGL = self._split(self.geo.scale * d_logits_BKRL).astype(dtype)
    d_depth_q = self._merge_rows(dot("bktgl,bktld->bktgd", d_scores_BKtGL, self.k_BKtLD))
    d_depth_k = dot("bktgl,bktgd->bktld", d_scores_BKtGL, self._split(depth_q_BKRD))
    d_depth_v = dot("bktgl,bktgd->bktld", probs_BKtGL, self._split(d_out_BKRD))
    return d_depth_q, _to_buffer(d_depth_k, dtype), _to_buffer(d_depth_v, dtype)


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
      self.k_BKnWLD = to_windows(depth_block(depth_k_BTLKD, i, geo))
      self.v_BKnWLD = to_windows(depth_block(depth_v_BTLKD, i, geo))
      window_tokens_nW = row_tokens.reshape(self.windows, chunk)
    else:
      self.windows, self.sub_block = 1, block
      self.width = min(block + chunk - 1, geo.padded_len)
      # Ends at the block's last token unless clipped at either end of the padded sequence; either way
      # it starts at or before the block's first chunk start (t0 // C) * C >= t0 - (C - 1).
      self.start = jnp.clip(first_row_token - (chunk - 1), 0, geo.padded_len - self.width)
      window = lambda x: jnp.transpose(jax.lax.dynamic_slice_in_dim(x, self.start, self.width, axis=1),
                                       (0, 3, 1, 2, 4))[:, :, None]
      self.k_BKnWLD, self.v_BKnWLD = window(depth_k_BTLKD), window(depth_v_BTLKD)
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

  def logits(self, depth_q_BKRD):
    scores = self.geo.scale * dot("bknsgd,bknwld->bknsgwl", self._split(depth_q_BKRD), self.k_BKnWLD)
    return self._merge_rows(jnp.where(self.mask, scores, -jnp.inf))

  def weighted_values(self, probs_BKRN, dtype):
    probs = self._split_columns(probs_BKRN).astype(dtype)
    return self._merge_rows(dot("bknsgwl,bknwld->bknsgd", probs, self.v_BKnWLD))

  def d_probs(self, d_out_BKRD):
    return self._merge_rows(dot("bknsgd,bknwld->bknsgwl", self._split(d_out_BKRD), self.v_BKnWLD))

  def grads(self, probs_BKRN, d_logits_BKRN, depth_q_BKRD, d_out_BKRD, dtype):
    """(d depth_q [B, K, R, D] f32, d depth_k, d depth_v of the window's tokens).

    The depth grads are [B, block, L, K, D] in dtype when the windows tile the block, else
    [B, W, L, K, D] float32 for `accumulate`.
    """
    probs = self._split_columns(probs_BKRN).astype(dtype)
    d_scores = self._split_columns(self.geo.scale * d_logits_BKRN).astype(dtype)
    d_depth_q = self._merge_rows(dot("bknsgwl,bknwld->bknsgd", d_scores, self.k_BKnWLD))
    d_depth_k = dot("bknsgwl,bknsgd->bknwld", d_scores, self._split(depth_q_BKRD))
    d_depth_v = dot("bknsgwl,bknsgd->bknwld", probs, self._split(d_out_BKRD))
    if sliding(self.geo):
      return d_depth_q, _to_buffer(d_depth_k[:, :, 0], jnp.float32), _to_buffer(d_depth_v[:, :, 0], jnp.float32)
    tokens = lambda x_BKnWLD: x_BKnWLD.reshape(self.geo.batch, self.geo.num_kv_heads, self.geo.block,
                                               *x_BKnWLD.shape[4:])
    return d_depth_q, _to_buffer(tokens(d_depth_k), dtype), _to_buffer(tokens(d_depth_v), dtype)

  def accumulate(self, acc_BTLKD, window_BWLKD):
    """acc[:, window] += the window's gradient (sliding windows only), in place in the scan carry."""
    current = jax.lax.dynamic_slice_in_dim(acc_BTLKD, self.start, self.width, axis=1)
    return jax.lax.dynamic_update_slice_in_dim(acc_BTLKD, current + window_BWLKD, self.start, axis=1)
