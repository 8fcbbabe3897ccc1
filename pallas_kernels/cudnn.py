"""`implementation="cudnn"`: cuDNN flash attention (the kernel behind `jax.nn.dot_product_attention`'s "cudnn").

The fastest attention kernel on NVIDIA GPUs for what it can express, and first in the GPU order, so that
a call without depth runs on it; everything else falls back to pallas_triton. It takes: no depth arrays,
k and v given, causal or not, any G, an even T, bfloat16 or float16, D a multiple of 8 up to 128 (256 on
Hopper and later), a CUDA GPU of compute capability 8.0+ (9.0+ with `segment_ids`), never interpret mode.
The lse it returns is cuDNN's softmax statistics: its gradient is not implemented (cuDNN's backward takes
no lse cotangent; `DIFFERENTIABLE_LSE = False`: the dispatcher gives `return_lse=True` calls to another
backend; a direct caller that differentiates it gets NotImplementedError, never a silent zero).

What a query sees is `spec.sequence_visible`: cuDNN's own causal mask (s <= t, top-left aligned: T query
and T key tokens), or none; with `segment_ids`, cuDNN's packed (THD) layout, each row given as runs of
one id (`cudnn_packed`). That is exact when every id of a row is one contiguous run and a row has at
most `cudnn_packed.MAX_SEGMENTS` runs, as the training pipeline packs. A traced switch picks, per call,
cuDNN at the smallest of `cudnn_packed.CAPACITIES` that holds the batch's runs, or pallas_triton's
segment-aware kernels where none does (`lax.switch` in the forward and in the backward of one
custom_vjp: every branch is compiled, one runs). Packed rows need Hopper. (A dense [B, 1, T, T] mask
bias, this backend's first way to take segments, measured slower than pallas_triton, BENCHMARKS.md §0c.)

Why not `jax.nn.dot_product_attention`: jax keeps cuDNN's residuals (its output and softmax statistics)
inside its own custom_vjp, where no remat policy can name them, so under `save_dots_and_attention` the
forward ran twice per step (71 forward calls for 36 layers, §0c). This backend binds the same cuDNN
forward and backward (jax's private `fused_attention_stablehlo` rules, pinned with jax 0.11.2; a CPU
test checks their signatures) in a custom_vjp of its own that names them (`residuals.named`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax._src.cudnn import fused_attention_stablehlo as _fa
from jax.custom_derivatives import SymbolicZero

from pallas_kernels import cudnn_packed
from pallas_kernels import gpu_capability
from pallas_kernels import residuals
from pallas_kernels import spec as spec_lib
from pallas_kernels import triton

DIFFERENTIABLE_LSE = False

_DTYPES = (jnp.bfloat16, jnp.float16)
_MIN_COMPUTE_CAPABILITY = (8, 0)  # cuDNN flash attention: Ampere and later
_HOPPER = gpu_capability.HOPPER  # head dims up to 256 from Hopper on, 128 before


def check_supported(inputs: spec_lib.Inputs, spec: spec_lib.Spec, interpret) -> None:
  """Raises NotImplementedError for what cuDNN flash attention cannot do (the dispatcher falls back)."""
  if interpret is not False and interpret is not None:
    raise NotImplementedError("cudnn: there is no interpret mode (cuDNN runs on a CUDA GPU only).")
  if spec.has_depth or not spec.has_sequence or inputs.depth_q is not None:
    raise NotImplementedError("cudnn: depth K/V (and depth_q) are not expressible in cuDNN attention; "
                              "only calls without depth run here.")
  dtype = jnp.dtype(inputs.q.dtype)
  if dtype not in _DTYPES:
    raise NotImplementedError(f"cudnn: dtype {dtype.name} is not supported (bfloat16 or float16).")
  head_dim = inputs.q.shape[-1]
  if head_dim % 8 or head_dim > 256:
    raise NotImplementedError(f"cudnn: head_dim={head_dim} is not supported (a multiple of 8, at most 256).")
  seq_len = inputs.q.shape[1]
  if seq_len % 2:
    # Measured on the H200 (jax 0.11.2): with the lse returned, T = 513 and T = 1 fail in the backward
    # ("Unsupported sequence length").
    raise NotImplementedError(f"cudnn: odd T={seq_len}: cuDNN's attention backward needs an even sequence "
                              "length here.")
  capability = _compute_capability()
  if capability < _MIN_COMPUTE_CAPABILITY:
    raise NotImplementedError(f"cudnn: compute capability {capability} is below the {_MIN_COMPUTE_CAPABILITY} "
                              "cuDNN flash attention needs.")
  if head_dim > 128 and capability < _HOPPER:
    raise NotImplementedError(f"cudnn: head_dim={head_dim} > 128 needs Hopper or later (compute capability "
                              f"{_HOPPER}), not {capability}.")
  if spec.has_segments:
    if capability < _HOPPER:
      raise NotImplementedError(f"cudnn: segment_ids need cuDNN's packed layout, Hopper or later (compute "
                                f"capability {_HOPPER}), not {capability}.")
    # Rows whose ids are not single runs go to pallas_triton inside the call (module docstring).
    triton.check_supported(inputs, spec, interpret)


def attention(inputs: spec_lib.Inputs, spec: spec_lib.Spec, *, interpret=False):
  """The backend protocol of `pallas_kernels.api`: (out [B, T, Hq, D] in q's dtype, lse [B, T, Hq] float32).

  The lse has no gradient (module docstring): differentiating it raises NotImplementedError.
  """
  check_supported(inputs, spec, interpret)
  if not spec.has_segments:
    out_BTHD, stats_BHT = _flash(inputs.q, inputs.k, inputs.v, None, spec.scale, spec.causal)
    return out_BTHD, _lse_without_gradient(jnp.swapaxes(stats_BHT, 1, 2))
  out_BTHD, lse_BTH = _packed(inputs, spec)
  return out_BTHD, _lse_without_gradient(lse_BTH)


# The statics of jax's cuDNN rules that this backend does not vary.
_SEED, _DROPOUT, _NO_BIAS = 42, 0.0, (False, False)  # (has_bias, has_dbias)
_LAYOUT = _fa.AttentionLayout.BTNH.value


def _mask_type(causal: bool, packed: bool):
  if packed:
    return _fa.MaskType.PADDING_CAUSAL if causal else _fa.MaskType.PADDING
  return _fa.MaskType.CAUSAL if causal else _fa.MaskType.NO_MASK


def _cudnn_version() -> int:
  return _fa.check_cudnn_version()


def _rule_arrays(q_BTHD, packing: cudnn_packed.Packing | None):
  """(bias, q_seqlen, kv_seqlen, q_offsets, kv_offsets, page_table_k, page_table_v) as jax's rules take
  them: empty arrays for what is not used."""
  unused = jnp.zeros(0, q_BTHD.dtype)
  if packing is None:
    return (unused,) * 7
  return (unused, packing.seqlen_BM, packing.seqlen_BM, packing.offsets_BM1, packing.offsets_BM1,
          unused, unused)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _flash(q_BTHD, k_BTKD, v_BTKD, packing, scale: float, causal: bool):
  """cuDNN's forward: (out [B, T, Hq, D], softmax statistics [B * M, Hq, T] float32; M = 1 unpacked)."""
  return _flash_fwd(q_BTHD, k_BTKD, v_BTKD, packing, scale, causal)[0]


def _flash_fwd(q_BTHD, k_BTKD, v_BTKD, packing, scale, causal):
  out_BTHD, stats = residuals.named(*_rule_forward(q_BTHD, k_BTKD, v_BTKD, packing, scale, causal))
  return (out_BTHD, stats), (q_BTHD, k_BTKD, v_BTKD, packing, out_BTHD, stats)


def _flash_bwd(scale, causal, saved, cotangents):
  q_BTHD, k_BTKD, v_BTKD, packing, out_BTHD, stats = saved
  d_out_BTHD, _ = cotangents  # the statistics' cotangent: none reaches here (`_lse_without_gradient`)
  return (*_rule_backward(q_BTHD, k_BTKD, v_BTKD, packing, out_BTHD, stats, d_out_BTHD, scale, causal), None)


def _rule_forward(q_BTHD, k_BTKD, v_BTKD, packing, scale, causal):
  """jax's cuDNN forward rule: (out [B, T, Hq, D], softmax statistics [B * M, Hq, T] float32)."""
  outputs, _ = _fa._dot_product_attention_fwd_rule(
      q_BTHD, k_BTKD, v_BTKD, *_rule_arrays(q_BTHD, packing), scale, _SEED, _DROPOUT, _NO_BIAS,
      _mask_type(causal, packing is not None), _LAYOUT, None, _cudnn_version(), True)
  return tuple(outputs)


def _rule_backward(q_BTHD, k_BTKD, v_BTKD, packing, out_BTHD, stats, d_out_BTHD, scale, causal):
  """jax's cuDNN backward rule: (dq, dk, dv)."""
  res = (q_BTHD, k_BTKD, v_BTKD, *_rule_arrays(q_BTHD, packing), stats, out_BTHD)
  # The rule's 8th static is jax's cudnn_version slot, named is_training there and unused.
  dq, dk, dv, *_ = _fa._dot_product_attention_bwd_rule(
      scale, _SEED, _DROPOUT, _NO_BIAS, _mask_type(causal, packing is not None), _LAYOUT, None,
      _cudnn_version(), False, res, d_out_BTHD)
  return dq, dk, dv


_flash.defvjp(_flash_fwd, _flash_bwd)


# Packed documents: one custom_vjp whose forward and backward each switch between cuDNN at the batch's
# capacity (`cudnn_packed.capacity_index`) and pallas_triton. Its residuals are exactly what the taken
# branch needs (the inputs, out, cuDNN's statistics or Triton's lse, the packing, described once per call);
# a `lax.cond` over two differentiable branches would return both branches' residuals from the forward,
# copies of q, k, v and out among them, and cost ~0.15-0.25 ms per call (BENCHMARKS.md §0j).
@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _packed(inputs: spec_lib.Inputs, spec: spec_lib.Spec):
  """(out [B, T, Hq, D], lse [B, T, Hq]) of a call with segment_ids."""
  return _packed_fwd(inputs, spec)[0]


def _packed_fwd(inputs, spec):
  capacities = cudnn_packed.CAPACITIES
  packing = cudnn_packed.describe(inputs.segment_ids, capacities[-1])
  stats_shape = (inputs.q.shape[0] * capacities[-1], inputs.q.shape[2], spec.seq_len)

  def on_cudnn(max_segments):
    def run():
      out_BTHD, stats_SHT = _rule_forward(inputs.q, inputs.k, inputs.v, packing.at_capacity(max_segments),
                                          spec.scale, spec.causal)
      # One statistics layout for every capacity: the runs sit at the front (`lse_from_stats`).
      stats_SHT = jnp.pad(stats_SHT, ((0, stats_shape[0] - stats_SHT.shape[0]), (0, 0), (0, 0)))
      return out_BTHD, stats_SHT, jnp.zeros(inputs.q.shape[:3], jnp.float32)
    return run

  def on_triton():
    out_BTHD, lse_BTH = triton.attention(inputs, spec)
    return out_BTHD, jnp.zeros(stats_shape, jnp.float32), lse_BTH

  branch = cudnn_packed.capacity_index(packing, capacities)
  out_BTHD, stats_SHT, triton_lse_BTH = residuals.named(
      *jax.lax.switch(branch, [on_cudnn(m) for m in capacities] + [on_triton]))
  lse_BTH = jnp.where(branch < len(capacities), cudnn_packed.lse_from_stats(stats_SHT, packing), triton_lse_BTH)
  # The packing and branch too (B x T int32 and less): a policy that saved only the kernel's outputs
  # would describe the batch again in the backward pass.
  *saved_packing, branch = residuals.named(*packing, branch)
  return (out_BTHD, lse_BTH), (inputs, out_BTHD, stats_SHT, triton_lse_BTH, cudnn_packed.Packing(*saved_packing),
                               branch)


def _packed_bwd(spec, saved, cotangents):
  inputs, out_BTHD, stats_SHT, triton_lse_BTH, packing, branch = saved
  d_out_BTHD, _ = cotangents  # the lse's: zero (`_lse_without_gradient`)
  capacities = cudnn_packed.CAPACITIES
  batch = inputs.q.shape[0]

  def on_cudnn(max_segments):
    def run():
      return _rule_backward(inputs.q, inputs.k, inputs.v, packing.at_capacity(max_segments), out_BTHD,
                            stats_SHT[:batch * max_segments], d_out_BTHD, spec.scale, spec.causal)
    return run

  def on_triton():
    return triton.sequence_backward(inputs, spec, out_BTHD, triton_lse_BTH, d_out_BTHD)

  dq, dk, dv = jax.lax.switch(branch, [on_cudnn(m) for m in capacities] + [on_triton])
  return (inputs._replace(q=dq, k=dk, v=dv, segment_ids=None),)


_packed.defvjp(_packed_fwd, _packed_bwd)


def _compute_capability() -> tuple[int, int]:
  """(major, minor) of the local CUDA GPU; NotImplementedError where there is none (CPU, ROCm)."""
  capability = gpu_capability.local()
  if capability is None:
    raise NotImplementedError("cudnn: no local CUDA GPU (or one that reports no CUDA compute capability).")
  return capability


# jax drops the cotangent of cuDNN's softmax statistics. This identity makes a non-zero one an error
# (symbolic zeros: an lse that nothing reads, as in `moda_attention(return_lse=False)`, passes).
@jax.custom_vjp
def _lse_without_gradient(lse_BTH):
  return lse_BTH


def _lse_fwd(lse_BTH):
  return lse_BTH.value, None


def _lse_bwd(_, d_lse_BTH):
  if not isinstance(d_lse_BTH, SymbolicZero):
    raise NotImplementedError("cudnn: the lse has no gradient (jax's cuDNN attention drops it); use "
                              "another implementation to differentiate through lse.")
  return (None,)


_lse_without_gradient.defvjp(_lse_fwd, _lse_bwd, symbolic_zeros=True)
