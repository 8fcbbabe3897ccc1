"""pallas_mosaic_gpu lowered for an abstract "NVIDIA H200" on this CPU machine.

Interpret mode runs a different wgmma path (`mosaic_gpu_tiles.matmul`: operands staged through SMEM, no
accumulator init), so the GPU path is checked here: forward + backward of benchmark-like shapes go
through jax's Mosaic GPU lowering (`lowering_platforms=("cuda",)`), which builds the kernels' Mosaic GPU
module in Python and so rejects layouts, wgmma shapes, TMA boxes and SMEM budgets (> 227 KB) the GPU
would. Each kernel (forward, dq + depth backward, sequence dk/dv) must become one Mosaic GPU call (with
segments taking the segment bounds of its own tiles, which its loop bounds read); with G > 8 the backward
is pallas_triton's (Triton calls). The threaded backward (`attention_with_depth` with carried depth
cotangents) must alias them to the results of the dq kernel's call (in place); a plain call's backward
aliases nothing. Compiling to PTX and running still needs the GPU machine: scripts/gpu_check_mosaic.sh.

The lowering does not check the TMA copies' SMEM addresses, which the GPU does at run time (a misaligned
one is CUDA_ERROR_MISALIGNED_ADDRESS, poisoning the process): `_checked_copies` records every copy's
SMEM view while the kernels are traced and checks it on the CPU.
"""

import contextlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic_gpu import core as gpu_core  # the SMEM views' tiling / swizzle transforms
from jax._src.state import indexing
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import api, benchmark, mosaic_gpu

_H200 = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="cuda")
_MESH = jax.sharding.AbstractMesh((1,), ("x",), (jax.sharding.AxisType.Explicit,), abstract_device=_H200)
_MOSAIC_CALL = "custom_call @mosaic_gpu_v2("
_TRITON_CALL = "__gpu$xla.gpu.triton"


def _lowered_text(batch, seq_len, group, head_dim, slots, *, depth_q=True, segments=False, causal=True,
                  threaded=False, documents=0):
  """The lowered jit(grad) of sum(out) + sum(lse) over every floating input; `threaded`: plus the returned
  depth arrays' products with two carried (donated) cotangents, which the backward adds into. `segments`:
  documents of 300 tokens; `documents` N: the benchmark's N equal documents per row instead."""
  shape = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)
  kv_heads = 8
  q = shape(batch, seq_len, kv_heads * group, head_dim)
  kv = shape(batch, seq_len, kv_heads, head_dim)
  depth = shape(batch, seq_len, slots, kv_heads, head_dim)
  arrays = [q, kv, kv]
  if slots:
    arrays += [depth] * 2 + ([q] if depth_q else [])
  carry = [depth] * 2 if threaded else []

  def loss(arrays, carry):
    q, k, v, depth_k, depth_v, dq = (*arrays, None, None, None)[:6]
    segment_ids = jnp.cumsum(jnp.ones(q.shape[:2], jnp.int32), axis=1) // 300 if segments else None
    if documents:
      segment_ids = benchmark.segment_ids(q, documents)
    inputs, spec = api.prepare(q, k, v, depth_k, depth_v, depth_q=dq, causal=causal, segment_ids=segment_ids,
                               depth_start=jnp.int32(1) if slots else None,
                               depth_len=jnp.int32(slots - 1) if slots else None)
    out, lse, *returned = mosaic_gpu.attention_with_depth(inputs, spec)
    threads = sum(jnp.vdot(x.astype(jnp.float32), c.astype(jnp.float32)) for x, c in zip(returned, carry))
    return jnp.sum(out.astype(jnp.float32)) + jnp.sum(lse) + threads

  with jax.sharding.use_abstract_mesh(_MESH):
    grad = jax.jit(jax.grad(loss), donate_argnums=1)
    return grad.trace(arrays, carry).lower(lowering_platforms=("cuda",)).as_text()


# (batch, T, G, D, L, depth_q, segments, causal): the paper's and the model's shapes (T not always a
# multiple of a tile), G from 1 to 8 (3: padded heads), D 64 and 128 (the dq kernel with one compute
# warpgroup), with and without depth.
_SHAPES = [(8, 4096, 2, 64, 72, True, False, True), (8, 4096, 2, 128, 72, True, True, True),
           (1, 1000, 8, 64, 64, False, True, True), (1, 777, 3, 64, 16, True, True, False),
           (2, 1024, 1, 128, 0, False, False, True), (1, 2048, 4, 64, 0, False, True, False)]


@pytest.mark.parametrize("batch, seq_len, group, head_dim, slots, depth_q, segments, causal", _SHAPES,
                         ids=[f"B{s[0]}_T{s[1]}_G{s[2]}_D{s[3]}_L{s[4]}" for s in _SHAPES])
