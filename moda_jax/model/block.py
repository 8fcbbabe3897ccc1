"""`Block`: one attention sublayer and one SwiGLU sublayer, both reading/writing the depth stream.

With a depth mixer (docs/peers.md) the residual sums are replaced: hyper-connections wrap each
sublayer in a width and a depth connection over n streams, attention residuals feed each sublayer
a softmax mix of all earlier outputs, DenseFormer averages the block outputs after the block.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from pallas_kernels.residuals import RESIDUALS_NAME

from moda_jax.model import depth_stream
from moda_jax.model import hyper_connections
from moda_jax.model import mixers
from moda_jax.model.attention import ATTENTION_OUT_NAME, QKV_PROJ_NAMES, MoDAAttention
from moda_jax.model.config import ModelConfig
from moda_jax.model.layers import DepthKVProjection, RMSNorm, SwiGLU

_ACT = ("act_batch", "act_len", "act_embed")
_STREAMS = ("act_batch", "act_len", "act_streams", "act_embed")  # hyper-connections' n streams


def remat_policy(name: str) -> Callable | None:
  """The `jax.checkpoint` policy for `ModelConfig.remat` (a name validated by the config; what each
  one saves is in the `ModelConfig` docstring)."""
  policies = jax.checkpoint_policies
  # The attention output and the kernel's own residuals (out, lse: pallas_kernels/residuals.py);
  # without the latter the backward pass re-runs the attention forward kernel to get lse back.
  attention = policies.save_only_these_names(ATTENTION_OUT_NAME, RESIDUALS_NAME)
  return {
      "full": policies.nothing_saveable,
      "save_attention_out": attention,
      "save_qkv_attention_out": policies.save_only_these_names(*QKV_PROJ_NAMES, ATTENTION_OUT_NAME,
                                                               RESIDUALS_NAME),
      "save_dots_and_attention": policies.save_from_both_policies(
          policies.dots_with_no_batch_dims_saveable, attention),
      "dots_saveable": policies.dots_saveable,
      "dots_with_no_batch_dims_saveable": policies.dots_with_no_batch_dims_saveable,
  }[name]


def sublayer_input(norm: str, h_BTM, norm_module):
  """What a sublayer's function (attention, FFN) reads of the residual stream h."""
  return norm_module(h_BTM) if norm == "pre" else h_BTM


def sublayer_output(norm: str, out_BTM, norm_module):
  """What a sublayer adds to the residual stream, from its function's output."""
  return norm_module(out_BTM) if norm == "reordered" else out_BTM


def residual_sum(norm: str, total_BTM, norm_module):
  """The residual sum (or what replaces it) as the next sublayer reads it.

  With the three helpers the placements are: pre x + f(n(x)); post n(x + f(x)); reordered
  x + n(f(x)). A depth mixer replaces only the sum (docs/peers.md).
  """
  return norm_module(total_BTM) if norm == "post" else total_BTM


