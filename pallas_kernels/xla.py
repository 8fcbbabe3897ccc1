"""Memory-efficient MoDA in plain jnp: a blocked online softmax with a FlashAttention-2 backward.

The default backend on CPU and the fallback on GPU and TPU (for anything a Pallas backend rejects), so
it accepts every call the contract in `pallas_kernels.api` allows. Peak memory is O(T * block) per head instead of the O(T^2) of
`reference`: no [T, T] logit matrix ever exists, only one [R = block * G, block] tile at a time.
The block layout is described in `xla_blocks`; the backward pass lives in `xla_backward`.

Forward, per query block i (`lax.map`): the depth phase (each token against its own L slots, masked by
`l < depth_len`) starts an online-softmax state, then the key blocks the block can see are merged into
the same state: one softmax over [sequence | depth]. Causal attention loops over key blocks 0..i-1
without any mask and applies the causal mask only to the diagonal block i; blocks above the diagonal
are never computed.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels import xla_backward
from pallas_kernels.api import current_platform
from pallas_kernels.xla_blocks import (
    Geometry, choose_block, default_max_block, depth_block, depth_logits, dot, from_query_blocks,
    key_block_mask, masked, pad_tokens, segment_blocks, sweep_key_blocks, to_key_blocks,
    to_query_blocks)


def attention(q_BTHD, k_BTKD, v_BTKD, depth_k_BTLKD, depth_v_BTLKD, depth_len, segment_ids_BT,
              *, causal: bool, scale: float, interpret=False, max_block: int | None = None,
              depth_q_BTHD=None):
  """See `pallas_kernels.api` for the normalized backend signature. `interpret` is ignored.

  `max_block` caps the tile size; None picks it for the platform and the batch * heads (tests pass
  small values to exercise many blocks on short inputs).
  """
  del interpret
  batch, seq_len, num_q_heads, head_dim = q_BTHD.shape
  if max_block is None:
    max_block = default_max_block(current_platform(), batch, num_q_heads)
  if not isinstance(max_block, int) or max_block < 1:
    raise ValueError(f"max_block={max_block!r}: expected None or a positive Python int.")
  num_kv_heads = k_BTKD.shape[2]
  block, num_blocks = choose_block(seq_len, max_block)
  geo = Geometry(
      batch=batch, seq_len=seq_len, num_kv_heads=num_kv_heads, group=num_q_heads // num_kv_heads,
      head_dim=head_dim, num_slots=0 if depth_k_BTLKD is None else depth_k_BTLKD.shape[2],
      block=block, num_blocks=num_blocks, causal=bool(causal), scale=float(scale))
  # depth_q None stays None (the depth keys are scored with q): the backward then accumulates one
  # dq instead of returning two [B, T, Hq, D] gradients for JAX to add (-23% op temp memory, CPU).
  # (The api never passes a depth_q without depth arrays.)
  return _moda(geo, q_BTHD, k_BTKD, v_BTKD, depth_q_BTHD, depth_k_BTLKD, depth_v_BTLKD, depth_len,
               segment_ids_BT)


# ----------------------------------------------------------------------------------------------
# Forward pass.
# ----------------------------------------------------------------------------------------------


class _Softmax(NamedTuple):
  """Online-softmax state of one query block: running max, normalizer and unnormalized output."""
  max_BKR: jax.Array
  sum_BKR: jax.Array
  acc_BKRD: jax.Array


def _merge(state: _Softmax, logits_BKRN, weighted_values: Callable) -> _Softmax:
  """Folds a tile of logits (masked entries -inf) into the running softmax."""
  new_max = jnp.maximum(state.max_BKR, logits_BKRN.max(axis=-1))
  # A row with nothing visible yet keeps max -inf; shifting by 0 then gives exp(-inf) = 0, not NaN.
  shift = jnp.where(new_max == -jnp.inf, 0.0, new_max)
  probs = jnp.exp(logits_BKRN - shift[..., None])
  rescale = jnp.exp(state.max_BKR - shift)
  return _Softmax(new_max, rescale * state.sum_BKR + probs.sum(axis=-1),
                  rescale[..., None] * state.acc_BKRD + weighted_values(probs))


def forward(geo: Geometry, q_BTHD, k_BTKD, v_BTKD, depth_q_BTHD, depth_k_BTLKD, depth_v_BTLKD,
            depth_len, segment_ids_BT):
  """(out [B, T, Hq, D] in q's dtype, lse [B, T, Hq] float32). depth_q scores the depth keys."""
  dtype = q_BTHD.dtype
  q_NBKRD = to_query_blocks(q_BTHD, geo)
  k_NBKSD, v_NBKSD = to_key_blocks(k_BTKD, geo), to_key_blocks(v_BTKD, geo)
  seg_rows_NBR, seg_keys_NBS = segment_blocks(segment_ids_BT, geo)
  if geo.num_slots:
    depth_k_BTLKD, depth_v_BTLKD = pad_tokens(depth_k_BTLKD, geo), pad_tokens(depth_v_BTLKD, geo)
    depth_q_NBKRD = q_NBKRD if depth_q_BTHD is None else to_query_blocks(depth_q_BTHD, geo)

  def query_block(i):
    q_BKRD = q_NBKRD[i]
    seg_rows_BR = None if seg_rows_NBR is None else seg_rows_NBR[i]
    shape_BKR = (geo.batch, geo.num_kv_heads, geo.rows)
    state = _Softmax(jnp.full(shape_BKR, -jnp.inf, jnp.float32), jnp.zeros(shape_BKR, jnp.float32),
                     jnp.zeros((*shape_BKR, geo.head_dim), jnp.float32))
    if geo.num_slots:
      depth_v_BKtLD = depth_block(depth_v_BTLKD, i, geo)

      def depth_values(probs_BKRL):
        probs = probs_BKRL.reshape(geo.batch, geo.num_kv_heads, geo.block, geo.group, geo.num_slots)
        out = dot("bktgl,bktld->bktgd", probs.astype(dtype), depth_v_BKtLD)
        return out.reshape(*shape_BKR, geo.head_dim)

      logits = depth_logits(depth_q_NBKRD[i], depth_block(depth_k_BTLKD, i, geo), depth_len, geo)
      state = _merge(state, logits, depth_values)

    def step(j, diagonal, state):
      k_BKSD, v_BKSD = k_NBKSD[j], v_NBKSD[j]
      seg_keys_BS = None if seg_keys_NBS is None else seg_keys_NBS[j]
      logits = geo.scale * dot("bkrd,bksd->bkrs", q_BKRD, k_BKSD)
      logits = masked(logits, key_block_mask(i, j, diagonal, seg_rows_BR, seg_keys_BS, geo))
      return _merge(state, logits, lambda p: dot("bkrs,bksd->bkrd", p.astype(dtype), v_BKSD))

    state = sweep_key_blocks(i, step, state, geo)
    # Real rows always see themselves; only padded rows can be empty, and those are sliced off.
    nonempty = state.sum_BKR > 0
    out_BKRD = state.acc_BKRD / jnp.where(nonempty, state.sum_BKR, 1.0)[..., None]
    lse_BKR = jnp.where(nonempty, state.max_BKR + jnp.log(state.sum_BKR), -jnp.inf)
    return out_BKRD.astype(dtype), lse_BKR

  out_NBKRD, lse_NBKR = jax.lax.map(query_block, jnp.arange(geo.num_blocks))
  return from_query_blocks(out_NBKRD, geo), from_query_blocks(lse_NBKR, geo)


# ----------------------------------------------------------------------------------------------
# custom_vjp wiring.
# ----------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _moda(geo, q, k, v, depth_q, depth_k, depth_v, depth_len, segment_ids):
  return forward(geo, q, k, v, depth_q, depth_k, depth_v, depth_len, segment_ids)


def _moda_fwd(geo, q, k, v, depth_q, depth_k, depth_v, depth_len, segment_ids):
  out, lse = forward(geo, q, k, v, depth_q, depth_k, depth_v, depth_len, segment_ids)
  return (out, lse), (q, k, v, depth_q, depth_k, depth_v, depth_len, segment_ids, out, lse)


def _moda_bwd(geo, residuals, cotangents):
  d_out, d_lse = cotangents
  grads = xla_backward.backward(geo, *residuals, d_out, d_lse)
  # depth_len and segment_ids are integers: no cotangent.
  return (*grads, None, None)


_moda.defvjp(_moda_fwd, _moda_bwd)
