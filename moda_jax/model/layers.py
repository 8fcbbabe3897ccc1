"""Parameterized building blocks without attention: RMSNorm, SwiGLU MLP, embedding, projections.

Every parameter carries logical axis names (`nn.with_logical_partitioning`) from the fixed set
"vocab", "embed", "q_heads", "kv_heads", "head_dim", "mlp", "norm" so that training can shard it.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from moda_jax.model.config import ModelConfig


def dtype_of(name: str):
  return jnp.dtype(name)


class Projection(nn.Module):
  """A bias-free linear map contracting the last `num_contracted` input axes into `features`.

  Not `nn.DenseGeneral`: it initializes a flattened 2-D kernel and boxes it with our 3 axis names,
  which fails as soon as logical-axis rules and a mesh are active (sharded init).
  """

  config: ModelConfig
  features: tuple[int, ...]
  names: tuple[str, ...]
  num_contracted: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    shape = x.shape[x.ndim - self.num_contracted:] + self.features
    kernel = self.param(
        "kernel",
        nn.with_logical_partitioning(nn.initializers.normal(stddev=cfg.init_std), self.names),
        shape, dtype_of(cfg.param_dtype))
    dtype = dtype_of(cfg.dtype)
    return jnp.tensordot(x.astype(dtype), kernel.astype(dtype), axes=self.num_contracted)


def projection(config: ModelConfig, features, axis, names: Sequence[str], name: str) -> Projection:
  """A `Projection` contracting the trailing input axes `axis` (-1 or (-2, -1), as in DenseGeneral)."""
  features = tuple(features) if isinstance(features, (tuple, list)) else (features,)
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  if sorted(axes) != list(range(-len(axes), 0)):
    raise ValueError(f"axis={axis!r}: expected trailing input axes such as -1 or (-2, -1).")
  return Projection(config, features, tuple(names), len(axes), name=name)


def _rms_normalize_f32(x: jax.Array, eps: float) -> jax.Array:
  """x / rms(x) over the last axis (no gain), in float32."""
  x32 = x.astype(jnp.float32)
  mean_square = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
  return x32 * jax.lax.rsqrt(mean_square + eps)


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
  """x / rms(x) over the last axis (no gain), computed in float32, in x's dtype."""
  return _rms_normalize_f32(x, eps).astype(x.dtype)


class RMSNorm(nn.Module):
  """x / rms(x) * scale over the last axis, computed in float32."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), dtype_of(self.config.param_dtype))
    normed = _rms_normalize_f32(x, self.config.norm_eps)
    scale = jnp.reshape(scale.astype(jnp.float32), (1,) * (x.ndim - 1) + (-1,))
    return (normed * scale).astype(x.dtype)


def norm_gain(norm: RMSNorm) -> jax.Array:
  """The [D] `scale` of an RMSNorm submodule that has already been called (so it is initialized)."""
  return nn.meta.unbox(norm.variables["params"]["scale"])


def depth_key(config: ModelConfig, k_BTKD: jax.Array) -> jax.Array:
  """A key as the depth buffer stores it: with QK-norm, RMS-normalized but without any gain.

  Every reader's k-norm is rms_normalize(k) * gain_reader with the same eps, so the normalization is
  done once here and each reader folds its gain into its depth query instead (q . (gain * k_hat) =
  (q * gain) . k_hat): readers never rewrite the [B, T, L, Hk, D] buffer.
  """
  return rms_normalize(k_BTKD, config.norm_eps) if config.qk_norm else k_BTKD


class SwiGLU(nn.Module):
  """silu(x W_gate) * (x W_up) W_down."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x_BTM: jax.Array) -> jax.Array:
    cfg = self.config
    gate_BTF = projection(cfg, cfg.mlp_dim, -1, ("embed", "mlp"), "gate")(x_BTM)
    up_BTF = projection(cfg, cfg.mlp_dim, -1, ("embed", "mlp"), "up")(x_BTM)
    hidden_BTF = nn.with_logical_constraint(nn.silu(gate_BTF) * up_BTF, ("act_batch", "act_len", "mlp"))
    return projection(cfg, cfg.d_model, -1, ("mlp", "embed"), "down")(hidden_BTF)


