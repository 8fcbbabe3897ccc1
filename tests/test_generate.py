"""Cached decoding (`decode.py`) and generation (`generate.py`) against the full forward pass."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oracle
from moda_jax import ModelConfig, Transformer
from moda_jax.model import decode, depth_stream, kv_cache
from moda_jax.eval import generate

# float32 everywhere; the cached path sums in a different order than the kernels (measured max
# |diff| ~3e-6 on logits of magnitude ~4).
LOGIT_ATOL = 5e-5


def _config(**overrides):
  base = dict(vocab_size=64, num_layers=3, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
              mlp_dim=48, max_seq_len=24, init_std=0.2, attention_impl="reference")
  return ModelConfig(**(base | overrides))


@functools.lru_cache(maxsize=None)  # configs are hashable; tests sharing one skip re-initializing
def _params(cfg, seed=0):
  tokens = jnp.zeros((1, 8), jnp.int32)
  return nn.meta.unbox(jax.jit(Transformer(cfg).init)(jax.random.PRNGKey(seed), tokens)["params"])


# Every norm placement and depth variant once (the decode tree mirrors Block's wiring). The full
# model uses the dense `reference` kernel, the cheapest to compile (the kernels' agreement with it
# is tested in test_moda_attention.py), except in the first case, which checks the CPU default.
@pytest.mark.parametrize("overrides", [
    dict(attention_impl=None),                                 # reordered, attn_ffn, scanned, GQA
    dict(norm="pre", depth_kv="attn_ffn_extra", scan_layers=False, tie_embeddings=True),
    dict(norm="post", depth_kv="attn", num_kv_heads=4, qk_norm=False, num_layers=2),
], ids=["reordered-attn_ffn-scan-default_impl", "pre-extra-loop-tied", "post-attn-mha"])
def test_cached_steps_equal_full_forward(overrides):
  cfg = _config(**overrides)
  params = _params(cfg)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 11), 0, cfg.vocab_size)
  full = jax.jit(Transformer(cfg).apply)({"params": params}, tokens)

  step = jax.jit(lambda p, t, c: decode.decode_step(cfg, p, t, c))
  cache = decode.init_cache(cfg, 2, 16)
  logits, cache, _ = step(params, tokens[:, :5], cache)               # prefill
  pieces = [logits]
  for t in range(5, 11):                                             # then one token at a time
    logits, cache, _ = step(params, tokens[:, t:t + 1], cache)
    pieces.append(logits)
  cached = jnp.concatenate(pieces, axis=1)
  assert int(cache.length) == 11
  np.testing.assert_allclose(cached, full, atol=LOGIT_ATOL, rtol=0)
  assert float(jnp.abs(full).max()) > 1.0  # logits far from 0: the comparison has teeth


def test_cache_holds_no_depth_state():
  """Plain MoDA's depth attention is own-token only: nothing about depth survives a step. The cache
  is exactly one K and one V per attention sublayer and position."""
  cfg = _config()
  cache = decode.init_cache(cfg, 2, 16)
  per_position = sum(a.size for a in cache[:4]) // (2 * 16)
  assert per_position == 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim


@pytest.mark.parametrize("causal_cache", [16, 11])
def test_cached_attention_matches_float64_oracle(causal_cache):
  """Decode attention with the whole text written into the cache (plus unused cache rows) is MoDA
  attention."""
  rng = np.random.default_rng(0)
  b, t, h, k, d, slots, depth_len = 2, 11, 4, 2, 8, 5, 3
  q = rng.normal(size=(b, t, h, d)).astype(np.float32)
  keys, values = (rng.normal(size=(b, t, k, d)).astype(np.float32) for _ in range(2))
  dk, dv = (rng.normal(size=(b, t, slots, k, d)).astype(np.float32) for _ in range(2))
  empty = np.full((b, causal_cache, k, d), 7.0, np.float32)  # unwritten rows must be invisible
  positions = np.broadcast_to(np.arange(t), (b, t))
  stream = depth_stream.DepthKV(jnp.asarray(dk), jnp.asarray(dv), jnp.int32(depth_len))
  out, (cache_k, _), probs = kv_cache.cached_attention(
      _config(), jnp.asarray(q), jnp.asarray(keys), jnp.asarray(values), None, stream, None,
      jnp.asarray(positions), (jnp.asarray(empty), jnp.asarray(empty)), return_probs=True)
  want, _ = oracle.forward(q, keys, values, dk, dv, depth_len=depth_len)
  np.testing.assert_allclose(out, want, atol=2e-6, rtol=2e-6)
  np.testing.assert_array_equal(cache_k[:, :t], keys)
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)
  probs = np.asarray(probs)
  assert np.all(probs[..., t:causal_cache] == 0)                # unwritten cache rows
  assert np.all(probs[..., causal_cache + depth_len:] == 0)     # unwritten depth slots


def test_greedy_generation_is_argmax_of_full_forward():
  cfg = _config()
  params = _params(cfg)
  prompt = jax.random.randint(jax.random.PRNGKey(2), (2, 6), 0, cfg.vocab_size)
  tokens, logits = generate.generate(cfg, params, prompt, max_new_tokens=8)
  sequence = jnp.concatenate([prompt, tokens], axis=1)
  full = jax.jit(Transformer(cfg).apply)({"params": params}, sequence)[:, 5:-1]  # -> tokens[:, i]
  np.testing.assert_allclose(logits, full, atol=LOGIT_ATOL, rtol=0)
  np.testing.assert_array_equal(tokens, jnp.argmax(full, axis=-1))


def test_rows_stop_independently_and_then_pad():
  cfg = _config()
  params = _params(cfg)
  prompt = jax.random.randint(jax.random.PRNGKey(2), (2, 6), 0, cfg.vocab_size)
  free, _ = generate.generate(cfg, params, prompt, max_new_tokens=8)
  stop = int(free[0, 2])
  stopped, _ = generate.generate(cfg, params, prompt, max_new_tokens=8, stop_tokens=[stop],
                                 pad_token=-1)
  for row_free, row in zip(np.asarray(free), np.asarray(stopped)):
    hits = np.flatnonzero(row_free == stop)
    end = hits[0] + 1 if hits.size else len(row_free)
    np.testing.assert_array_equal(row[:end], row_free[:end])
    assert np.all(row[end:] == -1)


def test_top_k_and_top_p_keep_the_right_tokens():
  probs = np.array([[0.5, 0.05, 0.3, 0.15]])
  logits = jnp.log(jnp.asarray(probs))
  kept = lambda s: np.isfinite(np.asarray(generate.filter_logits(logits, s)))[0].tolist()
  assert kept(generate.Sampling(1.0, top_k=2)) == [True, False, True, False]
  # Nucleus: smallest set with mass >= p, in order 0.5, 0.3, 0.15, 0.05.
  assert kept(generate.Sampling(1.0, top_p=0.7)) == [True, False, True, False]
  assert kept(generate.Sampling(1.0, top_p=0.81)) == [True, False, True, True]
  assert kept(generate.Sampling(1.0, top_p=0.1)) == [True, False, False, False]


def test_temperature_sampling_follows_the_distribution():
  probs = np.array([0.5, 0.05, 0.3, 0.15])
  logits = jnp.broadcast_to(jnp.log(jnp.asarray(probs)) * 2.0, (20000, 4))  # / T=2 -> probs
  draws = generate.sample(logits, jax.random.PRNGKey(0), generate.Sampling(temperature=2.0))
  freq = np.bincount(np.asarray(draws), minlength=4) / draws.shape[0]
  # 4.5 binomial standard deviations at n = 20000: a false failure has probability < 1e-4.
  np.testing.assert_allclose(freq, probs, atol=4.5 * np.sqrt(0.25 / 20000))


@pytest.mark.parametrize("kwargs, match", [
    (dict(sampling=dict(temperature=-1.0)), "temperature"),
    (dict(sampling=dict(top_p=0.0)), "top_p"),
    (dict(sampling=dict(top_k=-2)), "top_k"),
    (dict(sampling=dict(temperature=1.0, top_k=65)), "top_k"),
    (dict(max_new_tokens=30), "max_new_tokens"),
])
def test_bad_generation_arguments_raise(kwargs, match):
  cfg = _config()
  with pytest.raises(ValueError, match=match):
    sampling = generate.Sampling(**kwargs.pop("sampling", {}))
    generate.generate(cfg, {}, np.zeros((1, 4), np.int32), sampling=sampling,
                      **({"max_new_tokens": 4} | kwargs))
