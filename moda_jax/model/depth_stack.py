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
  * pulling layer i back against `final` (masked to i * S) with (cotangent of x_{i+1}, cotangent of
    slots_i, the carry) gives the cotangents of p_i, x_i and the new carry: the layer threads the
    buffers through its attention operator (`read`, see `block_loop`), whose backward adds the
    cotangent of the slots it read into the carry in place, over the visible slots only (no
    zero-filled full-size gradient per layer, no separate add). Contributions a layer adds at slots
    >= i * S (zero for a correct kernel) are harmless anyway: those slots' writers were already
    processed.

Residuals. The forward takes each layer's pullback (`jax.vjp` of the block, checkpointed with the
config's remat policy) and keeps only what the policy saved: the leaves that are the layer's own
inputs (its params, its input x_i, the buffers it read and returned, positions, segment ids) are
dropped and supplied again in the backward, the buffers as the final ones (`_split_residuals`,
`_join_residuals`). So the stack holds the final buffers, each layer's x_i and its policy residuals:
O(N), like a plain remat'd model, never a buffer pair per layer. With remat="full" nothing but the
inputs is saved and each layer's forward runs again in the backward; with "save_dots_and_attention"
only its elementwise work does (no attention forward kernel, no projection rerun). The backward holds
the final buffers, the carried buffer cotangents and one layer's activations: about two buffer pairs
above the baseline at any remat (tests/test_model_memory.py).

The stack is a pure function of the layer parameters so that it can be written with
`jax.custom_vjp` directly; the model passes `block_loop.block_fn(...)` as `layer_fn`, and both passes
iterate with `block_loop.over_layers` (scanned or unrolled layouts alike).

The same argument covers the depth mixers' write-once outputs buffer (docs/peers.md): DenseFormer's
block outputs and attention residuals' sublayer outputs are written once in layer order and read
through a mask, exactly like the depth K/V slots.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from moda_jax.model import block_loop
from moda_jax.model import depth_stream
from moda_jax.model.config import ModelConfig

# layer_fn(params, x_BTM, stream, positions_BT, segment_ids_BT, kv_cache=None, return_probs=False)
#   -> (x_BTM, (k_BTSKD, v_BTSKD), kv_cache, probs, read):
# a `block_loop.block_fn`; the stack reads the first two results and `read`, the stream it read.
LayerFn = Callable[..., tuple]


