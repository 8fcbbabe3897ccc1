"""Shared small model cases for the model tests: configs, random params, cached compiled functions.

Compiling is the slow part of these tests on a CPU box, so forward and gradient functions are
compiled once per (hashable, frozen) config and shared by every test that needs them.
"""

import contextlib
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moda_jax import ModelConfig, Transformer
from moda_jax.model import block_loop, decode, depth_stream, transformer

VOCAB = 37
TOKENS = np.random.default_rng(0).integers(0, VOCAB, size=(2, 12)).astype(np.int32)


def config(**overrides) -> ModelConfig:
  base = dict(vocab_size=VOCAB, num_layers=3, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
              mlp_dim=48, max_seq_len=16, init_std=0.2, attention_impl="reference", rope_theta=100.0)
  return ModelConfig(**{**base, **overrides})


def random_params(cfg: ModelConfig, seed: int = 0, tokens=TOKENS) -> dict:
  """float32 params of the model's shapes, every leaf (norm scales too) random, without compiling
  `init`: N(1, 0.1) for norm scales, N(0, init_std) otherwise."""
  shapes = nn.meta.unbox(jax.eval_shape(Transformer(cfg).init, jax.random.key(0), tokens)["params"])
  rng = np.random.default_rng(seed)

  def draw(path, s):
    is_norm = jax.tree_util.keystr(path).endswith("['scale']")
    mean, std = (1.0, 0.1) if is_norm else (0.0, cfg.init_std)
    return (mean + std * rng.standard_normal(s.shape)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.cache
def forward_fn(cfg: ModelConfig):
  return jax.jit(lambda params, tokens, seg=None, pos=None: Transformer(cfg).apply(
      {"params": params}, tokens, segment_ids=seg, positions=pos))


def loss(cfg: ModelConfig, params, tokens):
  """A scalar touching every logit with distinct weights, so no gradient cancels by symmetry."""
  logits = Transformer(cfg).apply({"params": params}, tokens)
  weights = jnp.sin(jnp.arange(logits.size, dtype=jnp.float32)).reshape(logits.shape)
  return jnp.sum(logits * weights)


@functools.cache
def grad_fn(cfg: ModelConfig):
  return jax.jit(jax.value_and_grad(functools.partial(loss, cfg)))


def naive_stack(layer_fn, layer_params, x_BTM, positions_BT, segment_ids_BT, *, config):
  """`depth_stack.linear_memory_stack` without its custom_vjp: the same block loop under plain
  autodiff, which saves one depth buffer pair per layer (memory quadratic in depth). The oracle of
  the linear-memory stack; it exists only here, in the tests."""
  step = block_loop.writer_step(layer_fn, positions_BT, segment_ids_BT)
  stream = depth_stream.start(config, x_BTM)  # empty buffers (+ a depth mixer's embedding slot)
  (x_BTM, stream), _ = block_loop.over_layers(step, (x_BTM, stream), layer_params)
  return x_BTM, stream


@contextlib.contextmanager
def naive_depth_memory():
  """Within this context, functions traced for the first time run the naive stack (the patch acts
  at trace time, so jit a fresh function inside it)."""
  original = transformer.linear_memory_stack
  transformer.linear_memory_stack = naive_stack
  try:
    yield
  finally:
    transformer.linear_memory_stack = original


def naive_value_and_grad(cfg: ModelConfig, params, tokens):
  """`grad_fn(cfg)(params, tokens)` with the naive stack: plain autodiff through every block."""
  with naive_depth_memory():
    return jax.jit(jax.value_and_grad(functools.partial(loss, cfg)))(params, tokens)


def embedding_influence(cfg: ModelConfig, params, tokens=TOKENS) -> np.ndarray:
  """[b, t, b', s]: |d (a weighted sum of logits[b, t]) / d (input embedding[b', s])| summed over the
  embedding axis, through a perturbation added to the embedding module's output. Causality means it
  is exactly 0 unless b' == b and s <= t."""
  batch, seq_len = tokens.shape

  def per_token_output(delta_BTM):
    def add_delta(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      is_embed = context.module.name == "embed" and context.method_name == "__call__"
      return out + delta_BTM if is_embed else out
    with nn.intercept_methods(add_delta):
      logits = Transformer(cfg).apply({"params": params}, tokens)
    return jnp.sum(logits * jnp.cos(jnp.arange(cfg.vocab_size, dtype=jnp.float32))[None, None], axis=-1)

  jac = jax.jit(jax.jacrev(per_token_output))(jnp.zeros((batch, seq_len, cfg.d_model)))
  return np.abs(np.asarray(jac)).sum(-1)


def causal_pattern(batch: int, seq_len: int) -> np.ndarray:
  """[b, t, b', s] True where causality allows an influence: same row, s <= t."""
  same_row = np.eye(batch, dtype=bool)[:, None, :, None]
  return same_row & np.tril(np.ones((seq_len, seq_len), bool))[None, :, None, :]


def decoded_logits(cfg: ModelConfig, params, tokens, prefill: int):
  """Logits of `tokens` decoded as a prefill of `prefill` tokens, then one token at a time."""
  step = jax.jit(lambda p, t, c: decode.decode_step(cfg, p, t, c))
  cache = decode.init_cache(cfg, tokens.shape[0], cfg.max_seq_len)
  logits, cache, _ = step(params, tokens[:, :prefill], cache)
  pieces = [logits]
  for t in range(prefill, tokens.shape[1]):
    logits, cache, _ = step(params, tokens[:, t:t + 1], cache)
    pieces.append(logits)
  return jnp.concatenate(pieces, axis=1)


@functools.cache
def train_step_bytes(cfg: ModelConfig, batch: int, seq_len: int, naive: bool = False) -> tuple[int, int]:
  """(temp + argument bytes, float32 parameter bytes) of a compiled gradient step on [batch, seq_len]
  tokens, from `memory_analysis()`; `naive` traces it with the naive depth stack."""
  tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
  params = nn.meta.unbox(jax.eval_shape(Transformer(cfg).init, jax.random.key(0), tokens)["params"])

  def loss(params, tokens):
    logits = Transformer(cfg).apply({"params": params}, tokens)
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1))

  with naive_depth_memory() if naive else contextlib.nullcontext():
    analysis = jax.jit(jax.grad(loss)).lower(params, tokens).compile().memory_analysis()
  param_bytes = sum(int(np.prod(p.shape)) * 4 for p in jax.tree.leaves(params))
  return analysis.temp_size_in_bytes + analysis.argument_size_in_bytes, param_bytes
