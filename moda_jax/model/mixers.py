"""The depth mixers (docs/peers.md): their parameters and the math that reads earlier layers.

Every mixer's parameters live in one top-level subtree "depth_mixer" with a leading axis over all N
blocks (or, for DenseFormer, one flat vector), created here with their paper's initialization. The
model turns them into one row per block (`layer_rows`) and hands block i its row with its own
parameters, {"block": ..., "mixer": row_i}, through the one block loop; so the mixer parameters need
no layout conversion between the scanned and the unscanned layout.

The residual state a block carries (`initial_state` -> ... -> `final_hidden`):
  * hyper-connections: the n streams [B, T, n, M] (copies of the embedding at the start, summed at
    the end);
  * value residual: (h [B, T, M], the first layer's values V_1 [B, T, Hk, D]);
  * every other mixer: h [B, T, M].
DenseFormer and attention residuals also read the outputs buffer of `depth_stream.Stream`.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from moda_jax.model.config import ModelConfig
from moda_jax.model.layers import dtype_of

# A parameter: (init(key, shape, dtype) -> array, shape, logical axis names).
_Spec = tuple[Callable, tuple[int, ...], tuple[str, ...]]


def _constant(value_fn) -> Callable:
  return lambda key, shape, dtype=jnp.float32: jnp.asarray(value_fn(), dtype).reshape(shape)


def _one_hot_stream(cfg: ModelConfig, sublayer: int) -> jax.Array:
  """[N, n]: e_{k mod n} for sublayer k = 2 b + sublayer of block b (HC's static A_m init)."""
  n = cfg.hyper_connections_streams
  k = 2 * jnp.arange(cfg.num_layers) + sublayer
  return jax.nn.one_hot(k % n, n)


def _hyper_connection_specs(cfg: ModelConfig, sublayer: int) -> dict[str, _Spec]:
  """One sublayer kind's (attention 0, FFN 1) hyper-connection parameters, for all N blocks.

  Dynamic HC (Zhu et al. 2025): static B = 1, A_m = e_{k mod n}, A_r = I (the residual network);
  dynamic weights W = 0 and scales s = 0.01. mHC (arXiv 2512.24880): projections phi = 0, gates
  alpha = 0.01 and static biases whose maps equal HC's init up to a 0.2 / n leak (docs/peers.md:
  H_pre sums to 1, H_post = 1, H_res ~ I, so at init it is the residual network exactly).
  """
  num, n, m = cfg.num_layers, cfg.hyper_connections_streams, cfg.d_model
  zeros, ones = nn.initializers.zeros, nn.initializers.ones
  small = _constant(lambda: jnp.full((num,), 0.01))
  if not cfg.hyper_connections_manifold:
    return {
        "static_beta": (ones, (num, n), ("layers", "mixer")),
        "static_alpha_m": (_constant(lambda: _one_hot_stream(cfg, sublayer)), (num, n), ("layers", "mixer")),
        "static_alpha_r": (_constant(lambda: jnp.broadcast_to(jnp.eye(n), (num, n, n))), (num, n, n),
                           ("layers", "mixer", "mixer_out")),
        "dynamic_beta": (zeros, (num, m), ("layers", "embed")),
        "dynamic_alpha_m": (zeros, (num, m), ("layers", "embed")),
        "dynamic_alpha_r": (zeros, (num, m, n), ("layers", "embed", "mixer")),
        "scale_alpha": (small, (num,), ("layers",)),
        "scale_beta": (small, (num,), ("layers",)),
    }
  leak = 0.2 / n
  pre = lambda: jax.scipy.special.logit((1 - n * leak) * _one_hot_stream(cfg, sublayer) + leak)
  diagonal = math.log((1 - (n - 1) * leak) * (n - 1) / ((n - 1) * leak))
  res = lambda: jnp.broadcast_to(diagonal * jnp.eye(n), (num, n, n))
  return {
      "phi_pre": (zeros, (num, n * m, n), ("layers", "embed", "mixer")),
      "phi_post": (zeros, (num, n * m, n), ("layers", "embed", "mixer")),
      "phi_res": (zeros, (num, n * m, n * n), ("layers", "embed", "mixer")),
      "bias_pre": (_constant(pre), (num, n), ("layers", "mixer")),
      "bias_post": (zeros, (num, n), ("layers", "mixer")),
      "bias_res": (_constant(res), (num, n, n), ("layers", "mixer", "mixer_out")),
      "gate_pre": (small, (num,), ("layers",)),
      "gate_post": (small, (num,), ("layers",)),
      "gate_res": (small, (num,), ("layers",)),
  }


def param_specs(cfg: ModelConfig) -> dict[str, Any]:
  """The mixer's parameters (nested dict of `_Spec`), each with its paper's initialization."""
  num, m = cfg.num_layers, cfg.d_model
  if cfg.outputs_per_block == 1:  # DenseFormer: DWA_i weights over X_0 .. X_{i+1}, flattened
    return {"dwa": (_constant(lambda: _dwa_identity(num)), (num * (num + 3) // 2,), ("mixer",))}
  if cfg.mixes_values:  # Learnable-ResFormer: (lambda_1, lambda_2) of blocks 1 .. N-1
    return {"lambdas": (_constant(lambda: jnp.full((num - 1, 2), 0.5)), (num - 1, 2), ("layers", "mixer"))}
  if cfg.hyper_streams:
    return {"attention": _hyper_connection_specs(cfg, 0), "mlp": _hyper_connection_specs(cfg, 1)}
  if cfg.attention_residuals:  # pseudo-queries: the FFN's input, the next consumer's input
    zeros = nn.initializers.zeros
    return {"query_mlp": (zeros, (num, m), ("layers", "embed")),
            "query_next": (zeros, (num, m), ("layers", "embed"))}
  return {}  # depth attention reads the depth stream with the attention's own projections


class MixerParams(nn.Module):
  """Creates the "depth_mixer" parameters (logically partitioned, nested like `param_specs`) and
  returns them as arrays."""

  config: ModelConfig
  path: tuple[str, ...] = ()

  @nn.compact
  def __call__(self) -> dict:
    specs = param_specs(self.config)
    for key in self.path:
      specs = specs[key]
    out = {}
    for name, spec in specs.items():
      if isinstance(spec, dict):
        out[name] = MixerParams(self.config, self.path + (name,), name=name)()
      else:
        init, shape, names = spec
        out[name] = self.param(name, nn.with_logical_partitioning(init, names), shape,
                               dtype_of(self.config.param_dtype))
    return out


def initial_values(cfg: ModelConfig) -> dict:
  """The mixer's parameters at their initialization, as the "depth_mixer" subtree holds them."""
  def values(specs):
    return {k: values(v) if isinstance(v, dict) else v[0](jax.random.key(0), v[1], jnp.float32)
            for k, v in specs.items()}
  return values(param_specs(cfg))


def _dwa_identity(num: int) -> jax.Array:
  """The flat DWA weights at init: 1 on each block's own output, 0 elsewhere (the identity)."""
  rows = [jnp.zeros(b + 2).at[b + 1].set(1.0) for b in range(num)]
  return jnp.concatenate(rows)


def _dwa_rows(num: int, flat: jax.Array) -> jax.Array:
  """[N, N + 1] DWA weights: row b holds the b + 2 weights of block b, then structural zeros."""
  offsets = [b * (b + 3) // 2 for b in range(num)]
  index = [[offsets[b] + j if j <= b + 1 else -1 for j in range(num + 1)] for b in range(num)]
  return jnp.take(flat, jnp.asarray(index), mode="fill", fill_value=0)


def layer_rows(cfg: ModelConfig, params: dict) -> dict:
  """The mixer parameters as one row per block (leading axis N, the last block included)."""
  if cfg.outputs_per_block == 1:
    return {"dwa": _dwa_rows(cfg.num_layers, params["dwa"])}
  if cfg.mixes_values:  # block 0 has no first layer to mix with: V' = 0 * (nothing) + 1 * V
    first = jnp.asarray([[0.0, 1.0]], params["lambdas"].dtype)
    return {"lambdas": jnp.concatenate([first, params["lambdas"]], axis=0)}
  return params


def zero_layer_params(cfg: ModelConfig) -> dict:
  """One block's mixer row filled with zeros: the shapes a block is initialized with."""
  rows = jax.eval_shape(lambda: layer_rows(cfg, initial_values(cfg)))
  return jax.tree.map(lambda s: jnp.zeros(s.shape[1:], s.dtype), rows)


def attach(cfg: ModelConfig, writers, last, rows):
  """The per-layer parameters {"block", "mixer"} of the writer blocks (stacked or a list, like
  `writers`) and of the last block."""
  if not cfg.has_mixer:
    return writers, last
  count = cfg.num_layers - 1
  last = {"block": last, "mixer": jax.tree.map(lambda a: a[count], rows)}
  if isinstance(writers, (list, tuple)):
    return [{"block": w, "mixer": jax.tree.map(lambda a, i=i: a[i], rows)} for i, w in enumerate(writers)], last
  return {"block": writers, "mixer": jax.tree.map(lambda a: a[:count], rows)}, last


def initial_state(cfg: ModelConfig, x_BTM: jax.Array):
  """The residual state the first block reads, from the embedding."""
  if cfg.hyper_streams:
    return jnp.broadcast_to(x_BTM[:, :, None], x_BTM.shape[:2] + (cfg.hyper_streams, x_BTM.shape[-1]))
  if cfg.mixes_values:
    return x_BTM, jnp.zeros(x_BTM.shape[:2] + (cfg.num_kv_heads, cfg.head_dim), x_BTM.dtype)
  return x_BTM


def final_hidden(cfg: ModelConfig, state) -> jax.Array:
  """The [B, T, M] hidden state the final norm reads."""
  if cfg.hyper_streams:
    return jnp.sum(state, axis=2)  # HC: the streams are summed
  if cfg.mixes_values:
    return state[0]
  return state


def mix_values(lambdas_2, v1_BTKD, v_BTKD):
  """Value residual: V' = lambda_1 V_1 + lambda_2 V_n (Learnable-ResFormer)."""
  lam = lambdas_2.astype(jnp.float32)
  mixed = lam[0] * v1_BTKD.astype(jnp.float32) + lam[1] * v_BTKD.astype(jnp.float32)
  return mixed.astype(v_BTKD.dtype)


def depth_weighted_average(weights_P, outs_BTPM, count, fresh_BTM):
  """DenseFormer's DWA: sum_j w_j X_j over the `count` buffered outputs, plus w_count * fresh.

  Slots at or above `count` (later writes in the final buffer) are masked out of the sum; the
  buffer is read in place in its own dtype (float32 accumulation)."""
  num_slots = outs_BTPM.shape[2]
  weights_P = weights_P.astype(jnp.float32)
  visible = jnp.arange(num_slots) < count
  buffer_weights_P = jnp.where(visible, weights_P[:num_slots], 0.0).astype(outs_BTPM.dtype)
  buffered = jnp.einsum("btpm,p->btm", outs_BTPM, buffer_weights_P, preferred_element_type=jnp.float32)
  fresh = jax.lax.dynamic_index_in_dim(weights_P, count, keepdims=False) * fresh_BTM.astype(jnp.float32)
  return (buffered + fresh).astype(fresh_BTM.dtype)


def attention_residual(query_M, outs_BTPM, count, fresh: list, eps: float):
  """Attention residuals: softmax_i(w . RMSNorm(v_i)) weighted sum of v_i over the `count`
  buffered outputs and the block's fresh ones (the RMSNorm gain is folded into w).

  The buffer is read in place (no concatenation with the fresh outputs, no normalized copy): a
  copy of it per read would be one more buffer-sized temporary in every layer's backward pass."""
  query = query_M.astype(jnp.float32)

  def logits(v_BTXM):
    dots = jnp.einsum("btxm,m->btx", v_BTXM, query.astype(v_BTXM.dtype), preferred_element_type=jnp.float32)
    mean_square = jnp.einsum("btxm,btxm->btx", v_BTXM, v_BTXM, preferred_element_type=jnp.float32)
    return dots * jax.lax.rsqrt(mean_square / v_BTXM.shape[-1] + eps)
  fresh_BTFM = jnp.stack(fresh, axis=2)
  num_slots = outs_BTPM.shape[2]
  visible = jnp.arange(num_slots) < count
  logits_BTX = jnp.concatenate([jnp.where(visible[None, None], logits(outs_BTPM), -jnp.inf), logits(fresh_BTFM)],
                               axis=-1)
  weights_BTX = jax.nn.softmax(logits_BTX, axis=-1)
  mixed = (jnp.einsum("btp,btpm->btm", weights_BTX[..., :num_slots].astype(outs_BTPM.dtype), outs_BTPM,
                      preferred_element_type=jnp.float32)
           + jnp.einsum("btf,btfm->btm", weights_BTX[..., num_slots:], fresh_BTFM.astype(jnp.float32)))
  return mixed.astype(fresh[0].dtype)
