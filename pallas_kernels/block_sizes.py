"""Tile sizes of the Triton MoDA kernels: frozen dataclasses, per-device defaults, validation.

A query tile holds `block_q` *folded rows*: `block_q // Gp` tokens times the `Gp = next_pow2(G)` query heads
of one kv head (rows with g >= G are padding), so one sequence K/V block and one depth block serve all G
heads. Every tile covers whole tokens, which is what lets the backward store depth gradients without atomics.
Why the defaults are what they are (the measurements): BENCHMARKS.md §1.
"""

from __future__ import annotations

import dataclasses

import jax

# The measured default of `KernelBlocks.per_query_head` (None): dk/dv per query head when G is at least
# this, or when the per-kv-head launch would have fewer programs than the second number.
PER_QUERY_HEAD_MIN_GROUP = 8
PER_QUERY_HEAD_MAX_PROGRAMS = 1024


def next_pow2(n: int) -> int:
  return 1 << max(0, (int(n) - 1).bit_length())


def _is_pow2(n: int) -> bool:
  return n > 0 and (n & (n - 1)) == 0


@dataclasses.dataclass(frozen=True)
class KernelBlocks:
  """Tiles of one kernel.

  block_q: folded query rows per program (power of two, >= 16).
  block_k: sequence keys per inner step (power of two, >= 16).
  depth_cols: depth columns (tokens of the tile x slots) per inner step of the depth phase: one
    tensor-core matmul of the rows against all their tokens' slots, invisible entries masked.
  num_warps, num_stages: Triton launch parameters.
  separate_depth_kernel: (dq kernel only) run the depth backward as its own kernel instead of fused into
    the dq kernel.
  depth_rows: (forward and dq kernels) rows per part of the depth phase, which splits the tile into parts
    of whole tokens (and whole depth chunks): a depth step multiplies a part's rows against its own
    tokens' slots only, so the masked waste is tokens_per_part x, not tokens_per_tile x. 0 = the whole tile.
  per_query_head: (dk/dv kernel only) one program per key block and *query* head instead of per kv head,
    the G float32 partial dk/dv summed outside the kernel: G times the programs. None: the measured
    default, `dkv_per_query_head`.
  """
  block_q: int
  block_k: int
  depth_cols: int = 64
  num_warps: int = 4
  num_stages: int = 2
  separate_depth_kernel: bool = False
  depth_rows: int = 0
  per_query_head: bool | None = None

  def validate(self, name: str, group_padded: int) -> None:
    for field in ("block_q", "block_k", "depth_cols"):
      value = getattr(self, field)
      if not isinstance(value, int) or not _is_pow2(value) or value < 16:
        raise ValueError(f"{name}.{field}={value!r}: expected a power of two >= 16 (Triton tiles).")
    if self.block_q < group_padded:
      raise ValueError(f"{name}.block_q={self.block_q}: expected >= next_pow2(G)={group_padded} so that a "
                       "tile holds whole tokens.")
    if self.num_warps not in (1, 2, 4, 8, 16):
      raise ValueError(f"{name}.num_warps={self.num_warps!r}: expected 1, 2, 4, 8 or 16.")
    if not isinstance(self.separate_depth_kernel, bool):
      raise ValueError(f"{name}.separate_depth_kernel={self.separate_depth_kernel!r}: expected a bool.")
    if self.per_query_head is not None and not isinstance(self.per_query_head, bool):
      raise ValueError(f"{name}.per_query_head={self.per_query_head!r}: expected None (the measured default) "
                       "or a bool.")
    rows = self.depth_rows
    valid_rows = isinstance(rows, int) and _is_pow2(rows) and max(16, group_padded) <= rows <= self.block_q
    if rows != 0 and not valid_rows:
      raise ValueError(f"{name}.depth_rows={rows!r}: expected 0 (the whole tile) or a power of two in "
                       f"[max(16, next_pow2(G)={group_padded}), block_q={self.block_q}].")
    if not isinstance(self.num_stages, int) or self.num_stages < 1:
      raise ValueError(f"{name}.num_stages={self.num_stages!r}: expected a positive int.")


