"""`implementation="pallas_tpu"`: MoDA as Pallas TPU (Mosaic) kernels, with its own `custom_vjp`.

The forward is `tpu_fwd` (sequence phase, then the token's own depth slots, in one online softmax);
the backward is FA2-style: the delta pre-pass in XLA, then `tpu_bwd`'s dq + depth-dk/dv kernel and
its sequence dk/dv kernel. Layout conversions (head-major, padding) are in `tpu_layout`.

Coverage: every shape the public API accepts (any T >= 1, padded internally to whole tiles; any D,
the D axis is never split; any G; any L, with depth_len traced or not; causal or not; segment ids),
in float32 / bfloat16, and float16 in interpret mode only. Raises `NotImplementedError` (so the
dispatcher falls back to `xla`) for float16 on a real TPU (no float16 MXU path) and for tiles that
would not fit the VMEM budget (very large D or G with the default blocks).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import tpu_bwd
from pallas_kernels import tpu_fwd
from pallas_kernels import tpu_layout as layout
from pallas_kernels import tpu_tiles as tiles
from pallas_kernels.tpu_block_sizes import TPUBlockSizes

# VMEM budget for one kernel's blocks (double-buffered) and scratch: under the smallest default
# scoped-VMEM limit (16 MiB on v5e), so no generation needs `vmem_limit_bytes` raised.
_VMEM_BUDGET_BYTES = 14 * 2**20


def attention(q_BTHD, k_BTKD, v_BTKD, depth_k_BTLKD, depth_v_BTLKD, depth_len, segment_ids_BT,
              *, causal: bool, scale: float, interpret=False, block_sizes: TPUBlockSizes | None = None,
              depth_q_BTHD=None):
  """See `pallas_kernels.api` for the normalized backend signature. Returns (out_BTHD, lse_BTH)."""
  block_sizes = TPUBlockSizes() if block_sizes is None else block_sizes
  batch, seq_len, num_q_heads, head_dim = q_BTHD.shape
  num_kv_heads = k_BTKD.shape[2]
  num_slots = 0 if depth_k_BTLKD is None else depth_k_BTLKD.shape[2]
  cfg = tiles.KernelConfig(
      blocks=block_sizes.fit(seq_len, num_slots), seq_len=seq_len,
      group=num_q_heads // num_kv_heads, head_dim=head_dim, causal=causal, scale=scale,
      has_segments=segment_ids_BT is not None, has_depth=num_slots > 0)
  _check_supported(cfg, q_BTHD.dtype, interpret)
  if depth_len is None:
    depth_len = jnp.zeros((), jnp.int32)
  if cfg.has_depth and depth_q_BTHD is None:
    depth_q_BTHD = q_BTHD  # the same array twice: JAX sums its two cotangents
  elif not cfg.has_depth:
    depth_q_BTHD = None
  return _differentiable(cfg, interpret)(q_BTHD, k_BTKD, v_BTKD, depth_q_BTHD, depth_k_BTLKD,
                                         depth_v_BTLKD, depth_len, segment_ids_BT)


def _check_supported(cfg: tiles.KernelConfig, dtype, interpret) -> None:
  if dtype == jnp.float16 and not interpret:
    raise NotImplementedError("pallas_tpu: float16 inputs are not supported on TPU (no float16 MXU "
                              "path); use bfloat16 or float32.")
  needed = tpu_bwd.vmem_bytes(cfg, jnp.dtype(dtype).itemsize)
  if needed > _VMEM_BUDGET_BYTES:
    raise NotImplementedError(
        f"pallas_tpu: tiles need ~{needed / 2**20:.0f} MiB of VMEM (G={cfg.group}, D={cfg.head_dim}, "
        f"blocks {cfg.blocks}), over the {_VMEM_BUDGET_BYTES / 2**20:.0f} MiB budget; pass smaller "
        "TPUBlockSizes.")


def _differentiable(cfg: tiles.KernelConfig, interpret):
  """The custom_vjp op for one static configuration (built per call: `interpret` may be unhashable)."""

  def run_forward(q, k, v, depth_q, depth_k, depth_v, depth_len, segment_ids):
    num_kv_heads, padded_len = k.shape[2], cfg.blocks.padded_len
    q_seg, kv_seg = layout.segments_to_kernel(segment_ids, padded_len)
    out_k, lse_k = tpu_fwd.forward(
        layout.queries_to_kernel(q, num_kv_heads, padded_len),
        layout.keys_to_kernel(k, padded_len), layout.keys_to_kernel(v, padded_len),
        *_depth_to_kernel(cfg, depth_q, depth_k, depth_v), _depth_len_operand(depth_len), q_seg, kv_seg,
        cfg=cfg, interpret=interpret)
    return (layout.queries_from_kernel(out_k, cfg.seq_len),
            layout.row_stat_from_kernel(lse_k, cfg.seq_len))

  @jax.custom_vjp
  def moda(q, k, v, depth_q, depth_k, depth_v, depth_len, segment_ids):
    return run_forward(q, k, v, depth_q, depth_k, depth_v, depth_len, segment_ids)

  def moda_fwd(q, k, v, depth_q, depth_k, depth_v, depth_len, segment_ids):
    out, lse = run_forward(q, k, v, depth_q, depth_k, depth_v, depth_len, segment_ids)
    # Residuals are the caller's own arrays (not kernel-layout copies): a layer stack that shares one
    # depth buffer across layers then keeps one buffer, not one transposed copy per layer.
    return (out, lse), (q, k, v, depth_q, depth_k, depth_v, depth_len, segment_ids, out, lse)

  def moda_bwd(residuals, cotangents):
    q, k, v, depth_q, depth_k, depth_v, depth_len, segment_ids, out, lse = residuals
    d_out, d_lse = cotangents
    num_kv_heads, padded_len = k.shape[2], cfg.blocks.padded_len
    # Delta pre-pass (FA2): rowsum(o * do), minus the lse cotangent since d lse / d logit = p.
    delta_BTH = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1) - d_lse
    # Padded rows get a huge lse so their recomputed probabilities are exactly 0.
    lse_k = layout.row_stat_to_kernel(lse, num_kv_heads, padded_len)
    if padded_len != cfg.seq_len:
      row_is_pad = jnp.arange(padded_len)[:, None] >= cfg.seq_len
      lse_k = jnp.where(row_is_pad, -tiles.MASK_VALUE, lse_k)
    q_seg, kv_seg = layout.segments_to_kernel(segment_ids, padded_len)
    depth_q_k, depth_k_k, depth_v_k = _depth_to_kernel(cfg, depth_q, depth_k, depth_v)
    operands = tpu_bwd.Operands(
        q=layout.queries_to_kernel(q, num_kv_heads, padded_len),
        k=layout.keys_to_kernel(k, padded_len), v=layout.keys_to_kernel(v, padded_len),
        d_out=layout.queries_to_kernel(d_out, num_kv_heads, padded_len),
        lse=lse_k, delta=layout.row_stat_to_kernel(delta_BTH, num_kv_heads, padded_len),
        depth_q=depth_q_k, depth_k=depth_k_k, depth_v=depth_v_k, depth_len=_depth_len_operand(depth_len),
        q_seg=q_seg, kv_seg=kv_seg)
    dq_k, d_depth_q_k, d_depth_k_k, d_depth_v_k = tpu_bwd.dq_and_depth(operands, cfg=cfg, interpret=interpret)
    dk_k, dv_k = tpu_bwd.dk_dv(operands, cfg=cfg, interpret=interpret)
    dq = layout.queries_from_kernel(dq_k, cfg.seq_len).astype(q.dtype)
    dk = layout.keys_from_kernel(dk_k, cfg.seq_len).astype(k.dtype)
    dv = layout.keys_from_kernel(dv_k, cfg.seq_len).astype(v.dtype)
    d_depth_q = d_depth_k = d_depth_v = None
    if cfg.has_depth:
      d_depth_q = layout.queries_from_kernel(d_depth_q_k, cfg.seq_len).astype(depth_q.dtype)
      num_slots = depth_k.shape[2]
      d_depth_k = layout.depth_from_kernel(d_depth_k_k, cfg.seq_len, num_slots).astype(depth_k.dtype)
      d_depth_v = layout.depth_from_kernel(d_depth_v_k, cfg.seq_len, num_slots).astype(depth_v.dtype)
    return dq, dk, dv, d_depth_q, d_depth_k, d_depth_v, None, None

  moda.defvjp(moda_fwd, moda_bwd)
  return moda


def _depth_to_kernel(cfg: tiles.KernelConfig, depth_q, depth_k, depth_v):
  if not cfg.has_depth:
    return None, None, None
  return (layout.queries_to_kernel(depth_q, depth_k.shape[3], cfg.blocks.padded_len),
          layout.depth_to_kernel(depth_k, cfg.blocks.padded_len, cfg.blocks.padded_slots),
          layout.depth_to_kernel(depth_v, cfg.blocks.padded_len, cfg.blocks.padded_slots))


def _depth_len_operand(depth_len) -> jax.Array:
  """depth_len as the int32[1] scalar-prefetch operand."""
  return jnp.reshape(jnp.asarray(depth_len, jnp.int32), (1,))
