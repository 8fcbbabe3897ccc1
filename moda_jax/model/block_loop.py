"""The one block loop: how the model's blocks are applied and iterated, for every caller.

Training's forward (with or without depth), the linear-memory stack's forward and backward
(`depth_stack`), cached decoding and the attention analysis all run the blocks through the two
functions here, so a change to how a block is applied happens once:

  * `block_fn(config, writes_depth)`: one block as a pure function of its parameters,
        (params, x_BTM, stream, positions_BT, segment_ids_BT, kv_cache, return_probs)
            -> (x_BTM, slots or None, kv_cache or None, probs or None, read)
    where `stream` is the `depth_stream.DepthKV` the block reads (its `length` is the block's
    depth_len), `slots` are the (k_BTSKD, v_BTSKD) it writes and `read` is `stream` with its depth
    buffers threaded through the attention operator (`MoDAAttention`): the stream to write into, so
    that the buffers' cotangent passes through the operator's backward, which adds its own in place.
    With a depth mixer (docs/peers.md) `params` is {"block": ..., "mixer": this layer's mixer
    parameters}, x the residual state (an array or a tuple), `stream` a `depth_stream.Stream` and
    `slots` (kv slots, output slots).
  * `over_layers(step, carry, layer_params, per_layer)`: iterates `step` over the layers, as a
    `lax.scan` over stacked parameters (the scanned layout) or a Python loop over a list of
    per-layer trees (the unscanned layout). Both compute the same thing.

`writer_step` combines them into the usual step: apply a block, then write its slots into the
stream it read.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from moda_jax.model import depth_stream
from moda_jax.model import kernel_call
from moda_jax.model import mixers
from moda_jax.model.block import Block, remat_policy
from moda_jax.model.config import ModelConfig

LayerParams = Any | Sequence[Any]  # a tree with a leading layer axis, or a list of per-layer trees


def num_layers(layer_params: LayerParams) -> int:
  if isinstance(layer_params, (list, tuple)):
    return len(layer_params)
  leaves = jax.tree.leaves(layer_params)
  return leaves[0].shape[0] if leaves else 0


def block_fn(config: ModelConfig, writes_depth: bool) -> Callable:
  """One block as a pure function (see the module docstring), checkpointed as `config.remat` says."""
  block = Block(config, writes_depth=writes_depth)

  def apply(params, x_BTM, stream, positions_BT, segment_ids_BT, kv_cache=None, return_probs=False):
    if config.has_mixer:
      return block.apply({"params": params["block"]}, x_BTM, stream, positions_BT, segment_ids_BT,
                         kv_cache, return_probs, mixer=params["mixer"])
    return block.apply({"params": params}, x_BTM, stream, positions_BT, segment_ids_BT, kv_cache,
                       return_probs)

  if config.remat == "none":
    return apply
  # prevent_cse=False: under scan, CSE across iterations cannot undo the rematerialization.
  return jax.checkpoint(apply, policy=remat_policy(config.remat), prevent_cse=False,
                        static_argnums=(6,))


def writer_step(block: Callable, positions_BT, segment_ids_BT, return_probs: bool = False,
                depth_ring=None) -> Callable:
  """The loop step of the depth-writing blocks: carry (x, stream) -> (carry, (kv_cache, probs)).

  Decoding passes each layer's (k, v) cache as the per-layer input; `depth_ring` (chunk-visible
  depth: the chunk's earlier tokens' depth, shared by every layer) is handed to each layer with it.
  """

  def step(carry, params, kv_cache, layer):
    del layer
    if kv_cache is not None and depth_ring is not None:
      kv_cache = (*kv_cache, depth_ring)
    x_BTM, stream = carry
    x_BTM, slots, kv_cache, probs, read = block(params, x_BTM, stream, positions_BT, segment_ids_BT,
                                                kv_cache, return_probs)
    return (x_BTM, depth_stream.write_block(read, slots)), (kv_cache, probs)
  return step


def over_layers(step: Callable, carry, layer_params: LayerParams, per_layer=None, *,
                reverse: bool = False):
  """Runs `carry, out_i = step(carry, params_i, per_layer_i, i)` over the layers.

  Args:
    step: the loop body; `i` is a Python int (unrolled) or an int32 scalar (scanned).
    carry: the loop state.
    layer_params: stacked (leading axis N, run under `lax.scan`) or a list of N trees (unrolled).
    per_layer: None, or a tree whose leaves have a leading axis N (e.g. decoding's KV caches).
    reverse: visit the layers from the last to the first (the backward pass of `depth_stack`).

  Returns:
    (carry, outs) with the outs' leaves stacked along a leading axis N in layer order.
  """
  count = num_layers(layer_params)
  if not isinstance(layer_params, (list, tuple)):
    xs = (layer_params, per_layer, jnp.arange(count, dtype=jnp.int32))
    return jax.lax.scan(lambda c, x: step(c, *x), carry, xs, reverse=reverse)
  outs = [None] * count
  for i in (reversed(range(count)) if reverse else range(count)):
    layer_input = None if per_layer is None else jax.tree.map(lambda a, i=i: a[i], per_layer)
    carry, outs[i] = step(carry, layer_params[i], layer_input, i)
  if not count:
    return carry, None
  return carry, jax.tree.map(lambda *xs: jnp.stack(xs), *outs)


def init_block_params(config: ModelConfig, writes_depth: bool) -> Callable:
  """An initializer rng -> the (boxed) parameters of one block, from a one-token dummy call."""

  @kernel_call.parameters_only()
  def init(rng):
    x_BTM = jnp.zeros((1, 1, config.d_model), jnp.dtype(config.dtype))
    positions_BT = jnp.zeros((1, 1), jnp.int32)
    block = Block(config, writes_depth=writes_depth)
    if not config.has_mixer:
      return block.init(rng, x_BTM, depth_stream.empty(config, 1, 1), positions_BT, None)["params"]
    state = mixers.initial_state(config, x_BTM)
    return block.init(rng, state, depth_stream.start(config, state), positions_BT, None,
                      mixer=mixers.zero_layer_params(config))["params"]
  return init


def init_stacked_params(config: ModelConfig, count: int) -> Callable:
  """An initializer rng -> `count` writer blocks' parameters stacked on a leading "layers" axis."""
  one = init_block_params(config, writes_depth=True)

  def init(rng):
    stacked = jax.vmap(one)(jax.random.split(rng, count))
    # vmap stacked the values; the logical axis names gain the new leading axis here.
    return nn.meta.add_axis(stacked, 0, _LAYERS_AXIS)
  return init


def init_looped_params(config: ModelConfig, count: int) -> Callable:
  """An initializer rng -> a list of `count` writer blocks' parameters, the unscanned layout.

  Block i gets slice i of `init_stacked_params`: from one key both layouts hold the same values, and
  the initializer compiles once for all blocks (one per block took 113 s on the H200, BENCHMARKS.md §0i).
  """
  stacked_init = init_stacked_params(config, count)

  def init(rng):
    # The barrier keeps the random stack one buffer: without it XLA fuses the random number generation
    # into every block's slice, and the init's compilation ran past 280 s on the H200 (§0i).
    stacked = jax.lax.optimization_barrier(stacked_init(rng))
    return [nn.meta.remove_axis(jax.tree.map(lambda a, i=i: a[i], stacked), 0, _LAYERS_AXIS)
            for i in range(count)]
  return init


_LAYERS_AXIS = {nn.PARTITION_NAME: "layers"}
