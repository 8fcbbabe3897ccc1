"""`implementation="cudnn"`: cuDNN flash attention, `jax.nn.dot_product_attention(implementation="cudnn")`.

The fastest attention kernel on NVIDIA GPUs for what it can express, and first in the GPU order, so that
a call without depth and without segments runs on it; everything else falls back to pallas_triton. It
takes: no depth arrays, no `segment_ids`, k and v given, causal or not, any G, an even T, bfloat16 or
float16, D a multiple of 8 up to 128 (256 on Hopper and later), a CUDA GPU of compute capability 8.0+,
never interpret mode. The lse it returns is cuDNN's softmax statistics as `jax.nn` hands them back
(rounded to q's dtype): its gradient is not implemented (`DIFFERENTIABLE_LSE = False`: the dispatcher
gives `return_lse=True` calls to another backend; a direct caller that differentiates it gets
NotImplementedError, never a silent zero).

What a query sees is `spec.sequence_visible` without segments: cuDNN's own causal mask (s <= t,
top-left aligned: T query and T key tokens), or none.

Why no segments (packed documents, as the training data comes): cuDNN has no segment-id mask. A dense
[B, 1, T, T] boolean mask built from the spec's rule (jax turns it into an additive bias) is exact, and
this backend took segments that way until it was measured on the H200 (BENCHMARKS.md §0c): at the 700M
training shape B8 T4K G2 it was slower than pallas_triton's segment-aware kernel (4.52 vs 3.59 ms
fwd+bwd) and the OLMo2 baseline's step 13% slower (0.545 vs 0.481 s), also because jax's cuDNN
residuals carry no checkpoint name, so a remat policy cannot keep them and the forward runs again. Its
other ways to express packed documents do not fit `moda_attention`'s contract: `query_seq_lengths` /
`key_value_seq_lengths` describe one padded prefix per row, and the packed (THD) layout behind
`jax._src.cudnn.fused_attention_stablehlo.dot_product_attention(q_offsets=, kv_offsets=)` needs every
segment id to be one contiguous run (ours may repeat anywhere in a row) and a static maximum number of
segments per row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from pallas_kernels import spec as spec_lib

DIFFERENTIABLE_LSE = False

_DTYPES = (jnp.bfloat16, jnp.float16)
_MIN_COMPUTE_CAPABILITY = (8, 0)  # cuDNN flash attention: Ampere and later
_HOPPER = (9, 0)  # head dims up to 256 from Hopper on, 128 before


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
  if spec.has_segments:
    raise NotImplementedError("cudnn: segment_ids (packed documents) are not expressible in cuDNN attention "
                              "(no segment-id mask; a dense mask measured slower than pallas_triton).")
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


def attention(inputs: spec_lib.Inputs, spec: spec_lib.Spec, *, interpret=False):
  """The backend protocol of `pallas_kernels.api`: (out [B, T, Hq, D] in q's dtype, lse [B, T, Hq] float32).

  The lse has no gradient (module docstring): differentiating it raises NotImplementedError.
  """
  check_supported(inputs, spec, interpret)
  out_BTHD, lse_BTH = jax.nn.dot_product_attention(
      inputs.q, inputs.k, inputs.v, scale=spec.scale, is_causal=spec.causal,
      implementation="cudnn", return_residual=True)
  return out_BTHD, _lse_without_gradient(lse_BTH.astype(jnp.float32))


def _compute_capability() -> tuple[int, int]:
  """(major, minor) of the local CUDA GPU; NotImplementedError where there is none (CPU, ROCm)."""
  try:
    device = jax.local_devices(backend="gpu")[0]
  except RuntimeError as e:
    raise NotImplementedError(f"cudnn: no local CUDA GPU ({e}).") from e
  capability = str(getattr(device, "compute_capability", ""))
  major, _, minor = capability.partition(".")
  if not (major.isdigit() and minor.isdigit()):  # e.g. ROCm's "gfx90a"
    raise NotImplementedError(f"cudnn: device {device.device_kind!r} reports no CUDA compute capability "
                              f"({capability!r}).")
  return int(major), int(minor)


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
