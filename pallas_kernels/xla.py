"""Memory-efficient MoDA in plain jnp: a blocked online softmax with a FlashAttention-2 backward.

The default backend on CPU and the fallback on GPU and TPU (for anything a Pallas backend rejects), so
it supports every call the api accepts: depth-only attention, chunk-visible depth, depth_start,
segments, GQA, depth_q. Peak memory is O(T * block) per head instead of the O(T^2) of `reference`: no
[T, T] logit matrix ever exists, only one [R = block * G, block] tile at a time. The block layout is
described in `xla_blocks`, the depth phase in `xla_depth`; the backward pass lives in `xla_backward`.

Forward, per query block i (`lax.map`): the depth phase (the visible depth slots of each row: its own
token's, or its chunk's) starts an online-softmax state, then the key blocks the block can see are
merged into the same state: one softmax over [sequence | depth]. Causal attention loops over key
blocks 0..i-1 without any mask and applies the causal mask only to the diagonal block i; blocks above
the diagonal are never computed. Depth-only attention has no key sweep; a row that sees nothing
returns 0 and lse = -inf.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels import residuals, xla_backward, xla_depth
from pallas_kernels.api import current_platform
from pallas_kernels.spec import Inputs, Spec
from pallas_kernels.xla_blocks import (
    Geometry, choose_block, default_max_block, dot, from_query_blocks, key_block_mask, masked,
    pad_tokens, segment_blocks, sweep_key_blocks, to_key_blocks, to_query_blocks)


def check_supported(inputs: Inputs, spec: Spec, interpret) -> None:
  """Every combination the api accepts is supported."""
  del inputs, spec, interpret


def attention(inputs: Inputs, spec: Spec, *, interpret=False, max_block: int | None = None):
  """See `pallas_kernels.api` for the backend protocol. `interpret` is ignored.

  `max_block` caps the tile size; None picks it for the platform and the batch * heads (tests pass
  small values to exercise many blocks on short inputs).
  """
  return attention_with_depth(inputs, spec, interpret=interpret, max_block=max_block)[:2]


def attention_with_depth(inputs: Inputs, spec: Spec, *, interpret=False, max_block: int | None = None):
  """`attention` returning (out, lse, depth_k, depth_v): the depth arrays unchanged (None without depth).

  Their cotangents seed the backward's depth cotangent carry (`xla_backward`), so a caller that threads
  its depth buffers through the call gets their cotangent back with this call's added in place.
  """
  check_supported(inputs, spec, interpret)
  batch, seq_len, num_q_heads, head_dim = inputs.q.shape
  if max_block is None:
    max_block = default_max_block(current_platform(), batch, num_q_heads)
  if isinstance(max_block, bool) or not isinstance(max_block, int) or max_block < 1:
    raise ValueError(f"max_block={max_block!r}: expected None or a positive Python int.")
  num_kv_heads = inputs.num_kv_heads
  block, num_blocks = choose_block(seq_len, max_block, spec.depth_chunk)
  geo = Geometry(batch=batch, num_kv_heads=num_kv_heads, group=num_q_heads // num_kv_heads,
                 head_dim=head_dim, block=block, num_blocks=num_blocks, spec=spec)
  # depth_q None stays None (the depth keys are scored with q): the backward then accumulates one
  # dq instead of returning two [B, T, Hq, D] gradients for JAX to add (-23% op temp memory, CPU).
  return _moda(geo, inputs)


# ----------------------------------------------------------------------------------------------
# Forward pass.
# ----------------------------------------------------------------------------------------------


class _Softmax(NamedTuple):
  """Online-softmax state of one query block: running max, normalizer and unnormalized output."""
  max_BKR: jax.Array
  sum_BKR: jax.Array
  acc_BKRD: jax.Array


def _empty(shape_BKR, geo: Geometry) -> _Softmax:
  return _Softmax(jnp.full(shape_BKR, -jnp.inf, jnp.float32), jnp.zeros(shape_BKR, jnp.float32),
                  jnp.zeros((*shape_BKR, geo.head_dim), jnp.float32))


def _merge(state: _Softmax, logits_BKRN, weighted_values: Callable) -> _Softmax:
  """Folds a tile of logits (masked entries -inf) into the running softmax."""
  new_max = jnp.maximum(state.max_BKR, logits_BKRN.max(axis=-1))
  # A row with nothing visible yet keeps max -inf; shifting by 0 then gives exp(-inf) = 0, not NaN.
  shift = jnp.where(new_max == -jnp.inf, 0.0, new_max)
  probs = jnp.exp(logits_BKRN - shift[..., None])
  rescale = jnp.exp(state.max_BKR - shift)
  return _Softmax(new_max, rescale * state.sum_BKR + probs.sum(axis=-1),
                  rescale[..., None] * state.acc_BKRD + weighted_values(probs))


def forward(geo: Geometry, inputs: Inputs):
  """(out [B, T, Hq, D] in q's dtype, lse [B, T, Hq] float32). depth_q (or q) scores the depth keys."""
  spec = geo.spec
  dtype = inputs.q.dtype
  q_NBKRD = to_query_blocks(inputs.q, geo)
  seg_rows_NBR, seg_keys_NBS = segment_blocks(inputs.segment_ids, geo)
  if spec.has_sequence:
    k_NBKSD, v_NBKSD = to_key_blocks(inputs.k, geo), to_key_blocks(inputs.v, geo)
  if spec.has_depth:
    depth_k_BTLKD, depth_v_BTLKD = pad_tokens(inputs.depth_k, geo), pad_tokens(inputs.depth_v, geo)
    segments_BT = None if inputs.segment_ids is None else pad_tokens(inputs.segment_ids, geo)
    depth_q_NBKRD = q_NBKRD if inputs.depth_q is None else to_query_blocks(inputs.depth_q, geo)

  def query_block(i):
    q_BKRD = q_NBKRD[i]
    seg_rows_BR = None if seg_rows_NBR is None else seg_rows_NBR[i]
    if spec.has_depth:
      depth = xla_depth.phase(depth_k_BTLKD, depth_v_BTLKD, segments_BT, inputs.depth_start,
                              inputs.depth_len, i, geo)
      # The depth phase starts the state: the softmax of its own logits, for its rows.
      state = depth.softmax_state(depth_q_NBKRD[i], dtype,
                                  lambda logits, values: _merge(_empty(logits.shape[:3], geo), logits, values))
    else:
      state = _empty((geo.batch, geo.num_kv_heads, geo.rows), geo)

    def step(j, diagonal, state):
      k_BKSD, v_BKSD = k_NBKSD[j], v_NBKSD[j]
      seg_keys_BS = None if seg_keys_NBS is None else seg_keys_NBS[j]
      logits = geo.scale * dot("bkrd,bksd->bkrs", q_BKRD, k_BKSD)
      logits = masked(logits, key_block_mask(i, j, diagonal, seg_rows_BR, seg_keys_BS, geo))
      return _merge(state, logits, lambda p: dot("bkrs,bksd->bkrd", p.astype(dtype), v_BKSD))

    if spec.has_sequence:
      state = sweep_key_blocks(i, step, state, geo)
    # With a sequence every real row sees itself; an empty row is padding (sliced off) or a
    # depth-only row whose slots are all hidden: out 0, lse -inf.
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
def _moda(geo, inputs):
  return (*forward(geo, inputs), inputs.depth_k, inputs.depth_v)


def _moda_fwd(geo, inputs):
  out, lse = residuals.named(*forward(geo, inputs))
  return (out, lse, inputs.depth_k, inputs.depth_v), (inputs, out, lse)


def _moda_bwd(geo, saved, cotangents):
  inputs, out, lse = saved
  d_out, d_lse, *depth_acc = cotangents
  dq, dk, dv, d_depth_q, d_depth_k, d_depth_v = xla_backward.backward(
      geo, inputs, out, lse, d_out, d_lse, depth_acc=depth_acc if geo.spec.has_depth else None)
  # depth_start, depth_len and segment_ids are integers: no cotangent.
  return (Inputs(q=dq, k=dk, v=dv, depth_q=d_depth_q, depth_k=d_depth_k, depth_v=d_depth_v,
                 depth_start=None, depth_len=None, segment_ids=None),)


_moda.defvjp(_moda_fwd, _moda_bwd)
