"""Incremental (cached) forward pass of `Transformer`, for generation and attention inspection.

`moda_attention` attends T queries to the same T keys; decoding attends a few new tokens to every key
seen so far. `DecodingTransformer` is therefore a second module tree with the *same parameter names*
as `Transformer` (params from `init`, training or a checkpoint apply unchanged) whose attention reads
a per-layer sequence KV cache.

Caches:
  * sequence: per attention sublayer, K (after QK-norm and RoPE, i.e. exactly what the logits read)
    and V for every position written so far: [B, S_max, Hk, D] each.
  * depth: depth attention is own-token only, so a token's depth slots are produced during its own
    forward pass and read by no later token. The depth "cache" is the new tokens' depth stream
    (`depth_stream.DepthKV`, [B, T_new, L, Hk, D]: O(L * Hk * D) per token), built layer by layer during
    the step and dropped afterwards; nothing about depth is stored across steps.

Attention here is dense (one float32 softmax over [cached keys | own depth slots], like
`pallas_kernels.reference`): decoding is memory-bound on the cache, and the probabilities are
wanted anyway for the analysis (`return_probs=True`).
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from moda_jax.model import block
from moda_jax.model import depth_stream
from moda_jax.model.attention import project_inputs
from moda_jax.model.config import ModelConfig
from moda_jax.model.layers import DepthKVProjection, Embedding, RMSNorm, SwiGLU, dtype_of, projection


class Cache(NamedTuple):
  """Sequence K/V of every attention sublayer; the N - 1 depth-writing blocks are stacked first."""

  blocks_k_NBSKD: jax.Array  # [N - 1, B, S_max, Hk, D]
  blocks_v_NBSKD: jax.Array
  last_k_BSKD: jax.Array     # the last block's attention
  last_v_BSKD: jax.Array
  length: jax.Array          # int32 scalar: positions 0 .. length - 1 are filled

  @property
  def max_len(self) -> int:
    return self.last_k_BSKD.shape[1]


def init_cache(config: ModelConfig, batch: int, max_len: int) -> Cache:
  """An empty cache for `batch` rows of up to `max_len` tokens (<= config.max_seq_len)."""
  if not 1 <= max_len <= config.max_seq_len:
    raise ValueError(f"max_len={max_len}: expected 1 <= max_len <= max_seq_len={config.max_seq_len}.")
  layer = (batch, max_len, config.num_kv_heads, config.head_dim)
  dtype = jnp.dtype(config.dtype)
  blocks = jnp.zeros((config.num_layers - 1,) + layer, dtype)
  last = jnp.zeros(layer, dtype)
  return Cache(blocks, blocks, last, last, jnp.zeros((), jnp.int32))


def attend(q_BTHD, k_BSKD, v_BSKD, depth_k_BTLKD, depth_v_BTLKD, depth_len, positions_BT,
           depth_q_BTHD=None):
  """Dense MoDA attention of T queries over S cached keys and each query's own depth slots.

  Key s is visible to the query at position p iff s <= p (causal over the cache); depth slot l iff
  l < depth_len. Depth slots are scored with depth_q (None: q), as in `moda_attention`. Returns
  (out_BTHD in q's dtype, probs_BTHC float32) with C = S + L columns ordered
  [sequence | depth] (L = 0 without depth buffers).
  """
  batch, seq_len, num_heads, head_dim = q_BTHD.shape
  num_kv = k_BSKD.shape[2]
  group = num_heads // num_kv
  scale = head_dim ** -0.5
  # GQA: query head h = k * G + g reads kv head k (the `jax.nn.dot_product_attention` convention).
  q_BTKGD = q_BTHD.astype(jnp.float32).reshape(batch, seq_len, num_kv, group, head_dim)
  logits = jnp.einsum("btkgd,bskd->btkgs", q_BTKGD, k_BSKD.astype(jnp.float32)) * scale
  visible_BTS = jnp.arange(k_BSKD.shape[1])[None, None, :] <= positions_BT[:, :, None]
  logits = jnp.where(visible_BTS[:, :, None, None, :], logits, -jnp.inf)
  num_seq = logits.shape[-1]
  if depth_k_BTLKD is not None:
    depth_q_BTKGD = q_BTKGD if depth_q_BTHD is None else (
        depth_q_BTHD.astype(jnp.float32).reshape(q_BTKGD.shape))
    depth_logits = jnp.einsum("btkgd,btlkd->btkgl", depth_q_BTKGD,
                              depth_k_BTLKD.astype(jnp.float32)) * scale
    written_L = jnp.arange(depth_k_BTLKD.shape[2]) < depth_len
    depth_logits = jnp.where(written_L.reshape(1, 1, 1, 1, -1), depth_logits, -jnp.inf)
    logits = jnp.concatenate([logits, depth_logits], axis=-1)
  # Every query sees at least its own key (s = p), so no row is all -inf.
  probs_BTKGC = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("btkgs,bskd->btkgd", probs_BTKGC[..., :num_seq], v_BSKD.astype(jnp.float32))
  if depth_k_BTLKD is not None:
    out = out + jnp.einsum("btkgl,btlkd->btkgd", probs_BTKGC[..., num_seq:],
                           depth_v_BTLKD.astype(jnp.float32))
  out_BTHD = out.reshape(batch, seq_len, num_heads, head_dim).astype(q_BTHD.dtype)
  return out_BTHD, probs_BTKGC.reshape(batch, seq_len, num_heads, -1)


class CachedAttention(nn.Module):
  """`MoDAAttention` (same parameters) reading and extending a sequence KV cache."""

  config: ModelConfig
  writes_depth: bool

  @nn.compact
  def __call__(self, x_BTM, depth_k_BTLKD, depth_v_BTLKD, depth_len, positions_BT, kv_cache):
    """Returns (out_BTM, depth_slot or None, updated (k_BSKD, v_BSKD), probs_BTHC)."""
    cfg = self.config
    q_BTHD, k_BTKD, v_BTKD, depth_q_BTHD, depth_slot = project_inputs(
        cfg, x_BTM, positions_BT, self.writes_depth)

    # All rows advance together, so row 0's first position is where the new tokens go.
    start = (0, positions_BT[0, 0], 0, 0)
    k_cache, v_cache = kv_cache
    k_cache = jax.lax.dynamic_update_slice(k_cache, k_BTKD.astype(k_cache.dtype), start)
    v_cache = jax.lax.dynamic_update_slice(v_cache, v_BTKD.astype(v_cache.dtype), start)
    out_BTHD, probs_BTHC = attend(q_BTHD, k_cache, v_cache, depth_k_BTLKD, depth_v_BTLKD,
                                  depth_len, positions_BT, depth_q_BTHD)
    out_BTM = projection(cfg, cfg.d_model, (-2, -1), ("q_heads", "head_dim", "embed"), "out")(out_BTHD)
    return out_BTM, depth_slot, (k_cache, v_cache), probs_BTHC


class CachedBlock(nn.Module):
  """`Block` (same parameters and norm placement) around `CachedAttention`."""

  config: ModelConfig
  writes_depth: bool = True

  @nn.compact
  def __call__(self, carry, kv_cache, positions_BT):
    """carry = (x_BTM, DepthKV) -> (carry, (k_cache, v_cache, probs_BTHC)); an `nn.scan` step."""
    cfg = self.config
    x_BTM, stream = carry
    write = self.writes_depth and cfg.uses_depth
    attention = CachedAttention(cfg, writes_depth=write, name="attention")
    mlp = SwiGLU(cfg, name="mlp")
    attn_norm, mlp_norm = RMSNorm(cfg, name="attention_norm"), RMSNorm(cfg, name="mlp_norm")

    def attend_fn(h_BTM):
      return attention(h_BTM, stream.k_BTLKD, stream.v_BTLKD, stream.length, positions_BT, kv_cache)

    # The same residual wiring as `Block.sublayers` (tests/test_generate.py checks they agree).
    h_BTM, ffn_in, (attn_slot, kv_cache, probs) = block.attention_residual(
        cfg.norm, x_BTM, attend_fn, attn_norm, mlp_norm)
    slots = [attn_slot] if write else []
    if write and cfg.ffn_writes_depth:
      slots.append(DepthKVProjection(cfg, name="ffn_depth_kv")(ffn_in))
    out_BTM = block.ffn_residual(cfg.norm, h_BTM, mlp(ffn_in), mlp_norm)
    if slots:
      stream = depth_stream.write(stream, *depth_stream.stack_slots(slots))
    return (out_BTM, stream), (kv_cache[0], kv_cache[1], probs)


class DecodingTransformer(nn.Module):
  """`Transformer` for cached decoding: (tokens [B, T_new], Cache) -> (logits, Cache, probs).

  The new tokens take positions cache.length .. cache.length + T_new - 1 (one document per row, all
  rows at the same position). `probs` is None unless `return_probs`: then [N, B, T_new, H, S_max + L]
  attention probabilities per attention sublayer (sequence columns first, then depth slots).
  """

  config: ModelConfig
  return_probs: bool = False

  @nn.compact
  def __call__(self, tokens_BT: jax.Array, cache: Cache):
    cfg = self.config
    batch, num_new = tokens_BT.shape
    positions_BT = jnp.broadcast_to(cache.length + jnp.arange(num_new, dtype=jnp.int32),
                                    (batch, num_new))
    embedding = Embedding(cfg, name="embed")
    carry = (embedding(tokens_BT), depth_stream.empty(cfg, batch, num_new))
    num_writers = cfg.num_layers - 1
    blocks_k, blocks_v, probs = cache.blocks_k_NBSKD, cache.blocks_v_NBSKD, []
    if num_writers and cfg.scan_layers:
      blocks = nn.scan(CachedBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                       in_axes=(0, nn.broadcast), length=num_writers)
      carry, (blocks_k, blocks_v, block_probs) = blocks(cfg, writes_depth=True, name="blocks")(
          carry, (blocks_k, blocks_v), positions_BT)
      probs = list(block_probs)
    elif num_writers:
      ks, vs = [], []
      for i in range(num_writers):
        carry, (k, v, p) = CachedBlock(cfg, writes_depth=True, name=f"block_{i}")(
            carry, (blocks_k[i], blocks_v[i]), positions_BT)
        ks, vs, probs = ks + [k], vs + [v], probs + [p]
      blocks_k, blocks_v = jnp.stack(ks), jnp.stack(vs)
    (x_BTM, _), (last_k, last_v, last_probs) = CachedBlock(cfg, writes_depth=False, name="last_block")(
        carry, (cache.last_k_BSKD, cache.last_v_BSKD), positions_BT)
    x_BTM = RMSNorm(cfg, name="final_norm")(x_BTM)
    if cfg.tie_embeddings:
      logits_BTV = embedding.attend(x_BTM)
    else:
      unembed_MV = self.param("unembed", nn.initializers.normal(stddev=cfg.init_std),
                              (cfg.d_model, cfg.vocab_size), dtype_of(cfg.param_dtype))
      logits_BTV = jnp.einsum("btm,mv->btv", x_BTM, unembed_MV.astype(x_BTM.dtype),
                              preferred_element_type=jnp.float32)
    new_cache = Cache(blocks_k, blocks_v, last_k, last_v, cache.length + num_new)
    # Every layer's probabilities have S_max + L_max columns (the depth buffers have a fixed size).
    all_probs = jnp.stack(probs + [last_probs]) if self.return_probs else None
    return logits_BTV, new_cache, all_probs
