"""`implementation="pallas_mosaic_gpu"`: the MoDA backend written in Pallas Mosaic GPU for Hopper GPUs.

This file owns the layout glue, what the backend supports and the `custom_vjp`; the kernels live in
`mosaic_gpu_fwd.py` (forward), `mosaic_gpu_bwd.py` (dq + depth backward) and `mosaic_gpu_bwd_dkv.py`
(sequence dk / dv): wgmma on SMEM operands, a TMA ring fed by a memory warpgroup, one or two compute
warpgroups. No transposes of q / k / v / depth: the kernels read the native layouts with TMA boxes (a T
that is not a multiple of a tile is handled by TMA's zero-filled reads and clipped writes; T not a
multiple of 8 is padded here, a copy of every input). lse, delta and the rows' segment ids are in row
tiles inside (`mosaic_gpu_tiles.to_row_tiles`: one aligned TMA box per warpgroup; re-laid here: small).
The backward is deterministic (no atomics; every sum in registers in a fixed order). With segments,
every kernel visits only the key blocks (forward, dq) or query tiles (dk/dv) between the first and the
last token of its rows' (keys') segments (`spec.segment_span`, once per call; `mosaic_gpu_stream`).

`attention_with_depth` (what `moda_attention(..., return_depth=True)` and the model's depth stack call)
also returns depth_k / depth_v unchanged, and its backward takes their cotangents as the buffers the dq
kernel adds its depth dk / dv into, in place: they are Refs of the kernel call, which makes them
input_output_aliases of it. Per depth item the kernel reads the carried tiles of the item's readable
slots (a slot of a partial item outside [depth_start, depth_len) reads a readable one of the item, never
stored) and writes the sums there; unread slots are neither read nor written and keep the carried
values. When nobody reads the returned depth arrays (a plain call: symbolic zeros, `cotangents.split`)
the kernel stores its gradient instead and zero-fills the unread slots, so no cotangent-sized zeros are
made, read or added. With T not a multiple of 8 the carried cotangents are padded like the inputs (a
copy each way).

With G > 8 (a kv head's query heads spread over several programs) the backward is pallas_triton's
(`triton_bwd.backward` on this forward's residuals, threading the depth cotangents the same way): the
depth dk / dv would otherwise be summed across programs.

Supported: float16 / bfloat16, head dims 64 and 128, any G, causal or not, segments, depth_q, L = 0 or
more with traced depth_start / depth_len, compiled for Hopper (compute capability 9.x), where the
dispatcher tries it before pallas_triton. NotImplementedError (the dispatcher falls back) for float32,
other head dims, depth-only attention (k = v = None), depth_chunk > 1 and compiled kernels on another
GPU. In interpret mode the kernels run in jax's Mosaic GPU interpreter (`plgpu.InterpretGPUParams`),
whose wgmma reads both operands from SMEM: `mosaic_gpu_tiles.matmul` stages register operands there (the
only difference from the GPU code).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import block_ranges
from pallas_kernels import cotangents as cotangents_lib
from pallas_kernels import gpu_capability
from pallas_kernels import mosaic_gpu_bwd, mosaic_gpu_fwd, mosaic_gpu_stream
from pallas_kernels import mosaic_gpu_tiles as mt
from pallas_kernels import residuals
from pallas_kernels import spec as spec_lib
from pallas_kernels import triton_bwd
from pallas_kernels import triton_tiles as tt
from pallas_kernels.block_sizes import BlockSizes as TritonBlockSizes


def attention(inputs: spec_lib.Inputs, spec: spec_lib.Spec, *, interpret=False,
              block_sizes: mt.BlockSizes | None = None):
  """The backend protocol of `pallas_kernels.api`: (out [B, T, Hq, D] in q's dtype, lse [B, T, Hq] float32).

  `interpret`: False, True (GPU interpret mode with default `plgpu.InterpretGPUParams`) or an
  `InterpretGPUParams`. `block_sizes` overrides the default tiles (tests and benchmarks).
  """
  return attention_with_depth(inputs, spec, interpret=interpret, block_sizes=block_sizes)[:2]


def attention_with_depth(inputs: spec_lib.Inputs, spec: spec_lib.Spec, *, interpret=False,
                         block_sizes: mt.BlockSizes | None = None):
  """`attention` returning (out, lse, depth_k, depth_v): the depth arrays unchanged (None without depth).

  Their cotangents are the buffers the dq kernel adds its depth dk / dv into (`mosaic_gpu_bwd`), so a
  caller that threads its depth buffers through the call gets their cotangent back with this call's
  added in place.
  """
  check_supported(inputs, spec, interpret)
  block_sizes = block_sizes or mt.BlockSizes.get_default(inputs.q.shape[-1])
  if not isinstance(block_sizes, mt.BlockSizes):
    raise ValueError(f"block_sizes={block_sizes!r}: expected a mosaic_gpu_tiles.BlockSizes.")
  params = interpret_params(interpret)
  block_sizes.validate(wgmma_operand=(inputs.q.shape[-1], inputs.q.dtype) if params is None else None)
  return _moda(operands_of(inputs, spec), spec, block_sizes, params)


def operands_of(inputs: spec_lib.Inputs, spec: spec_lib.Spec) -> tt.Operands:
  """The kernels' operands of a prepared call (depth bounds as one int32 [2] array; with segments their
  spans, once per call: every kernel's block skipping derives from them, the backward's too)."""
  span = block_ranges.segment_spans(inputs.segment_ids)
  operands = tt.Operands(q=inputs.q, k=inputs.k, v=inputs.v, depth_q=inputs.depth_q,
                         segment_ids=inputs.segment_ids, segment_span=span)
  if spec.has_depth:
    operands = operands._replace(depth_k=inputs.depth_k, depth_v=inputs.depth_v,
                                 depth_bounds=jnp.stack([inputs.depth_start, inputs.depth_len]).astype(jnp.int32))
  return operands


def check_supported(inputs: spec_lib.Inputs, spec: spec_lib.Spec, interpret) -> None:
  """Raises NotImplementedError for what this backend cannot do (the dispatcher then falls back)."""
  # Interpret mode runs the same kernels anywhere. Compiled, they need Hopper's wgmma (sm_90a); where no
  # local GPU says otherwise (lowering for an abstract H200 on a CPU machine) the caller's platform stands.
  capability = gpu_capability.local()
  if not interpret and capability is not None and not gpu_capability.is_hopper(capability):
    raise NotImplementedError(f"pallas_mosaic_gpu: compiled kernels need a Hopper GPU (compute capability "
                              f"9.x: wgmma), not {capability}; pallas_triton runs there.")
  seq_len, head_dim = inputs.q.shape[1], inputs.q.shape[3]
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


def interpret_params(interpret):
  """None (compile for the GPU) or the `InterpretGPUParams` of GPU interpret mode (hashable)."""
  if interpret is None or interpret is False:
    return None
  if interpret is True:
    return plgpu.InterpretGPUParams()
  if isinstance(interpret, plgpu.InterpretGPUParams):
    return interpret
  raise ValueError(f"interpret={interpret!r}: pallas_mosaic_gpu expects a bool or a plgpu.InterpretGPUParams.")


def _pad_tokens(x):
  """x [B, T, ...] with T padded to a multiple of 8 (a tiled TMA box needs whole 8-row tiles): a copy
  when T is not one. The padded tokens are masked by spec.seq_len like any key >= T, and their rows
  sliced off."""
  pad = -x.shape[1] % 8
  return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) if pad else x


def _padded(operands: tt.Operands) -> dict:
  """The operands the Mosaic kernels take, by name, with T padded by `_pad_tokens` (the depth bounds as they
  are). segment_span, which no kernel reads, stays out (`operands_of` sets no segment_blocks: each
  launcher makes its own)."""
  return {name: x if x is None or name == "depth_bounds" else _pad_tokens(x)
          for name, x in operands._asdict().items() if name in mosaic_gpu_fwd.Operands._fields}


def _geometry(operands: tt.Operands, blocks: mt.MosaicBlocks, interpret) -> mt.Geometry:
  _, seq_len, num_q_heads, head_dim = operands.q.shape
  num_slots = 0 if operands.depth_k is None else operands.depth_k.shape[2]
  return mt.make_geometry(seq_len, num_slots, num_q_heads // operands.k.shape[2], head_dim, blocks,
                          interpret is not None)


def _row_segments(segment_ids, num_tiles: int, geom: mt.Geometry):
  return None if segment_ids is None else mt.row_segments(segment_ids, num_tiles, geom)


def forward(operands: tt.Operands, spec: spec_lib.Spec, block_sizes: mt.BlockSizes, interpret):
  """The forward kernel: (out [B, T, Hq, D], lse [B, T, Hq], lse in row tiles) of the unpadded operands;
  `interpret` from `interpret_params`."""
  seq_len = operands.q.shape[1]
  geom = _geometry(operands, block_sizes.fwd, interpret)
  ops = mosaic_gpu_fwd.Operands(**_padded(operands))
  ops = ops._replace(row_segments=_row_segments(operands.segment_ids, geom.row_tiles, geom),
                     segment_blocks=mosaic_gpu_stream.key_bounds(operands.segment_span, operands.segment_ids, geom))
  out, lse_rows = mosaic_gpu_fwd.forward(ops, spec, geom, interpret)
  return out[:, :seq_len], mt.from_row_tiles(lse_rows, seq_len, geom), lse_rows


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _moda(operands: tt.Operands, spec: spec_lib.Spec, block_sizes: mt.BlockSizes, interpret):
  return (*forward(operands, spec, block_sizes, interpret)[:2], operands.depth_k, operands.depth_v)


def _moda_fwd(operands, spec, block_sizes, interpret):
  operands = cotangents_lib.primals(operands)  # symbolic_zeros: the `perturbed` bits are not used here
  out, lse, lse_rows = residuals.named(*forward(operands, spec, block_sizes, interpret))
  return (out, lse, operands.depth_k, operands.depth_v), (operands, out, lse, lse_rows)


def _moda_bwd(spec, block_sizes, interpret, saved, cotangents):
  operands, out, lse, lse_rows = saved
  depth_arrays = (operands.depth_k, operands.depth_v) if spec.has_depth else None
  d_out, d_lse, depth_acc = cotangents_lib.split(cotangents, out, depth_arrays)
  delta = cotangents_lib.delta(out, d_out, d_lse)
  d_out = d_out.astype(out.dtype)
  seq_len, num_q_heads = operands.q.shape[1:3]
  if num_q_heads // operands.k.shape[2] > mt.MAX_HEADS_PER_TILE:
    return (_triton_backward(operands, out, lse, d_out, delta, spec, interpret, depth_acc=depth_acc),)
  ops = backward_operands(operands, lse_rows, d_out, delta, block_sizes, interpret)
  if depth_acc is not None:  # padded like the depth arrays
    depth_acc = tuple(_pad_tokens(acc) for acc in depth_acc)
  grads = mosaic_gpu_bwd.backward(ops, spec, block_sizes, interpret, depth_acc=depth_acc)
  dq, d_depth_q, dk, dv, d_depth_k, d_depth_v = (None if g is None else g[:, :seq_len] for g in grads)
  return (tt.Operands(q=dq, k=dk, v=dv, depth_q=d_depth_q, depth_k=d_depth_k, depth_v=d_depth_v),)


def backward_operands(operands: tt.Operands, lse_rows, d_out, delta, block_sizes: mt.BlockSizes, interpret):
  """The backward kernels' `mosaic_gpu_bwd.Operands` (T padded to 8, the rows' vectors in row tiles) from
  the unpadded operands, the forward's lse row tiles, do [B, T, Hq, D] and delta [B, T, Hq] (G <= 8).

  The rows past T (and of padded heads) get lse +inf, so that the backward's probabilities exp2(s - lse)
  are exactly 0 there, whichever keys a kernel's loops let them meet: their segment id (row_segments'
  padding, 0) may equal a real key's, and a kernel visiting such a key where the forward did not (its
  blocks differ) would get an inf probability, times their zero do a NaN in that key's dk / dv."""
  geom, num_tiles = _geometry(operands, block_sizes.dq, interpret), lse_rows.shape[2]  # tokens, Gp: any kernel's
  real_rows = mt.to_row_tiles(jnp.ones((1, *delta.shape[1:]), bool), num_tiles, geom)
  lse_rows = jnp.where(real_rows, lse_rows, jnp.inf)
  return mosaic_gpu_bwd.Operands(**_padded(operands), do=_pad_tokens(d_out), lse=lse_rows,
                                 delta=mt.to_row_tiles(delta, num_tiles, geom),
                                 row_segments=_row_segments(operands.segment_ids, num_tiles, geom),
                                 segment_span=operands.segment_span)


