"""The device mesh, the logical-axis rules, and the shardings of parameters and batches.

Mesh axes: "data" (pure data parallelism: parameters replicated), "fsdp" (data parallelism with
parameters sharded along "embed"), "tensor" (heads / MLP hidden / vocab split across devices).
The batch is split over ("data", "fsdp") together. The model names its axes logically; this table is
the only place that maps them to mesh axes.
"""

import contextlib
import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

LOGICAL_AXIS_RULES = (
    # activations
    ("act_batch", BATCH_AXES),
    ("act_len", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    # parameters (also used for activations with the same meaning, e.g. "mlp", "vocab")
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> jax.sharding.Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all); `data=-1` takes what is left."""
  devices = list(jax.devices() if devices is None else devices)
  for name, size in (("fsdp", fsdp), ("tensor", tensor)):
    if size < 1:
      raise ValueError(f"mesh.{name}={size}; expected a positive int.")
  if data == -1:
    if len(devices) % (fsdp * tensor):
      raise ValueError(f"mesh.fsdp * mesh.tensor = {fsdp * tensor} does not divide the "
                       f"{len(devices)} devices.")
    data = len(devices) // (fsdp * tensor)
  if data < 1 or data * fsdp * tensor != len(devices):
    raise ValueError(f"mesh (data={data}, fsdp={fsdp}, tensor={tensor}) needs "
                     f"{data * fsdp * tensor} devices; {len(devices)} are available.")
  auto = (jax.sharding.AxisType.Auto,) * 3  # GSPMD propagation; logical constraints steer it.
  return jax.make_mesh((data, fsdp, tensor), MESH_AXES, auto, devices=devices)


def mesh_from_config(config, devices=None) -> jax.sharding.Mesh:
  return make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices)


def _fit_spec(spec: P, shape: tuple[int, ...], mesh) -> P:
  """Drops mesh axes that do not divide their dimension (e.g. 1 kv head on tensor=2): replicate
  that dimension instead of failing, so one rule table serves every model size."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = math.prod(mesh.shape[a] for a in names)
    fitted.append(axes if names and dim % size == 0 else None)
  return P(*fitted)


def logical_shardings(abstract_tree, mesh):
  """NamedShardings for a tree of (possibly `nn.LogicallyPartitioned`) abstract arrays."""
  logical_specs = nn.get_partition_spec(abstract_tree)
  mesh_specs = nn.logical_to_mesh(logical_specs, LOGICAL_AXIS_RULES)
  plain = nn.meta.unbox(abstract_tree)
  return jax.tree.map(lambda x, spec: NamedSharding(mesh, _fit_spec(spec, x.shape, mesh)),
                      plain, mesh_specs, is_leaf=lambda s: isinstance(s, P))


def batch_sharding(mesh) -> NamedSharding:
  """Rows of a [B, T] batch split over the data-parallel axes."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(host_batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """Assembles every host's rows into global arrays (rows ordered by process index)."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in host_batch.items()}


@contextlib.contextmanager
def activation_context(mesh, constrain_activations: bool = True):
  """What model code needs at trace time: the mesh (sharded kernels run under shard_map over it)
  and, if `constrain_activations`, the logical rules that make `nn.with_logical_constraint` act.

  Use `constrain_activations=False` around `model.init`: flax's DenseGeneral unboxes its kernel
  while it is still flattened (rank 2) and the 3-d logical names no longer fit it. Initial
  parameter shardings come from `jit(out_shardings=...)` instead.
  """
  with jax.set_mesh(mesh):
    if constrain_activations:
      with nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        yield
    else:
      yield
