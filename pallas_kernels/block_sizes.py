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
  per_query_head_below: (dk/dv kernel only) when the launch would have fewer programs than this (key
    blocks x batch x kv heads), run one program per key block and *query* head instead of per kv head and
    sum the G float32 partial dk/dv outside the kernel: G times the programs, for short sequences whose
    few key blocks leave SMs idle. 0: never.
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
  per_query_head_below: int = 0

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
    if not isinstance(self.separate_depth_kernel, bool):
      raise ValueError(f"{name}.separate_depth_kernel={self.separate_depth_kernel!r}: expected a bool.")
    if not isinstance(self.per_query_head_below, int) or self.per_query_head_below < 0:
      raise ValueError(f"{name}.per_query_head_below={self.per_query_head_below!r}: expected an int >= 0.")
    rows = self.depth_rows
    valid_rows = isinstance(rows, int) and _is_pow2(rows) and max(16, group_padded) <= rows <= self.block_q
    if rows != 0 and not valid_rows:
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
    # Measured on the H200 (fwd+bwd ms, BENCHMARKS.md §1, "Fourth round"):
    # * dq depth_rows=16 (the depth backward in parts of 16 rows, a quarter of the dense waste of 64):
    #   B8 T4K G2 L72 7.91 vs 8.47, D128 14.39 vs 16.22; T4K G8 2.30 vs 2.27, T64K 398.8 vs 400.6.
    #   The forward's depth phase gained nothing from parts (it streams depth K/V at ~HBM bandwidth
    #   already: 1.92 ms either way at B8 T4K G2), except 1.4% at D128.
    # * dk/dv per query head below 1024 programs: T4K G8 (512 programs) 2.30 vs 2.53; B8 T4K G2 (4096)
    #   7.91 vs 7.76 when forced; T64K (8192) even.
    # Fifth round (§1): at G >= 8 per query head at any size. T8K G8 (1024 programs) 7.54 vs 7.75/7.78,
    # T16K G8 (2048) 26.87 vs 27.51/27.33, T16K G16 51.39 vs 55.79/56.17, T64K G8 even (above); but T16K
    # G2 8.19 vs 8.16 and G4 14.54 vs 14.43. A per-kv-head tile holds only 64/G tokens at G >= 8.
    if head_dim <= 64:
      fwd = KernelBlocks(block_q=64, block_k=64, depth_cols=64, num_warps=4, num_stages=3)
      # The depth backward as its own kernel (fwd+bwd ms, H200, BENCHMARKS.md §1): T4K G8 2.77 vs 2.96
      # fused, T64K 388 vs 444, B8 T4K G2 L72 8.49 vs 8.42. Fused, its depth work lengthens every step
      # of the dq kernel's O(T^2) loop; separate, it re-reads q / do once. Not yet measured at D > 64.
      dq = KernelBlocks(block_q=64, block_k=64, depth_cols=64, num_warps=4, num_stages=2,
                        separate_depth_kernel=True, depth_rows=16)
      dkv = KernelBlocks(block_q=64, block_k=64, depth_cols=64, num_warps=4, num_stages=2,
                         per_query_head_below=2 ** 31 if group >= 8 else 1024)
    elif head_dim <= 128:
      # D128 (B8 T4K G2 L72): fused depth backward 16.22 vs 16.65 separate; dk/dv per query head 16.49.
      fwd = KernelBlocks(block_q=64, block_k=64, depth_cols=64, num_warps=4, num_stages=2, depth_rows=16)
      dq = KernelBlocks(block_q=64, block_k=32, depth_cols=32, num_warps=4, num_stages=2, depth_rows=16)
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
