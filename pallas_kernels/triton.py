"""`implementation="pallas_triton"`: the MoDA backend built from Pallas kernels lowered through Triton.

This file owns the layout glue and the `custom_vjp`; the kernels live in `triton_fwd.py` / `triton_bwd.py`.
No transposes: q is viewed as [B, T, Hk, G, D] (a free reshape) and every kernel reads the native layouts.
Head dims that are not a power of two >= 16 are zero-padded here (zero columns change no logit, and the
padded output columns are sliced off). fp32 dots run in IEEE fp32, not TF32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import triton_bwd, triton_fwd
from pallas_kernels.block_sizes import BlockSizes, next_pow2


def attention(q_BTHD, k_BTKD, v_BTKD, depth_k_BTLKD, depth_v_BTLKD, depth_len, segment_ids_BT,
              *, causal: bool, scale: float, interpret=False, block_sizes: BlockSizes | None = None,
              depth_q_BTHD=None):
  """See `pallas_kernels.api` for the normalized backend signature.

  `block_sizes` overrides the per-device default tiles (benchmarks and tests use it).
  """
  batch, seq_len, num_q_heads, head_dim = q_BTHD.shape
  num_kv_heads = k_BTKD.shape[2]
  group = num_q_heads // num_kv_heads
  padded_dim = max(16, next_pow2(head_dim))
  if block_sizes is None:
    block_sizes = BlockSizes.get_default(padded_dim, group, q_BTHD.dtype, _device_kind())
  block_sizes.validate(group)

  pad = lambda x: x if padded_dim == head_dim else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, padded_dim - head_dim)])
  q_BTKGD = pad(q_BTHD).reshape(batch, seq_len, num_kv_heads, group, padded_dim)
  has_depth = depth_k_BTLKD is not None
  depth = (None, None, None)
  if has_depth:
    # q itself when not given: the same array twice, JAX sums its two cotangents.
    depth_q_BTKGD = q_BTKGD if depth_q_BTHD is None else pad(depth_q_BTHD).reshape(q_BTKGD.shape)
    depth = (depth_q_BTKGD, pad(depth_k_BTLKD), pad(depth_v_BTLKD))
  out_BTKGD, lse_BTKG = _moda(q_BTKGD, pad(k_BTKD), pad(v_BTKD), *depth, depth_len, segment_ids_BT,
                              causal, float(scale), block_sizes, interpret)
  out_BTHD = out_BTKGD.reshape(batch, seq_len, num_q_heads, padded_dim)[..., :head_dim]
  return out_BTHD, lse_BTKG.reshape(batch, seq_len, num_q_heads)


def _device_kind() -> str | None:
  mesh = jax.sharding.get_abstract_mesh()
  device = getattr(mesh, "abstract_device", None)
  if device is not None:
    return getattr(device, "device_kind", None)
  try:
    return jax.devices()[0].device_kind
  except RuntimeError:
    return None


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11))
def _moda(q, k, v, depth_q, depth_k, depth_v, depth_len, segment_ids, causal, scale, block_sizes, interpret):
  return triton_fwd.forward(q, k, v, depth_q, depth_k, depth_v, depth_len, segment_ids, causal=causal,
                            scale=scale, blocks=block_sizes.fwd, interpret=interpret)


def _moda_fwd(q, k, v, depth_q, depth_k, depth_v, depth_len, segment_ids, causal, scale, block_sizes, interpret):
  out, lse = _moda(q, k, v, depth_q, depth_k, depth_v, depth_len, segment_ids, causal, scale, block_sizes,
                   interpret)
  return (out, lse), (q, k, v, depth_q, depth_k, depth_v, depth_len, segment_ids, out, lse)


def _moda_bwd(causal, scale, block_sizes, interpret, residuals, cotangents):
  q, k, v, depth_q, depth_k, depth_v, depth_len, segment_ids, out, lse = residuals
  d_out, d_lse = cotangents
  # d lse / d logit = p, so an lse cotangent shifts every ds = p * (dp - delta) like a -dlse in delta.
  delta = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1) - d_lse
  grads = triton_bwd.backward(
      q, k, v, depth_q, depth_k, depth_v, depth_len, segment_ids, d_out.astype(q.dtype), lse, delta,
      causal=causal, scale=scale, dq_blocks=block_sizes.dq, dkv_blocks=block_sizes.dkv, interpret=interpret)
  return (*grads, None, None)


_moda.defvjp(_moda_fwd, _moda_bwd)
