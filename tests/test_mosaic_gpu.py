"""pallas_mosaic_gpu in Mosaic GPU interpret mode (jax's `plgpu.InterpretGPUParams` simulator) on CPU.

1. Cases of the shared operator table's reduced spread, mapped onto what the backend supports
   (float32 -> bfloat16, head dims -> 64 or 128), against the float64 oracle through the shared
   suite's own check: out, lse and every gradient, default tiles; and the H200's D 64 default tiles on a
   sequence several of their key blocks long.
2. Small tiles, so that several key blocks, ring wrap-arounds, depth items per slot step and causal
   skips meet odd T, G = 3 (padded heads), segments, a traced depth_start / depth_len, depth_q, D 128
   with one compute warpgroup, and G = 16 (two head groups, Triton's backward): against `reference`,
   with NaN in every depth slot that must not be read (a masked NaN logit or NaN * 0 stays NaN) and
   exactly zero gradients there.
3. What the backend refuses (NotImplementedError, so the dispatcher falls back) and tile validation.
The interpreter runs each warpgroup as a thread whose barrier waits block inside XLA:CPU callbacks; it
needs more host threads than this machine's 2 cores, which conftest's 8 fake devices provide.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import segment_layouts as sl
from operator_cases import CASES, Impl, assert_matches_oracle, make_inputs, run_case
from pallas_kernels import api, mosaic_gpu, reference
from pallas_kernels import mosaic_gpu_tiles as mt

IMPL = Impl("pallas_mosaic_gpu", interpret=True, spread="kernel")


def supported(case):
  """The case on the backend's support matrix: bf16 for f32, D 64 / 128, its own inputs (new name)."""
  return dataclasses.replace(case, name="mosaic_" + case.name,
                             dtype="bfloat16" if case.dtype == "float32" else case.dtype,
                             head_dim=64 if case.head_dim <= 64 else 128)


# A feature-covering subset of the reduced spread (interpret mode costs ~10 s a case here): T = 1, odd T
# and G = 3, D 128 with L > T and segments, float16, depth_len 0, depth_q with a traced depth_len,
# G = 8 with shuffled segments; garbage in unwritten slots throughout.
_KEPT = ("t1_g2_l1", "odd_g3_l5_garbage_small_scale", "bf16_g4_l40_segments_garbage_noncausal",
         "f16_g2_l5_scale_half", "depth_len0_int_garbage", "depth_q_g2_l5_traced_garbage", "bf16_g8_shuffled_traced")
_CASES = [supported(c) for c in CASES if c.name in _KEPT]


@pytest.mark.parametrize("case", _CASES, ids=[c.name for c in _CASES])
def test_operator_case_matches_oracle(case):
  inputs = make_inputs(case)
  assert_matches_oracle(case, inputs, *run_case(IMPL, case, inputs))


def test_h200_default_tiles_over_several_key_blocks_match_oracle():
  # The cases above fit one key block of the D 64 defaults (256 keys forward, 128 in the dq kernel). T 300
  # ends mid-block in both; documents [0, 130), [130, 270), [270, 300) make the last forward CTA's second
  # warpgroup skip the block its sibling reads, and dq CTAs stream from block 1; L 4 with a traced
  # depth_len 3 makes the forward's one 4-slot depth item and the dq kernel's second 2-slot one partial,
  # with garbage in the unread slot.
  tiles = mt.BlockSizes.get_default(64)
  documents = {"three_documents": lambda t, unit=1: np.repeat([1, 2, 3], [130, 140, t - 270])}
  case, inputs = sl.case_inputs("h200_defaults_t300", ("three_documents",), 300, True, 2, 4, table=documents,
                                kv_heads=1, head_dim=64, dtype="bfloat16")
  for blocks in (tiles.fwd, tiles.dq):
    assert case.seq_len > blocks.block_kv and case.seq_len % blocks.block_kv, blocks
  assert case.written < case.slots
  out, lse, grads = sl.out_lse_grads(
      case, inputs, lambda prepared, spec: mosaic_gpu.attention(prepared, spec, interpret=True, block_sizes=tiles))
  assert_matches_oracle(case, inputs, out, lse, grads)


_SLOTS = 5


