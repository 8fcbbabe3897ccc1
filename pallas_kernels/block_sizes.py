"""Tile sizes of the Triton MoDA kernels: frozen dataclasses, per-device defaults, validation.

A query tile holds `block_q` *folded rows*: `block_q // Gp` tokens times the `Gp = next_pow2(G)` query heads
of one kv head (rows with g >= G are padding), so one sequence K/V block and one depth block serve all G
heads. Every tile covers whole tokens, which is what lets the backward store depth gradients without atomics.
"""

from __future__ import annotations

import dataclasses

import jax


def next_pow2(n: int) -> int:
  return 1 << max(0, (int(n) - 1).bit_length())


def _is_pow2(n: int) -> bool:
  return n > 0 and (n & (n - 1)) == 0


@dataclasses.dataclass(frozen=True)
class KernelBlocks:
  """Tiles of one kernel.

  block_q: folded query rows per program (power of two, >= 16).
  block_k: sequence keys per inner step (power of two, >= 16).
  depth_cols: depth columns (tokens of the tile x slots) per inner step of the "dense" depth phase.
  num_warps, num_stages: Triton launch parameters.
  depth_mode: how depth logits q[t, g] . depth_k[t, l] are formed.
    "dense": one tensor-core matmul of the tile's rows against all its tokens' slots, off-token entries
      masked (the official kernel's layout): tokens_per_tile x the useful FLOPs.
    "per_token": each row gathers its own token's slot and reduces q * depth_k over D on the CUDA cores:
      no wasted FLOPs, but ~12x lower peak rate. Wins once a tile holds many tokens (small G).
  per_token_slots: slots gathered per step in "per_token" mode (loads in flight per rescale).
  separate_depth_kernel: (dq kernel only) run the depth backward as its own kernel instead of fused into
    the dq kernel.
  depth_rows: (forward and dq kernels) rows per part of the depth phase, which splits the tile into parts
    of whole tokens: a "dense" depth step multiplies a part's rows against its own tokens' slots only, so
    the masked waste is tokens_per_part x, not tokens_per_tile x. 0 = the whole tile.
  per_query_head: (dk/dv kernel only) one program per key block and *query* head instead of per kv head;
    the G float32 partial dk/dv are summed outside the kernel. G times the programs, for short sequences
    whose few key blocks leave the GPU part idle.
  """
  block_q: int
  block_k: int
  depth_cols: int = 64
  num_warps: int = 4
  num_stages: int = 2
  depth_mode: str = "dense"
  per_token_slots: int = 2
  separate_depth_kernel: bool = False
  depth_rows: int = 0
  per_query_head: bool = False

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
    if self.depth_mode not in ("dense", "per_token"):
      raise ValueError(f"{name}.depth_mode={self.depth_mode!r}: expected 'dense' or 'per_token'.")
    if not isinstance(self.per_token_slots, int) or not 1 <= self.per_token_slots <= 8:
      raise ValueError(f"{name}.per_token_slots={self.per_token_slots!r}: expected an int in [1, 8].")
    for field in ("separate_depth_kernel", "per_query_head"):
      if not isinstance(getattr(self, field), bool):
        raise ValueError(f"{name}.{field}={getattr(self, field)!r}: expected a bool.")
    rows = self.depth_rows
    if rows != 0 and (not isinstance(rows, int) or not _is_pow2(rows) or not max(16, group_padded) <= rows <= self.block_q):
      raise ValueError(f"{name}.depth_rows={rows!r}: expected 0 (the whole tile) or a power of two in "
                       f"[max(16, next_pow2(G)={group_padded}), block_q={self.block_q}].")
    if not isinstance(self.num_stages, int) or self.num_stages < 1:
      raise ValueError(f"{name}.num_stages={self.num_stages!r}: expected a positive int.")


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
    # Measured on the H200 (benchmark --tune, 2026-11-28): 64-row forward tiles beat 128-row ones on
    # T16K G8 (6.5 vs 7.3 ms), T4K G8 (0.66 vs 0.77) and B8 T4K G2 L72 (2.2 vs 2.7): the dense depth
    # phase costs tokens_per_tile x the useful FLOPs, and halving the tile halves that waste.
    if head_dim <= 64:
      # Depth phases in parts of 16 rows: a quarter of the dense depth FLOPs and exps of a 64-row tile.
      fwd = KernelBlocks(block_q=64, block_k=64, depth_cols=64, num_warps=4, num_stages=3, depth_rows=16)
      # The depth backward as its own kernel (fwd+bwd ms, H200, BENCHMARKS.md §1): T4K G8 2.77 vs 2.96
      # fused, T64K 388 vs 444, B8 T4K G2 L72 8.49 vs 8.42. Fused, its depth work lengthens every step
      # of the dq kernel's O(T^2) loop; separate, it re-reads q / do once. Not yet measured at D > 64.
      dq = KernelBlocks(block_q=64, block_k=64, depth_cols=64, num_warps=4, num_stages=2,
                        separate_depth_kernel=True, depth_rows=16)
      # dk/dv per query head: T4K G8 fwd+bwd 2.27 vs 2.49 ms (512 kv-head programs leave SMs idle), T64K
      # and B8 T4K G2 within 1% (BENCHMARKS.md §1).
      dkv = KernelBlocks(block_q=64, block_k=64, depth_cols=64, num_warps=4, num_stages=2, per_query_head=True)
    elif head_dim <= 128:
      fwd = KernelBlocks(block_q=64, block_k=64, depth_cols=64, num_warps=4, num_stages=2)
      dq = KernelBlocks(block_q=64, block_k=32, depth_cols=32, num_warps=4, num_stages=2)
      dkv = KernelBlocks(block_q=32, block_k=64, depth_cols=32, num_warps=4, num_stages=2)
    else:
      fwd = KernelBlocks(block_q=64, block_k=32, depth_cols=32, num_warps=8, num_stages=2)
      dq = KernelBlocks(block_q=32, block_k=32, depth_cols=32, num_warps=8, num_stages=1)
      dkv = KernelBlocks(block_q=32, block_k=32, depth_cols=32, num_warps=8, num_stages=1)
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
