"""train_step: the masked loss against numpy, and gradient accumulation against the big-batch step.

A small stand-in LM (embedding + one dense layer mixing each token with its segment's previous
token) keeps compilation to a second; the properties tested belong to `train_step`, not the model.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from configs import micro
from moda_jax.train import optimizer
from moda_jax.train import step as ts

V, M = 11, 8


class StandInLM(nn.Module):
  @nn.compact
  def __call__(self, tokens_BT, segment_ids=None, positions=None):
    x = nn.Embed(V, M)(tokens_BT)
    positions = jnp.zeros_like(tokens_BT) if positions is None else positions
    prev = jnp.where((positions > 0)[..., None], jnp.roll(x, 1, axis=1), 0.0)
    return nn.Dense(V)(jnp.tanh(nn.Dense(M)(x + prev))).astype(jnp.float32)


def _batch(seed, B=8, T=6):
  rng = np.random.default_rng(seed)
  seg = np.sort(rng.integers(0, 3, size=(B, T)), axis=1).astype(np.int32)  # zeros first = padding
  pos = np.zeros_like(seg)
  for b in range(B):
    for t in range(1, T):
      pos[b, t] = pos[b, t - 1] + 1 if seg[b, t] == seg[b, t - 1] else 0
  return {"inputs": rng.integers(0, V, (B, T)).astype(np.int32),
          "targets": rng.integers(0, V, (B, T)).astype(np.int32), "segment_ids": seg, "positions": pos}


def _setup(z_loss_weight=1e-2):
  cfg = micro.get_config()
  model = StandInLM()
  opt = optimizer.make_optimizer(cfg)
  state = jax.jit(lambda: ts.init_train_state(model, opt, 0, jnp.zeros((1, 6), jnp.int32)))()
  step = functools.partial(ts.train_step, model=model, optimizer=opt,
                           schedule=optimizer.learning_rate_schedule(cfg))
  return model, state, step


def test_loss_matches_numpy_float64():
  model, state, _ = _setup()
  batch = _batch(0)
  _, sums = ts.loss_sums(model, state.params, batch, 0.5)
  logits = np.asarray(model.apply({"params": state.params}, batch["inputs"],
                                  segment_ids=batch["segment_ids"], positions=batch["positions"]),
                      np.float64)
  lse = np.log(np.exp(logits).sum(-1))
  ce = lse - np.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
  mask = batch["segment_ids"] > 0
  np.testing.assert_allclose(float(sums["ce_sum"]), ce[mask].sum(), rtol=1e-5)
  np.testing.assert_allclose(float(sums["z_sum"]), (lse[mask] ** 2).sum(), rtol=1e-5)
  assert float(sums["tokens"]) == mask.sum()


def test_padding_tokens_do_not_affect_the_step():
  """Changing inputs/targets under segment 0 (padding) changes nothing; under a segment it does."""
  _, state, step = _setup()
  batch = _batch(1)
  jitted = jax.jit(functools.partial(step, cfg=ts.StepConfig(1e-2, 1)))
  _, base = jitted(state, batch)
  padded = {k: v.copy() for k, v in batch.items()}
  padded["targets"] = np.where(batch["segment_ids"] == 0, (batch["targets"] + 1) % V, batch["targets"])
  _, same = jitted(state, padded)
  real = {k: v.copy() for k, v in batch.items()}
  real["targets"] = np.where(batch["segment_ids"] > 0, (batch["targets"] + 1) % V, batch["targets"])
  _, other = jitted(state, real)
  assert float(same["loss"]) == float(base["loss"]) and float(other["loss"]) != float(base["loss"])


def test_gradient_accumulation_equals_big_batch():
  _, state, step = _setup()
  batch = _batch(2)
  big_state, big = jax.jit(functools.partial(step, cfg=ts.StepConfig(1e-2, 1)))(state, batch)
  acc_state, acc = jax.jit(functools.partial(step, cfg=ts.StepConfig(1e-2, 4)))(state, batch)
  for k in ("loss", "z_loss", "grad_norm", "tokens"):
    np.testing.assert_allclose(float(acc[k]), float(big[k]), rtol=2e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               acc_state.params, big_state.params)
  # ... and the accumulated step really did use every microbatch: dropping one changes it.
  half = {k: v[:4] for k, v in batch.items()}
  _, part = jax.jit(functools.partial(step, cfg=ts.StepConfig(1e-2, 1)))(state, half)
  assert abs(float(part["loss"]) - float(big["loss"])) > 1e-4