class _Supplied(NamedTuple):
  """A layer's inputs that its pullback may hold and the backward supplies again (module docstring:
  "Residuals"); one structure for `_split_residuals` (forward) and `_join_residuals` (backward)."""
  params: Any
  x_BTM: Any
  buffers_read: Any
  buffers_returned: Any
  positions_and_segments: tuple


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

  def layer(p, x_BTM, arrays, layer_index, positions_BT, segment_ids_BT):
    """One writer block against `arrays` (masked to what it reads): (x_out, written, read buffers)."""
    x_out, written, _, _, read = layer_fn(p, x_BTM, depth_stream.view(config, arrays, layer_index),
                                          positions_BT, segment_ids_BT, None, False)
    return x_out, written, depth_stream.buffers(read)

  # What the forward's pullbacks hold that the backward supplies itself (module docstring:
  # "Residuals"): filled while tracing the forward, read while tracing the backward.
  layout = {}

  def forward(params, x_BTM, positions_BT, segment_ids_BT, save_residuals: bool):
    """(x_out, final buffers, (each layer's input, its pullback's own residuals) with a leading axis N)."""
    ints = (positions_BT, segment_ids_BT)

    def step(carry, p, per_layer, layer_index):
      del per_layer
      x_in, stream = carry
      arrays = depth_stream.buffers(stream)
      if not save_residuals:
        x_out, written, read = layer(p, x_in, arrays, layer_index, *ints)
        return (x_out, _write(read, written, layer_index)), (x_in, [])
      (x_out, written, read), pullback = jax.vjp(lambda p, x, a: layer(p, x, a, layer_index, *ints),
                                                 p, x_in, arrays)
      own = _split_residuals(pullback, _Supplied(p, x_in, arrays, read, ints), layout, layer_index)
      return (x_out, _write(read, written, layer_index)), (x_in, own)

    (x_BTM, stream), per_layer = block_loop.over_layers(
        step, (x_BTM, depth_stream.start(config, x_BTM)), params)
    return x_BTM, depth_stream.buffers(stream), per_layer

  def _write(read, written, layer_index):
    return depth_stream.write_block(depth_stream.view(config, read, layer_index), written)

  # Positions and segment ids are arguments (not closed over) so the custom_vjp sees every input.
  @jax.custom_vjp
  def stack(params, x_BTM, positions_BT, segment_ids_BT):
    return forward(params, x_BTM, positions_BT, segment_ids_BT, save_residuals=False)[:2]

  def stack_fwd(params, x_BTM, positions_BT, segment_ids_BT):
    x_out, arrays, per_layer = forward(params, x_BTM, positions_BT, segment_ids_BT, save_residuals=True)
    return (x_out, arrays), (params, per_layer, arrays, positions_BT, segment_ids_BT)

  def stack_bwd(residuals, cotangents):
    params, per_layer, arrays, positions_BT, segment_ids_BT = residuals

    def layer_bwd(carry, p, saved, layer_index):
      g_x_BTM, g_arrays = carry
      x_in_BTM, own = saved
      # The buffers as this layer saw them equal the final ones wherever it reads (module docstring).
      supplied = _Supplied(p, x_in_BTM, arrays, arrays, (positions_BT, segment_ids_BT))
      pullback = _join_residuals(own, supplied, layout, layer_index)
      # Complete here: every reader of this layer's slots lies above it and was pulled back already.
      g_written = depth_stream.written_part(config, g_arrays, layer_index)
      # Read the written slots' cotangent out before the pullback updates the carry in place (XLA
      # would otherwise read it from the carry late, and copy the whole carry to do so).
      g_written, g_arrays = jax.lax.optimization_barrier((g_written, g_arrays))
      # The carry goes in as the cotangent of the buffers the layer read and comes back with the
      # layer's read cotangent added (by the operator in place; by JAX for the outputs buffer).
      g_p, g_x_in, g_arrays = pullback((g_x_BTM, g_written, g_arrays))
      return (g_x_in, g_arrays), g_p

    (g_x, g_arrays), g_params = block_loop.over_layers(layer_bwd, cotangents, params, per_layer,
                                                       reverse=True)
    # The stream's entry write (the embedding in output slot 0; nothing without an outputs buffer).
    x_first = jax.tree.map(lambda a: a[0], per_layer[0])
    _, start_pullback = jax.vjp(lambda x: depth_stream.buffers(depth_stream.start(config, x)), x_first)
    g_x = jax.tree.map(jnp.add, g_x, start_pullback(g_arrays)[0])
    if isinstance(params, (list, tuple)):
      g_params = type(params)(jax.tree.map(lambda a, i=i: a[i], g_params) for i in range(num_layers))
    # Positions and segment ids are integers: no cotangent.
    return g_params, g_x, None, None

  stack.defvjp(stack_fwd, stack_bwd)
  x_BTM, arrays = stack(layer_params, x_BTM, positions_BT, segment_ids_BT)
  return x_BTM, depth_stream.view(config, arrays, num_layers)


def _layout_key(layer_index):
  """One pullback structure per traced loop body; one per layer when the layers are unrolled."""
  return layer_index if isinstance(layer_index, int) else "scanned"


def _split_residuals(pullback, inputs: _Supplied, layout: dict, layer_index) -> list:
  """The leaves of a layer's pullback that are not among `inputs` (its params, input, the buffers it
  read and the buffers it returned), recording in `layout` where the others come from.

  The inputs are the backward's own (the stacked params, the saved layer inputs, the final buffers),
  so they are not saved again; in particular the depth buffers, saved per layer, would make memory
  quadratic in depth. The rest is what the remat policy keeps (nothing but the inputs for "full").
  """
  leaves, treedef = jax.tree.flatten(pullback)
  where = {id(leaf): i for i, leaf in enumerate(jax.tree.leaves(inputs))}
  sources = [where.get(id(leaf)) for leaf in leaves]
  layout[_layout_key(layer_index)] = (treedef, sources)
  return [leaf for leaf, source in zip(leaves, sources) if source is None]


def _join_residuals(own: list, inputs: _Supplied, layout: dict, layer_index):
  """The pullback `_split_residuals` took apart, with `inputs` (same structure) in the recorded places."""
  treedef, sources = layout[_layout_key(layer_index)]
  supplied, own = jax.tree.leaves(inputs), iter(own)
  return jax.tree.unflatten(treedef, [next(own) if source is None else supplied[source] for source in sources])
