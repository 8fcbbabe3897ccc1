"""Pure training and evaluation steps: loss, gradient accumulation, optimizer update. No I/O.

The loss is a token-weighted mean over all valid targets of the whole (global) batch. Each microbatch
contributes *sums*, divided once by the total token count at the end, so a step with
`grad_accum_steps = A` computes the same gradient as one big-batch step (up to float rounding).
"""

import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from moda_jax.train import loss
from moda_jax.train import sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array       # int32 scalar: optimizer updates done so far
  params: Any           # float32 master parameters
  opt_state: Any
  rng: jax.Array        # uint32[2] raw key, carried (and checkpointed) for stochastic layers


@dataclasses.dataclass(frozen=True)
class StepConfig:
  z_loss_weight: float = 0.0
  grad_accum_steps: int = 1
  loss_chunk_len: int = 0  # 0: dense [B, T, V] logits; else positions per chunk (train/loss.py)


def init_tokens(mesh, seq_len: int) -> jax.Array:
  """Dummy tokens for `model.init`: one row per batch shard so sharded kernels see whole rows."""
  rows = mesh.shape["data"] * mesh.shape["fsdp"]
  return jnp.zeros((rows, seq_len), jnp.int32)


def init_train_state(model: nn.Module, optimizer: optax.GradientTransformation, seed: int,
                     tokens_BT: jax.Array) -> TrainState:
  init_rng, rng = jax.random.split(jax.random.PRNGKey(seed))
  params = nn.meta.unbox(model.init(init_rng, tokens_BT)["params"])
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                    rng=rng)


def state_shardings(model, optimizer, mesh, seed: int, tokens_BT) -> tuple[TrainState, TrainState]:
  """(abstract state, NamedSharding tree) for the train state on `mesh`."""
  boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(seed), tokens_BT)["params"])
  param_sh = sharding.logical_shardings(boxed, mesh)
  abstract = jax.eval_shape(lambda: init_train_state(model, optimizer, seed, tokens_BT))
  rep = sharding.replicated(mesh)
  opt_sh = optax.tree_map_params(optimizer, lambda _, s: s, abstract.opt_state, param_sh,
                                 transform_non_params=lambda _: rep)
  return abstract, TrainState(step=rep, params=param_sh, opt_state=opt_sh, rng=rep)


def loss_sums(model, params, batch, z_loss_weight: float,
              loss_chunk_len: int = 0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(objective sum, {ce_sum, z_sum, tokens}) over the valid targets of `batch`.

  `loss_chunk_len` > 0 computes the same sums without the dense logits (`loss.chunked_objective`);
  the model must then accept `return_hidden=True` (the `Transformer` does)."""
  inputs = dict(segment_ids=batch["segment_ids"], positions=batch["positions"])
  mask_BT = (batch["segment_ids"] > 0).astype(jnp.float32)  # segment 0 is packing padding
  if loss_chunk_len:
    hidden_BTM, unembedding = model.apply({"params": params}, batch["inputs"], **inputs, return_hidden=True)
    objective, ce_sum, z_sum = loss.chunked_objective(hidden_BTM, unembedding, batch["targets"], mask_BT,
                                                      loss_chunk_len, z_loss_weight)
  else:
    logits_BTV = model.apply({"params": params}, batch["inputs"], **inputs)
    ce_sum, z_sum = loss.logit_sums(logits_BTV, batch["targets"], mask_BT)
    objective = loss.objective(ce_sum, z_sum, z_loss_weight)
  return objective, {"ce_sum": ce_sum, "z_sum": z_sum, "tokens": jnp.sum(mask_BT)}


def _microbatches(batch, num: int):
  """[B, ...] -> [num, B/num, ...], microbatch a taking rows a, a+num, ... so each one keeps every
  device's share of the rows (no resharding between microbatches)."""
  def split(x):
    if x.shape[0] % num:
      raise ValueError(f"batch rows {x.shape[0]} not divisible by grad_accum_steps={num}.")
    return jnp.swapaxes(x.reshape((x.shape[0] // num, num) + x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def train_step(state: TrainState, batch, *, model, optimizer, schedule, cfg: StepConfig):
  """One optimizer update on `batch` (dict of [B, T] int32); returns (new state, scalar metrics)."""
  grad_fn = jax.grad(lambda p, b: loss_sums(model, p, b, cfg.z_loss_weight, cfg.loss_chunk_len),
                     has_aux=True)
  if cfg.grad_accum_steps == 1:
    grads, sums = grad_fn(state.params, batch)
  else:
    def accumulate(carry, micro):
      g, s = grad_fn(state.params, micro)
      return jax.tree.map(jnp.add, carry, (g, s)), None
    zero_sums = {k: jnp.zeros((), jnp.float32) for k in ("ce_sum", "z_sum", "tokens")}
    zeros = (jax.tree.map(jnp.zeros_like, state.params), zero_sums)
    (grads, sums), _ = jax.lax.scan(accumulate, zeros, _microbatches(batch, cfg.grad_accum_steps))
  tokens = jnp.maximum(sums["tokens"], 1.0)
  grads = jax.tree.map(lambda g: g / tokens, grads)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  rng, _ = jax.random.split(state.rng)
  metrics = {"loss": sums["ce_sum"] / tokens, "z_loss": sums["z_sum"] / tokens,
             "grad_norm": optax.tree.norm(grads), "learning_rate": schedule(state.step),
             "tokens": sums["tokens"]}
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng), metrics


def eval_step(params, batch, *, model, loss_chunk_len: int = 0):
  """Summed cross-entropy and token count of one batch (summed, so batches combine exactly)."""
  _, sums = loss_sums(model, params, batch, 0.0, loss_chunk_len)
  return {"ce_sum": sums["ce_sum"], "tokens": sums["tokens"]}
