"""Backward pass of the `xla` MoDA backend: FlashAttention-2 style recomputation from (out, lse).

With p = exp(logits - lse) recomputed tile by tile, dp = d_out . v and
    delta = rowsum(out * d_out) - d_lse,     d_logits = p * (dp - delta)
(the lse cotangent enters as + p * d_lse because d lse / d logits = p; `out` is the saved output in
q's dtype, as in flash kernels, so bf16 / f16 delta carries that rounding). Then
    dv += p^T d_out,   dk += scale * d_logits^T q,   dq += scale * d_logits k
for the sequence tiles, and the same with the visible depth slots and depth_q in place of q (the
depth part of the query gradient is d depth_q, a separate output unless depth_q is q itself).

Loop order: a `lax.scan` over query blocks carries float32 dk / dv accumulators for the whole sequence
([B, T, K, D]: O(T * D), smaller than a dq carry whenever G > 1); a query block's dq is complete when
its sweep ends, so it is a scan output. The depth cotangents [B, T, L, K, D] are a carry too, which each
block's depth phase adds its tokens' gradients into in place (`xla_depth`): seeded with zeros, or with the
cotangent a caller threads through the call, so the result is that cotangent plus this call's without any
other array of the buffers' size. It has the buffers' dtype (each slot's gradient is added once, rounded
once), float32 where sliding depth windows (C > max_block) overlap. Hidden slots have p = 0 exactly, hence
gradients that are exactly zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import xla_depth
from pallas_kernels.spec import Inputs
from pallas_kernels.xla_blocks import (
    Geometry, dot, from_key_blocks, from_query_blocks, key_block_mask, masked, pad_tokens,
    segment_blocks, sweep_key_blocks, to_key_blocks, to_query_blocks)


def backward(geo: Geometry, inputs: Inputs, out_BTHD, lse_BTH, d_out_BTHD, d_lse_BTH, depth_acc=None):
  """Returns (dq, dk, dv, d_depth_q, d_depth_k, d_depth_v) in the inputs' dtypes.

  depth_q None means the depth keys were scored with q: dq then holds both parts and d_depth_q is
  None (one query gradient, not two [B, T, Hq, D] arrays and their sum). Otherwise dq is the
  sequence part only. dk / dv are None for depth-only attention, the depth grads None without depth.
  `depth_acc` = (dk, dv) like the depth arrays (or None: zeros) is added into the depth grads."""
  spec = geo.spec
  q_BTHD = inputs.q
  dtype = q_BTHD.dtype
  q_NBKRD = to_query_blocks(q_BTHD, geo)
  d_out_NBKRD = to_query_blocks(d_out_BTHD.astype(dtype), geo)
  delta_BTH = jnp.sum(out_BTHD.astype(jnp.float32) * d_out_BTHD.astype(jnp.float32), axis=-1)
  delta_NBKR = to_query_blocks(delta_BTH - d_lse_BTH.astype(jnp.float32), geo)
  # A row that saw nothing (depth-only attention) has lse = -inf, and padded query rows get +inf: as
  # +inf both recompute probabilities that are exactly 0, so they contribute nothing and no NaN.
  lse_NBKR = to_query_blocks(jnp.where(lse_BTH == -jnp.inf, jnp.inf, lse_BTH), geo, pad_value=jnp.inf)
  seg_rows_NBR, seg_keys_NBS = segment_blocks(inputs.segment_ids, geo)
  shared_query = inputs.depth_q is None
  if spec.has_sequence:
    k_NBKSD, v_NBKSD = to_key_blocks(inputs.k, geo), to_key_blocks(inputs.v, geo)
  depth_q_NBKRD = None
  if spec.has_depth:
    depth_k_BTLKD, depth_v_BTLKD = pad_tokens(inputs.depth_k, geo), pad_tokens(inputs.depth_v, geo)
    segments_BT = None if inputs.segment_ids is None else pad_tokens(inputs.segment_ids, geo)
    depth_q_NBKRD = None if shared_query else to_query_blocks(inputs.depth_q, geo)

  def query_block(carry, xs):
    dkv_acc, depth_acc = carry
    i, q_BKRD, depth_q_BKRD, d_out_BKRD, lse_BKR, delta_BKR = xs
    if shared_query:
      depth_q_BKRD = q_BKRD
    seg_rows_BR = None if seg_rows_NBR is None else seg_rows_NBR[i]

    def step(j, diagonal, carry):
      dq_BKRD, (dk_NBKSD, dv_NBKSD) = carry
      k_BKSD, v_BKSD = k_NBKSD[j], v_NBKSD[j]
      seg_keys_BS = None if seg_keys_NBS is None else seg_keys_NBS[j]
      logits = geo.scale * dot("bkrd,bksd->bkrs", q_BKRD, k_BKSD)
      logits = masked(logits, key_block_mask(i, j, diagonal, seg_rows_BR, seg_keys_BS, geo))
      probs, d_logits = _grads_of_logits(logits, dot("bkrd,bksd->bkrs", d_out_BKRD, v_BKSD), lse_BKR, delta_BKR)
      probs, d_logits = probs.astype(dtype), d_logits.astype(dtype)
      dq_BKRD += geo.scale * dot("bkrs,bksd->bkrd", d_logits, k_BKSD)
      dk_NBKSD = _add_block(dk_NBKSD, j, geo.scale * dot("bkrs,bkrd->bksd", d_logits, q_BKRD))
      dv_NBKSD = _add_block(dv_NBKSD, j, dot("bkrs,bkrd->bksd", probs, d_out_BKRD))
      return dq_BKRD, (dk_NBKSD, dv_NBKSD)

    dq_BKRD = jnp.zeros(q_BKRD.shape, jnp.float32)
    depth_grads = ()
    if spec.has_depth:
      depth = xla_depth.phase(depth_k_BTLKD, depth_v_BTLKD, segments_BT, inputs.depth_start,
                              inputs.depth_len, i, geo)
      d_depth_q, depth_acc = depth.backward(depth_q_BKRD, d_out_BKRD, (lse_BKR, delta_BKR), _grads_of_logits,
                                            dtype, depth_acc)
      if shared_query:
        dq_BKRD += d_depth_q
      else:
        depth_grads = (d_depth_q.astype(dtype),)

    if spec.has_sequence:
      dq_BKRD, dkv_acc = sweep_key_blocks(i, step, (dq_BKRD, dkv_acc), geo)
    return (dkv_acc, depth_acc), (dq_BKRD.astype(dtype), *depth_grads)

  shape_NBKSD = (geo.num_blocks, geo.batch, geo.num_kv_heads, geo.block, geo.head_dim)
  dkv_init = ((jnp.zeros(shape_NBKSD, jnp.float32), jnp.zeros(shape_NBKSD, jnp.float32))
              if spec.has_sequence else ())
  depth_init = ()
  if spec.has_depth:
    depth_arrays = (inputs.depth_k, inputs.depth_v)
    if depth_acc is None:
      depth_acc = tuple(jnp.zeros(a.shape, a.dtype) for a in depth_arrays)
    depth_init = tuple(pad_tokens(_typed_in_context_mesh(acc), geo).astype(xla_depth.acc_dtype(geo, a.dtype))
                       for acc, a in zip(depth_acc, depth_arrays))
  xs = (jnp.arange(geo.num_blocks), q_NBKRD, depth_q_NBKRD, d_out_NBKRD, lse_NBKR, delta_NBKR)
  (dkv_acc, depth_acc), per_block = jax.lax.scan(query_block, (dkv_init, depth_init), xs)

  dq_BTHD = from_query_blocks(per_block[0], geo)
  dk_BTKD = dv_BTKD = None
  if spec.has_sequence:
    dk_BTKD = from_key_blocks(dkv_acc[0], geo).astype(inputs.k.dtype)
    dv_BTKD = from_key_blocks(dkv_acc[1], geo).astype(inputs.v.dtype)
  if not spec.has_depth:
    return dq_BTHD, dk_BTKD, dv_BTKD, None, None, None
  d_depth_q = None if shared_query else from_query_blocks(per_block[1], geo)
  d_depth_k, d_depth_v = (acc[:, :geo.seq_len].astype(a.dtype) for acc, a in zip(depth_acc, depth_arrays))
  return dq_BTHD, dk_BTKD, dv_BTKD, d_depth_q, d_depth_k, d_depth_v


def _grads_of_logits(logits_BKRN, d_probs_BKRN, lse_BKR, delta_BKR):
  """(p, d logits) of a tile: p recomputed from the saved lse, d logits = p * (dp - delta)."""
  probs = jnp.exp(logits_BKRN - lse_BKR[..., None])
  return probs, probs * (d_probs_BKRN - delta_BKR[..., None])


def _add_block(acc_NBKSD, j, update_BKSD):
  """acc[j] += update, written as a dynamic slice + update so XLA keeps the carry in place."""
  block = jax.lax.dynamic_index_in_dim(acc_NBKSD, j, keepdims=False)
  return jax.lax.dynamic_update_index_in_dim(acc_NBKSD, block + update_BKSD, j, 0)


def _typed_in_context_mesh(acc):
  """The carry seed typed with the context's explicit mesh. Under explicit mesh axes the arrays this
  backward creates (iotas, masks) and so its gradients carry the mesh, while the zero cotangent JAX makes
  for an unused output (and an input traced without a sharding) carries none; the carry's in-place
  updates need the two to agree."""
  mesh = jax.sharding.get_abstract_mesh()
  explicit = not mesh.empty and jax.sharding.AxisType.Explicit in mesh.axis_types
  if not explicit or not jax.typeof(acc).sharding.mesh.empty:
    return acc
  return jax.sharding.reshard(acc, jax.sharding.PartitionSpec())
