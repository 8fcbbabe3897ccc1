"""OLMo2 optimizer recipe: schedule shape, weight-decay mask, clipping, decoupled decay."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import micro
from moda_jax import ModelConfig, Transformer
from moda_jax.train import optimizer


def _cfg(**kw):
  c = micro.get_config()
  c.update({"learning_rate": 1e-3, "warmup_steps": 10, "total_steps": 110, "weight_decay": 0.1, **kw})
  return c


def test_schedule_warmup_then_cosine_to_ten_percent():
  sched = optimizer.learning_rate_schedule(_cfg())
  lr = np.array([float(sched(s)) for s in range(111)])
  np.testing.assert_allclose(lr[:11], np.linspace(0, 1e-3, 11), rtol=1e-6)  # linear warmup
  np.testing.assert_allclose(lr[110], 1e-4, rtol=1e-6)                      # 10% of peak at the end
  t = (np.arange(10, 111) - 10) / 100                                         # independent cosine
  np.testing.assert_allclose(lr[10:], 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + np.cos(np.pi * t)), rtol=1e-5)


def test_schedule_rejects_bad_settings():
  with pytest.raises(ValueError, match="warmup_steps"):
    optimizer.learning_rate_schedule(_cfg(warmup_steps=200))
  with pytest.raises(ValueError, match="learning_rate"):
    optimizer.learning_rate_schedule(_cfg(learning_rate=0.0))


def test_decay_mask_on_the_real_model_tree():
  cfg = ModelConfig(vocab_size=64, num_layers=3, d_model=16, num_heads=2, num_kv_heads=1, head_dim=8,
                    mlp_dim=32, max_seq_len=8)
  params = nn.meta.unbox(jax.eval_shape(
      lambda: Transformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]))
  flat = {"/".join(str(getattr(k, "key", k)) for k in path): decays
          for path, decays in jax.tree_util.tree_leaves_with_path(optimizer.weight_decay_mask(params))}
  assert flat["embed/embedding"] is False and flat["unembed"] is True
  norms = [p for p in flat if "norm" in p]
  kernels = [p for p in flat if p.endswith("kernel")]
  assert norms and not any(flat[p] for p in norms)
  assert kernels and all(flat[p] for p in kernels)


def test_decay_is_decoupled_and_masked():
  """With zero gradients AdamW's update is exactly -lr * wd * p on decayed leaves, 0 elsewhere."""
  params = {"embed": {"embedding": jnp.ones((4, 3))}, "mlp": {"kernel": jnp.full((3, 3), 2.0)},
            "final_norm": {"scale": jnp.ones((3,))}}
  cfg = _cfg(warmup_steps=0)
  opt = optimizer.make_optimizer(cfg)
  updates, _ = opt.update(jax.tree.map(jnp.zeros_like, params), opt.init(params), params)
  np.testing.assert_allclose(updates["mlp"]["kernel"], -1e-3 * 0.1 * 2.0, rtol=1e-6)
  np.testing.assert_array_equal(updates["embed"]["embedding"], 0.0)
  np.testing.assert_array_equal(updates["final_norm"]["scale"], 0.0)


def test_clipping_bounds_the_global_norm():
  grads = {"a": jnp.full((10,), 3.0), "b": jnp.full((5,), -4.0)}
  clip = optax.clip_by_global_norm(_cfg().grad_clip_norm)
  clipped, _ = clip.update(grads, clip.init(grads))
  assert abs(float(optax.tree.norm(clipped)) - 1.0) < 1e-6
  # Direction is kept: clipped = g / ||g||.
  norm = np.sqrt(10 * 9 + 5 * 16)
  np.testing.assert_allclose(clipped["a"], 3.0 / norm, rtol=1e-6)
