"""What a Pallas backend's `custom_vjp` backward receives, made dense once for every backend.

The Pallas backends (pallas_triton, pallas_mosaic_gpu) define their custom_vjp with
`symbolic_zeros=True` and return (out, lse, depth_k, depth_v), the depth arrays unchanged
(`attention_with_depth`). Their forward rule then receives every operand wrapped in a
`CustomVJPPrimal` (`primals` unwraps it), and their backward rule receives a `SymbolicZero` for each
output nobody differentiates: the lse of a plain call, and the depth outputs of a call whose caller does
not thread its depth buffers through it. `split` turns these into what the kernels take:
  * d_out and d_lse dense (zeros / 0.0 where symbolic);
  * the depth accumulators: None when both depth cotangents are symbolic zeros (the depth kernel then
    stores its gradient and zero-fills the unread slots: no cotangent-sized zeros are made, read or
    added), else both dense (a zero buffer only for a one-sided cotangent, a case no caller of the
    model makes), for the depth kernel to add its dk / dv into in place.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero


def primals(tree):
  """The operands of a `symbolic_zeros=True` forward rule without their `perturbed` wrappers."""
  return jax.tree.map(lambda x: x.value, tree, is_leaf=lambda x: isinstance(x, CustomVJPPrimal))


def dense(cotangent):
  """None for a symbolic zero, else the cotangent."""
  return None if isinstance(cotangent, SymbolicZero) else cotangent


def split(cotangents, out, depth_arrays):
  """(d_out, d_lse, depth_acc) of the cotangents of (out, lse, depth_k, depth_v).

  `depth_arrays` = (depth_k, depth_v) in the kernels' layout, or None without depth; `depth_acc` is
  None or the (dk, dv) accumulators shaped like them (module docstring).
  """
  d_out, d_lse, *depth = (dense(ct) for ct in cotangents)
  d_out = jnp.zeros_like(out) if d_out is None else d_out
  d_lse = 0.0 if d_lse is None else d_lse
  if depth_arrays is None or all(ct is None for ct in depth):
    return d_out, d_lse, None
  return d_out, d_lse, tuple(jnp.zeros_like(x) if ct is None else ct for ct, x in zip(depth, depth_arrays))


def delta(out, d_out, d_lse):
  """delta = rowsum(out * d_out) - d_lse, float32 [..., H]: the backward's row statistic.

  d lse / d logit = p, so an lse cotangent shifts every ds = p * (dp - delta) like a -d_lse in delta.
  """
  return jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1) - d_lse
