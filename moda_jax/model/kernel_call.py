"""Calls `moda_attention` so that it stays sharded when a mesh is active.

A `pallas_call` under plain `jit` on sharded operands silently gathers them and runs replicated.
Attention is independent per batch row and per kv head (the depth part too: it only reads the
token's own slots), so under a mesh the call goes through `jax.shard_map`: batch over
("data", "fsdp"), heads over "tensor", each device running the kernel on its local block.
"""

from __future__ import annotations

import functools
import math

import jax
from jax.sharding import PartitionSpec as P

from pallas_kernels import moda_attention

BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"


def _active_mesh():
  """The context mesh (`jax.set_mesh`) if it has any of the model's axes, else None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(mesh.axis_names) & set(BATCH_AXES + (HEAD_AXIS,)):
    return None
  return mesh


def sharded_moda_attention(q_BTHD, k_BTKD, v_BTKD, depth_k_BTLKD, depth_v_BTLKD, *, depth_len,
                           segment_ids_BT, implementation, depth_q_BTHD=None):
  """`moda_attention` (causal), wrapped in `shard_map` when a mesh with the model's axes is set.

  `depth_q_BTHD` (None: q) scores the depth keys; it shards like q."""
  call = functools.partial(moda_attention, implementation=implementation)
  if depth_k_BTLKD is None:
    depth_len = None  # the model's count is an array even when there is no depth buffer
    depth_q_BTHD = None
  mesh = _active_mesh()
  if mesh is None:
    return call(q_BTHD, k_BTKD, v_BTKD, depth_k_BTLKD, depth_v_BTLKD, depth_len=depth_len,
                segment_ids=segment_ids_BT, depth_q=depth_q_BTHD)

  # An axis that does not divide its dimension (e.g. batch 1 at evaluation) is left unsharded.
  batch = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  if not batch or q_BTHD.shape[0] % math.prod(mesh.shape[a] for a in batch):
    batch = None
  heads = HEAD_AXIS if HEAD_AXIS in mesh.axis_names else None
  if heads and k_BTKD.shape[2] % mesh.shape[heads]:
    heads = None
  heads_spec = P(batch, None, heads, None)
  depth_spec = P(batch, None, None, heads, None)
  seq_spec = P(batch, None)
  has_depth = depth_k_BTLKD is not None
  has_depth_q = depth_q_BTHD is not None
  has_segments = segment_ids_BT is not None

  # None operands cannot pass through shard_map; only the present ones are mapped.
  args = [q_BTHD, k_BTKD, v_BTKD]
  specs = [heads_spec, heads_spec, heads_spec]
  if has_depth:
    args += [depth_k_BTLKD, depth_v_BTLKD, jax.numpy.asarray(
        depth_k_BTLKD.shape[2] if depth_len is None else depth_len, jax.numpy.int32)]
    specs += [depth_spec, depth_spec, P()]
  if has_depth_q:
    args.append(depth_q_BTHD)
    specs.append(heads_spec)
  if has_segments:
    args.append(segment_ids_BT)
    specs.append(seq_spec)

  def local(*local_args):
    q, k, v, *rest = local_args
    depth_k = depth_v = local_len = depth_q = segments = None
    if has_depth:
      depth_k, depth_v, local_len, *rest = rest
    if has_depth_q:
      depth_q, *rest = rest
    if has_segments:
      (segments,) = rest
    return call(q, k, v, depth_k, depth_v, depth_len=local_len, segment_ids=segments, depth_q=depth_q)

  # check_vma=False: interpreted/Pallas kernel bodies do not carry varying-axis annotations.
  return jax.shard_map(local, in_specs=tuple(specs), out_specs=heads_spec, check_vma=False)(*args)
