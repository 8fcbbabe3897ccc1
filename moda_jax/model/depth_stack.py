"""A layer stack whose training memory is linear in depth: `custom_vjp` over all depth writers.

Why plain autodiff is quadratic: each layer reads the depth buffers carried through the scan, so
the backward pass needs the buffers *as that layer saw them*, and autodiff saves one full
[B, T, L_max, Hk, D] pair per layer: O(N * L_max) = O(N^2) memory.

Why the final buffers suffice (the idea of this file): slots are written once, in layer order.
Layer i reads with depth_len = i * S, and every slot below i * S holds in the *final* buffers
exactly what it held when layer i ran; slots at or above i * S differ (zeros then, later writes
now) but the kernel ignores them: they are masked out of the softmax. So

    layer_i(p_i, x_i, buffers_as_seen_by_i, i * S) == layer_i(p_i, x_i, final_buffers, i * S)

and the whole stack is the function "x_{i+1}, slots_i = layer_i(p_i, x_i, final, i * S);
final = concat(slots_0 ... slots_{N-1})". Its reverse pass, layer by layer from the top:

  * the cotangent of `final` starts as the cotangent flowing in from outside the stack (the last
    block reads it) and accumulates every layer's read cotangent, carried in the reverse scan;
  * when layer i is reached, every reader of its slots (layers j > i, and the outside) has already
    added its contribution, so the carried cotangent at slots [i * S, (i + 1) * S) is complete:
    it is the cotangent of layer i's written slots;
  * re-running layer i from its saved input x_i against `final` (masked to i * S) and pulling
    back (cotangent of x_{i+1}, cotangent of slots_i, the carry) gives the cotangents of p_i, x_i and
    the new carry: the layer threads the buffers through its attention operator (`read`, see
    `block_loop`), whose backward adds the cotangent of the slots it read into the carry in place,
    over the visible slots only (no zero-filled full-size gradient per layer, no separate add).
    Contributions a layer adds at slots >= i * S (zero for a correct kernel) are harmless anyway:
    those slots' writers were already processed.

Residuals: the final buffers, each layer's input x_i [N, B, T, M] and the params: O(N). The
backward holds the final buffers, the carried buffer cotangents and one layer's activations: two
buffer pairs plus a layer (tests/test_model_memory.py). Each layer's forward runs twice (like full
remat), which is why `remat` has no further effect on this stack.

The stack is a pure function of the layer parameters so that it can be written with
`jax.custom_vjp` directly; the model passes `block_loop.block_fn(...)` as `layer_fn`, and both passes
iterate with `block_loop.over_layers` (scanned or unrolled layouts alike).

The same argument covers the depth mixers' write-once outputs buffer (docs/peers.md): DenseFormer's
block outputs and attention residuals' sublayer outputs are written once in layer order and read
through a mask, exactly like the depth K/V slots.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from moda_jax.model import block_loop
from moda_jax.model import depth_stream
from moda_jax.model.config import ModelConfig

# layer_fn(params, x_BTM, stream, positions_BT, segment_ids_BT, kv_cache=None, return_probs=False)
#   -> (x_BTM, (k_BTSKD, v_BTSKD), kv_cache, probs, read):
# a `block_loop.block_fn`; the stack reads the first two results and `read`, the stream it read.
LayerFn = Callable[..., tuple]


def linear_memory_stack(layer_fn: LayerFn, layer_params: Any | Sequence[Any], x_BTM,
                        positions_BT: jax.Array, segment_ids_BT: jax.Array | None, *,
                        config: ModelConfig) -> tuple[Any, depth_stream.DepthKV | depth_stream.Stream]:
  """Runs the depth-writing layers; returns (x_BTM, the full stream the last block reads).

  Args:
    layer_fn: one layer as a pure function (see `LayerFn`); must write S = slots_per_block slots
      (and, with a depth mixer's outputs buffer, `config.outputs_per_block` output slots).
    layer_params: stacked parameters (leading axis N) or a list of N per-layer parameter trees.
    x_BTM: the stack's input: the residual state (an array, or a tree of arrays with a depth mixer).
    positions_BT, segment_ids_BT: passed to every layer unchanged.
    config: gives the buffer shapes; N * S must equal `config.num_depth_slots`.

  The depth mixers' write-once outputs buffer (DenseFormer, attention residuals) is one more final
  buffer here: same argument, same backward. Its slot 0 holds the stack's input (the embedding),
  so that slot's cotangent flows to x at the end of the backward pass.
  """
  num_layers, slots = block_loop.num_layers(layer_params), config.slots_per_block
  if num_layers * slots != config.num_depth_slots:
    raise ValueError(f"linear_memory_stack got {num_layers} layers writing {slots} slots each; "
                     f"expected {num_layers * slots} == config.num_depth_slots="
                     f"{config.num_depth_slots}.")
  if config.outputs_per_block and 1 + num_layers * config.outputs_per_block != config.num_output_slots:
    raise ValueError(f"linear_memory_stack got {num_layers} layers; expected num_layers - 1 = "
                     f"{config.num_layers - 1} for the outputs buffer of depth_mixer="
                     f"{config.depth_mixer!r}.")

  def forward(params, x_BTM, positions_BT, segment_ids_BT):
    """(x_out, final buffers, each layer's input with a leading axis N)."""
    write_step = block_loop.writer_step(layer_fn, positions_BT, segment_ids_BT)

    def step(carry, p, per_layer, layer):
      new_carry, _ = write_step(carry, p, per_layer, layer)
      return new_carry, carry[0]
    (x_BTM, stream), inputs_NBTM = block_loop.over_layers(
        step, (x_BTM, depth_stream.start(config, x_BTM)), params)
    return x_BTM, depth_stream.buffers(stream), inputs_NBTM

  # Positions and segment ids are arguments (not closed over) so the custom_vjp sees every input.
  @jax.custom_vjp
  def stack(params, x_BTM, positions_BT, segment_ids_BT):
    return forward(params, x_BTM, positions_BT, segment_ids_BT)[:2]

  def stack_fwd(params, x_BTM, positions_BT, segment_ids_BT):
    x_out, arrays, inputs_NBTM = forward(params, x_BTM, positions_BT, segment_ids_BT)
    residuals = (params, inputs_NBTM, arrays, positions_BT, segment_ids_BT)
    return (x_out, arrays), residuals

  def stack_bwd(residuals, cotangents):
    params, inputs_NBTM, arrays, positions_BT, segment_ids_BT = residuals

    def layer_bwd(carry, p, x_in_BTM, layer):
      g_x_BTM, g_arrays = carry

      def rerun(p, x, arrays):
        x_out, written, _, _, read = layer_fn(p, x, depth_stream.view(config, arrays, layer), positions_BT,
                                              segment_ids_BT)
        return x_out, written, depth_stream.buffers(read)
      _, pullback = jax.vjp(rerun, p, x_in_BTM, arrays)
      # Complete here: every reader of this layer's slots lies above it and was pulled back already.
      g_written = depth_stream.written_part(config, g_arrays, layer)
      # Read the written slots' cotangent out before the pullback updates the carry in place (XLA
      # would otherwise read it from the carry late, and copy the whole carry to do so).
      g_written, g_arrays = jax.lax.optimization_barrier((g_written, g_arrays))
      # The carry goes in as the cotangent of the buffers the layer read and comes back with the
      # layer's read cotangent added (by the operator in place; by JAX for the outputs buffer).
      g_p, g_x_in, g_arrays = pullback((g_x_BTM, g_written, g_arrays))
      return (g_x_in, g_arrays), g_p

    (g_x, g_arrays), g_params = block_loop.over_layers(layer_bwd, cotangents, params, inputs_NBTM,
                                                       reverse=True)
    # The stream's entry write (the embedding in output slot 0; nothing without an outputs buffer).
    x_first = jax.tree.map(lambda a: a[0], inputs_NBTM)
    _, start_pullback = jax.vjp(lambda x: depth_stream.buffers(depth_stream.start(config, x)), x_first)
    g_x = jax.tree.map(jnp.add, g_x, start_pullback(g_arrays)[0])
    if isinstance(params, (list, tuple)):
      g_params = type(params)(jax.tree.map(lambda a, i=i: a[i], g_params) for i in range(num_layers))
    # Positions and segment ids are integers: no cotangent.
    return g_params, g_x, None, None

  stack.defvjp(stack_fwd, stack_bwd)
  x_BTM, arrays = stack(layer_params, x_BTM, positions_BT, segment_ids_BT)
  return x_BTM, depth_stream.view(config, arrays, num_layers)