def _tiles(head_dim):
  """Small tiles: 32-key blocks; forward depth items of 16 columns, backward ones of 64."""
  return mt.BlockSizes(fwd=mt.MosaicBlocks(block_kv=32, depth_cols=16, stages=2),
                       dq=mt.MosaicBlocks(block_kv=32, depth_cols=64, stages=3, compute_wgs=2 if head_dim == 64 else 1),
                       dkv=mt.MosaicBlocks(block_kv=64, depth_cols=64, stages=2))


def _out_lse_grads(backend, arrays, cotangents, **options):
  @jax.jit
  def run(arrays):
    def attend(*a):
      inputs, spec = api.prepare(*a[:5], depth_q=a[5], scale=0.3, **options)
      return backend(inputs, spec)
    (out, lse), pullback = jax.vjp(attend, *arrays)
    return out, lse, pullback(cotangents)
  return run(arrays)


# (T, G, D, causal, segments, depth_q, depth_start, depth_len): each crosses 32-key blocks or query tiles.
# T40 G2 (32 tokens per warpgroup) gives warpgroup 0 a causal block to release unread.
_SHAPES = [(37, 3, 64, True, True, False, 1, 4),
           (40, 2, 64, True, False, True, 0, 5),
           (30, 4, 128, False, False, True, 2, 3),
           (20, 16, 64, True, True, False, 0, 2)]


@pytest.mark.parametrize("seq_len, group, head_dim, causal, segments, with_depth_q, depth_start, depth_len", _SHAPES,
                         ids=[f"T{s[0]}_G{s[1]}_D{s[2]}" for s in _SHAPES])
