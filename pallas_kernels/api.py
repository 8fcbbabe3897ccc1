"""`moda_attention`: the public MoDA operator. Validation, normalization and dispatch live here.

A call is first normalized by `prepare` into the two structures of `pallas_kernels.spec`:
  * `Inputs`, the arrays (absent ones None): q; k, v (None for depth-only attention); depth_q (None:
    the depth keys are scored with q); depth_k, depth_v with L >= 1 (None without depth: depth
    arrays with L = 0 become None too); depth_start, depth_len int32 scalars in [0, L] (possibly
    traced; None without depth); segment_ids int32 (or None);
  * `Spec`, the static facts (frozen, hashable: a backend passes it whole as one non-differentiable
    argument of its `custom_vjp`): seq_len, num_slots, causal, scale, has_sequence, has_segments and
    depth_chunk (1 without depth).
What a query sees is defined once, by `spec.sequence_visible`, `spec.depth_slot_visible` and
`spec.depth_token_visible`; backends call those with their own index arrays.

Every backend module exposes

    attention(inputs: Inputs, spec: Spec, *, interpret=False, **backend_options) -> (out_BTHD, lse_BTH)

with `out` in q's dtype and `lse` float32 in natural log (-inf for a row that sees nothing, whose `out`
is 0). It is differentiable in every floating array of `inputs` (a cotangent on `lse` included) and
owns its `custom_vjp`. A backend may also expose `attention_with_depth(inputs, spec, *, interpret=False)
-> (out, lse, depth_k, depth_v)`, the depth arrays returned unchanged, whose backward adds its depth
cotangents into theirs in place (`return_depth=True`); without it the dispatcher returns the inputs
themselves and JAX adds the two cotangents. With depth_q None a backend may pass q twice (JAX then sums the two
cotangents: one code path per kernel, as the Pallas backends do) or keep a single dq (as `xla`
does). `backend_options` are test and benchmark knobs (`block_sizes=`, `max_block=`); the dispatcher
passes none. A backend first calls its own `check_supported(inputs, spec, interpret)`, which raises
`NotImplementedError` saying why for a combination the backend does not handle, before any work;
with `implementation=None` the dispatcher then falls back to the next backend of the platform
(GPU: cudnn, pallas_mosaic_gpu, pallas_triton, xla; TPU: pallas_tpu, xla; CPU: xla). `cudnn` (cuDNN
flash attention) takes only calls without depth, so on GPU a plain-attention call runs on cuDNN and a
MoDA call on pallas_mosaic_gpu on Hopper (compute capability 9.x), on pallas_triton elsewhere and for
what Mosaic does not take (float32, head dims other than 64 and 128, depth-only, depth_chunk > 1). A
backend whose lse carries no gradient sets `DIFFERENTIABLE_LSE = False` and is never given a
`return_lse=True` call. `resolve_implementation` names the backend a call would run on, by the same
order and the backends' `check_supported`, without computing anything (what the trainer logs). Tests
and benchmarks that call one backend directly use `prepare` the same way:

    inputs, spec = api.prepare(q, k, v, depth_k, depth_v, depth_len=5)
    out, lse = triton.attention(inputs, spec, interpret=True, block_sizes=tiles)
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp

from pallas_kernels import validation
from pallas_kernels.spec import Inputs, Spec

# name -> (module, the platforms it runs on without interpret mode). Modules import lazily so that a
# missing optional backend never breaks the others.
_BACKENDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "reference": ("pallas_kernels.reference", ("cpu", "gpu", "cuda", "rocm", "tpu")),
    "xla": ("pallas_kernels.xla", ("cpu", "gpu", "cuda", "rocm", "tpu")),
    "pallas_triton": ("pallas_kernels.triton", ("gpu", "cuda")),
    "pallas_mosaic_gpu": ("pallas_kernels.mosaic_gpu", ("gpu", "cuda")),
    "pallas_tpu": ("pallas_kernels.tpu", ("tpu",)),
    "cudnn": ("pallas_kernels.cudnn", ("gpu", "cuda")),
}
IMPLEMENTATIONS = tuple(_BACKENDS)

# implementation=None tries these in order; NotImplementedError moves on to the next one. `xla` is
# last everywhere because it runs on every platform and every call: the CPU default, the fallback
# on GPU and TPU. `cudnn` is first on GPU: the fastest kernel there for the calls it takes (no depth).
# `pallas_mosaic_gpu` takes the MoDA calls on Hopper, where it measured faster than pallas_triton
# (BENCHMARKS.md §0h); elsewhere, and for what it does not support, pallas_triton does.
_DEFAULT_ORDER = {
    "gpu": ("cudnn", "pallas_mosaic_gpu", "pallas_triton", "xla"),
    "tpu": ("pallas_tpu", "xla"),
    "cpu": ("xla",),
}


def prepare(
    q: jax.Array,
    k: jax.Array | None,
    v: jax.Array | None,
    depth_k: jax.Array | None = None,
    depth_v: jax.Array | None = None,
    *,
    depth_len: int | jax.Array | None = None,
    causal: bool = True,
    scale: float | None = None,
    segment_ids: jax.Array | None = None,
    depth_q: jax.Array | None = None,
    depth_chunk: int | None = None,
    depth_start: int | jax.Array | None = None,
) -> tuple[Inputs, Spec]:
  """Validates a `moda_attention` call and normalizes it into (Inputs, Spec); see the module docstring.

  Raises ValueError naming the argument for every bad input (shapes, dtypes, ranges, combinations).
  """
  validation.check_arrays(q, k, v, depth_k, depth_v, segment_ids)
  validation.check_depth_q(q, depth_k, depth_q)
  causal = validation.check_flag("causal", causal)
  scale = validation.check_scale(scale, q.shape[-1])
  has_depth_arrays = depth_k is not None
  num_slots = depth_k.shape[2] if has_depth_arrays else 0
  depth_len = validation.slot_bound("depth_len", depth_len, num_slots, has_depth_arrays, default=num_slots)
  depth_start = validation.slot_bound("depth_start", depth_start, num_slots, has_depth_arrays, default=0)
  depth_chunk = validation.check_depth_chunk(depth_chunk, causal, has_depth_arrays)
  if num_slots == 0:  # no depth, or depth arrays with L = 0: nothing is scored against depth keys
    if k is None:
      raise ValueError(f"depth_k.shape={tuple(depth_k.shape)} has L=0 slots and k / v are None: nothing "
                       "to attend to; pass k and v, or depth arrays with L >= 1.")
    depth_k = depth_v = depth_q = None
    depth_chunk = 1
  if segment_ids is not None:
    segment_ids = segment_ids.astype(jnp.int32)
  inputs = Inputs(q=q, k=k, v=v, depth_q=depth_q, depth_k=depth_k, depth_v=depth_v,
                  depth_start=depth_start, depth_len=depth_len, segment_ids=segment_ids)
  spec = Spec(seq_len=q.shape[1], num_slots=num_slots, causal=causal, scale=scale,
              has_sequence=k is not None, has_segments=segment_ids is not None, depth_chunk=depth_chunk)
  return inputs, spec


def moda_attention(
    q: jax.Array,
    k: jax.Array | None,
    v: jax.Array | None,
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
    depth_chunk: int | None = None,
    depth_start: int | jax.Array | None = None,
    return_depth: bool = False,
):
  """Mixture-of-Depths attention: one softmax over the sequence K/V and the visible depth K/V.

  For query head h at token t (kv head h // G, G = Hq / Hk):

      out_t = (sum_s e^{a_s} v_s + sum_{t', l} e^{c_t'l} depth_v[t', l]) / Z,   lse_t = log Z
      a_s = scale * q_t . k_s          (s <= t if causal, same segment if segment_ids)
      c_t'l = scale * depth_q_t . depth_k[t', l]   (depth_q = q unless given)

  over the depth slots depth_start <= l < depth_len of the tokens t' of t's segment with
  (t // C) * C <= t' <= t (C = depth_chunk; C = 1: t' = t only, plain MoDA). A row that sees nothing
  (only possible without k / v) returns 0 and lse = -inf, with zero gradients.

  Args:
    q: [B, T, Hq, D] queries.
    k, v: [B, T, Hk, D] sequence keys and values; Hq must be a multiple of Hk. Both None: depth-only
      attention (one softmax over the visible depth slots alone).
    depth_k, depth_v: [B, T, L, Hk, D] depth keys and values of each token (both or neither).
    depth_len: slots >= depth_len are ignored and get zero gradient. None means L. A Python int or an
      int32 scalar array (may be traced).
    causal: mask the sequence part to s <= t. The depth part is always causal.
    scale: logit scale; defaults to D ** -0.5.
    segment_ids: [B, T] integers; attention (sequence and depth) only within a segment.
    return_lse: also return the float32 log-sum-exp [B, T, Hq] (natural log, differentiable).
    implementation: None for the best on this platform (GPU: `cudnn` for calls without depth, else
      `pallas_mosaic_gpu` on Hopper, `pallas_triton` elsewhere; `resolve_implementation` names it), or
      one of `IMPLEMENTATIONS`.
    interpret: run a Pallas backend in interpret mode (True, or a backend's interpret params).
    depth_q: [B, T, Hq, D] the queries scored against depth keys (default: q). A model whose depth
      keys are stored RMS-normalized without the reader's k-norm gain passes q * gain here, so the
      reader never rewrites the [B, T, L, Hk, D] depth buffer. Needs depth_k / depth_v.
    depth_chunk: None (= 1) or a Python int C >= 1: a query also sees the depth slots of the earlier
      tokens of its chunk of C tokens. C > 1 needs causal=True and depth arrays.
    depth_start: slots < depth_start are ignored like slots >= depth_len. None means 0. A Python int
      or an int32 scalar array (may be traced).
    return_depth: also return depth_k and depth_v, unchanged. A caller that carries depth buffers
      through a stack of calls (the model's layers) threads them through this one: the cotangent
      flowing back along the returned buffers then comes back as theirs with this call's depth
      cotangent added in place, over the visible slots only, where the backend supports it
      (pallas_triton, pallas_mosaic_gpu, xla), instead of a zero-filled [B, T, L, Hk, D] gradient
      added to it. Needs depth_k / depth_v.

  Returns:
    out [B, T, Hq, D] in q's dtype, or (out, lse) when return_lse; with return_depth, followed by
    depth_k and depth_v.
  """
  inputs, spec = prepare(q, k, v, depth_k, depth_v, depth_len=depth_len, causal=causal, scale=scale,
                         segment_ids=segment_ids, depth_q=depth_q, depth_chunk=depth_chunk,
                         depth_start=depth_start)
  return_lse = validation.check_flag("return_lse", return_lse)
  return_depth = validation.check_flag("return_depth", return_depth)
  if return_depth and depth_k is None:
    raise ValueError("return_depth=True returns depth_k and depth_v: pass them (they are None).")
  _, (out, lse, *depth) = _dispatch(implementation, interpret, return_lse,
                                    lambda backend: _attend(backend, inputs, spec, interpret, return_depth))
  result = (out, lse) if return_lse else (out,)
  if return_depth:
    # Depth arrays with L = 0 took no part (prepare dropped them): they come back as given.
    result += (depth_k, depth_v) if inputs.depth_k is None else tuple(depth)
  return result if len(result) > 1 else out


def _attend(backend, inputs: Inputs, spec: Spec, interpret: Any, return_depth: bool):
  """(out, lse) or, with return_depth, (out, lse, depth_k, depth_v) from one backend."""
  if not return_depth:
    return backend.attention(inputs, spec, interpret=interpret)
  if hasattr(backend, "attention_with_depth"):
    return backend.attention_with_depth(inputs, spec, interpret=interpret)
  return (*backend.attention(inputs, spec, interpret=interpret), inputs.depth_k, inputs.depth_v)


def resolve_implementation(*args, **kwargs) -> str:
  """The name of the backend `moda_attention(*args, **kwargs)` runs (the very same arguments), computing
  nothing.

  The same validation, order and fallback as `moda_attention`, with each backend's `check_supported`
  in place of its `attention`; it raises what `moda_attention` would (TypeError for an unknown argument,
  ValueError for a bad one, NotImplementedError when no backend, or the named one, takes the call).
  Arrays may be tracers. `return_depth` never changes the choice: a backend without an in-place depth
  cotangent returns the depth inputs through the dispatcher instead.
  """
  call = inspect.signature(moda_attention).bind(*args, **kwargs)  # moda_attention's signature, once
  call.apply_defaults()
  arguments = dict(call.arguments)
  implementation, interpret = arguments.pop("implementation"), arguments.pop("interpret")
  return_lse = validation.check_flag("return_lse", arguments.pop("return_lse"))
  validation.check_flag("return_depth", arguments.pop("return_depth"))
  inputs, spec = prepare(**arguments)
  name, _ = _dispatch(implementation, interpret, return_lse,
                      lambda backend: backend.check_supported(inputs, spec, interpret))
  return name


def _dispatch(implementation: str | None, interpret: Any, return_lse: bool, call: Callable):
  """(name, call(module)) for the backend that takes the call: the named one, or the first of the
  platform's order whose module (and `call`) raises no NotImplementedError."""
  if implementation is None:
    errors = []
    for name in _DEFAULT_ORDER.get(_platform_family(), ("xla",)):
      try:
        return name, call(_backend(name, interpret, return_lse))
      except NotImplementedError as e:
        errors.append(f"{name}: {e}")
    raise NotImplementedError("no MoDA implementation supports this call:\n" + "\n".join(errors))
  if not isinstance(implementation, str) or implementation not in _BACKENDS:
    raise ValueError(f"implementation={implementation!r}: expected None or one of {IMPLEMENTATIONS}.")
  return implementation, call(_backend(implementation, interpret, return_lse))


def _backend(name: str, interpret: Any, return_lse: bool = False):
  """The backend's module; NotImplementedError when it cannot run on this platform, or cannot give
  the differentiable lse that `return_lse` asks for."""
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
  if return_lse and not getattr(module, "DIFFERENTIABLE_LSE", True):
    raise NotImplementedError(f"implementation={name!r} returns no differentiable lse; return_lse=True "
                              "needs another backend.")
  return module


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
