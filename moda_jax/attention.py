"""`MoDAAttention`: GQA self-attention whose softmax also covers the token's own depth K/V."""

from __future__ import annotations

import flax.linen as nn
from jax.ad_checkpoint import checkpoint_name

from moda_jax.config import ModelConfig
from moda_jax.kernel_call import sharded_moda_attention
from moda_jax.layers import DepthKVProjection, RMSNorm, projection
from moda_jax.rope import apply_rope

# `remat="save_attention_out"` keeps this tensor for the backward pass and recomputes the rest.
ATTENTION_OUT_NAME = "attention_out"


def project_inputs(cfg: ModelConfig, x_BTM, depth_k_BTLKD, positions_BT, writes_depth: bool):
  """Everything an attention sublayer computes before attending (shared with decoding).

  Call it inside a compact method: the projections and norms become the caller's submodules
  ("query", "key", "value", "depth_kv", "query_norm", "key_norm").
  Returns (q_BTHD, k_BTKD, v_BTKD, depth_k_BTLKD as the reader sees it, depth_slot or None).
  """
  q_BTHD = projection(cfg, (cfg.num_heads, cfg.head_dim), -1, ("embed", "q_heads", "head_dim"),
                      "query")(x_BTM)
  k_BTKD = projection(cfg, (cfg.num_kv_heads, cfg.head_dim), -1, ("embed", "kv_heads", "head_dim"),
                      "key")(x_BTM)
  v_BTKD = projection(cfg, (cfg.num_kv_heads, cfg.head_dim), -1, ("embed", "kv_heads", "head_dim"),
                      "value")(x_BTM)

  depth_slot = None
  if writes_depth and cfg.uses_depth:
    if cfg.separate_attn_depth_proj:
      depth_slot = DepthKVProjection(cfg, name="depth_kv")(x_BTM)
    else:
      # Raw K/V, before QK-norm and RoPE: each reader applies its own k-norm (official code).
      depth_slot = (k_BTKD, v_BTKD)

  if cfg.qk_norm:
    q_norm, k_norm = RMSNorm(cfg, name="query_norm"), RMSNorm(cfg, name="key_norm")
    q_BTHD, k_BTKD = q_norm(q_BTHD), k_norm(k_BTKD)
    if depth_k_BTLKD is not None:
      # Depth keys get the reader's k-norm and no RoPE (their logit is position-free).
      depth_k_BTLKD = k_norm(depth_k_BTLKD)
  q_BTHD = apply_rope(q_BTHD, positions_BT, cfg.rope_theta)
  k_BTKD = apply_rope(k_BTKD, positions_BT, cfg.rope_theta)
  return q_BTHD, k_BTKD, v_BTKD, depth_k_BTLKD, depth_slot


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
  def __call__(self, x_BTM, depth_k_BTLKD, depth_v_BTLKD, depth_len, positions_BT, segment_ids_BT):
    """Returns (out_BTM, depth_slot) where depth_slot is (k_BTKD, v_BTKD) or None."""
    cfg = self.config
    heads = ("act_batch", "act_len", "act_heads", None)
    kv_heads = ("act_batch", "act_len", "act_kv_heads", None)
    q_BTHD, k_BTKD, v_BTKD, depth_k_BTLKD, depth_slot = project_inputs(
        cfg, x_BTM, depth_k_BTLKD, positions_BT, self.writes_depth)
    q_BTHD = nn.with_logical_constraint(q_BTHD, heads)
    k_BTKD = nn.with_logical_constraint(k_BTKD, kv_heads)
    v_BTKD = nn.with_logical_constraint(v_BTKD, kv_heads)
    out_BTHD = sharded_moda_attention(
        q_BTHD, k_BTKD, v_BTKD, depth_k_BTLKD, depth_v_BTLKD, depth_len=depth_len,
        segment_ids_BT=segment_ids_BT, implementation=cfg.attention_impl)
    out_BTHD = checkpoint_name(out_BTHD, ATTENTION_OUT_NAME)
    out_BTHD = nn.with_logical_constraint(out_BTHD, heads)
    out_BTM = projection(cfg, cfg.d_model, (-2, -1), ("q_heads", "head_dim", "embed"), "out")(out_BTHD)
    return out_BTM, depth_slot
