"""`Transformer`: embed -> depth-writing blocks -> last block -> final norm -> float32 logits.

With `return_hidden=True` it stops before the output layer and returns the final-normed hidden states
and the output layer as data (`layers.Unembedding`): a loss can then form the [B, T, V] logits a chunk
of tokens at a time (`moda_jax/train/loss.py`) instead of holding them all in float32.

Parameter layout (`param_layout.py` converts between the two):
  scan_layers=True:  embed, blocks (leading "layers" axis, N - 1 blocks), last_block, final_norm[, unembed]
  scan_layers=False: embed, block_0 ... block_{N-2}, last_block, final_norm[, unembed]
The last block is separate because it writes no depth slots (nothing reads them), so with FFN-KV or
extra attention depth projections it has fewer parameters than the others.

The module creates the parameters; the blocks always run through `block_loop` as pure functions of
them, the same loop for every caller:
  * training / scoring (`model.apply(params, tokens)`): with depth, the writer blocks run inside
    `depth_stack.linear_memory_stack`, a `jax.custom_vjp` whose memory is linear in depth; without
    depth, a plain loop (with `config.remat`);
  * decoding (`model.apply(params, tokens, cache=...)`, see `decode.py`): the same loop carrying each
    layer's sequence KV cache.
A depth mixer (docs/peers.md) adds the top-level "depth_mixer" parameters (one row per block, handed
to the blocks with their own), widens the carried residual state (`mixers.initial_state`) and, for
DenseFormer and attention residuals, an outputs buffer to the stream; the loops stay the same.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moda_jax.model import block_loop
from moda_jax.model import depth_stream
from moda_jax.model.config import ModelConfig
from moda_jax.model.depth_stack import linear_memory_stack
from moda_jax.model import kv_cache
from moda_jax.model import mixers
from moda_jax.model import param_layout
from moda_jax.model.kv_cache import Cache
from moda_jax.model.layers import Embedding, RMSNorm, Unembedding, dtype_of

_ACT = ("act_batch", "act_len", "act_embed")


class Transformer(nn.Module):
  """OLMo2-style decoder with a MoDA depth stream; see `ModelConfig`."""

  config: ModelConfig

  @nn.compact
  def __call__(self, tokens_BT: jax.Array, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None, *, cache: Cache | None = None,
               return_probs: bool = False, return_hidden: bool = False):
    """tokens [B, T] int -> logits [B, T, V] float32; with `cache`, (logits, cache, probs).

    Args:
      tokens_BT: token ids.
      segment_ids: optional [B, T] int document ids of packed sequences: attention never crosses
        segments (the depth stream is per token, so it needs no mask).
      positions: optional [B, T] int RoPE positions; default arange(T) for every row.
      cache: decoding (`decode.py`): the tokens continue the cached ones at positions cache.length ..
        (one document per row, all rows at the same position); returns the updated cache too.
      return_probs: with `cache`, also return the attention probabilities [N, B, T, H, S_max + L_max]
        of every attention sublayer (sequence columns first, then depth slots); else None.
      return_hidden: without `cache`, return (hidden_BTM, unembedding) instead of the logits: the
        final-normed hidden states in the compute dtype and a `layers.Unembedding` whose
        `logits(hidden_BTM)` are exactly the logits this call would return.
    """
    cfg = self.config
    if return_hidden and cache is not None:
      raise ValueError("return_hidden=True was given with cache: decoding returns logits; pass one "
                       "of them.")
    batch, seq_len = _validate_inputs(cfg, tokens_BT, segment_ids, positions, cache)
    if cache is not None:
      positions = jnp.broadcast_to(cache.length + jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len))
    elif positions is None:
      positions = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len))

    embedding = Embedding(cfg, name="embed")
    x_BTM = nn.with_logical_constraint(embedding(tokens_BT), _ACT)
    writers = self._writer_params()
    last = self.param("last_block", block_loop.init_block_params(cfg, writes_depth=False))
    if cfg.has_mixer:  # docs/peers.md: each block gets its row of the mixer's parameters
      rows = mixers.layer_rows(cfg, mixers.MixerParams(cfg, name="depth_mixer")())
      writers, last = mixers.attach(cfg, writers, last, rows)
    state = mixers.initial_state(cfg, x_BTM)
    stream = depth_stream.start(cfg, state)

    block_caches, probs = None, []
    ring = None if cache is None else kv_cache.ring_of(cfg, cache)
    if cache is not None:
      step = block_loop.writer_step(block_loop.block_fn(cfg, True), positions, None, return_probs, ring)
      (state, stream), outs = block_loop.over_layers(
          step, (state, stream), writers, (cache.blocks_k_NBSKD, cache.blocks_v_NBSKD))
      if outs is not None:  # None: a one-layer model has no writer blocks
        block_caches, block_probs = outs
        probs = [] if block_probs is None else list(block_probs)
    elif cfg.uses_linear_stack:
      state, stream = linear_memory_stack(block_loop.block_fn(cfg, True), writers, state,
                                          positions, segment_ids, config=cfg)
    else:
      step = block_loop.writer_step(block_loop.block_fn(cfg, True), positions, segment_ids)
      (state, stream), _ = block_loop.over_layers(step, (state, stream), writers)

    last_cache = None
    if cache is not None:
      last_cache = (cache.last_k_BSKD, cache.last_v_BSKD) + (() if ring is None else (ring,))
    state, _, last_cache, last_probs, _ = block_loop.block_fn(cfg, False)(
        last, state, stream, positions, segment_ids, last_cache, return_probs)
    x_BTM = mixers.final_hidden(cfg, state)
    x_BTM = RMSNorm(cfg, name="final_norm")(x_BTM)

    if cfg.tie_embeddings:
      unembedding = Unembedding(embedding.embedding, vocab_first=True)
    else:
      unembed_MV = self.param(
          "unembed",
          nn.with_logical_partitioning(nn.initializers.normal(stddev=cfg.init_std), ("embed", "vocab")),
          (cfg.d_model, cfg.vocab_size), dtype_of(cfg.param_dtype))
      unembedding = Unembedding(unembed_MV, vocab_first=False)
    if return_hidden:
      return x_BTM, unembedding
    logits_BTV = unembedding.logits(x_BTM)
    if cache is None:
      return logits_BTV
    if block_caches is None:
      block_caches = (cache.blocks_k_NBSKD, cache.blocks_v_NBSKD)
    new_cache = Cache(*block_caches, *last_cache, cache.length + seq_len, cache.chunk_k_BCLKD,
                      cache.chunk_v_BCLKD)
    new_cache = kv_cache.update_ring(cfg, new_cache, stream, positions)
    all_probs = jnp.stack(probs + [last_probs]) if return_probs else None
    return logits_BTV, new_cache, all_probs

  def _writer_params(self):
    """The N - 1 depth-writing blocks' parameters: stacked (scan_layers) or a list."""
    cfg = self.config
    count = cfg.num_layers - 1
    if not count:
      return []
    if cfg.scan_layers:
      return self.param("blocks", block_loop.init_stacked_params(cfg, count))
    names = [param_layout.looped_name(i) for i in range(count)]
    if self.is_initializing():
      # One key for all blocks, drawn where the scanned layout draws "blocks"'s: a seed gives both
      # layouts the same values (and the same keys to every parameter created after these).
      for name, boxed in zip(names, block_loop.init_looped_params(cfg, count)(self.make_rng("params"))):
        self.put_variable("params", name, boxed)
    return [nn.meta.unbox(self.get_variable("params", name)) for name in names]


def _validate_inputs(cfg: ModelConfig, tokens_BT, segment_ids, positions, cache) -> tuple[int, int]:
  if tokens_BT.ndim != 2 or not jnp.issubdtype(tokens_BT.dtype, jnp.integer):
    raise ValueError(f"tokens has shape {tokens_BT.shape} and dtype {tokens_BT.dtype}: expected "
                     "integer token ids of shape [B, T].")
  batch, seq_len = tokens_BT.shape
  if seq_len > cfg.max_seq_len:
    raise ValueError(f"tokens has T={seq_len} tokens: expected T <= max_seq_len={cfg.max_seq_len}.")
  for name, ids in (("segment_ids", segment_ids), ("positions", positions)):
    if ids is not None and (ids.shape != (batch, seq_len) or not jnp.issubdtype(ids.dtype, jnp.integer)):
      raise ValueError(f"{name} has shape {ids.shape} and dtype {ids.dtype}: expected integers of "
                       f"shape [B={batch}, T={seq_len}] like tokens.")
    if ids is not None and cache is not None:
      raise ValueError(f"{name} was given with cache: decoding continues each row as one document at "
                       "positions cache.length ...; pass neither.")
  return batch, seq_len
