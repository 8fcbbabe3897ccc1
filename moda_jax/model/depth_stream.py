"""The depth stream: fixed-size per-token K/V buffers and the count of slots written so far.

Buffers are allocated once at their final size L_max = `config.num_depth_slots` so that a scan
carry has a fixed shape; slot `l` is written exactly once (block b writes slots
[b * S, (b + 1) * S), S = `config.slots_per_block`: its attention's slot, then its FFN's). A
reader passes `length` as `depth_len`, so slots not yet written are ignored by the kernel.

With QK-norm the keys are stored RMS-normalized without gain (`layers.depth_key`); each reader
scores them with its depth query q * (its k-norm gain) and never rewrites the buffer.

With a depth mixer (docs/peers.md) the blocks read a `Stream`: the same K/V fields, the outputs
buffer of DenseFormer / attention residuals (slot 0 the embedding, then each non-last block's
`config.outputs_per_block` outputs, written once like the K/V slots) and the reading block's index.
A block returns what it writes as (kv slots or None, output slots or None) then.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from moda_jax.model.config import ModelConfig


class DepthKV(NamedTuple):
  """The scan carry's depth part. `k`/`v` are None when the model has no depth slots."""

  k_BTLKD: jax.Array | None
  v_BTLKD: jax.Array | None
  length: jax.Array  # int32 scalar: slots written so far


def empty(config: ModelConfig, batch: int, seq_len: int) -> DepthKV:
  """Zero buffers [B, T, L_max, Hk, D] in the compute dtype, or None buffers when L_max = 0."""
  length = jnp.zeros((), jnp.int32)
  if config.num_depth_slots == 0:
    return DepthKV(None, None, length)
  shape = (batch, seq_len, config.num_depth_slots, config.num_kv_heads, config.head_dim)
  zeros = jnp.zeros(shape, jnp.dtype(config.dtype))
  return DepthKV(zeros, zeros, length)


class Stream(NamedTuple):
  """The scan carry's depth part with a depth mixer: DepthKV's fields, the outputs buffer
  [B, T, P, M] (None without one; P = `config.num_output_slots`) and the reading block's index."""

  k_BTLKD: jax.Array | None
  v_BTLKD: jax.Array | None
  length: jax.Array
  outs_BTPM: jax.Array | None
  layer: jax.Array  # int32 scalar: the index of the block that reads this stream


def hidden_of(state) -> jax.Array:
  """The [B, T, ...] hidden part of a residual state (an array, or a tuple whose first leaf it is)."""
  return jax.tree.leaves(state)[0]


def start(config: ModelConfig, state) -> DepthKV | Stream:
  """The stream the first block reads: empty buffers, and the embedding (the residual state, an
  array [B, T, M] for the mixers with an outputs buffer) in output slot 0."""
  batch, seq_len = hidden_of(state).shape[:2]
  kv = empty(config, batch, seq_len)
  if not config.has_mixer:
    return kv
  outs_BTPM = None
  if config.num_output_slots:
    shape = (batch, seq_len, config.num_output_slots, config.d_model)
    outs_BTPM = jax.lax.dynamic_update_slice_in_dim(jnp.zeros(shape, state.dtype), state[:, :, None], 0,
                                                    axis=2)
  return Stream(*kv, outs_BTPM, jnp.zeros((), jnp.int32))


def buffers(stream: DepthKV | Stream) -> tuple:
  """The write-once arrays of a stream (None where absent): (k, v) or (k, v, outputs)."""
  if isinstance(stream, Stream):
    return stream.k_BTLKD, stream.v_BTLKD, stream.outs_BTPM
  return stream.k_BTLKD, stream.v_BTLKD


def view(config: ModelConfig, arrays: tuple, layer) -> DepthKV | Stream:
  """The stream block `layer` (int or int32 scalar) reads, given the final buffers: slots written
  later hold other values there, but every reader ignores them (docs/moda.md section 5)."""
  length = jnp.asarray(layer * config.slots_per_block, jnp.int32)
  if not config.has_mixer:
    return DepthKV(arrays[0], arrays[1], length)
  return Stream(arrays[0], arrays[1], length, arrays[2], jnp.asarray(layer, jnp.int32))


def outputs_read(config: ModelConfig, stream: Stream):
  """How many output slots block `stream.layer` reads: the embedding and the earlier blocks'."""
  return 1 + stream.layer * config.outputs_per_block


def write_block(stream: DepthKV | Stream, written) -> DepthKV | Stream:
  """The stream after a block wrote `written` (what `Block` returns) and the next block reads."""
  if not isinstance(stream, Stream):
    return stream if written is None else write(stream, *written)
  kv, outs_BTSM = (None, None) if written is None else written
  if kv is not None:
    stream = stream._replace(**write(DepthKV(*stream[:3]), *kv)._asdict())
  if outs_BTSM is not None:
    first = 1 + stream.layer * outs_BTSM.shape[2]
    stream = stream._replace(outs_BTPM=jax.lax.dynamic_update_slice_in_dim(
        stream.outs_BTPM, outs_BTSM.astype(stream.outs_BTPM.dtype), first, axis=2))
  return stream._replace(layer=stream.layer + 1)


def written_part(config: ModelConfig, arrays: tuple, layer):
  """The slots of `arrays` (e.g. the buffers' cotangents) that block `layer` writes, structured
  like what `Block` returns."""
  kv = None
  if config.slots_per_block:
    start_slot, count = layer * config.slots_per_block, config.slots_per_block
    kv = (read_slots(arrays[0], start_slot, count), read_slots(arrays[1], start_slot, count))
  if not config.has_mixer:
    return kv
  outs = None
  if config.outputs_per_block:
    per_block = config.outputs_per_block
    outs = read_slots(arrays[2], 1 + layer * per_block, per_block)
  return kv, outs


def stack_slots(slots: list[tuple[jax.Array, jax.Array]]) -> tuple[jax.Array, jax.Array]:
  """[(k_BTKD, v_BTKD)] * S in slot order -> (k_BTSKD, v_BTSKD)."""
  return (jnp.stack([k for k, _ in slots], axis=2), jnp.stack([v for _, v in slots], axis=2))


def write(depth: DepthKV, k_BTSKD: jax.Array, v_BTSKD: jax.Array) -> DepthKV:
  """Writes S consecutive slots at `depth.length` and advances it by S."""
  start = (0, 0, depth.length, 0, 0)
  k_BTLKD = jax.lax.dynamic_update_slice(depth.k_BTLKD, k_BTSKD.astype(depth.k_BTLKD.dtype), start)
  v_BTLKD = jax.lax.dynamic_update_slice(depth.v_BTLKD, v_BTSKD.astype(depth.v_BTLKD.dtype), start)
  return DepthKV(k_BTLKD, v_BTLKD, depth.length + k_BTSKD.shape[2])


def read_slots(buffer_BTLKD: jax.Array, start, num_slots: int) -> jax.Array:
  """The S = num_slots slots starting at `start` (traced or static): [B, T, S, Hk, D]."""
  return jax.lax.dynamic_slice_in_dim(buffer_BTLKD, start, num_slots, axis=2)