class Block(nn.Module):
  """x -> attention sublayer -> FFN sublayer, with the configured norm placement and depth mixer.

  Attributes:
    config: the model config.
    writes_depth: whether this block writes depth slots (every block but the last; the last
      block's slots would be read by no one, so they are neither computed nor parameterized).
  """

  config: ModelConfig
  writes_depth: bool = True

  @nn.compact
  def __call__(self, x_BTM, stream: depth_stream.DepthKV, positions_BT, segment_ids_BT, kv_cache=None,
               return_probs: bool = False, mixer=None):
    """Reads the slots `stream` holds (depth_len = stream.length) and returns what it writes.

    Returns (x_out_BTM, slots, kv_cache, probs, read): slots = (k_BTSKD, v_BTSKD) of this block's S
    written slots in slot order (attention's, then FFN's) or None when the block writes none; kv_cache,
    probs and read (the stream as the attention read it, its depth buffers threaded through the
    operator) as `MoDAAttention` returns them (kv_cache and probs None unless decoding with a cache).
    With a depth mixer, x is the residual state (`mixers.initial_state`), `mixer` this block's row of
    the mixer parameters, and slots (kv slots or None, output slots or None), or None for the last block.
    """
    cfg = self.config
    norm = cfg.norm
    write = self.writes_depth and cfg.uses_depth
    attention = MoDAAttention(cfg, writes_depth=write, name="attention")
    mlp = SwiGLU(cfg, name="mlp")
    attn_norm, mlp_norm = RMSNorm(cfg, name="attention_norm"), RMSNorm(cfg, name="mlp_norm")
    ffn_kv = DepthKVProjection(cfg, name="ffn_depth_kv") if write and cfg.ffn_writes_depth else None
    value_mix, h_BTM = None, x_BTM
    if cfg.mixes_values:
      h_BTM, v1_BTKD = x_BTM
      value_mix = (mixer["lambdas"], v1_BTKD)

    def attention_sublayer(h):
      out, *extras = attention(sublayer_input(norm, h, attn_norm), stream, positions_BT, segment_ids_BT,
                               kv_cache, return_probs, value_mix)
      return sublayer_output(norm, out, attn_norm), extras

    def ffn_sublayer(h):
      ffn_in = sublayer_input(norm, h, mlp_norm)
      slot = None if ffn_kv is None else ffn_kv(ffn_in)
      return sublayer_output(norm, mlp(ffn_in), mlp_norm), slot

    outs = None
    if cfg.hyper_streams:
      streams = nn.with_logical_constraint(x_BTM, _STREAMS)
      h0, mixed, b = hyper_connections.width(cfg, mixer["attention"], streams)
      v_att, (attn_slot, kv_cache, probs, _, read) = attention_sublayer(h0)
      streams = nn.with_logical_constraint(residual_sum(norm, hyper_connections.depth(mixed, b, v_att),
                                                        attn_norm), _STREAMS)
      h0, mixed, b = hyper_connections.width(cfg, mixer["mlp"], streams)
      v_ffn, ffn_slot = ffn_sublayer(h0)
      x_out = nn.with_logical_constraint(residual_sum(norm, hyper_connections.depth(mixed, b, v_ffn),
                                                      mlp_norm), _STREAMS)
    elif cfg.attention_residuals:
      # The input h_l of every sublayer is a softmax mix of the embedding and all earlier outputs.
      count, eps = depth_stream.outputs_read(cfg, stream), cfg.norm_eps
      v_att, (attn_slot, kv_cache, probs, _, read) = attention_sublayer(nn.with_logical_constraint(h_BTM, _ACT))
      h_ffn = residual_sum(norm, mixers.attention_residual(mixer["query_mlp"], stream.outs_BTPM, count,
                                                           [v_att], eps), attn_norm)
      v_ffn, ffn_slot = ffn_sublayer(nn.with_logical_constraint(h_ffn, _ACT))
      x_out = residual_sum(norm, mixers.attention_residual(mixer["query_next"], stream.outs_BTPM, count,
                                                           [v_att, v_ffn], eps), mlp_norm)
      x_out = nn.with_logical_constraint(x_out, _ACT)
      outs = jnp.stack([v_att, v_ffn], axis=2)
    else:
      h_BTM = nn.with_logical_constraint(h_BTM, _ACT)
      v_att, (attn_slot, kv_cache, probs, values_BTKD, read) = attention_sublayer(h_BTM)
      h_BTM = nn.with_logical_constraint(residual_sum(norm, h_BTM + v_att, attn_norm), _ACT)
      v_ffn, ffn_slot = ffn_sublayer(h_BTM)
      out_BTM = nn.with_logical_constraint(residual_sum(norm, h_BTM + v_ffn, mlp_norm), _ACT)
      x_out = out_BTM
      if cfg.outputs_per_block:  # DenseFormer: DWA over the embedding and every block output so far
        x_out = mixers.depth_weighted_average(mixer["dwa"], stream.outs_BTPM,
                                              depth_stream.outputs_read(cfg, stream), out_BTM)
        outs = out_BTM[:, :, None]
      if cfg.mixes_values:  # block 0's values are V_1
        x_out = (out_BTM, jnp.where(stream.layer == 0, values_BTKD, v1_BTKD))

    slots = [attn_slot] if write else []
    if ffn_slot is not None:
      slots.append(ffn_slot)
    kv = depth_stream.stack_slots(slots) if slots else None
    if not cfg.has_mixer:
      return x_out, kv, kv_cache, probs, read
    return x_out, ((kv, outs) if self.writes_depth else None), kv_cache, probs, read
