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
    ("act_streams", None),    # hyper-connections' n residual streams
    # parameters (also used for activations with the same meaning, e.g. "mlp", "vocab")
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
    ("mixer", None),          # the depth mixers' small axes (streams, DWA weights, lambdas)
    ("mixer_out", None),      # the second stream axis of an n x n stream mix
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> jax.sharding.Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all). One axis may be -1: it takes the
  devices the others leave (`data=-1` by default; `data=1, fsdp=-1` is FSDP over every device)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
  for name, size in sizes.items():
    if size != -1 and size < 1:
      raise ValueError(f"mesh.{name}={size}; expected a positive int or -1 (the devices left).")
  free = [name for name, size in sizes.items() if size == -1]
  if len(free) > 1:
    raise ValueError(f"mesh {sizes}: at most one axis may be -1; {free} are.")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if free:
    if len(devices) % fixed:
      raise ValueError(f"the mesh axes other than {free[0]} hold {fixed} devices, which does not "
                       f"divide the {len(devices)} devices.")
    sizes[free[0]] = len(devices) // fixed
  if math.prod(sizes.values()) != len(devices):
    raise ValueError(f"mesh (data={sizes['data']}, fsdp={sizes['fsdp']}, tensor={sizes['tensor']}) "
                     f"needs {math.prod(sizes.values())} devices; {len(devices)} are available.")
  auto = (jax.sharding.AxisType.Auto,) * 3  # GSPMD propagation; logical constraints steer it.
  return jax.make_mesh(tuple(sizes.values()), MESH_AXES, auto, devices=devices)


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
