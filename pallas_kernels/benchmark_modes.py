"""The benchmark's study modes (`python -m pallas_kernels.benchmark --tune [--mosaic] | --ablate | --family`):
tile variants (of pallas_triton, or with `--mosaic` of pallas_mosaic_gpu), each kernel option flipped against
the defaults beside the kernels without depth and JAX's Mosaic GPU forward, and the MoDA family. Each adds
the rows `benchmark.measure` gives to `rows` (a `benchmark.RowLog`) as it goes, on its shapes that `names`
selects (`benchmark.selected`; all without names).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math

import jax
import jax.numpy as jnp

from pallas_kernels import mosaic_gpu, mosaic_gpu_tiles, triton
from pallas_kernels.benchmark import (PEAK_FLOPS, RowLog, Shape, bytes_moved, flops, make_inputs, measure, selected,
                                      time_ms)
from pallas_kernels.block_sizes import BlockSizes, KernelBlocks, dkv_per_query_head, next_pow2


def _variants(specs):
  return [KernelBlocks(bq, bk, dc, w, st) for bq, bk, dc, w, st in specs]


# Forward / backward tiles to compare (block_q, block_k, depth_cols, num_warps, num_stages).
_FWD_VARIANTS = _variants([(128, 64, 64, 4, 3), (128, 64, 64, 8, 3), (128, 128, 64, 8, 3), (64, 64, 64, 4, 3),
                           (64, 32, 64, 4, 3)])
_BWD_VARIANTS = _variants([(64, 64, 64, 4, 2), (128, 64, 64, 8, 2), (64, 128, 64, 8, 2), (32, 64, 32, 4, 2)])


# The shapes that bound the design: long sequence G8, short G8, the G = 2 training shape.
_TUNE_SHAPES = (Shape("table2_T16K_G8_L64", 1, 16384, 8, 64), Shape("table2_T4K_G8_L64", 1, 4096, 8, 64),
                Shape("train_B8_T4K_G2_L72", 8, 4096, 2, 72))


def _tune_row(shape: Shape, impl: str, tiled, kind: str, blocks, mode: str, iters: int) -> dict:
  row = measure(shape, impl, iters=iters, tiled=tiled, modes=(mode,))
  print(f"tune {impl} {kind} {shape.name} {tuple(dataclasses.astuple(blocks))}: "
        f"{row.get(f'{mode}_ms', row.get(f'{mode}_error'))}", flush=True)
  return dict(row, tune=kind, blocks=dataclasses.asdict(blocks))


def tune(iters: int, rows: RowLog, names: list[str] | None = None) -> None:
  """Times pallas_triton's tile variants on `_TUNE_SHAPES`."""
  for shape in selected(_TUNE_SHAPES, names):
    base = BlockSizes.get_default(shape.head_dim, shape.group, jnp.bfloat16)
    for kind, variants, mode in (("fwd", _FWD_VARIANTS, "fwd"), ("bwd", _BWD_VARIANTS, "fwd_bwd")):
      for blocks in variants:
        sizes = (dataclasses.replace(base, fwd=blocks) if kind == "fwd"
                 else dataclasses.replace(base, dq=blocks, dkv=blocks))
        rows.append(_tune_row(shape, "pallas_triton", functools.partial(triton.attention, block_sizes=sizes),
                              kind, blocks, mode, iters))


def _mosaic_variants(kernel: str, specs) -> list:
  """MosaicBlocks of `kernel` (fwd, dq, dkv) from (block_kv, depth_cols, stages), its default's
  compute warpgroups kept."""
  base = getattr(mosaic_gpu_tiles.BlockSizes.get_default(64), kernel)
  return [dataclasses.replace(base, block_kv=kv, depth_cols=cols, stages=stages) for kv, cols, stages in specs]


# Ring depth (stages: the bytes in flight per CTA), key block and depth item sizes around the D 64
# defaults (fwd 256 / 128 / 2, dq 128 / 64 / 3, dkv 64 / 64 / 3: the first of each list; the H200 sweep
# of 2026-12-02, BENCHMARKS.md §0g), and the earlier defaults (fwd 128 / 64 / 2, dq and dkv 64 / 64 / 2)
# to compare that sweep with. Only tiles that lower for the H200 in the model's call (its own depth_q,
# threaded depth cotangents, packed B8 T4K G2 L72) and at G 8, so that a winner can be the default:
# fwd (256, 128, 3), (256, 64, 3), (128, 128, 3) and dq (128, 64, 4), (64, 64, 4) exceed the SMEM there.
_MOSAIC_VARIANTS = {
    "fwd": ((256, 128, 2), (256, 64, 2), (192, 128, 2), (192, 64, 2), (128, 128, 2), (128, 64, 4), (128, 64, 2)),
    "dq": ((128, 64, 3), (128, 64, 2), (192, 64, 2), (64, 64, 3), (64, 64, 2)),
    "dkv": ((64, 64, 3), (64, 64, 4), (64, 64, 5), (64, 64, 2)),
}


def tune_mosaic(iters: int, rows: RowLog, names: list[str] | None = None) -> None:
  """Times pallas_mosaic_gpu's tile variants on `_TUNE_SHAPES` (D 64): forward variants forward only, dq
  and dk/dv variants forward + backward (the forward at its default)."""
  for shape in selected(_TUNE_SHAPES, names):
    base = mosaic_gpu_tiles.BlockSizes.get_default(shape.head_dim)
    for kernel, specs in _MOSAIC_VARIANTS.items():
      for blocks in _mosaic_variants(kernel, specs):
        sizes = dataclasses.replace(base, **{kernel: blocks})
        tiled = functools.partial(mosaic_gpu.attention, block_sizes=sizes)
        rows.append(_tune_row(shape, "pallas_mosaic_gpu", tiled, kernel, blocks,
                              "fwd" if kernel == "fwd" else "fwd_bwd", iters))