def test_forward_and_backward_lower_for_h200(batch, seq_len, group, head_dim, slots, depth_q, segments, causal):
  text = _lowered_text(batch, seq_len, group, head_dim, slots, depth_q=depth_q, segments=segments, causal=causal)
  assert text.count(_MOSAIC_CALL) == 3 and _TRITON_CALL not in text
  assert "output_operand_alias" not in text  # nothing threaded: the depth gradients are stored, not added


@pytest.mark.parametrize("slots", [0, 72])
def test_packed_documents_lower_for_h200(slots):
  # The benchmark's packed rows (--segments 8 at B8 T4096 G2): each kernel takes the segment bounds of its
  # own tiles, per warpgroup of 32 tokens (forward, dq: [8, 128, 4], with the run blocks) or of 64 keys
  # (dk/dv: [8, 64, 2]), and its loop bounds read from them lower for the H200.
  text = _lowered_text(8, 4096, 2, 64, slots, depth_q=False, documents=8)
  calls = [line for line in text.splitlines() if _MOSAIC_CALL in line]
  assert len(calls) == 3 and _TRITON_CALL not in text
  bounds = sorted(tuple(re.findall(r"tensor<8x(?:128x4|64x2)xi32>", call)) for call in calls)
  assert bounds == [("tensor<8x128x4xi32>",)] * 2 + [("tensor<8x64x2xi32>",)]


def _smem_view(ref):
  """(static byte offset, byte strides of the dynamically indexed dims, swizzle or None) of an SMEM view
  inside its allocation (allocations start 1024-byte aligned). Offsets are row-major in the logical
  shape: for a tiled buffer that is the physical offset of a slice starting on a tile boundary, the only
  slices a TMA copy takes."""
  itemsize = jnp.dtype(ref.dtype).itemsize
  swizzle, strides, static, dynamic = None, None, 0, []
  for t in getattr(ref, "transforms", ()):
    if isinstance(t, gpu_core.UnswizzleRef):
      swizzle = t.swizzle
    elif isinstance(t, indexing.NDIndexer):
      strides = strides or [int(np.prod(t.shape[i + 1:])) for i in range(len(t.shape))]
      kept = []
      for index, stride in zip(t.indices, strides):
        start = index.start if isinstance(index, indexing.Slice) else index
        if isinstance(start, (int, np.integer)):
          static += int(start) * stride
        else:
          dynamic.append(stride)
        if isinstance(index, indexing.Slice):
          kept.append(stride * index.stride)
      strides = kept
    elif not isinstance(t, gpu_core.UntilingTransform):
      raise AssertionError(f"unhandled SMEM transform {t!r}: teach _smem_view its offsets")
  return static * itemsize, [s * itemsize for s in dynamic], swizzle


def _check_smem_side(ref, what):
  """A tiled TMA copy needs a 128-byte aligned SMEM address (CUDA programming guide, TMA alignment
  table); a swizzled one starts on its swizzle pattern's period (8 rows of `swizzle` bytes), or the
  data lands permuted."""
  static, dynamic, swizzle = _smem_view(ref)
  align = 128 if swizzle is None else 8 * swizzle
  bad = [b for b in [static, *dynamic] if b % align]
  assert not bad, f"{what}: SMEM view {ref} at byte offset {static} + k * {dynamic}: not {align}-byte aligned"


def _check_gmem_window(ref, what):
  """A store from an unswizzled SMEM view to a contiguous GMEM window is one bulk copy that Mosaic GPU
  clips at the array's end only (jax 0.11.2 `LaunchContext.async_copy`): a window running past its row
  writes the next row. Such stores here write whole minor dims (integer indices elsewhere)."""
  for t in getattr(ref, "transforms", ()):
    if isinstance(t, indexing.NDIndexer):
      for index, size in zip(t.indices, t.shape):
        if isinstance(index, indexing.Slice):
          assert isinstance(index.start, (int, np.integer)) and index.start == 0 and index.size == size, (
              f"{what}: an unswizzled SMEM store to the GMEM window {t.indices} of {t.shape}")


@contextlib.contextmanager
def _checked_copies(monkeypatch):
  """Checks every TMA copy of the kernels traced inside; yields the number of copies seen."""
  seen = []
  load, store = plgpu.copy_gmem_to_smem, plgpu.copy_smem_to_gmem

  def checked_load(src, dst, *args, **kwargs):
    seen.append(dst)
    _check_smem_side(dst, "copy_gmem_to_smem")
    return load(src, dst, *args, **kwargs)

  def checked_store(src, dst, *args, **kwargs):
    seen.append(src)
    _check_smem_side(src, "copy_smem_to_gmem")
    if _smem_view(src)[2] is None:
      _check_gmem_window(dst, "copy_smem_to_gmem")
    return store(src, dst, *args, **kwargs)

  monkeypatch.setattr(plgpu, "copy_gmem_to_smem", checked_load)
  monkeypatch.setattr(plgpu, "copy_smem_to_gmem", checked_store)
  yield seen


