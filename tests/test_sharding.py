"""Mesh, logical rules, and the same training losses on 1 device and on a 2x2x2 (data, fsdp, tensor)
mesh of 8 fake CPU devices."""

import subprocess

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from moda_jax import ModelConfig, Transformer
from moda_jax.train import sharding
import train_runs


def test_make_mesh_axes_and_errors():
  mesh = sharding.make_mesh(-1, 2, 2)
  assert mesh.axis_names == ("data", "fsdp", "tensor") and dict(mesh.shape) == {
      "data": 2, "fsdp": 2, "tensor": 2}
  with pytest.raises(ValueError, match="needs 12 devices"):
    sharding.make_mesh(3, 2, 2)
  with pytest.raises(ValueError, match="does not divide"):
    sharding.make_mesh(-1, 3, 1)
  fsdp_mesh = sharding.make_mesh(1, -1, 2)
  assert dict(fsdp_mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
  with pytest.raises(ValueError, match="at most one axis may be -1"):
    sharding.make_mesh(-1, -1, 1)
  with pytest.raises(ValueError, match="mesh.tensor=0"):
    sharding.make_mesh(-1, 1, 0)


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


def _start(workdir, num_devices, mesh_flags, cache_dir):
  env = train_runs.train_env(cache_dir)
  env["XLA_FLAGS"] += f" --xla_force_host_platform_device_count={num_devices}"
  flags = ["--config.total_steps=4", "--config.log_every=1", "--config.eval_every=0",
           "--config.checkpoint_every=4", *mesh_flags]
  return subprocess.Popen(train_runs.train_command(workdir, *flags), env=env, cwd=train_runs.REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_one_device_and_eight_device_mesh_give_the_same_losses(tmp_path):
  """train.py on 1 device vs on a (data=2, fsdp=2, tensor=2) mesh of 8: the same run, sharded.
  Both run at once, as subprocesses (each needs its own device count)."""
  runs = {"one": _start(tmp_path / "one", 1, ["--config.mesh.data=1"], tmp_path / "cache1"),
          "eight": _start(tmp_path / "eight", 8, ["--config.mesh.data=2", "--config.mesh.fsdp=2",
                                                  "--config.mesh.tensor=2"], tmp_path / "cache8")}
  losses = {}
  for name, proc in runs.items():
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    records = train_runs.read_metrics(tmp_path / name)
    losses[name] = np.array([[records[s]["loss"], records[s]["grad_norm"]] for s in sorted(records)])
  assert losses["one"].shape == (4, 2)
  # float32 with different reduction orders across devices: equal to rounding, not bit-exact.
  np.testing.assert_allclose(losses["eight"], losses["one"], rtol=2e-5)
  assert losses["one"][-1, 0] < losses["one"][0, 0]