# (kernel, field, mode) of each kernel option that `--ablate` times flipped against the defaults.
_TOGGLES = (("dq", "separate_depth_kernel", "fwd_bwd"), ("dkv", "per_query_head", "fwd_bwd"),
            ("fwd", "depth_rows", "fwd"), ("dq", "depth_rows", "fwd_bwd"))


def _flipped(blocks: KernelBlocks, field: str, shape: Shape) -> KernelBlocks:
  """The option off if on and on if off; depth parts turn on at their smallest size; per-query-head
  dk/dv the other way than its default decides for this shape."""
  value = getattr(blocks, field)
  if field == "depth_rows":
    return dataclasses.replace(blocks, depth_rows=0 if value else max(16, next_pow2(shape.group)))
  if field == "per_query_head":
    programs = math.ceil(shape.seq_len / blocks.block_k) * shape.batch * shape.kv_heads
    return dataclasses.replace(blocks, per_query_head=not dkv_per_query_head(blocks, shape.group, programs))
  return dataclasses.replace(blocks, **{field: not value})


def _mgpu_forward(shape: Shape, iters: int) -> list[dict]:
  """JAX's own Pallas Mosaic GPU flash attention (sequence only; its causal backward is not implemented):
  what a wgmma/TMA kernel reaches on this shape, against the Triton lowering of ours. float16 (its
  shared-memory staging is float16 only): the same tensor-core rate as bfloat16."""
  from jax.experimental.pallas.ops.gpu import attention_mgpu
  (q, k, v, _, _), _ = make_inputs(shape, depth=False)
  q, k, v = (x.astype(jnp.float16) for x in (q, k, v))
  rows = []
  for block_kv in (64, 128):
    config = attention_mgpu.TuningConfig(block_q=64, block_kv=block_kv, max_concurrent_steps=2, causal=True)
    row = dict(shape=shape.name, impl=f"jax_mgpu_kv{block_kv}", **dataclasses.asdict(shape))
    try:
      ms = time_ms(jax.jit(lambda q, k, v: attention_mgpu.attention(q, k, v, config)), q, k, v, warmup=2,
                   iters=iters)
      f = flops(shape, False, False)
      row.update(fwd_ms=ms, fwd_tflops=f / ms / 1e9, fwd_gbps=bytes_moved(shape, False, False) / ms / 1e6,
                 fwd_roofline_fraction=f / PEAK_FLOPS * 1e3 / ms)
    except Exception as e:  # noqa: BLE001  (reported, not fatal: this is a probe of another kernel)
      row["fwd_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    rows.append(row)
  return rows


def family(iters: int, rows: RowLog, names: list[str] | None = None) -> None:
  """The MoDA family at Table 2's T4K shape: chunk-visible depth at the official chunk C = 64 / G and
  depth-only attention, on pallas_triton and on the xla fallback, beside plain MoDA and cuDNN."""
  for shape in selected([Shape("table2_T4K_G8_L64", 1, 4096, 8, 64)], names):
    chunk = 64 // shape.group
    variants = {"plain": {}, f"chunk{chunk}": dict(depth_chunk=chunk), "depth_only": dict(depth_only=True)}
    rows.append(measure(shape, "cudnn", iters=iters))
    for name, options in variants.items():
      for impl in ("pallas_triton", "xla"):
        rows.append(dict(measure(shape, impl, iters=iters, variant=options), impl=f"{impl}_{name}"))
        print(json.dumps(rows[-1]), flush=True)


def ablate(iters: int, rows: RowLog, names: list[str] | None = None) -> None:
  """Where the time goes: cuDNN, the kernels without depth, JAX's Mosaic GPU forward, the defaults, and
  each optional kernel feature flipped (`_TOGGLES`)."""
  shapes = [Shape("table2_T4K_G8_L64", 1, 4096, 8, 64), Shape("table2_T64K_G8_L64", 1, 65536, 8, 64),
            Shape("train_B8_T4K_G2_L72", 8, 4096, 2, 72), Shape("train_B8_T4K_G2_L72_D128", 8, 4096, 2, 72, 128)]
  for shape in selected(shapes, names):
    for impl in ("cudnn", "pallas_triton_nodepth", "pallas_triton"):
      rows.append(measure(shape, impl, iters=iters))
      print(json.dumps(rows[-1]), flush=True)
    if shape.head_dim == 64:
      rows += _mgpu_forward(shape, iters)
      print(json.dumps(rows[-2:]), flush=True)
    base = BlockSizes.get_default(shape.head_dim, shape.group, jnp.bfloat16)
    for kernel, field, mode in _TOGGLES:
      flipped = _flipped(getattr(base, kernel), field, shape)
      tiled = functools.partial(triton.attention, block_sizes=dataclasses.replace(base, **{kernel: flipped}))
      row = measure(shape, "pallas_triton", iters=iters, tiled=tiled, modes=(mode,))
      toggled = f"{kernel}.{field}={getattr(flipped, field)}"
      rows.append(dict(row, tune=kernel, toggled=toggled, blocks=dataclasses.asdict(flipped)))
      print(f"ablate {toggled} {shape.name} {mode}: {row.get(f'{mode}_ms', row.get(f'{mode}_error'))}", flush=True)