# T 7 (padded to 8, one partial tile), G 3 and 8 (Gp >= 4: a head's tokens < 32), segments, D 128.
_ALIGNMENT_SHAPES = _SHAPES + [(1, 7, 3, 64, 5, False, False, True), (1, 4096, 8, 64, 64, False, False, True),
                               (1, 7, 3, 128, 5, True, True, False)]


@pytest.mark.parametrize("batch, seq_len, group, head_dim, slots, depth_q, segments, causal", _ALIGNMENT_SHAPES,
                         ids=[f"B{s[0]}_T{s[1]}_G{s[2]}_D{s[3]}_L{s[4]}_seg{int(s[6])}" for s in _ALIGNMENT_SHAPES])
def test_tma_copies_are_aligned(monkeypatch, batch, seq_len, group, head_dim, slots, depth_q, segments, causal):
  with _checked_copies(monkeypatch) as seen:
    _lowered_text(batch, seq_len, group, head_dim, slots, depth_q=depth_q, segments=segments, causal=causal)
  assert len(seen) > 10  # the check saw the three kernels' copies


def test_alignment_check_catches_a_misaligned_view(monkeypatch):
  # An [8] int32 box at row 8 of a [64] vector starts 32 bytes in: the check must fail on it.
  def kernel(x_ref, o_ref, vec, bar):
    plgpu.copy_gmem_to_smem(x_ref.at[pl.ds(0, 8)], vec.at[pl.ds(8, 8)], bar.at[0])
    plgpu.barrier_wait(bar.at[0])
    o_ref[...] = vec[...]

  call = plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct((64,), jnp.int32),
                      scratch_types=[plgpu.SMEM((64,), jnp.int32), plgpu.Barrier(num_arrivals=1, num_barriers=1)])
  with _checked_copies(monkeypatch), pytest.raises(AssertionError, match="not 128-byte aligned"):
    with jax.sharding.use_abstract_mesh(_MESH):
      jax.jit(call).trace(jax.ShapeDtypeStruct((64,), jnp.int32)).lower(lowering_platforms=("cuda",))


def test_many_heads_per_kv_head_use_the_triton_backward():
  # G = 16: the forward spreads a kv head's heads over two programs; the backward is Triton's.
  text = _lowered_text(1, 2048, 16, 64, 64)
  assert text.count(_MOSAIC_CALL) == 1 and text.count(_TRITON_CALL) >= 3


# (batch, T, G, D, L, depth_q, segments, causal): the 700M training shape, also as the model calls it (its
# own depth_q, packed documents: the most SMEM the D 64 default tiles must fit), D 128 (one compute
# warpgroup), odd T and G 3 (padded tokens and heads), T 7 (one partial tile).
_THREADED_SHAPES = [(8, 4096, 2, 64, 72, False, False, True), (8, 4096, 2, 64, 72, True, True, True),
                    (8, 4096, 2, 128, 72, True, True, True),
                    (1, 777, 3, 64, 16, True, True, False), (1, 7, 3, 128, 5, False, False, True)]


@pytest.mark.parametrize("batch, seq_len, group, head_dim, slots, depth_q, segments, causal", _THREADED_SHAPES,
                         ids=[f"B{s[0]}_T{s[1]}_G{s[2]}_D{s[3]}_L{s[4]}_seg{int(s[6])}" for s in _THREADED_SHAPES])
def test_threaded_backward_lowers_and_aliases_the_carried_cotangent(monkeypatch, batch, seq_len, group, head_dim,
                                                                    slots, depth_q, segments, causal):
  # The dq kernel's call takes the two carried cotangents as operands aliased to its results (updated in
  # place); a fallback to a fresh zero-filled gradient would have no alias. Its TMA copies (the carried
  # tiles' loads included) are checked like the plain kernels'.
  with _checked_copies(monkeypatch) as seen:
    text = _lowered_text(batch, seq_len, group, head_dim, slots, depth_q=depth_q, segments=segments, causal=causal,
                         threaded=True)
  assert text.count(_MOSAIC_CALL) == 3 and _TRITON_CALL not in text
  assert text.count("#stablehlo.output_operand_alias<") == 2
  assert len(seen) > 10


def test_many_heads_per_kv_head_thread_through_the_triton_backward():
  text = _lowered_text(1, 2048, 16, 64, 64, threaded=True)
  assert text.count(_MOSAIC_CALL) == 1 and text.count("#stablehlo.output_operand_alias<") == 2
