"""`implementation="pallas_tpu"`: MoDA as Pallas TPU (Mosaic) kernels, with its own `custom_vjp`.

The forward is `tpu_fwd` (sequence phase, then the token's own depth slots, in one online softmax);
the backward is FA2-style: the delta pre-pass in XLA, then `tpu_bwd`'s dq + depth-dk/dv kernel and
its sequence dk/dv kernel. Layout conversions (head-major, padding) are in `tpu_layout`.

Coverage: every shape the public API accepts (any T >= 1, padded internally to whole tiles; any D,
the D axis is never split; any G; any L, with depth_start / depth_len traced or not; causal or not;
segment ids), in float32 / bfloat16, and float16 in interpret mode only. `check_supported` raises
`NotImplementedError` (so the dispatcher falls back to `xla`) for depth-only attention and
depth_chunk > 1 (not built), float16 on a real TPU (no float16 MXU path) and tiles that would not fit
the VMEM budget (very large D or G with the default blocks).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import residuals
from pallas_kernels import spec as spec_lib
from pallas_kernels import tpu_bwd
from pallas_kernels import tpu_fwd
from pallas_kernels import tpu_layout as layout
from pallas_kernels import tpu_tiles as tiles
from pallas_kernels.tpu_block_sizes import FittedBlocks, TPUBlockSizes

# VMEM budget for one kernel's blocks (double-buffered) and scratch: under the smallest default
# scoped-VMEM limit (16 MiB on v5e), so no generation needs `vmem_limit_bytes` raised.
_VMEM_BUDGET_BYTES = 14 * 2**20


def attention(inputs: spec_lib.Inputs, spec: spec_lib.Spec, *, interpret=False,
              block_sizes: TPUBlockSizes | None = None):
  """See `pallas_kernels.api` for the backend protocol. Returns (out_BTHD, lse_BTH).

  `block_sizes` overrides the default tiles (tests and benchmarks use it).
  """
  check_supported(inputs, spec, interpret, block_sizes)
  blocks = _fit(spec, block_sizes)
  depth_q, depth_range = None, jnp.zeros((2,), jnp.int32)  # without depth no depth step runs
  if spec.has_depth:
    depth_q = inputs.q if inputs.depth_q is None else inputs.depth_q  # q twice: JAX sums its cotangents
    depth_range = jnp.stack([jnp.asarray(inputs.depth_start, jnp.int32), jnp.asarray(inputs.depth_len, jnp.int32)])
  return _moda(spec, blocks, interpret, inputs.q, inputs.k, inputs.v, depth_q, inputs.depth_k, inputs.depth_v,
               depth_range, inputs.segment_ids)


def check_supported(inputs: spec_lib.Inputs, spec: spec_lib.Spec, interpret,
                    block_sizes: TPUBlockSizes | None = None) -> None:
  """Raises NotImplementedError (the dispatcher then falls back to `xla`) for what these kernels lack."""
  if not spec.has_sequence:
    raise NotImplementedError("pallas_tpu: depth-only attention (k = v = None) is not built; the "
                              "kernels need sequence keys.")
  if spec.depth_chunk != 1:
    raise NotImplementedError(f"pallas_tpu: depth_chunk={spec.depth_chunk} is not built (the kernels "
                              "read each token's own depth slots only).")
  dtype = inputs.q.dtype
  if dtype == jnp.float16 and not interpret:
    raise NotImplementedError("pallas_tpu: float16 inputs are not supported on TPU (no float16 MXU "
                              "path); use bfloat16 or float32.")
  cfg = _config(spec, _fit(spec, block_sizes), inputs.q, inputs.k)
  needed = tpu_bwd.vmem_bytes(cfg, jnp.dtype(dtype).itemsize)
  if needed > _VMEM_BUDGET_BYTES:
    raise NotImplementedError(
        f"pallas_tpu: tiles need ~{needed / 2**20:.0f} MiB of VMEM (G={cfg.group}, D={cfg.head_dim}, "
        f"blocks {cfg.blocks}), over the {_VMEM_BUDGET_BYTES / 2**20:.0f} MiB budget; pass smaller "
        "TPUBlockSizes.")


def _fit(spec: spec_lib.Spec, block_sizes: TPUBlockSizes | None) -> FittedBlocks:
  return (TPUBlockSizes() if block_sizes is None else block_sizes).fit(spec.seq_len, spec.num_slots)


def _config(spec: spec_lib.Spec, blocks: FittedBlocks, q_BTHD, k_BTKD) -> tiles.KernelConfig:
  return tiles.KernelConfig(spec=spec, blocks=blocks, group=q_BTHD.shape[2] // k_BTKD.shape[2],
                            head_dim=q_BTHD.shape[3])


def _forward(spec, blocks, interpret, q, k, v, depth_q, depth_k, depth_v, depth_range, segment_ids):
  cfg = _config(spec, blocks, q, k)
  num_kv_heads, padded_len = k.shape[2], blocks.padded_len
  q_seg, kv_seg = layout.segments_to_kernel(segment_ids, padded_len)
  out_k, lse_k = tpu_fwd.forward(
      layout.queries_to_kernel(q, num_kv_heads, padded_len),
      layout.keys_to_kernel(k, padded_len), layout.keys_to_kernel(v, padded_len),
      *_depth_to_kernel(cfg, depth_q, depth_k, depth_v), depth_range, q_seg, kv_seg,
      cfg=cfg, interpret=interpret)
  return (layout.queries_from_kernel(out_k, spec.seq_len), layout.row_stat_from_kernel(lse_k, spec.seq_len))


# The Spec, the fitted tiles and `interpret` (hashable, also as pltpu.InterpretParams) are static.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _moda(spec, blocks, interpret, q, k, v, depth_q, depth_k, depth_v, depth_range, segment_ids):
  return _forward(spec, blocks, interpret, q, k, v, depth_q, depth_k, depth_v, depth_range, segment_ids)


def _moda_fwd(spec, blocks, interpret, q, k, v, depth_q, depth_k, depth_v, depth_range, segment_ids):
  out, lse = residuals.named(*_forward(spec, blocks, interpret, q, k, v, depth_q, depth_k, depth_v,
                                       depth_range, segment_ids))
  # Residuals are the caller's own arrays (not kernel-layout copies): a layer stack that shares one
  # depth buffer across layers then keeps one buffer, not one transposed copy per layer.
  return (out, lse), (q, k, v, depth_q, depth_k, depth_v, depth_range, segment_ids, out, lse)


def _moda_bwd(spec, blocks, interpret, residuals, cotangents):
  q, k, v, depth_q, depth_k, depth_v, depth_range, segment_ids, out, lse = residuals
  d_out, d_lse = cotangents
  cfg = _config(spec, blocks, q, k)
  num_kv_heads, padded_len = k.shape[2], blocks.padded_len
  # Delta pre-pass (FA2): rowsum(o * do), minus the lse cotangent since d lse / d logit = p.
  delta_BTH = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1) - d_lse
  # Padded rows get a huge lse so their recomputed probabilities are exactly 0.
  lse_k = layout.row_stat_to_kernel(lse, num_kv_heads, padded_len)
  if padded_len != spec.seq_len:
    row_is_pad = jnp.arange(padded_len)[:, None] >= spec.seq_len
    lse_k = jnp.where(row_is_pad, -tiles.MASK_VALUE, lse_k)
  q_seg, kv_seg = layout.segments_to_kernel(segment_ids, padded_len)
  depth_q_k, depth_k_k, depth_v_k = _depth_to_kernel(cfg, depth_q, depth_k, depth_v)
  operands = tpu_bwd.Operands(
      q=layout.queries_to_kernel(q, num_kv_heads, padded_len),
      k=layout.keys_to_kernel(k, padded_len), v=layout.keys_to_kernel(v, padded_len),
      d_out=layout.queries_to_kernel(d_out, num_kv_heads, padded_len),
      lse=lse_k, delta=layout.row_stat_to_kernel(delta_BTH, num_kv_heads, padded_len),
      depth_q=depth_q_k, depth_k=depth_k_k, depth_v=depth_v_k, depth_range=depth_range,
      q_seg=q_seg, kv_seg=kv_seg)
  dq_k, d_depth_q_k, d_depth_k_k, d_depth_v_k = tpu_bwd.dq_and_depth(operands, cfg=cfg, interpret=interpret)
  dk_k, dv_k = tpu_bwd.dk_dv(operands, cfg=cfg, interpret=interpret)
  dq = layout.queries_from_kernel(dq_k, spec.seq_len).astype(q.dtype)
  dk = layout.keys_from_kernel(dk_k, spec.seq_len).astype(k.dtype)
  dv = layout.keys_from_kernel(dv_k, spec.seq_len).astype(v.dtype)
  d_depth_q = d_depth_k = d_depth_v = None
  if spec.has_depth:
    d_depth_q = layout.queries_from_kernel(d_depth_q_k, spec.seq_len).astype(depth_q.dtype)
    d_depth_k = layout.depth_from_kernel(d_depth_k_k, spec.seq_len, spec.num_slots).astype(depth_k.dtype)
    d_depth_v = layout.depth_from_kernel(d_depth_v_k, spec.seq_len, spec.num_slots).astype(depth_v.dtype)
  return dq, dk, dv, d_depth_q, d_depth_k, d_depth_v, None, None


_moda.defvjp(_moda_fwd, _moda_bwd)


def _depth_to_kernel(cfg: tiles.KernelConfig, depth_q, depth_k, depth_v):
  if not cfg.spec.has_depth:
    return None, None, None
  return (layout.queries_to_kernel(depth_q, depth_k.shape[3], cfg.blocks.padded_len),
          layout.depth_to_kernel(depth_k, cfg.blocks.padded_len, cfg.blocks.padded_slots),
          layout.depth_to_kernel(depth_v, cfg.blocks.padded_len, cfg.blocks.padded_slots))
