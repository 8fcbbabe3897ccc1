"""The depth stream (`depth_stream.py`) and the linear-memory stack (`depth_stack.py`) on a toy layer.

The toy layer has the structure the stack relies on and nothing else: it reads the buffers through
a mask `slot < depth_len` and writes S new slots computed from its input, so the custom_vjp is
checked against plain autodiff of a naive scan independently of the Transformer block.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moda_jax import ModelConfig
from moda_jax.model import depth_stream
from moda_jax.model.depth_stack import linear_memory_stack

_ATOL, _RTOL = 2e-5, 1e-4  # float32


def _config(depth_kv, num_layers):
  return ModelConfig(vocab_size=11, num_layers=num_layers, d_model=6, num_heads=2, num_kv_heads=1,
                     head_dim=4, mlp_dim=8, depth_kv=depth_kv)


def _toy_layer(p, x_BTM, stream, positions_BT, segment_ids_BT, kv_cache=None, return_probs=False):
  """x + (softmax-weighted depth values), then S slots from tanh projections of the new x; returns the
  stream it read as is (not threaded through an operator: JAX adds the carried cotangent to its own)."""
  del positions_BT, segment_ids_BT, kv_cache, return_probs
  k_BTLKD, v_BTLKD, depth_len = stream
  q_BTKD = jnp.einsum("btm,mkd->btkd", x_BTM, p["wq"])
  logits_BTLK = jnp.einsum("btkd,btlkd->btlk", q_BTKD, k_BTLKD)
  visible_L = jnp.arange(k_BTLKD.shape[2]) < depth_len
  logits_BTLK = jnp.where(visible_L[None, None, :, None], logits_BTLK, -1e30)
  weights_BTLK = jax.nn.softmax(jnp.concatenate([logits_BTLK, jnp.zeros_like(logits_BTLK[:, :, :1])],
                                                axis=2), axis=2)[:, :, :-1]
  read_BTKD = jnp.einsum("btlk,btlkd->btkd", weights_BTLK, v_BTLKD)
  x_BTM = x_BTM + jnp.einsum("btkd,kdm->btm", read_BTKD, p["wo"])
  k_BTSKD = jnp.tanh(jnp.einsum("btm,smkd->btskd", x_BTM, p["wk"]))
  v_BTSKD = jnp.einsum("btm,smkd->btskd", x_BTM, p["wv"])
  return x_BTM, (k_BTSKD, v_BTSKD), None, None, stream


def _naive_stack(layer_params, x_BTM, cfg):
  """Plain scan with the buffers in the carry: what autodiff differentiates in O(N^2) memory."""
  def body(carry, p):
    x_BTM, stream = carry
    x_BTM, slots, *_ = _toy_layer(p, x_BTM, stream, None, None)
    return (x_BTM, depth_stream.write(stream, *slots)), None
  (x_BTM, stream), _ = jax.lax.scan(body, (x_BTM, depth_stream.empty(cfg, *x_BTM.shape[:2])), layer_params)
  return x_BTM, stream


def _params(cfg, num_layers, rng):
  s, m, k, d = cfg.slots_per_block, cfg.d_model, cfg.num_kv_heads, cfg.head_dim
  shapes = {"wq": (m, k, d), "wo": (k, d, m), "wk": (s, m, k, d), "wv": (s, m, k, d)}
  draw = lambda shape: jnp.asarray(rng.standard_normal((num_layers,) + shape), jnp.float32)
  return {name: draw(shape) for name, shape in shapes.items()}


def test_write_fills_consecutive_slots_and_counts():
  cfg = _config("attn_ffn", num_layers=3)  # 4 slots: blocks 0 and 1 write 2 each
  stream = depth_stream.empty(cfg, batch=1, seq_len=2)
  assert stream.k_BTLKD.shape == (1, 2, 4, 1, 4) and int(stream.length) == 0
  ones = jnp.ones((1, 2, 2, 1, 4))
  stream = depth_stream.write(stream, ones, 2 * ones)
  stream = depth_stream.write(stream, 3 * ones, 4 * ones)
  assert int(stream.length) == 4
  np.testing.assert_array_equal(stream.k_BTLKD[0, 0, :, 0, 0], [1, 1, 3, 3])
  np.testing.assert_array_equal(stream.v_BTLKD[0, 0, :, 0, 0], [2, 2, 4, 4])
  assert depth_stream.empty(_config("none", 3), 1, 2).k_BTLKD is None
  assert depth_stream.empty(_config("attn", 1), 1, 2).k_BTLKD is None  # a single block reads nothing


@pytest.mark.parametrize("depth_kv", ["attn", "attn_ffn"])
@pytest.mark.parametrize("unrolled", [False, True], ids=["scan", "loop"])
def test_linear_stack_matches_naive_autodiff(depth_kv, unrolled):
  num_layers = 4
  cfg = _config(depth_kv, num_layers + 1)  # the stack is every block but the last
  rng = np.random.default_rng(0)
  params = _params(cfg, num_layers, rng)
  x_BTM = jnp.asarray(rng.standard_normal((2, 3, cfg.d_model)), jnp.float32)
  # Cotangents on x *and* on the buffers: the last block reads the buffers outside the stack.
  w_x, w_k, w_v = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in
                   (x_BTM.shape, (2, 3, cfg.num_depth_slots, 1, 4), (2, 3, cfg.num_depth_slots, 1, 4)))

  def loss(stack_fn, params, x_BTM):
    out_BTM, stream = stack_fn(params, x_BTM)
    return jnp.sum(out_BTM * w_x) + jnp.sum(stream.k_BTLKD * w_k) + jnp.sum(stream.v_BTLKD * w_v)

  def linear(params, x_BTM):
    layers = params
    if unrolled:
      layers = [jax.tree.map(lambda a, i=i: a[i], params) for i in range(num_layers)]
    return linear_memory_stack(_toy_layer, layers, x_BTM, None, None, config=cfg)

  naive = lambda params, x_BTM: _naive_stack(params, x_BTM, cfg)
  value_and_grads = lambda stack_fn: jax.jit(jax.value_and_grad(
      lambda p, x: loss(stack_fn, p, x), argnums=(0, 1)))(params, x_BTM)
  value, grads = value_and_grads(linear)
  want_value, want_grads = value_and_grads(naive)
  np.testing.assert_allclose(value, want_value, rtol=_RTOL)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=_ATOL, rtol=_RTOL),
               grads, want_grads)
  assert np.all(np.abs(np.asarray(want_grads[0]["wq"][1:])).sum(axis=(1, 2, 3)) > 0)  # reads matter


def test_linear_stack_rejects_inconsistent_layer_count():
  cfg = _config("attn_ffn", num_layers=3)
  params = _params(cfg, 3, np.random.default_rng(0))  # 3 writer layers, but the config has 2
  with pytest.raises(ValueError, match="num_depth_slots=4"):
    linear_memory_stack(_toy_layer, params, jnp.zeros((1, 2, cfg.d_model)), None, None, config=cfg)
