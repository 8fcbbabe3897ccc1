"""Checks of `moda_attention`'s arguments, used by `api.prepare` and nowhere else.

Every user error is a ValueError naming the argument, its value (where short enough to print) and what
was expected. The functions return the normalized value they checked, so `prepare` reads as a list of
checks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def shape_of(name: str, x) -> tuple[int, ...]:
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise ValueError(f"{name} must be an array, got {type(x).__name__}.")
  return tuple(x.shape)


def check_arrays(q, k, v, depth_k, depth_v, segment_ids) -> None:
  """Ranks, shapes and dtypes of every array; which pairs are present."""
  q_shape = shape_of("q", q)
  if len(q_shape) != 4:
    raise ValueError(f"q.shape={q_shape}: expected rank 4 [B, T, Hq, D].")
  batch, seq_len, num_q_heads, head_dim = q_shape
  if (k is None) != (v is None):
    missing, given = ("k", "v") if k is None else ("v", "k")
    raise ValueError(f"{missing} is None but {given} is given: pass both (sequence and depth attention) or "
                     "neither (depth-only attention).")
  if k is None and depth_k is None and depth_v is None:
    raise ValueError("k, v, depth_k and depth_v are all None: nothing to attend to; pass k and v, or "
                     "depth_k and depth_v (depth-only attention), or both pairs.")

  num_kv_heads = None
  if k is not None:
    k_shape, v_shape = shape_of("k", k), shape_of("v", v)
    for name, shape in (("k", k_shape), ("v", v_shape)):
      if len(shape) != 4:
        raise ValueError(f"{name}.shape={shape}: expected rank 4 [B, T, Hk, D].")
    if k_shape != v_shape:
      raise ValueError(f"k.shape={k_shape} and v.shape={v_shape}: expected equal shapes [B, T, Hk, D].")
    if k_shape[0] != batch or k_shape[1] != seq_len or k_shape[3] != head_dim:
      raise ValueError(f"k.shape={k_shape}: expected [B={batch}, T={seq_len}, Hk, D={head_dim}] "
                       f"to match q.shape={q_shape}.")
    num_kv_heads = _check_heads(num_q_heads, k_shape[2], "k")

  if (depth_k is None) != (depth_v is None):
    missing = "depth_v" if depth_v is None else "depth_k"
    raise ValueError(f"{missing} is None but the other depth array is given: pass both or neither.")
  if depth_k is not None:
    dk_shape, dv_shape = shape_of("depth_k", depth_k), shape_of("depth_v", depth_v)
    if num_kv_heads is None and len(dk_shape) == 5:  # depth-only: depth_k sets Hk
      num_kv_heads = _check_heads(num_q_heads, dk_shape[3], "depth_k")
    heads = "Hk" if num_kv_heads is None else f"Hk={num_kv_heads}"
    for name, shape in (("depth_k", dk_shape), ("depth_v", dv_shape)):
      if (len(shape) != 5 or shape[:2] != (batch, seq_len)
          or shape[3:] != (num_kv_heads, head_dim)):
        raise ValueError(f"{name}.shape={shape}: expected [B={batch}, T={seq_len}, L, {heads}, "
                         f"D={head_dim}].")
    if dk_shape != dv_shape:
      raise ValueError(f"depth_k.shape={dk_shape} and depth_v.shape={dv_shape}: expected equal shapes.")

  if seq_len == 0 or head_dim == 0 or batch == 0:
    raise ValueError(f"q.shape={q_shape}: expected B, T and D to be positive.")
  if q.dtype not in _FLOAT_DTYPES:
    raise ValueError(f"q.dtype={q.dtype}: expected float32, bfloat16 or float16.")
  if k is not None:
    for name, x in (("k", k), ("v", v)):
      if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name}.dtype={x.dtype}: expected float32, bfloat16 or float16.")
    if k.dtype != q.dtype or v.dtype != q.dtype:
      raise ValueError(f"dtypes q={q.dtype}, k={k.dtype}, v={v.dtype}: expected one dtype.")
  if depth_k is not None:
    for name, x in (("depth_k", depth_k), ("depth_v", depth_v)):
      if x.dtype != q.dtype:
        raise ValueError(f"{name}.dtype={x.dtype}: expected q's dtype {q.dtype}.")

  if segment_ids is not None:
    seg_shape = shape_of("segment_ids", segment_ids)
    if seg_shape != (batch, seq_len):
      raise ValueError(f"segment_ids.shape={seg_shape}: expected [B={batch}, T={seq_len}].")
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
      raise ValueError(f"segment_ids.dtype={segment_ids.dtype}: expected an integer dtype.")


def _check_heads(num_q_heads: int, num_kv_heads: int, name: str) -> int:
  if num_kv_heads == 0 or num_q_heads % num_kv_heads:
    raise ValueError(f"q has Hq={num_q_heads} heads and {name} has Hk={num_kv_heads}: expected Hq to be a "
                     "positive multiple of Hk (GQA: query head h reads kv head h // (Hq // Hk)).")
  return num_kv_heads


def check_depth_q(q, depth_k, depth_q) -> None:
  if depth_q is None:
    return
  shape = shape_of("depth_q", depth_q)
  if depth_k is None:
    raise ValueError(f"depth_q has shape {shape} but depth_k / depth_v are None: depth_q only scores "
                     "depth keys; pass the depth arrays or drop depth_q.")
  if shape != tuple(q.shape):
    raise ValueError(f"depth_q.shape={shape}: expected q's shape {tuple(q.shape)} [B, T, Hq, D].")
  if depth_q.dtype != q.dtype:
    raise ValueError(f"depth_q.dtype={depth_q.dtype}: expected q's dtype {q.dtype}.")


def slot_bound(name: str, value, num_slots: int, has_depth_arrays: bool, default: int):
  """`depth_len` / `depth_start`: an int32 scalar array in [0, L], or None when L = 0.

  A Python int or a concrete array is range-checked; a traced one cannot be, so it is clamped to
  [0, L] (a bad value then never reads past the buffer).
  """
  if isinstance(value, (bool, np.bool_)) or (
      value is not None and not isinstance(value, (int, np.integer)) and not hasattr(value, "dtype")):
    raise ValueError(f"{name}={value!r}: expected None, a Python int or an int32 scalar array.")
  if hasattr(value, "dtype"):
    if value.shape != () or not jnp.issubdtype(value.dtype, jnp.integer):
      raise ValueError(f"{name} has shape {value.shape} and dtype {value.dtype}: expected an integer scalar.")
    if not has_depth_arrays:
      raise ValueError(f"{name} is an array but depth_k / depth_v are None: pass the depth arrays.")
  concrete = value is not None and not isinstance(value, jax.core.Tracer)
  if concrete and not 0 <= int(value) <= num_slots:
    raise ValueError(f"{name}={int(value)}: expected 0 <= {name} <= L={num_slots} (the depth arrays' slot "
                     "count).")
  if num_slots == 0:
    return None
  value = default if value is None else value
  return jnp.clip(jnp.asarray(value, jnp.int32), 0, num_slots)


def check_depth_chunk(depth_chunk, causal: bool, has_depth_arrays: bool) -> int:
  """C >= 1 (None: 1). C > 1 reads the depth of earlier tokens: causal only, and needs depth arrays."""
  if depth_chunk is None:
    return 1
  if (isinstance(depth_chunk, (bool, np.bool_)) or not isinstance(depth_chunk, (int, np.integer))
      or depth_chunk < 1):
    raise ValueError(f"depth_chunk={depth_chunk!r}: expected None or a Python int >= 1 (1: each token "
                     "reads its own depth slots only).")
  depth_chunk = int(depth_chunk)
  if depth_chunk > 1 and not causal:
    raise ValueError(f"depth_chunk={depth_chunk} with causal=False: chunk-visible depth reads the depth of "
                     "earlier tokens of the chunk, so it is causal only; pass causal=True or depth_chunk=1.")
  if depth_chunk > 1 and not has_depth_arrays:
    raise ValueError(f"depth_chunk={depth_chunk} but depth_k / depth_v are None: a chunk only widens which "
                     "depth slots a query sees; pass the depth arrays or drop depth_chunk.")
  return depth_chunk


def check_scale(scale, head_dim: int) -> float:
  if scale is None:
    return head_dim ** -0.5
  if (isinstance(scale, (bool, np.bool_)) or not isinstance(scale, (int, float, np.floating))
      or not np.isfinite(scale) or scale <= 0):
    raise ValueError(f"scale={scale!r}: expected a positive finite Python float (or None for D**-0.5).")
  return float(scale)


def check_flag(name: str, flag) -> bool:
  if not isinstance(flag, (bool, np.bool_)):
    raise ValueError(f"{name}={flag!r}: expected a Python bool.")
  return bool(flag)
