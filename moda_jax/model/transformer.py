"""`Transformer`: embed -> depth-writing blocks -> last block -> final norm -> float32 logits.

Parameter layout (`param_layout.py` converts between the two):
  scan_layers=True:  embed, blocks (leading "layers" axis, N - 1 blocks), last_block, final_norm[, unembed]
  scan_layers=False: embed, block_0 ... block_{N-2}, last_block, final_norm[, unembed]
The last block is separate because it writes no depth slots (nothing reads them), so with FFN-KV or
extra attention depth projections it has fewer parameters than the others.

How the blocks run:
  * `init`, `depth_kv="none"` and `depth_memory="naive"`: Linen `nn.scan` (or a loop) over `Block`
    with (x, DepthKV) as the carry; plain autodiff, so memory is quadratic in depth when depth is on.
  * otherwise (`depth_memory="linear"`, the default): the parameters Linen created are read back
    and the blocks run as `Block(...).apply` inside `depth_stack.linear_memory_stack`, a
    `jax.custom_vjp` whose memory is linear in depth_stream. A custom_vjp over a pure function is simpler
    and easier to verify than Linen's lifted `nn.custom_vjp` around an `nn.scan`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moda_jax.model import depth_stream
from moda_jax.model.block import Block, remat_policy
from moda_jax.model.config import ModelConfig
from moda_jax.model.depth_stack import linear_memory_stack
from moda_jax.model.layers import Embedding, RMSNorm, dtype_of

_ACT = ("act_batch", "act_len", "act_embed")


def _remat(config: ModelConfig, methods: list[str]):
  if config.remat == "none":
    return Block
  # prevent_cse=False: under scan, CSE across iterations cannot undo the rematerialization.
  return nn.remat(Block, policy=remat_policy(config.remat), prevent_cse=False, methods=methods)


def block_apply_fn(config: ModelConfig):
  """One depth-writing block as a pure function (the `layer_fn` of `linear_memory_stack`)."""
  block = Block(config, writes_depth=True)

  def layer_fn(params, x_BTM, depth_k, depth_v, depth_len, positions_BT, segment_ids_BT):
    return block.apply({"params": params}, x_BTM, depth_k, depth_v, depth_len, positions_BT,
                       segment_ids_BT, method=Block.sublayers)
  return layer_fn


class Transformer(nn.Module):
  """OLMo2-style decoder with a MoDA depth stream; see `ModelConfig`."""

  config: ModelConfig

  @nn.compact
  def __call__(self, tokens_BT: jax.Array, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None) -> jax.Array:
    """tokens [B, T] int -> logits [B, T, V] float32.

    Args:
      tokens_BT: token ids.
      segment_ids: optional [B, T] int document ids of packed sequences: attention never crosses
        segments (the depth stream is per token, so it needs no mask).
      positions: optional [B, T] int RoPE positions; default arange(T) for every row.
    """
    cfg = self.config
    batch, seq_len = _validate_inputs(cfg, tokens_BT, segment_ids, positions)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len))

    embedding = Embedding(cfg, name="embed")
    x_BTM = nn.with_logical_constraint(embedding(tokens_BT), _ACT)
    stream = depth_stream.empty(cfg, batch, seq_len)
    if cfg.num_layers > 1:
      x_BTM, stream = self._depth_writers(x_BTM, stream, positions, segment_ids)

    last = _remat(cfg, ["sublayers"])(cfg, writes_depth=False, name="last_block")
    x_BTM, _ = last.sublayers(x_BTM, stream.k_BTLKD, stream.v_BTLKD, stream.length, positions,
                              segment_ids)
    x_BTM = RMSNorm(cfg, name="final_norm")(x_BTM)

    if cfg.tie_embeddings:
      return embedding.attend(x_BTM)
    unembed_MV = self.param(
        "unembed",
        nn.with_logical_partitioning(nn.initializers.normal(stddev=cfg.init_std), ("embed", "vocab")),
        (cfg.d_model, cfg.vocab_size), dtype_of(cfg.param_dtype))
    return jnp.einsum("btm,mv->btv", x_BTM, unembed_MV.astype(x_BTM.dtype),
                      preferred_element_type=jnp.float32)

  def _depth_writers(self, x_BTM, stream, positions_BT, segment_ids_BT):
    """Blocks 0 .. N-2, which write depth slots; returns (x, the full stream)."""
    cfg = self.config
    num_writers = cfg.num_layers - 1
    linear = (cfg.uses_depth and cfg.depth_memory == "linear" and not self.is_initializing())
    if linear:
      all_params = nn.meta.unbox(self.variables["params"])
      if cfg.scan_layers:
        layer_params = all_params["blocks"]
      else:
        layer_params = [all_params[f"block_{i}"] for i in range(num_writers)]
      return linear_memory_stack(block_apply_fn(cfg), layer_params, x_BTM, positions_BT,
                                 segment_ids_BT, config=cfg)

    block_cls = _remat(cfg, ["__call__"])
    carry = (x_BTM, stream)
    if cfg.scan_layers:
      blocks = nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                       in_axes=(nn.broadcast, nn.broadcast), length=num_writers,
                       metadata_params={nn.PARTITION_NAME: "layers"})
      carry, _ = blocks(cfg, writes_depth=True, name="blocks")(carry, positions_BT, segment_ids_BT)
    else:
      for i in range(num_writers):
        carry, _ = block_cls(cfg, writes_depth=True, name=f"block_{i}")(carry, positions_BT,
                                                                         segment_ids_BT)
    return carry


def _validate_inputs(cfg: ModelConfig, tokens_BT, segment_ids, positions) -> tuple[int, int]:
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
  return batch, seq_len