def _triton_backward(operands: tt.Operands, out, lse, d_out, delta, spec, interpret, *,
                     depth_acc=None) -> tt.Operands:
  """pallas_triton's backward kernels on this forward's residuals (views per kv head, no copies); they add
  the depth dk / dv into `depth_acc` when given, as the dq kernel here does."""
  batch, seq_len, num_q_heads, head_dim = operands.q.shape
  num_kv_heads = operands.k.shape[2]
  group = num_q_heads // num_kv_heads
  per_kv_head = lambda x: None if x is None else x.reshape(batch, seq_len, num_kv_heads, group, head_dim)
  q = per_kv_head(operands.q)
  triton_operands = operands._replace(q=q)
  if spec.has_depth:
    triton_operands = triton_operands._replace(depth_q=q if operands.depth_q is None else per_kv_head(operands.depth_q))
  rows = tt.RowGrads(do=per_kv_head(d_out), lse=lse.reshape(q.shape[:-1]), delta=delta.reshape(q.shape[:-1]))
  block_sizes = TritonBlockSizes.get_default(head_dim, group, operands.q.dtype)
  grads = triton_bwd.backward(triton_operands, rows, spec, block_sizes=block_sizes, interpret=interpret is not None,
                              depth_acc=depth_acc)
  to_q_layout = lambda x: x.reshape(operands.q.shape)
  dq, d_depth_q = to_q_layout(grads.q), None
  if spec.has_depth:
    if operands.depth_q is None:  # depth scored with q: both parts of q's gradient
      dq = (dq.astype(jnp.float32) + to_q_layout(grads.depth_q).astype(jnp.float32)).astype(dq.dtype)
    else:
      d_depth_q = to_q_layout(grads.depth_q)
  return tt.Operands(q=dq, k=grads.k, v=grads.v, depth_q=d_depth_q, depth_k=grads.depth_k, depth_v=grads.depth_v)


_moda.defvjp(_moda_fwd, _moda_bwd, symbolic_zeros=True)
