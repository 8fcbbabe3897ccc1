"""The attention call under a device mesh goes through `shard_map` and equals the unsharded call.

Uses the 8 fake CPU devices of conftest.py as a ("data", "fsdp", "tensor") = (2, 2, 2) mesh.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import model_cases as cases
from moda_jax import Transformer
from moda_jax.model.kernel_call import sharded_moda_attention
from pallas_kernels import moda_attention

_ATOL, _RTOL = 1e-5, 1e-4  # float32
_RULES = (("act_batch", ("data", "fsdp")), ("act_heads", "tensor"), ("act_kv_heads", "tensor"),
          ("q_heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"), ("embed", "fsdp"))


def _mesh():
  # Auto axes: Linen's logical constraints are hints there; Explicit axes would make them asserts.
  return jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)


def _operands(rng):
  shape = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  q, k, v = shape(4, 8, 4, 8), shape(4, 8, 2, 8), shape(4, 8, 2, 8)
  depth_k, depth_v = shape(4, 8, 3, 2, 8), shape(4, 8, 3, 2, 8)
  segments = jnp.asarray(np.repeat([[0, 0, 1, 1, 1, 2, 2, 2]], 4, axis=0), jnp.int32)
  return q, k, v, depth_k, depth_v, segments


def test_sharded_call_equals_unsharded_and_stays_sharded():
  q, k, v, depth_k, depth_v, segments = _operands(np.random.default_rng(0))

  def run(q, k, v, depth_k, depth_v, segments, depth_len):
    return sharded_moda_attention(q, k, v, depth_k, depth_v, depth_len=depth_len,
                                  segment_ids_BT=segments, implementation="reference")

  want = moda_attention(q, k, v, depth_k, depth_v, depth_len=2, segment_ids=segments,
                        implementation="reference")
  mesh = _mesh()
  with jax.set_mesh(mesh):
    heads = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
    slots = NamedSharding(mesh, P(("data", "fsdp"), None, None, "tensor", None))
    args = (jax.device_put(q, heads), jax.device_put(k, heads), jax.device_put(v, heads),
            jax.device_put(depth_k, slots), jax.device_put(depth_v, slots), segments, jnp.int32(2))
    got = jax.jit(run)(*args)
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(run(*a) ** 2), argnums=(0, 3)))(*args)
  # Replicated (P()) would mean the kernel ran unsharded on gathered operands.
  assert got.sharding.spec == P(("data", "fsdp"), None, "tensor", None)
  np.testing.assert_allclose(got, want, atol=_ATOL, rtol=_RTOL)
  want_grads = jax.grad(lambda q, dk: jnp.sum(moda_attention(
      q, k, v, dk, depth_v, depth_len=2, segment_ids=segments, implementation="reference") ** 2),
                        argnums=(0, 1))(q, depth_k)
  for g, w in zip(grads, want_grads):
    np.testing.assert_allclose(g, w, atol=_ATOL, rtol=_RTOL)


def test_indivisible_axes_fall_back_to_replication():
  q, k, v, depth_k, depth_v, segments = (x[:1] for x in _operands(np.random.default_rng(1)))
  q, k, v = q[:, :, :1], k[:, :, :1], v[:, :, :1]
  depth_k, depth_v = depth_k[:, :, :, :1], depth_v[:, :, :, :1]
  want = moda_attention(q, k, v, depth_k, depth_v, depth_len=3, segment_ids=segments,
                        implementation="reference")
  with jax.set_mesh(_mesh()):  # batch 1 over data x fsdp = 4 and 1 kv head over tensor = 2
    got = jax.jit(lambda *a: sharded_moda_attention(
        *a, depth_len=3, segment_ids_BT=segments, implementation="reference"))(q, k, v, depth_k, depth_v)
  np.testing.assert_allclose(got, want, atol=_ATOL, rtol=_RTOL)


def test_model_under_mesh_equals_unsharded():
  cfg = cases.config(depth_kv="attn_ffn", num_layers=3)
  tokens = np.concatenate([cases.TOKENS, cases.TOKENS[::-1]])  # batch 4 over data x fsdp
  params = cases.random_params(cfg, tokens=tokens)
  want = Transformer(cfg).apply({"params": params}, tokens)
  mesh = _mesh()
  with jax.set_mesh(mesh), nn.logical_axis_rules(_RULES):
    got = jax.jit(lambda p, t: Transformer(cfg).apply({"params": p}, t))(params, tokens)
  np.testing.assert_allclose(got, want, atol=_ATOL, rtol=_RTOL)