def dkv_per_query_head(blocks: KernelBlocks, group: int, num_kv_head_programs: int) -> bool:
  """Whether the dk/dv kernel runs one program per query head (see `KernelBlocks.per_query_head`).

  The default (None): yes when G >= 8 (a per-kv-head tile then holds only block_q / G tokens), or when the
  per-kv-head launch (key blocks x batch x kv heads) has fewer than 1024 programs, too few for the SMs.
  """
  if group == 1:
    return False
  if blocks.per_query_head is not None:
    return blocks.per_query_head
  return group >= PER_QUERY_HEAD_MIN_GROUP or num_kv_head_programs < PER_QUERY_HEAD_MAX_PROGRAMS


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles of the forward, the dq (+ depth dk/dv) and the sequence dk/dv kernels."""
  fwd: KernelBlocks
  dq: KernelBlocks
  dkv: KernelBlocks

  @classmethod
  def get_default(cls, head_dim: int, group: int, dtype, device_kind: str | None = None) -> "BlockSizes":
    """Defaults for Hopper-class GPUs (tuned on an H200); other GPUs get the same tiles.

    Register pressure grows with head_dim, so larger heads get shorter tiles and more warps; fp32 tiles
    are halved because every operand takes twice the registers.
    """
    del device_kind  # One table today; the argument keeps the call sites ready for per-device tables.
    group_padded = next_pow2(group)
    if head_dim <= 64:
      fwd = KernelBlocks(block_q=64, block_k=64, depth_cols=64, num_warps=4, num_stages=3)
      dq = KernelBlocks(block_q=64, block_k=64, depth_cols=64, num_warps=4, num_stages=2,
                        separate_depth_kernel=True, depth_rows=16)
      dkv = KernelBlocks(block_q=64, block_k=64, depth_cols=64, num_warps=4, num_stages=2, per_query_head=None)
    elif head_dim <= 128:
      fwd = KernelBlocks(block_q=64, block_k=64, depth_cols=64, num_warps=4, num_stages=2, depth_rows=16)
      dq = KernelBlocks(block_q=64, block_k=32, depth_cols=32, num_warps=4, num_stages=2, depth_rows=16)
      dkv = KernelBlocks(block_q=32, block_k=64, depth_cols=32, num_warps=4, num_stages=2, per_query_head=False)
    else:
      fwd = KernelBlocks(block_q=64, block_k=32, depth_cols=32, num_warps=8, num_stages=2)
      dq = KernelBlocks(block_q=32, block_k=32, depth_cols=32, num_warps=8, num_stages=1)
      dkv = KernelBlocks(block_q=32, block_k=32, depth_cols=32, num_warps=8, num_stages=1, per_query_head=False)
    if jax.numpy.dtype(dtype).itemsize == 4:
      fwd, dq, dkv = (dataclasses.replace(b, block_q=max(16, b.block_q // 2)) for b in (fwd, dq, dkv))
    # A tile, and a depth part, must hold at least one whole token of Gp folded rows.
    fix = lambda b: dataclasses.replace(b, block_q=max(b.block_q, group_padded),
                                        depth_rows=b.depth_rows and max(b.depth_rows, group_padded))
    return cls(fwd=fix(fwd), dq=fix(dq), dkv=fix(dkv))

  def validate(self, group: int) -> None:
    group_padded = next_pow2(group)
    for name in ("fwd", "dq", "dkv"):
      blocks = getattr(self, name)
      if not isinstance(blocks, KernelBlocks):
        raise ValueError(f"block_sizes.{name}={blocks!r}: expected a KernelBlocks.")
      blocks.validate(f"block_sizes.{name}", group_padded)