def test_small_tiles_match_reference_and_never_read_unread_slots(seq_len, group, head_dim, causal, segments,
                                                                 with_depth_q, depth_start, depth_len):
  keys = jax.random.split(jax.random.PRNGKey(seq_len), 8)
  normal = lambda key, *shape: jax.random.normal(key, shape, jnp.bfloat16)
  kv_heads = 2
  q_shape, kv_shape = (1, seq_len, kv_heads * group, head_dim), (1, seq_len, kv_heads, head_dim)
  depth_shape = (1, seq_len, _SLOTS, kv_heads, head_dim)
  arrays = (normal(keys[0], *q_shape), normal(keys[1], *kv_shape), normal(keys[2], *kv_shape),
            normal(keys[3], *depth_shape), normal(keys[4], *depth_shape),
            normal(keys[5], *q_shape) if with_depth_q else None)
  cotangents = (normal(keys[6], *q_shape), jax.random.normal(keys[7], q_shape[:3], jnp.float32))
  unread = np.ones(_SLOTS, bool)
  unread[depth_start:depth_len] = False
  poison = lambda x: jnp.where(unread[None, None, :, None, None], jnp.nan, x).astype(x.dtype)
  poisoned = arrays[:3] + (poison(arrays[3]), poison(arrays[4])) + arrays[5:]
  options = dict(causal=causal, depth_start=jnp.int32(depth_start), depth_len=jnp.int32(depth_len),
                 segment_ids=jnp.asarray([[0] * (seq_len // 3) + [1] * (seq_len - seq_len // 3)]) if segments else None)
  tiles = _tiles(head_dim)
  got = _out_lse_grads(lambda i, s: mosaic_gpu.attention(i, s, interpret=True, block_sizes=tiles),
                       poisoned, cotangents, **options)
  want = _out_lse_grads(reference.attention, arrays, cotangents, **options)
  names = ("out", "lse", "dq", "dk", "dv", "d depth_k", "d depth_v", "d depth_q")
  for name, g, w in zip(names, [got[0], got[1], *got[2]], [want[0], want[1], *want[2]]):
    if w is None:
      assert g is None, name
      continue
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    assert np.isfinite(g).all(), name
    # bf16 inputs and probabilities: the reference rounds only its output.
    assert np.linalg.norm(g - w) <= 1e-2 * np.linalg.norm(w), name
  for name, grad in (("d depth_k", got[2][3]), ("d depth_v", got[2][4])):
    assert not np.asarray(grad, np.float32)[:, :, unread].any(), f"{name} of an unread slot is not 0"


def _inputs(dtype=jnp.bfloat16, head_dim=64, depth=True, **options):
  q = jnp.zeros((1, 16, 4, head_dim), dtype)
  kv = jnp.zeros((1, 16, 2, head_dim), dtype)
  depth_kv = jnp.zeros((1, 16, 3, 2, head_dim), dtype) if depth else None
  if options.pop("depth_only", False):
    return api.prepare(q, None, None, depth_kv, depth_kv, **options)
  return api.prepare(q, kv, kv, depth_kv, depth_kv, **options)


@pytest.mark.parametrize("options, match", [
    (dict(dtype=jnp.float32), "float32"), (dict(dtype=jnp.float16, head_dim=96), "head_dim=96"),
    (dict(head_dim=256), "head_dim=256"), (dict(depth_only=True), "depth-only"),
    (dict(depth_chunk=2), "depth_chunk=2")])
def test_unsupported_calls_raise_not_implemented(options, match):
  inputs, spec = _inputs(**options)
  with pytest.raises(NotImplementedError, match=match):
    mosaic_gpu.check_supported(inputs, spec, True)
  with pytest.raises(NotImplementedError, match=match):
    mosaic_gpu.attention(inputs, spec, interpret=True)


@pytest.mark.parametrize("change, match", [
    (dict(block_kv=48), "block_kv=48"), (dict(block_kv=512), "block_kv=512"), (dict(depth_cols=24), "depth_cols=24"),
    (dict(stages=1), "stages=1"), (dict(compute_wgs=3), "compute_wgs=3"), (dict(ping_pong=1), "ping_pong=1")])
def test_tiles_are_validated_before_launch(change, match):
  base = mt.BlockSizes.get_default(64)
  inputs, spec = _inputs()
  bad = dataclasses.replace(base, fwd=dataclasses.replace(base.fwd, **change))
  with pytest.raises(ValueError, match=match):
    mosaic_gpu.attention(inputs, spec, interpret=True, block_sizes=bad)
  with pytest.raises(ValueError, match="dq.depth_cols=32"):
    mosaic_gpu.attention(inputs, spec, interpret=True,
                         block_sizes=dataclasses.replace(base, dq=dataclasses.replace(base.dq, depth_cols=32)))


def test_dispatcher_puts_the_backend_before_pallas_triton_on_gpu_only():
  assert "pallas_mosaic_gpu" in api.IMPLEMENTATIONS
  order = api._DEFAULT_ORDER["gpu"]
  assert order.index("pallas_mosaic_gpu") == order.index("pallas_triton") - 1  # check_supported says Hopper
  assert all("pallas_mosaic_gpu" not in order for platform, order in api._DEFAULT_ORDER.items() if platform != "gpu")
  inputs, _ = _inputs()
  with pytest.raises(NotImplementedError, match="pallas_mosaic_gpu"):
    api.moda_attention(*inputs[:3], inputs.depth_k, inputs.depth_v, implementation="pallas_mosaic_gpu")


@pytest.mark.parametrize("kernel, field", [("fwd", "block_kv"), ("fwd", "depth_cols"), ("dq", "block_kv"),
                                           ("dkv", "block_kv")])
@pytest.mark.parametrize("head_dim", mt.SUPPORTED_HEAD_DIMS)
def test_compiled_tiles_contract_in_whole_swizzle_rows(kernel, field, head_dim):
  """On the GPU, wgmma contracts over block_kv / depth_cols against a [., D] tile 64 elements at a time
  (the H200 raised "K must be a multiple of 64, got: 32" for dq.block_kv=32); interpret mode does not."""
  base = mt.BlockSizes.get_default(head_dim)
  for dtype in mt.SUPPORTED_DTYPES:
    base.validate(wgmma_operand=(head_dim, dtype))  # the defaults compile
    assert mt.wgmma_k_multiple(head_dim, dtype) == 64
  narrow = dataclasses.replace(base, **{kernel: dataclasses.replace(getattr(base, kernel), **{field: 32})})
  narrow.validate()  # interpret mode takes it
  with pytest.raises(ValueError, match=rf"block_sizes\.{kernel}\.{field}=32: expected a multiple of 64"):
    narrow.validate(wgmma_operand=(head_dim, jnp.bfloat16))
