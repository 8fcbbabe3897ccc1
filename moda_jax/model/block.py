"""`Block`: one attention sublayer and one SwiGLU sublayer, both reading/writing the depth stream."""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax

from moda_jax.model import depth_stream
from moda_jax.model.attention import ATTENTION_OUT_NAME, MoDAAttention
from moda_jax.model.config import ModelConfig
from moda_jax.model.layers import DepthKVProjection, RMSNorm, SwiGLU

_ACT = ("act_batch", "act_len", "act_embed")


def remat_policy(name: str) -> Callable | None:
  """The `jax.checkpoint` policy for `ModelConfig.remat` (a name validated by the config)."""
  policies = jax.checkpoint_policies
  return {
      "full": policies.nothing_saveable,
      "dots_saveable": policies.dots_saveable,
      "dots_with_no_batch_dims_saveable": policies.dots_with_no_batch_dims_saveable,
      "save_attention_out": policies.save_only_these_names(ATTENTION_OUT_NAME),
  }[name]


def attention_residual(norm: str, x_BTM, attend: Callable, attn_norm, mlp_norm):
  """The attention half of a block for each norm placement.

  `attend(h_BTM) -> (out_BTM, *extras)`. Returns (h_BTM, ffn_in_BTM, extras), where `ffn_in` is
  exactly what the FFN consumes (the FFN-KV projection reads the same tensor).
  """
  if norm == "pre":
    attn_out, *extras = attend(attn_norm(x_BTM))
    h_BTM = x_BTM + attn_out
    return h_BTM, mlp_norm(h_BTM), extras
  if norm == "post":
    attn_out, *extras = attend(x_BTM)
    h_BTM = attn_norm(x_BTM + attn_out)
    return h_BTM, h_BTM, extras
  attn_out, *extras = attend(x_BTM)  # reordered (OLMo2)
  h_BTM = x_BTM + attn_norm(attn_out)
  return h_BTM, h_BTM, extras


def ffn_residual(norm: str, h_BTM, ffn_out_BTM, mlp_norm):
  """The FFN half of a block: combines its output with the residual stream per norm placement."""
  if norm == "pre":
    return h_BTM + ffn_out_BTM
  if norm == "post":
    return mlp_norm(h_BTM + ffn_out_BTM)
  return h_BTM + mlp_norm(ffn_out_BTM)


class Block(nn.Module):
  """x -> attention sublayer -> FFN sublayer, with the configured norm placement.

  Attributes:
    config: the model config.
    writes_depth: whether this block writes depth slots (every block but the last; the last
      block's slots would be read by no one, so they are neither computed nor parameterized).
  """

  config: ModelConfig
  writes_depth: bool = True

  @nn.compact
  def __call__(self, x_BTM, stream: depth_stream.DepthKV, positions_BT, segment_ids_BT, kv_cache=None,
               return_probs: bool = False):
    """Reads the slots `stream` holds (depth_len = stream.length) and returns what it writes.

    Returns (x_out_BTM, slots, kv_cache, probs): slots = (k_BTSKD, v_BTSKD) of this block's S written
    slots in slot order (attention's, then FFN's) or None when the block writes none; kv_cache and
    probs as `MoDAAttention` returns them (None unless decoding with a cache).
    """
    cfg = self.config
    write = self.writes_depth and cfg.uses_depth
    attention = MoDAAttention(cfg, writes_depth=write, name="attention")
    mlp = SwiGLU(cfg, name="mlp")
    attn_norm, mlp_norm = RMSNorm(cfg, name="attention_norm"), RMSNorm(cfg, name="mlp_norm")
    attend = lambda h: attention(h, stream, positions_BT, segment_ids_BT, kv_cache, return_probs)
    x_BTM = nn.with_logical_constraint(x_BTM, _ACT)

    h_BTM, ffn_in, (attn_slot, kv_cache, probs) = attention_residual(cfg.norm, x_BTM, attend, attn_norm,
                                                                    mlp_norm)
    h_BTM = nn.with_logical_constraint(h_BTM, _ACT)

    slots = [attn_slot] if write else []
    if write and cfg.ffn_writes_depth:
      slots.append(DepthKVProjection(cfg, name="ffn_depth_kv")(ffn_in))

    out_BTM = ffn_residual(cfg.norm, h_BTM, mlp(ffn_in), mlp_norm)
    out_BTM = nn.with_logical_constraint(out_BTM, _ACT)
    return out_BTM, (depth_stream.stack_slots(slots) if slots else None), kv_cache, probs
