"""Checkpointer: state + data iterator + config round trip, restore onto another mesh, keep-N."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import micro
from moda_jax.train import checkpoint
from moda_jax.data import pipeline
from moda_jax.data import sources
from moda_jax.train import optimizer
from moda_jax.train import sharding
from moda_jax.data import tokenizers
from moda_jax.train import step as ts


def _state(mesh, spec):
  """A train state whose parameters are sharded by `spec` on `mesh` (values depend on position)."""
  sh = NamedSharding(mesh, spec)
  params = {"mlp": {"kernel": jax.device_put(jnp.arange(64.0).reshape(8, 8), sh)},
            "final_norm": {"scale": jnp.linspace(0.5, 1.5, 8)}}
  opt = optimizer.make_optimizer(micro.get_config())
  opt_state = opt.init(params)
  opt_state = jax.tree.map(lambda x: x + 0.25 if x.dtype == jnp.float32 else x, opt_state)
  return ts.TrainState(step=jnp.int32(7), params=params, opt_state=opt_state,
                       rng=jax.random.PRNGKey(3))


def _iterator():
  docs = sources.TextDocuments([f"document number {i} " * (i + 1) for i in range(20)], "t")
  return iter(pipeline.packed_dataset(docs, tokenizers.ByteTokenizer(), seq_len=16, batch_size=2, seed=0))


def test_round_trip_onto_a_different_mesh(tmp_path):
  devices = jax.devices()
  save_mesh = sharding.make_mesh(2, 2, 2, devices)
  state = _state(save_mesh, P("fsdp", "tensor"))
  it = _iterator()
  for _ in range(3):
    next(it)
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2)
  ckpt.save(7, state, it, micro.get_config())
  ckpt.wait()
  want_batch = next(it)

  # Restore onto a 1-D data-parallel layout over 4 devices, with the kernel split by rows.
  load_mesh = sharding.make_mesh(4, 1, 1, devices[:4])
  new_sh = jax.tree.map(lambda _: NamedSharding(load_mesh, P()), state)
  new_sh = new_sh.replace(params={"mlp": {"kernel": NamedSharding(load_mesh, P("data"))},
                                  "final_norm": {"scale": NamedSharding(load_mesh, P())}})
  abstract = checkpoint.abstract_with_shardings(jax.eval_shape(lambda: state), new_sh)
  fresh = _iterator()
  restored = checkpoint.Checkpointer(str(tmp_path), keep=2).restore(7, abstract, fresh)

  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored, state)
  kernel = restored.params["mlp"]["kernel"]
  assert kernel.sharding == NamedSharding(load_mesh, P("data"))
  assert {s.data.shape for s in kernel.addressable_shards} == {(2, 8)}
  np.testing.assert_array_equal(next(fresh)["inputs"], want_batch["inputs"])


def test_keep_n_and_latest_step(tmp_path):
  mesh = sharding.make_mesh(1, 1, 1, jax.devices()[:1])
  state, it, cfg = _state(mesh, P()), _iterator(), micro.get_config()
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2)
  for step in (1, 2, 3, 4):
    ckpt.save(step, state, it, cfg)
  ckpt.wait()
  assert ckpt.latest_step() == 4
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [3, 4]
  ckpt.close()


def test_bad_arguments_raise_value_error(tmp_path):
  with pytest.raises(ValueError, match="keep_checkpoints"):
    checkpoint.Checkpointer(str(tmp_path), keep=0)
  with pytest.raises(ValueError, match="no checkpoints/"):
    checkpoint.load_checkpoint(str(tmp_path / "nothing"))
