"""Mesh, logical rules, and the same training losses on 1 device and on a 2x2x2 (data, fsdp, tensor)
mesh of 8 fake CPU devices."""

import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import micro
from moda_jax import ModelConfig, Transformer
from moda_jax import sharding
from moda_jax import trainer


def test_make_mesh_axes_and_errors():
  mesh = sharding.make_mesh(-1, 2, 2)
  assert mesh.axis_names == ("data", "fsdp", "tensor") and dict(mesh.shape) == {
      "data": 2, "fsdp": 2, "tensor": 2}
  with pytest.raises(ValueError, match="needs 12 devices"):
    sharding.make_mesh(3, 2, 2)
  with pytest.raises(ValueError, match="does not divide"):
    sharding.make_mesh(-1, 3, 1)


def test_parameter_shardings_follow_the_rules():
  cfg = ModelConfig(vocab_size=257, num_layers=3, d_model=16, num_heads=4, num_kv_heads=2,
                    head_dim=8, mlp_dim=32, max_seq_len=8)
  boxed = jax.eval_shape(
      lambda: Transformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
  mesh = sharding.make_mesh(2, 2, 2)
  specs = {"/".join(str(getattr(k, "key", k)) for k in path): s.spec
           for path, s in jax.tree_util.tree_leaves_with_path(sharding.logical_shardings(boxed, mesh))}
  logical = {"/".join(str(getattr(k, "key", k)) for k in path): names for path, names in
             jax.tree_util.tree_leaves_with_path(nn.get_partition_spec(boxed),
                                                 is_leaf=lambda x: isinstance(x, P))}
  rules = dict(sharding.LOGICAL_AXIS_RULES)
  shapes = {"/".join(str(getattr(k, "key", k)) for k in path): x.shape
            for path, x in jax.tree_util.tree_leaves_with_path(nn.meta.unbox(boxed))}
  checked = 0
  for name, spec in specs.items():
    for dim, logical_name, mesh_axes in zip(shapes[name], logical[name], tuple(spec) + (None,) * 9):
      want = rules.get(logical_name)
      size = 1 if want is None else np.prod([mesh.shape[a] for a in np.atleast_1d(want)])
      # Each dimension gets its rule's mesh axes, unless they do not divide it (257 over tensor=2).
      assert mesh_axes == (want if dim % size == 0 else None), (name, dim, logical_name, mesh_axes)
      checked += mesh_axes is not None
  assert checked >= 6
  assert specs["embed/embedding"] == P(None, "fsdp")  # 257 rows cannot split in two


def _losses(workdir, devices, mesh):
  cfg = micro.get_config()
  cfg.update({"total_steps": 4, "log_every": 1, "eval_every": 0, "checkpoint_every": 4})
  cfg.mesh.update(mesh)
  trainer.train_and_evaluate(cfg, str(workdir), devices=devices)
  lines = pathlib.Path(workdir, "metrics.jsonl").read_text().splitlines()
  return np.array([[json.loads(l)["loss"], json.loads(l)["grad_norm"]] for l in lines])


def test_one_device_and_eight_device_mesh_give_the_same_losses(tmp_path):
  single = _losses(tmp_path / "one", jax.devices()[:1], {"data": 1, "fsdp": 1, "tensor": 1})
  sharded = _losses(tmp_path / "eight", jax.devices(), {"data": 2, "fsdp": 2, "tensor": 2})
  assert single.shape == (4, 2)
  # float32 with different reduction orders across devices: equal to rounding, not bit-exact.
  np.testing.assert_allclose(sharded, single, rtol=2e-5)
  assert single[-1, 0] < single[0, 0]
