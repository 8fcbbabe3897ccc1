"""Tile sizes of the Pallas TPU MoDA kernels and how they fit a given sequence length.

TPU (Mosaic) blocks must have their last two dimensions divisible by (8, 128) or equal to the array's.
In the kernels' layouts the query tile `block_q` and the depth tile are second-minor (multiple of 8),
and the key tile `block_k` is the minor (lane) dimension of the logits and of the key segment ids
(multiple of 128). Sequences shorter than one block use a single block of the padded length instead,
which the "equal to the array" rule allows.
"""

from __future__ import annotations

import dataclasses
import math

_SUBLANES = 8
_LANES = 128


@dataclasses.dataclass(frozen=True)
class TPUBlockSizes:
  """Tile sizes in tokens (query, key) and in depth slots.

  Attributes:
    block_q: query tokens per tile; each tile holds all G query heads of one kv head (G * block_q rows).
      A multiple of 16 keeps 16-bit blocks aligned to their (16, 128) memory tiles.
    block_k: key tokens per sequence step.
    block_slots: depth slots per depth step. Steps past `depth_len` are neither fetched nor computed.
  """

  block_q: int = 128
  block_k: int = 128
  block_slots: int = 8

  def __post_init__(self):
    for name, value, multiple in (("block_q", self.block_q, _SUBLANES),
                                  ("block_k", self.block_k, _LANES),
                                  ("block_slots", self.block_slots, 1)):
      if not isinstance(value, int) or value <= 0 or value % multiple:
        raise ValueError(f"{name}={value!r}: expected a positive int divisible by {multiple} "
                         "(Mosaic TPU tiling).")

  def fit(self, seq_len: int, num_slots: int) -> FittedBlocks:
    """The blocks and padded extents used for a sequence of `seq_len` tokens and `num_slots` slots."""
    if seq_len <= max(self.block_q, self.block_k):
      # One block spanning the whole (padded) sequence: allowed by the "equal to the array" rule.
      # 16 rows, not 8: 16-bit arrays are tiled (16, 128) in TPU memory.
      padded_len = _round_up(seq_len, 2 * _SUBLANES)
      block_q = block_k = padded_len
    else:
      block_q, block_k = self.block_q, self.block_k
      padded_len = _round_up(seq_len, math.lcm(block_q, block_k))
    block_slots = min(self.block_slots, max(num_slots, 1))
    padded_slots = _round_up(num_slots, block_slots)
    return FittedBlocks(block_q, block_k, block_slots, padded_len, padded_slots)


@dataclasses.dataclass(frozen=True)
class FittedBlocks:
  """Block sizes after fitting to a shape; `padded_*` are the kernel-side array extents."""

  block_q: int
  block_k: int
  block_slots: int
  padded_len: int
  padded_slots: int

  @property
  def num_q_blocks(self) -> int:
    return self.padded_len // self.block_q

  @property
  def num_k_blocks(self) -> int:
    return self.padded_len // self.block_k

  @property
  def num_depth_blocks(self) -> int:
    return self.padded_slots // self.block_slots


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple
