"""`MoDAAttention`: GQA self-attention whose softmax also covers the token's own depth K/V."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from moda_jax.model import depth_stream
from moda_jax.model import mixers
from moda_jax.model.config import ModelConfig
from moda_jax.model.kv_cache import cached_attention
from moda_jax.model.kernel_call import sharded_moda_attention
from moda_jax.model.layers import DepthKVProjection, RMSNorm, depth_key, norm_gain, projection
from moda_jax.model.rope import apply_rope

# Names for the remat policies (`block.remat_policy`): the attention output and the q / k / v
# projection outputs (before QK-norm and RoPE, which are elementwise and cheap to redo).
ATTENTION_OUT_NAME = "attention_out"
QKV_PROJ_NAMES = ("query_proj", "key_proj", "value_proj")


def project_inputs(cfg: ModelConfig, x_BTM, positions_BT, writes_depth: bool):
  """Everything an attention sublayer computes before attending.

  Call it inside a compact method: the projections and norms become the caller's submodules
  ("query", "key", "value", "depth_kv", "query_norm", "key_norm").
  Returns (q_BTHD, k_BTKD, v_BTKD, depth_q_BTHD, depth_slot or None). depth_q is what scores the
  depth buffer's keys: None means q (no QK-norm: the buffer holds raw keys, as this reader sees them).

  The depth logit is the same as reading the raw depth key k through this layer's k-norm (no RoPE:
  depth logits are position-free): q . (rms_normalize(k) * gain) = (q * gain) . rms_normalize(k), and
  the buffer already holds rms_normalize(k) (`layers.depth_key`). So the [B, T, Hq, D] depth query
  carries the gain, and the [B, T, L, Hk, D] buffer is read as is: no per-layer copy of it (nor its
  cotangent) in training memory, no O(L) work per layer outside the kernel.
  """
  q_BTHD = projection(cfg, (cfg.num_heads, cfg.head_dim), -1, ("embed", "q_heads", "head_dim"),
                      "query")(x_BTM)
  k_BTKD = projection(cfg, (cfg.num_kv_heads, cfg.head_dim), -1, ("embed", "kv_heads", "head_dim"),
                      "key")(x_BTM)
  v_BTKD = projection(cfg, (cfg.num_kv_heads, cfg.head_dim), -1, ("embed", "kv_heads", "head_dim"),
                      "value")(x_BTM)
  q_BTHD, k_BTKD, v_BTKD = (checkpoint_name(x, name) for x, name in zip((q_BTHD, k_BTKD, v_BTKD),
                                                                      QKV_PROJ_NAMES))

  depth_slot = None
  if writes_depth and cfg.uses_depth:
    if cfg.separate_attn_depth_proj:
      depth_slot = DepthKVProjection(cfg, name="depth_kv")(x_BTM)
    else:
      # The key before QK-norm and RoPE (official code: each reader applies its own k-norm), stored
      # normalized without gain, which is the part of every reader's k-norm they share.
      depth_slot = (depth_key(cfg, k_BTKD), v_BTKD)

  depth_gain_D = None
  if cfg.qk_norm:
    q_norm, k_norm = RMSNorm(cfg, name="query_norm"), RMSNorm(cfg, name="key_norm")
    q_BTHD, k_BTKD = q_norm(q_BTHD), k_norm(k_BTKD)
    depth_gain_D = norm_gain(k_norm)
  q_BTHD = apply_rope(q_BTHD, positions_BT, cfg.rope_theta)
  k_BTKD = apply_rope(k_BTKD, positions_BT, cfg.rope_theta)
  depth_q_BTHD = None
  if depth_gain_D is not None and cfg.uses_depth:
    gain_111D = jnp.reshape(depth_gain_D.astype(jnp.float32), (1, 1, 1, -1))
    depth_q_BTHD = (q_BTHD.astype(jnp.float32) * gain_111D).astype(q_BTHD.dtype)
  return q_BTHD, k_BTKD, v_BTKD, depth_q_BTHD, depth_slot


class MoDAAttention(nn.Module):
  """Projections -> (QK-norm, RoPE) -> `moda_attention` over sequence + depth -> output projection.

  Attributes:
    config: the model config.
    writes_depth: return this sublayer's depth slot (K/V). False for the last block, whose slot no
      sublayer reads; with `attn_ffn_extra` that also means no depth projection parameters.
  """

  config: ModelConfig
  writes_depth: bool

  @nn.compact
  def __call__(self, x_BTM, stream: depth_stream.DepthKV, positions_BT, segment_ids_BT, kv_cache=None,
               return_probs: bool = False, value_mix=None):
    """Returns (out_BTM, depth_slot, kv_cache, probs, values_BTKD, read).

    depth_slot is this sublayer's (k_BTKD, v_BTKD) or None. `read` is `stream` with its depth
    buffers as the operator returned them (`return_depth`): the same values, threaded through the
    call, so that the cotangent a caller sends back along them gets this read's cotangent added in
    place (the linear-memory stack's carry, `depth_stack`); `stream` itself when decoding.
    Without `kv_cache` (training, scoring) the queries attend to their own T tokens through
    `moda_attention` and kv_cache / probs are None.
    With `kv_cache` = (k_BSKD, v_BSKD[, depth ring]) (decoding) the new keys are written at
    `positions_BT` and the queries attend to the whole cache (`kv_cache.cached_attention`); the
    returned cache is (k, v); probs [B, T, H, S + L] when `return_probs`.
    values_BTKD are this layer's own values (before any value residual).

    `value_mix` = (lambdas [2], V_1 [B, T, Hk, D]): value residual learning, the sequence values
    are lambda_1 V_1 + lambda_2 V (the depth slot keeps the raw V; the cache holds the mixed V).
    Without `config.joint_depth_read` (depth attention) the depth slots get their own softmax
    (depth-only attention) whose output is added to the sequence attention's.
    """
    cfg = self.config
    heads = ("act_batch", "act_len", "act_heads", None)
    kv_heads = ("act_batch", "act_len", "act_kv_heads", None)
    q_BTHD, k_BTKD, values_BTKD, depth_q_BTHD, depth_slot = project_inputs(
        cfg, x_BTM, positions_BT, self.writes_depth)
    v_BTKD = values_BTKD if value_mix is None else mixers.mix_values(value_mix[0], value_mix[1], values_BTKD)
    probs, read = None, stream
    depth_start = None if cfg.depth_window == 0 else cfg.depth_read_start(stream.length)
    if kv_cache is not None:
      k_cache, v_cache, *depth_ring = kv_cache  # (k, v) or (k, v, the chunk ring)
      out_BTHD, kv_cache, probs = cached_attention(
          cfg, q_BTHD, k_BTKD, v_BTKD, depth_q_BTHD, stream, depth_start, positions_BT, (k_cache, v_cache),
          return_probs, ring=depth_ring[0] if depth_ring else None)
    else:
      q_BTHD = nn.with_logical_constraint(q_BTHD, heads)
      if depth_q_BTHD is not None:
        depth_q_BTHD = nn.with_logical_constraint(depth_q_BTHD, heads)
      k_BTKD = nn.with_logical_constraint(k_BTKD, kv_heads)
      v_BTKD = nn.with_logical_constraint(v_BTKD, kv_heads)
      attend = functools.partial(sharded_moda_attention, depth_len=stream.length, depth_start=depth_start,
                                 segment_ids_BT=segment_ids_BT, implementation=cfg.attention_impl,
                                 depth_q_BTHD=depth_q_BTHD, depth_chunk=cfg.depth_chunk)
      if stream.k_BTLKD is None:
        out_BTHD = attend(q_BTHD, k_BTKD, v_BTKD, None, None)
      elif cfg.joint_depth_read:
        out_BTHD, *depth = attend(q_BTHD, k_BTKD, v_BTKD, stream.k_BTLKD, stream.v_BTLKD, return_depth=True)
      else:  # two softmaxes: sequence attention + depth-only attention (0 where no slot is visible)
        depth_out_BTHD, *depth = attend(q_BTHD, None, None, stream.k_BTLKD, stream.v_BTLKD, return_depth=True)
        out_BTHD = attend(q_BTHD, k_BTKD, v_BTKD, None, None) + depth_out_BTHD
      if stream.k_BTLKD is not None:
        read = stream._replace(k_BTLKD=depth[0], v_BTLKD=depth[1])
      out_BTHD = checkpoint_name(out_BTHD, ATTENTION_OUT_NAME)
      out_BTHD = nn.with_logical_constraint(out_BTHD, heads)
    out_BTM = projection(cfg, cfg.d_model, (-2, -1), ("q_heads", "head_dim", "embed"), "out")(out_BTHD)
    return out_BTM, depth_slot, kv_cache, probs, values_BTKD, read
