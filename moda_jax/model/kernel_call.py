"""Calls `moda_attention` so that it stays sharded when a mesh is active.

A `pallas_call` under plain `jit` on sharded operands silently gathers them and runs replicated.
Attention is independent per batch row and per kv head (the depth part too: it only reads the
token's own slots), so under a mesh the call goes through `jax.shard_map`: batch over
("data", "fsdp"), heads over "tensor", each device running the kernel on its local block.

`recording_implementations()` collects, while the model is traced inside it, the backend each kind of
call resolves to (`pallas_kernels.api.resolve_implementation` on the very arguments, local shapes
included): what the trainer logs, so a run says which kernel it trained on.
"""

from __future__ import annotations

import contextlib
import math

import jax
from jax.sharding import PartitionSpec as P

from pallas_kernels import moda_attention, resolve_implementation

# The open `recording_implementations` collections: {call kind: {implementation names}}.
_RECORDINGS: list[dict[str, set[str]]] = []
# Inside `parameters_only`: attention calls only create parameters.
_PARAMETERS_ONLY = False


@contextlib.contextmanager
def recording_implementations():
  """Yields {"sequence" | "sequence+depth" | "depth-only": {implementation}} filled by every attention
  call traced inside the block. A function that is already compiled is not traced again, so a cache hit
  records nothing."""
  used: dict[str, set[str]] = {}
  _RECORDINGS.append(used)
  try:
    yield used
  finally:
    _RECORDINGS.remove(used)


@contextlib.contextmanager
def parameters_only():
  """Attention calls traced inside only create parameters (a one-token dummy call): they run on the
  `xla` backend, which takes any shape on any platform (a user's `implementation="cudnn"` refuses the
  odd T = 1; the values are discarded), and are left out of `recording_implementations` (the dummy
  call would otherwise show up as a kernel the run trains on)."""
  global _PARAMETERS_ONLY
  saved, saved_flag = _RECORDINGS[:], _PARAMETERS_ONLY
  _RECORDINGS.clear()
  _PARAMETERS_ONLY = True
  try:
    yield
  finally:
    _RECORDINGS[:] = saved
    _PARAMETERS_ONLY = saved_flag


def describe_implementations(used: dict[str, set[str]]) -> str:
  """One log line: "attention kernels: sequence -> cudnn; sequence+depth -> pallas_triton"."""
  return "attention kernels: " + "; ".join(f"{kind} -> {', '.join(sorted(names))}"
                                           for kind, names in sorted(used.items()))

BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"


def _active_mesh():
  """The context mesh (`jax.set_mesh`) if it has any of the model's axes, else None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(mesh.axis_names) & set(BATCH_AXES + (HEAD_AXIS,)):
    return None
  return mesh


def sharded_moda_attention(q_BTHD, k_BTKD, v_BTKD, depth_k_BTLKD, depth_v_BTLKD, *, depth_len,
                           segment_ids_BT, implementation, depth_q_BTHD=None, depth_start=None,
                           depth_chunk: int = 1, return_depth: bool = False):
  """`moda_attention` (causal), wrapped in `shard_map` when a mesh with the model's axes is set.

  `depth_q_BTHD` (None: q) scores the depth keys; it shards like q. `depth_start` / `depth_chunk`:
  the bounded depth window and chunk-visible depth (the operator's arguments of the same names).
  k = v = None: depth-only attention (the depth-attention mixer's depth read). `return_depth`:
  returns (out, depth_k, depth_v), the depth buffers threaded through the call (the operator's
  argument); needs depth buffers."""
  has_depth = depth_k_BTLKD is not None
  # The model's counts are arrays even when there is no depth buffer; the operator wants None then.
  arrays = dict(q=q_BTHD, k=k_BTKD, v=v_BTKD, depth_k=depth_k_BTLKD, depth_v=depth_v_BTLKD,
                depth_q=depth_q_BTHD if has_depth else None,
                depth_len=_scalar(depth_len) if has_depth else None,
                depth_start=_scalar(depth_start) if has_depth and depth_start is not None else None,
                segment_ids=segment_ids_BT)
  arrays = {name: a for name, a in arrays.items() if a is not None}  # None cannot pass shard_map
  options = dict(implementation="xla" if _PARAMETERS_ONLY else implementation, return_depth=return_depth,
                 depth_chunk=None if depth_chunk == 1 or not has_depth else depth_chunk)

  def call(arrays):
    q, k, v = arrays.pop("q"), arrays.pop("k", None), arrays.pop("v", None)
    depth_k, depth_v = arrays.pop("depth_k", None), arrays.pop("depth_v", None)
    if _RECORDINGS:
      kind = "depth-only" if k is None else "sequence+depth" if depth_k is not None else "sequence"
      name = resolve_implementation(q, k, v, depth_k, depth_v, **arrays, **options)
      for used in _RECORDINGS:
        used.setdefault(kind, set()).add(name)
    return moda_attention(q, k, v, depth_k, depth_v, **arrays, **options)

  mesh = _active_mesh()
  if mesh is None:
    return call(arrays)
  # An axis that does not divide its dimension (e.g. batch 1 at evaluation) is left unsharded.
  batch = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  if not batch or q_BTHD.shape[0] % math.prod(mesh.shape[a] for a in batch):
    batch = None
  heads = HEAD_AXIS if HEAD_AXIS in mesh.axis_names else None
  num_kv_heads = (k_BTKD if k_BTKD is not None else depth_k_BTLKD).shape[-2]
  if heads and num_kv_heads % mesh.shape[heads]:
    heads = None
  heads_spec, depth_spec = P(batch, None, heads, None), P(batch, None, None, heads, None)
  specs = dict(q=heads_spec, k=heads_spec, v=heads_spec, depth_q=heads_spec, depth_k=depth_spec,
               depth_v=depth_spec, depth_len=P(), depth_start=P(), segment_ids=P(batch, None))
  out_specs = (heads_spec, depth_spec, depth_spec) if return_depth else heads_spec
  # check_vma=False: interpreted/Pallas kernel bodies do not carry varying-axis annotations.
  return jax.shard_map(call, in_specs=({name: specs[name] for name in arrays},), out_specs=out_specs,
                       check_vma=False)(arrays)


def _scalar(value):
  return jax.numpy.asarray(value, jax.numpy.int32)
