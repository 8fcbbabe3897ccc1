"""Deterministic sums across Triton programs: every destination tile adds its parts in one fixed order.

The dk/dv kernel with `KernelBlocks.ordered_dq` also forms dq, whose tile i is a sum over the key blocks
that see it, each computed by a different program. Float atomics would make that sum depend on the order
in which programs happen to arrive (non-deterministic dq). Here every destination tile has an int32 turn
counter, zero before the launch. A program waits until the counter equals its turn (the number of programs
that add to the tile before it), adds its part with a plain load and store of the float32 tile, and
increments the counter. Each tile is then summed in the same order on every run: bitwise reproducible.

The protocol is pipelined by one step so that its memory latency hides behind the next step's matmuls: a
part computed in step s is `Held` into step s + 1, which waits for its turn (the counter was peeked in
step s), loads the float32 tile, runs its own matmuls, and only then adds, stores and passes the turn on.

Deadlock freedom: a program's turn only ever waits on programs with a lower linear launch index, which the
GPU dispatches first (the assumption FlashAttention-3's deterministic backward makes too). Interpret mode
runs the grid in that order, so there the counter must already equal the turn on arrival: `interpret`
reads it once and poisons the part with NaN if it does not, so a wrong turn fails a test instead of
hanging it (and needs no CTA barrier, which has no CPU lowering).

Memory ordering (the pattern of CUB's decoupled look-back): the writer stores the tile, a CTA barrier
orders every thread's stores before one thread's acquire-release atomic increment at GPU scope (its
result unused, so Triton emits it from one thread without a second barrier). The reader spins on
`volatile` loads of the counter (every thread, no barrier) and only after seeing its turn issues the
`volatile` loads of the tile, which read L2 rather than the SM's incoherent L1, where a stale copy of the
tile may sit (jax 0.11.2's Pallas Triton rejects the `.cg` cache modifier that would say the same).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import triton_tiles as tt


class Held(NamedTuple):
  """A float32 part [block_q, D] of destination tile `tile`, computed in one step and added in the next."""
  tile: jax.Array   # int32 []
  part: jax.Array   # float32 [block_q, D]
  seen: jax.Array   # int32 []: the tile's counter, peeked when the part was computed
  valid: jax.Array  # bool []: False before the first step (nothing to add)


def nothing_held(tile, geom: tt.Geometry) -> Held:
  part = jnp.zeros((geom.block_q, geom.head_dim), jnp.float32)
  return Held(jnp.asarray(tile, jnp.int32), part, jnp.int32(0), jnp.bool_(False))


def hold(tile, part, seen, previous: Held) -> Held:
  """The part computed in this step, for the next one. `valid` is True, traced from `previous`: Pallas
  Triton cannot yield a literal from a loop body."""
  return Held(tile, part, seen, previous.valid | True)


def peek(counter_ref, tile):
  """The tile's counter, read by every thread without a barrier (issued early, waited on late)."""
  return plgpu.load(counter_ref.at[tile], volatile=True)


def _rows(held: Held, geom: tt.Geometry) -> tt.Rows:
  rows = tt.tile_rows(held.tile * geom.tokens_per_tile, geom)
  return dataclasses.replace(rows, valid=rows.valid & held.valid)


def load_in_turn(acc_ref, counter_ref, held: Held, turn, geom: tt.Geometry, *, interpret: bool):
  """Waits until the held tile's counter equals `turn`, then loads the tile's running sum: (sum, part)."""
  part = held.part
  if interpret:
    part = jnp.where(~held.valid | (held.seen == turn), part, jnp.nan)
  else:
    jax.lax.while_loop(lambda seen: held.valid & (seen != turn), lambda _: peek(counter_ref, held.tile), held.seen)
  return tt.load_rows(acc_ref, _rows(held, geom), geom, volatile=True), part


def store_and_pass(acc_ref, counter_ref, held: Held, total, geom: tt.Geometry, *, interpret: bool):
  """Stores the held tile's new sum and passes its turn on (a no-op increment when nothing is held)."""
  tt.store_rows(acc_ref, _rows(held, geom), total, geom)
  if not interpret:  # Interpret mode runs programs one at a time (and has no CPU lowering of the barrier).
    plgpu.debug_barrier()
  plgpu.atomic_add(counter_ref, (held.tile,), held.valid.astype(jnp.int32))
