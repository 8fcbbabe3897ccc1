"""`implementation="pallas_triton"`: the MoDA backend built from Pallas kernels lowered through Triton.

This file owns the layout glue, what the backend supports and the `custom_vjp`; the kernels live in
`triton_fwd.py` / `triton_bwd.py`. No transposes: q is viewed as [B, T, Hk, G, D] (a free reshape) and every
kernel reads the native layouts. Head dims that are not a power of two >= 16 are zero-padded here (zero
columns change no logit, and the padded output columns are sliced off). fp32 dots run in IEEE fp32, not TF32.

Supported: every `moda_attention` call except depth_chunk C > 1 where a query tile (or a depth part) does
not hold whole chunks (its tokens are not a multiple of C): there a depth slot would take its gradient from
two programs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import block_ranges
from pallas_kernels import cotangents as cotangents_lib
from pallas_kernels import residuals
from pallas_kernels import spec as spec_lib
from pallas_kernels import triton_bwd, triton_fwd
from pallas_kernels import triton_tiles as tt
from pallas_kernels.block_sizes import BlockSizes, next_pow2


def attention(inputs: spec_lib.Inputs, spec: spec_lib.Spec, *, interpret=False,
              block_sizes: BlockSizes | None = None):
  """The backend protocol of `pallas_kernels.api`: (out [B, T, Hq, D] in q's dtype, lse [B, T, Hq] float32).

  `block_sizes` overrides the per-device default tiles (benchmarks and tests use it).
  """
  return attention_with_depth(inputs, spec, interpret=interpret, block_sizes=block_sizes)[:2]


def attention_with_depth(inputs: spec_lib.Inputs, spec: spec_lib.Spec, *, interpret=False,
                         block_sizes: BlockSizes | None = None):
  """`attention` returning (out, lse, depth_k, depth_v): the depth arrays unchanged (None without depth).

  Their cotangents are the buffers the depth kernel adds its dk / dv into (`triton_bwd`), so a caller that
  threads its depth buffers through the call gets their cotangent back with this call's added in place.
  """
  block_sizes = _block_sizes(inputs, block_sizes)
  check_supported(inputs, spec, interpret, block_sizes=block_sizes)
  layout = _Layout(inputs)
  q_BTKGD = layout.per_kv_head(inputs.q)
  operands = _sequence_operands(inputs, layout, q_BTKGD if spec.has_sequence else None)
  if spec.has_depth:
    # q itself when not given: the same array twice, JAX sums its two cotangents.
    bounds = jnp.stack([inputs.depth_start, inputs.depth_len]).astype(jnp.int32)
    operands = operands._replace(
        depth_q=q_BTKGD if inputs.depth_q is None else layout.per_kv_head(inputs.depth_q),
        depth_k=layout.pad(inputs.depth_k), depth_v=layout.pad(inputs.depth_v), depth_bounds=bounds)
  out_BTKGD, lse_BTKG, depth_k, depth_v = _moda(operands, spec, block_sizes, interpret)
  if spec.has_depth:  # the padded copies went through: back to the inputs' width
    depth_k, depth_v = layout.unpad(depth_k), layout.unpad(depth_v)
  return layout.per_q_head(out_BTKGD), lse_BTKG.reshape(inputs.q.shape[:3]), depth_k, depth_v


def sequence_backward(inputs: spec_lib.Inputs, spec: spec_lib.Spec, out_BTHD, lse_BTH, d_out_BTHD, *,
                      interpret=False, block_sizes: BlockSizes | None = None):
  """(dq, dk, dv) of a call without depth, from the out and lse its `attention` returned: the backward
  kernels alone, for a backend whose own custom_vjp runs this one's forward (cudnn, for the rows its
  packed layout cannot express). No lse cotangent."""
  if spec.has_depth or not spec.has_sequence:
    raise NotImplementedError("pallas_triton.sequence_backward: calls without depth only.")
  block_sizes = _block_sizes(inputs, block_sizes)
  layout = _Layout(inputs)
  operands = _sequence_operands(inputs, layout, layout.per_kv_head(inputs.q))
  lse_BTKG = lse_BTH.reshape(operands.q.shape[:4])
  rows = _row_grads(layout.per_kv_head(out_BTHD), lse_BTKG, layout.per_kv_head(d_out_BTHD), 0.0)
  grads = triton_bwd.backward(operands, rows, spec, block_sizes=block_sizes, interpret=interpret)
  return layout.per_q_head(grads.q), layout.unpad(grads.k), layout.unpad(grads.v)


def _sequence_operands(inputs: spec_lib.Inputs, layout: _Layout, q_BTKGD) -> tt.Operands:
  """The kernels' sequence operands: q (None for a depth-only call), k and v padded, the segment ids and
  their spans, once per call (the backward reuses them): each kernel's tile skipping derives from them."""
  return tt.Operands(q=q_BTKGD, k=layout.pad(inputs.k), v=layout.pad(inputs.v), segment_ids=inputs.segment_ids,
                     segment_span=block_ranges.segment_spans(inputs.segment_ids))


