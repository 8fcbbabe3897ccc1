"""`implementation="pallas_mosaic_gpu"`: the MoDA backend written in Pallas Mosaic GPU for Hopper GPUs.

This file owns the layout glue, what the backend supports and the `custom_vjp`. The forward kernel
(`mosaic_gpu_fwd.py`) is Mosaic GPU: wgmma on SMEM operands, a TMA ring fed by a memory warpgroup, two
compute warpgroups. No transposes of q / k / v / depth: the kernels read the native layouts with TMA
boxes (a T that is not a multiple of the tile is handled by TMA's zero-filled reads and clipped
writes; T not a multiple of 8 is padded here, a copy); only lse is produced as [B, Hq, T] and
transposed here.

THE BACKWARD IS NOT MOSAIC GPU YET: the `custom_vjp`'s backward calls `pallas_triton`'s backward
kernels (`triton_bwd.backward`, its default tiles) on the residuals of this forward, so the backend is
complete and differentiable (deterministic, like Triton's). Its speed is Triton's; a Mosaic GPU
backward is the next step (see the issue). In interpret mode the Triton backward runs in its own
(HLO) interpret mode.

Supported: float16 / bfloat16, head dims 64 and 128, any G, causal or not, segments, depth_q, L = 0 or
more with traced depth_start / depth_len. NotImplementedError (the dispatcher falls back) for float32,
other head dims, depth-only attention (k = v = None) and depth_chunk > 1.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import mosaic_gpu_fwd
from pallas_kernels import mosaic_gpu_tiles as mt
from pallas_kernels import spec as spec_lib
from pallas_kernels import triton_bwd
from pallas_kernels import triton_tiles as tt
from pallas_kernels.block_sizes import BlockSizes


def attention(inputs: spec_lib.Inputs, spec: spec_lib.Spec, *, interpret=False,
              block_sizes: mt.MosaicBlocks | None = None):
  """The backend protocol of `pallas_kernels.api`: (out [B, T, Hq, D] in q's dtype, lse [B, T, Hq] float32).

  `interpret`: False, True (GPU interpret mode with default `plgpu.InterpretGPUParams`) or an
  `InterpretGPUParams`. `block_sizes` overrides the default forward tiles (tests and benchmarks).
  """
  check_supported(inputs, spec, interpret)
  blocks = block_sizes or default_blocks(inputs.q.shape[-1])
  blocks.validate()
  operands = tt.Operands(q=inputs.q, k=inputs.k, v=inputs.v, depth_q=inputs.depth_q,
                         segment_ids=inputs.segment_ids)
  if spec.has_depth:
    operands = operands._replace(depth_k=inputs.depth_k, depth_v=inputs.depth_v,
                                 depth_bounds=jnp.stack([inputs.depth_start, inputs.depth_len]).astype(jnp.int32))
  return _moda(operands, spec, blocks, _interpret_params(interpret))


def check_supported(inputs: spec_lib.Inputs, spec: spec_lib.Spec, interpret) -> None:
  """Raises NotImplementedError for what this backend cannot do (the dispatcher then falls back)."""
  del interpret  # Interpret mode runs the same kernels: it supports the same calls.
  batch, seq_len, num_q_heads, head_dim = inputs.q.shape
  if spec.seq_len != seq_len:
    raise NotImplementedError(f"pallas_mosaic_gpu: spec.seq_len={spec.seq_len} differs from the {seq_len} "
                              "query tokens; the kernels attend over the queries' own tokens only.")
  if jnp.dtype(inputs.q.dtype) not in mt.SUPPORTED_DTYPES:
    raise NotImplementedError(f"pallas_mosaic_gpu: dtype {jnp.dtype(inputs.q.dtype).name} is not supported "
                              "(wgmma operands here are float16 or bfloat16).")
  if head_dim not in mt.SUPPORTED_HEAD_DIMS:
    raise NotImplementedError(f"pallas_mosaic_gpu: head_dim={head_dim} is not supported (expected one of "
                              f"{mt.SUPPORTED_HEAD_DIMS}).")
  if not spec.has_sequence:
    raise NotImplementedError("pallas_mosaic_gpu: depth-only attention (k = v = None) is not supported.")
  if spec.depth_chunk > 1:
    raise NotImplementedError(f"pallas_mosaic_gpu: depth_chunk={spec.depth_chunk} > 1 is not supported "
                              "(a query sees its own token's depth slots only here).")
  del batch, num_q_heads


def default_blocks(head_dim: int) -> mt.MosaicBlocks:
  """Forward tiles: 128-key ring slots, two stages (SMEM: ~100 KB at D 64, ~200 KB at D 128 with depth_q)."""
  del head_dim  # One table today (not yet measured on the H200).
  return mt.MosaicBlocks(block_kv=128, stages=2)


def _interpret_params(interpret):
  """None (compile for the GPU) or the `InterpretGPUParams` of GPU interpret mode (hashable)."""
  if interpret is None or interpret is False:
    return None
  if interpret is True:
    return plgpu.InterpretGPUParams()
  if isinstance(interpret, plgpu.InterpretGPUParams):
    return interpret
  raise ValueError(f"interpret={interpret!r}: pallas_mosaic_gpu expects a bool or a plgpu.InterpretGPUParams.")


def _forward(operands: tt.Operands, spec: spec_lib.Spec, blocks: mt.MosaicBlocks, interpret):
  batch, seq_len, num_q_heads, head_dim = operands.q.shape
  group = num_q_heads // operands.k.shape[2]
  num_slots = 0 if operands.depth_k is None else operands.depth_k.shape[2]
  geom = mt.make_geometry(seq_len, num_slots, group, head_dim, blocks, interpret is not None)
  # A tiled TMA box needs the token axis a multiple of 8 rows: other T are padded (a copy of every input;
  # the padded tokens are masked by spec.seq_len like any key >= T, and sliced off).
  pad = -seq_len % 8
  padded = lambda x: x if x is None or not pad else jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
  ops = mosaic_gpu_fwd.Operands(
      q=padded(operands.q), k=padded(operands.k), v=padded(operands.v), depth_q=padded(operands.depth_q),
      depth_k=padded(operands.depth_k), depth_v=padded(operands.depth_v), depth_bounds=operands.depth_bounds,
      segment_ids=padded(operands.segment_ids))
  out, lse_BHT = mosaic_gpu_fwd.forward(ops, spec, geom, interpret)
  return out[:, :seq_len], jnp.transpose(lse_BHT[:, :, :seq_len], (0, 2, 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _moda(operands: tt.Operands, spec: spec_lib.Spec, blocks: mt.MosaicBlocks, interpret):
  return _forward(operands, spec, blocks, interpret)


def _moda_fwd(operands, spec, blocks, interpret):
  out, lse = _forward(operands, spec, blocks, interpret)
  return (out, lse), (operands, out, lse)


def _moda_bwd(spec, blocks, interpret, residuals, cotangents):
  """pallas_triton's backward kernels on this forward's residuals (views per kv head, no copies)."""
  del blocks
  operands, out, lse = residuals
  d_out, d_lse = cotangents
  batch, seq_len, num_q_heads, head_dim = operands.q.shape
  num_kv_heads = operands.k.shape[2]
  group = num_q_heads // num_kv_heads
  per_kv_head = lambda x: None if x is None else x.reshape(batch, seq_len, num_kv_heads, group, head_dim)
  q = per_kv_head(operands.q)
  triton_operands = operands._replace(q=q)
  if spec.has_depth:
    triton_operands = triton_operands._replace(depth_q=q if operands.depth_q is None else per_kv_head(operands.depth_q))
  # d lse / d logit = p, so an lse cotangent shifts every ds = p * (dp - delta) like a -dlse in delta.
  delta = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1) - d_lse
  rows = tt.RowGrads(do=per_kv_head(d_out.astype(out.dtype)), lse=lse.reshape(q.shape[:-1]),
                     delta=delta.reshape(q.shape[:-1]))
  block_sizes = BlockSizes.get_default(head_dim, group, operands.q.dtype)
  grads = triton_bwd.backward(triton_operands, rows, spec, block_sizes=block_sizes,
                              interpret=interpret is not None)
  to_q_layout = lambda x: x.reshape(operands.q.shape)
  dq = to_q_layout(grads.q)
  d_depth_q = None
  if spec.has_depth:
    if operands.depth_q is None:  # depth scored with q: both parts of q's gradient
      dq = (dq.astype(jnp.float32) + to_q_layout(grads.depth_q).astype(jnp.float32)).astype(dq.dtype)
    else:
      d_depth_q = to_q_layout(grads.depth_q)
  return (tt.Operands(q=dq, k=grads.k, v=grads.v, depth_q=d_depth_q, depth_k=grads.depth_k,
                      depth_v=grads.depth_v),)


_moda.defvjp(_moda_fwd, _moda_bwd)
