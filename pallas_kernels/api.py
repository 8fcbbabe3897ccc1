"""`moda_attention`: the public MoDA operator. Validation and dispatch live here and nowhere else.

Every backend module exposes one function with the *normalized* signature

    attention(q_BTHD, k_BTKD, v_BTKD, depth_k_BTLKD, depth_v_BTLKD, depth_len, segment_ids_BT,
              *, causal: bool, scale: float, interpret, depth_q_BTHD=None) -> (out_BTHD, lse_BTH)

where the depth pair is either both arrays with L >= 1 or both None (then `depth_len` is None too),
`depth_len` is an int32 scalar array (possibly traced) in [0, L], `segment_ids_BT` is int32 or None,
`depth_q_BTHD` is None (score the depth keys with q) or an array like q (only with a depth pair),
`out` has q's dtype and `lse` is float32 in natural log. The function is differentiable in q, k, v,
depth_q and the depth pair (a cotangent on `lse` included) and owns its own `custom_vjp`; its
backward returns the sequence part of dq and d(depth_q) separately. With depth_q None a backend may
pass q as depth_q (JAX then sums the two cotangents: one code path per kernel, as the Pallas backends
do) or keep a single dq (as `xla` does, which saves its second [B, T, Hq, D] gradient). A backend
that cannot handle a combination raises `NotImplementedError` saying why.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

# name -> (module, the platforms it runs on without interpret mode). Modules import lazily so that a
# missing optional backend never breaks the others.
_BACKENDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "reference": ("pallas_kernels.reference", ("cpu", "gpu", "cuda", "rocm", "tpu")),
    "xla": ("pallas_kernels.xla", ("cpu", "gpu", "cuda", "rocm", "tpu")),
    "pallas_triton": ("pallas_kernels.triton", ("gpu", "cuda")),
    "pallas_mosaic_gpu": ("pallas_kernels.mosaic_gpu", ("gpu", "cuda")),
    "pallas_tpu": ("pallas_kernels.tpu", ("tpu",)),
}
IMPLEMENTATIONS = tuple(_BACKENDS)

# Known names whose backend does not exist yet, with what to use instead.
_NOT_BUILT = {
    "pallas_mosaic_gpu": "the Mosaic GPU (Hopper wgmma/TMA) kernels are not built yet; use "
                         "implementation='pallas_triton' (or None) on NVIDIA GPUs",
}

# implementation=None tries these in order; NotImplementedError moves on to the next one. `xla` is
# last everywhere because it runs on every platform and every shape: the CPU default, the fallback
# on GPU and TPU.
_DEFAULT_ORDER = {
    "gpu": ("pallas_triton", "xla"),
    "tpu": ("pallas_tpu", "xla"),
    "cpu": ("xla",),
}

_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def moda_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    depth_k: jax.Array | None = None,
    depth_v: jax.Array | None = None,
    *,
    depth_len: int | jax.Array | None = None,
    causal: bool = True,
    scale: float | None = None,
    segment_ids: jax.Array | None = None,
    return_lse: bool = False,
    implementation: str | None = None,
    interpret: Any = False,
    depth_q: jax.Array | None = None,
):
  """Mixture-of-Depths attention: one softmax over the sequence K/V and the token's own depth K/V.

  For query head h at token t (kv head h // G, G = Hq / Hk):

      out_t = (sum_s e^{a_s} v_s + sum_{l < depth_len} e^{c_l} depth_v[t, l]) / Z
      a_s = scale * q_t . k_s  (s <= t if causal, same segment if segment_ids)
      c_l = scale * depth_q_t . depth_k[t, l]  (depth_q = q unless given)
      lse_t = log Z

  Args:
    q: [B, T, Hq, D] queries.
    k, v: [B, T, Hk, D] sequence keys and values; Hq must be a multiple of Hk.
    depth_k, depth_v: [B, T, L, Hk, D] depth keys and values of each token (both or neither).
    depth_len: number of valid depth slots; slots >= depth_len are ignored and get zero gradient.
      None means L. A Python int or an int32 scalar array (may be traced).
    causal: mask the sequence part to s <= t. The depth part is always the token's own slots.
    scale: logit scale; defaults to D ** -0.5.
    segment_ids: [B, T] integers; sequence attention only between tokens of the same segment.
    return_lse: also return the float32 log-sum-exp [B, T, Hq] (natural log, differentiable).
    implementation: None for the best on this platform, or one of `IMPLEMENTATIONS`.
    interpret: run a Pallas backend in interpret mode (True, or a backend's interpret params).
    depth_q: [B, T, Hq, D] the queries scored against depth keys (default: q). A model whose depth
      keys are stored RMS-normalized without the reader's k-norm gain passes q * gain here, so the
      reader never rewrites the [B, T, L, Hk, D] depth buffer. Needs depth_k / depth_v.

  Returns:
    out [B, T, Hq, D] in q's dtype, or (out, lse) when return_lse.
  """
  _validate_arrays(q, k, v, depth_k, depth_v, segment_ids)
  _validate_depth_q(q, depth_k, depth_q)
  depth_k, depth_v, depth_len = _normalize_depth(depth_k, depth_v, depth_len)
  if depth_k is None:
    depth_q = None  # L = 0: nothing is scored against depth keys
  if scale is None:
    scale = q.shape[-1] ** -0.5
  elif (isinstance(scale, (bool, np.bool_)) or not isinstance(scale, (int, float, np.floating))
        or not np.isfinite(scale) or scale <= 0):
    raise ValueError(f"scale={scale!r}: expected a positive finite Python float (or None for D**-0.5).")
  for name, flag in (("causal", causal), ("return_lse", return_lse)):
    if not isinstance(flag, (bool, np.bool_)):
      raise ValueError(f"{name}={flag!r}: expected a Python bool.")
  if segment_ids is not None:
    segment_ids = segment_ids.astype(jnp.int32)

  # depth_q=None reaches the backends as None: each scores depth with q itself, one code path.
  call = lambda fn: fn(q, k, v, depth_k, depth_v, depth_len, segment_ids,
                       causal=bool(causal), scale=float(scale), interpret=interpret,
                       depth_q_BTHD=depth_q)
  out, lse = _dispatch(implementation, interpret, call)
  return (out, lse) if return_lse else out


def _dispatch(implementation: str | None, interpret: Any, call: Callable):
  if implementation is None:
    errors = []
    for name in _DEFAULT_ORDER.get(_platform_family(), ("xla",)):
      try:
        return call(_backend_fn(name, interpret))
      except NotImplementedError as e:
        errors.append(f"{name}: {e}")
    raise NotImplementedError("no MoDA implementation supports this call:\n" + "\n".join(errors))
  if not isinstance(implementation, str) or implementation not in _BACKENDS:
    raise ValueError(f"implementation={implementation!r}: expected None or one of {IMPLEMENTATIONS}.")
  return call(_backend_fn(implementation, interpret))


def _backend_fn(name: str, interpret: Any) -> Callable:
  if name in _NOT_BUILT:
    raise NotImplementedError(f"implementation={name!r}: {_NOT_BUILT[name]}.")
  module_name, platforms = _BACKENDS[name]
  platform = current_platform()
  if not interpret and platform not in platforms:
    raise NotImplementedError(
        f"implementation={name!r} runs on {platforms}, not on platform {platform!r}; pass "
        "interpret=True to run its Pallas kernels in interpret mode.")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise NotImplementedError(f"implementation={name!r} is not available: {e}") from e
  return module.attention


def current_platform() -> str:
  """The platform the computation is being built for.

  Inside `jax.sharding.use_abstract_mesh` with an abstract device (used to lower GPU/TPU kernels on a
  CPU machine) that device's platform wins over the local default backend.
  """
  mesh = jax.sharding.get_abstract_mesh()
  device = getattr(mesh, "abstract_device", None)
  if device is not None and getattr(device, "platform", None):
    return device.platform
  return jax.default_backend()


def _platform_family() -> str:
  platform = current_platform()
  return "gpu" if platform in ("gpu", "cuda", "rocm") else platform


# ----------------------------------------------------------------------------------------------
# Validation: every user error is a ValueError naming the argument, its value and the expectation.
# ----------------------------------------------------------------------------------------------


def _shape_of(name: str, x) -> tuple[int, ...]:
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise ValueError(f"{name} must be an array, got {type(x).__name__}.")
  return tuple(x.shape)


def _validate_arrays(q, k, v, depth_k, depth_v, segment_ids) -> None:
  q_shape, k_shape, v_shape = _shape_of("q", q), _shape_of("k", k), _shape_of("v", v)
  if len(q_shape) != 4:
    raise ValueError(f"q.shape={q_shape}: expected rank 4 [B, T, Hq, D].")
  batch, seq_len, num_q_heads, head_dim = q_shape
  for name, shape in (("k", k_shape), ("v", v_shape)):
    if len(shape) != 4:
      raise ValueError(f"{name}.shape={shape}: expected rank 4 [B, T, Hk, D].")
  if k_shape != v_shape:
    raise ValueError(f"k.shape={k_shape} and v.shape={v_shape}: expected equal shapes [B, T, Hk, D].")
  num_kv_heads = k_shape[2]
  if k_shape[0] != batch or k_shape[1] != seq_len or k_shape[3] != head_dim:
    raise ValueError(f"k.shape={k_shape}: expected [B={batch}, T={seq_len}, Hk, D={head_dim}] "
                     f"to match q.shape={q_shape}.")
  if num_kv_heads == 0 or num_q_heads % num_kv_heads:
    raise ValueError(f"q has Hq={num_q_heads} heads and k has Hk={num_kv_heads}: expected Hq to be a "
                     "positive multiple of Hk (GQA: query head h reads kv head h // (Hq // Hk)).")
  if seq_len == 0 or head_dim == 0 or batch == 0:
    raise ValueError(f"q.shape={q_shape}: expected B, T and D to be positive.")
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.dtype not in _FLOAT_DTYPES:
      raise ValueError(f"{name}.dtype={x.dtype}: expected float32, bfloat16 or float16.")
  if k.dtype != q.dtype or v.dtype != q.dtype:
    raise ValueError(f"dtypes q={q.dtype}, k={k.dtype}, v={v.dtype}: expected one dtype.")

  if (depth_k is None) != (depth_v is None):
    missing = "depth_v" if depth_v is None else "depth_k"
    raise ValueError(f"{missing} is None but the other depth array is given: pass both or neither.")
  if depth_k is not None:
    dk_shape, dv_shape = _shape_of("depth_k", depth_k), _shape_of("depth_v", depth_v)
    for name, shape in (("depth_k", dk_shape), ("depth_v", dv_shape)):
      if (len(shape) != 5 or shape[:2] != (batch, seq_len)
          or shape[3:] != (num_kv_heads, head_dim)):
        raise ValueError(f"{name}.shape={shape}: expected [B={batch}, T={seq_len}, L, "
                         f"Hk={num_kv_heads}, D={head_dim}].")
    if dk_shape != dv_shape:
      raise ValueError(f"depth_k.shape={dk_shape} and depth_v.shape={dv_shape}: expected equal shapes.")
    for name, x in (("depth_k", depth_k), ("depth_v", depth_v)):
      if x.dtype != q.dtype:
        raise ValueError(f"{name}.dtype={x.dtype}: expected q's dtype {q.dtype}.")

  if segment_ids is not None:
    seg_shape = _shape_of("segment_ids", segment_ids)
    if seg_shape != (batch, seq_len):
      raise ValueError(f"segment_ids.shape={seg_shape}: expected [B={batch}, T={seq_len}].")
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
      raise ValueError(f"segment_ids.dtype={segment_ids.dtype}: expected an integer dtype.")


def _validate_depth_q(q, depth_k, depth_q) -> None:
  if depth_q is None:
    return
  shape = _shape_of("depth_q", depth_q)
  if depth_k is None:
    raise ValueError(f"depth_q has shape {shape} but depth_k / depth_v are None: depth_q only scores "
                     "depth keys; pass the depth arrays or drop depth_q.")
  if shape != tuple(q.shape):
    raise ValueError(f"depth_q.shape={shape}: expected q's shape {tuple(q.shape)} [B, T, Hq, D].")
  if depth_q.dtype != q.dtype:
    raise ValueError(f"depth_q.dtype={depth_q.dtype}: expected q's dtype {q.dtype}.")


def _normalize_depth(depth_k, depth_v, depth_len):
  """Returns (depth_k, depth_v, depth_len) with no-depth as (None, None, None)."""
  num_slots = 0 if depth_k is None else depth_k.shape[2]
  if isinstance(depth_len, (bool, np.bool_)) or (
      depth_len is not None and not isinstance(depth_len, (int, np.integer)) and not hasattr(depth_len, "dtype")):
    raise ValueError(f"depth_len={depth_len!r}: expected None, a Python int or an int32 scalar array.")
  if hasattr(depth_len, "dtype") and not isinstance(depth_len, jax.core.Tracer):
    if depth_len.shape != () or not jnp.issubdtype(depth_len.dtype, jnp.integer):
      raise ValueError(f"depth_len has shape {depth_len.shape} and dtype {depth_len.dtype}: "
                       "expected an integer scalar.")
    # A concrete array can be range-checked like a Python int; only traced values cannot.
    concrete_len = int(depth_len)
    if not 0 <= concrete_len <= num_slots:
      raise ValueError(f"depth_len={concrete_len}: expected 0 <= depth_len <= L={num_slots} "
                       "(the depth arrays' slot count).")
  if isinstance(depth_len, (int, np.integer)):
    if not 0 <= depth_len <= num_slots:
      raise ValueError(f"depth_len={depth_len}: expected 0 <= depth_len <= L={num_slots} "
                       "(the depth arrays' slot count).")
  elif depth_len is not None:
    if depth_len.shape != () or not jnp.issubdtype(depth_len.dtype, jnp.integer):
      raise ValueError(f"depth_len has shape {depth_len.shape} and dtype {depth_len.dtype}: "
                       "expected an integer scalar.")
    if depth_k is None:
      raise ValueError("depth_len is an array but depth_k / depth_v are None: pass the depth arrays.")
  if num_slots == 0:
    return None, None, None
  if depth_len is None:
    depth_len = num_slots
  # Traced values cannot be range-checked; clamping keeps a bad value from reading past the buffer.
  depth_len = jnp.clip(jnp.asarray(depth_len, jnp.int32), 0, num_slots)
  return depth_k, depth_v, depth_len