class _Layout:
  """The kernels' view of a call's [B, T, H, D] arrays: q-like ones as [B, T, Hk, G, D'], every one with
  its head dim zero-padded to D' (`_padded_dim`), and back."""

  def __init__(self, inputs: spec_lib.Inputs):
    self.batch, self.seq_len, self.num_q_heads, self.head_dim = inputs.q.shape
    self.num_kv_heads = inputs.num_kv_heads
    self.padded_dim = _padded_dim(self.head_dim)

  def pad(self, x):
    if x is None or self.padded_dim == self.head_dim:
      return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, self.padded_dim - self.head_dim)])

  def unpad(self, x):
    return x if x is None or self.padded_dim == self.head_dim else x[..., :self.head_dim]

  def per_kv_head(self, x_BTHD):
    if x_BTHD is None:
      return None
    group = self.num_q_heads // self.num_kv_heads
    return self.pad(x_BTHD).reshape(self.batch, self.seq_len, self.num_kv_heads, group, self.padded_dim)

  def per_q_head(self, x_BTKGD):
    return self.unpad(x_BTKGD.reshape(self.batch, self.seq_len, self.num_q_heads, self.padded_dim))


def check_supported(inputs: spec_lib.Inputs, spec: spec_lib.Spec, interpret, *,
                    block_sizes: BlockSizes | None = None) -> None:
  """Raises NotImplementedError for what this backend cannot do (the dispatcher then falls back)."""
  del interpret  # Interpret mode runs the same kernels: it supports the same calls.
  seq_len = inputs.q.shape[1]
  if spec.seq_len != seq_len:
    raise NotImplementedError(f"pallas_triton: spec.seq_len={spec.seq_len} differs from the {seq_len} query "
                              "tokens; the kernels attend over the queries' own tokens only.")
  if spec.depth_chunk > 1:
    block_sizes = _block_sizes(inputs, block_sizes)
    group_padded = next_pow2(inputs.q.shape[2] // inputs.num_kv_heads)
    for name in ("fwd", "dq"):
      tokens_per_tile = getattr(block_sizes, name).block_q // group_padded
      if tokens_per_tile % spec.depth_chunk:
        raise NotImplementedError(
            f"pallas_triton: depth_chunk={spec.depth_chunk} does not divide the {tokens_per_tile} tokens of a "
            f"{name} query tile (block_q={getattr(block_sizes, name).block_q}, G padded to {group_padded}): a "
            "chunk must lie inside one tile, so that each depth slot takes its gradient from one program.")


def _padded_dim(head_dim: int) -> int:
  return max(16, next_pow2(head_dim))


def _block_sizes(inputs: spec_lib.Inputs, block_sizes: BlockSizes | None) -> BlockSizes:
  """The given tiles or the device's defaults, validated (ValueError) before any launch."""
  group = inputs.q.shape[2] // inputs.num_kv_heads
  if block_sizes is None:
    block_sizes = BlockSizes.get_default(_padded_dim(inputs.q.shape[3]), group, inputs.q.dtype, _device_kind())
  block_sizes.validate(group)
  return block_sizes


def _device_kind() -> str | None:
  mesh = jax.sharding.get_abstract_mesh()
  device = getattr(mesh, "abstract_device", None)
  if device is not None:
    return getattr(device, "device_kind", None)
  try:
    return jax.devices()[0].device_kind
  except RuntimeError:
    return None


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _moda(operands: tt.Operands, spec: spec_lib.Spec, block_sizes: BlockSizes, interpret):
  out, lse = triton_fwd.forward(operands, spec, blocks=block_sizes.fwd, interpret=interpret)
  return out, lse, operands.depth_k, operands.depth_v


def _moda_fwd(operands, spec, block_sizes, interpret):
  operands = cotangents_lib.primals(operands)  # symbolic_zeros: the `perturbed` bits are not used here
  out, lse, *depth = _moda(operands, spec, block_sizes, interpret)
  out, lse = residuals.named(out, lse)
  return (out, lse, *depth), (operands, out, lse)


def _moda_bwd(spec, block_sizes, interpret, saved, cotangents):
  operands, out, lse = saved
  depth_arrays = (operands.depth_k, operands.depth_v) if spec.has_depth else None
  d_out, d_lse, depth_acc = cotangents_lib.split(cotangents, out, depth_arrays)
  rows = _row_grads(out, lse, d_out, d_lse)
  grads = triton_bwd.backward(operands, rows, spec, block_sizes=block_sizes, interpret=interpret,
                              depth_acc=depth_acc)
  return (grads,)


def _row_grads(out_BTKGD, lse_BTKG, d_out_BTKGD, d_lse_BTKG) -> tt.RowGrads:
  """What the backward kernels read per query row: d_out in out's dtype, the lse, and delta."""
  return tt.RowGrads(do=d_out_BTKGD.astype(out_BTKGD.dtype), lse=lse_BTKG,
                     delta=cotangents_lib.delta(out_BTKGD, d_out_BTKGD, d_lse_BTKG))


_moda.defvjp(_moda_fwd, _moda_bwd, symbolic_zeros=True)