class DepthKVProjection(nn.Module):
  """The light K/V projection d_model -> 2 * Hk * D whose output becomes one depth slot.

  The key comes out as the buffer stores it (`depth_key`: gain-free RMS-normalized with QK-norm)."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x_BTM: jax.Array) -> tuple[jax.Array, jax.Array]:
    cfg = self.config
    features = (cfg.num_kv_heads, cfg.head_dim)
    names = ("embed", "kv_heads", "head_dim")
    return (depth_key(cfg, projection(cfg, features, -1, names, "key")(x_BTM)),
            projection(cfg, features, -1, names, "value")(x_BTM))


class Embedding(nn.Module):
  """Token embedding [V, M] (with tied embeddings also the output layer: `Unembedding(table, True)`)."""

  config: ModelConfig

  def setup(self):
    cfg = self.config
    self.embedding = self.param(
        "embedding",
        nn.with_logical_partitioning(nn.initializers.normal(stddev=cfg.init_std), ("vocab", "embed")),
        (cfg.vocab_size, cfg.d_model), dtype_of(cfg.param_dtype))

  def __call__(self, tokens_BT: jax.Array) -> jax.Array:
    return jnp.take(self.embedding, tokens_BT, axis=0).astype(dtype_of(self.config.dtype))


@flax.struct.dataclass
class Unembedding:
  """The output layer as data, so a loss can compute logits a chunk of tokens at a time.

  `table` is the parameter as stored (float32 master copy): the embedding [V, M] when tied
  (`vocab_first`), the "unembed" kernel [M, V] otherwise. The rule for logits is written once, here:
  the table cast to the hidden states' (compute) dtype, contracted with float32 accumulation into
  float32 logits, no soft-capping or scaling; in the backward pass the logits' cotangent is rounded to
  the compute dtype, as every other layer's is (`_logits`).
  """

  table: jax.Array
  vocab_first: bool = flax.struct.field(pytree_node=False)

  def logits(self, x_NM: jax.Array) -> jax.Array:
    """x [..., M] -> float32 logits [..., V]."""
    spec = "...m,vm->...v" if self.vocab_first else "...m,mv->...v"
    return _logits(spec, x_NM, self.table.astype(x_NM.dtype))


# Why a custom_vjp: autodiff of an einsum with float32 output hands its two backward matmuls a float32
# cotangent, and XLA runs them as float32 (TF32) GEMMs with the bf16 operand upcast. At the 700M shape
# they were 45 ms of a 0.48 s step on the H200, 2-3x the bf16 forward matmul (BENCHMARKS.md §0c). The
# backward here is the same einsum's VJP with the cotangent in the compute dtype: bf16 GEMMs that
# accumulate in float32, as everywhere else in the model. The forward is unchanged (float32 logits).
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _logits(spec: str, x_NM: jax.Array, table: jax.Array) -> jax.Array:
  return jnp.einsum(spec, x_NM, table, preferred_element_type=jnp.float32)


def _logits_fwd(spec, x_NM, table):
  return _logits(spec, x_NM, table), (x_NM, table)


def _logits_bwd(spec, residuals, d_logits_NV):
  x_NM, table = residuals
  d_logits_NV = d_logits_NV.astype(x_NM.dtype)
  # The contraction is linear in each operand: its transposes are the two backward matmuls.
  (d_x_NM,) = jax.linear_transpose(lambda x: jnp.einsum(spec, x, table), x_NM)(d_logits_NV)
  (d_table,) = jax.linear_transpose(lambda t: jnp.einsum(spec, x_NM, t), table)(d_logits_NV)
  return d_x_NM, d_table


_logits.defvjp(_logits_fwd, _logits_bwd)
