"""pallas_mosaic_gpu compiled for a Hopper GPU (no interpret mode): skipped visibly without one.

Run on the GPU machine with `JAX_PLATFORMS=cuda python -m pytest tests/gpu/test_mosaic_gpu_device.py -q`
(scripts/gpu_check_mosaic.sh).
1. Every case of the shared operator table on the backend's support matrix (float32 -> bfloat16, head
   dims -> 64 / 128; depth-only and depth_chunk cases are not supported) against the float64 oracle.
2. Multi-tile shapes (odd T, G = 3 and 8, D 64 and 128, many slots, segments, causal or not, a traced
   depth_start / depth_len, G = 16 through Triton's backward) against `reference` (`xla` where the
   dense logits would not fit), with the default tiles and with small ones: out, lse, every gradient;
   unread slots get exactly zero gradient.
3. The backward is deterministic: three runs give bitwise-identical gradients.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import test_moda_attention as suite
from operator_cases import CASES, Impl, assert_close
from pallas_kernels import api, mosaic_gpu, reference, xla
from pallas_kernels import mosaic_gpu_tiles as mt

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (run scripts/gpu_check_mosaic.sh)")

GPU = Impl("pallas_mosaic_gpu", interpret=False, spread="full")


def _supported(case):
  return dataclasses.replace(case, name="mosaic_" + case.name,
                             dtype="bfloat16" if case.dtype == "float32" else case.dtype,
                             head_dim=64 if case.head_dim <= 64 else 128)


_CASES = [_supported(c) for c in CASES if not c.depth_only and not c.depth_chunk]


@pytest.mark.parametrize("case", _CASES, ids=[c.name for c in _CASES])
def test_operator_case_on_gpu(case):
  suite.test_forward_and_gradients_match_oracle(GPU, case)


# (batch, T, Hk, G, D, L, depth_start, depth_len, causal, segments, dtype)
_LARGE = [
    (2, 1031, 2, 8, 64, 72, 0, 72, True, False, "bfloat16"),
    (8, 4096, 2, 2, 64, 72, 0, 72, True, False, "bfloat16"),
    (1, 777, 2, 3, 64, 40, 3, 17, True, True, "bfloat16"),
    (1, 1024, 4, 2, 128, 16, 0, 16, False, False, "float16"),
    (1, 1000, 2, 4, 128, 24, 5, 20, True, True, "bfloat16"),
    (1, 513, 1, 16, 64, 8, 0, 5, True, False, "bfloat16"),
    (2, 2048, 8, 2, 64, 0, None, None, True, True, "bfloat16"),
]


def _small_tiles(head_dim):
  return mt.BlockSizes(fwd=mt.MosaicBlocks(block_kv=64, depth_cols=32, stages=3),
                       dq=mt.MosaicBlocks(block_kv=32, depth_cols=64, stages=3, compute_wgs=2 if head_dim == 64 else 1),
                       dkv=mt.MosaicBlocks(block_kv=64, depth_cols=64, stages=3, compute_wgs=1))


def _arrays(shape, seed):
  batch, seq_len, kv_heads, group, head_dim, slots, depth_start, depth_len, causal, segments, dtype = shape
  keys = jax.random.split(jax.random.PRNGKey(seed), 9)
  normal = lambda key, *s: jax.random.normal(key, s, dtype)
  q_shape, kv_shape = (batch, seq_len, kv_heads * group, head_dim), (batch, seq_len, kv_heads, head_dim)
  depth_shape = (batch, seq_len, slots, kv_heads, head_dim)
  arrays = (normal(keys[0], *q_shape), normal(keys[1], *kv_shape), normal(keys[2], *kv_shape),
            normal(keys[3], *depth_shape) if slots else None, normal(keys[4], *depth_shape) if slots else None,
            normal(keys[5], *q_shape) if slots else None)
  cotangents = (normal(keys[6], *q_shape), jax.random.normal(keys[7], q_shape[:3], jnp.float32))
  options = dict(causal=causal)
  if slots:
    options.update(depth_start=jnp.int32(depth_start), depth_len=jnp.int32(depth_len))
  if segments:
    options["segment_ids"] = jnp.sort(jax.random.randint(keys[8], (batch, seq_len), 0, 4), axis=1)
  return arrays, cotangents, options


def _run(backend, arrays, cotangents, options):
  @jax.jit
  def f(arrays):
    def attend(q, k, v, depth_k, depth_v, depth_q):
      inputs, spec = api.prepare(q, k, v, depth_k, depth_v, depth_q=depth_q, **options)
      return backend(inputs, spec)
    (out, lse), pullback = jax.vjp(attend, *arrays)
    return out, lse, pullback(cotangents)
  return f(arrays)


@pytest.mark.parametrize("tiles", ["default", "small"])
@pytest.mark.parametrize("shape", _LARGE, ids=[f"B{s[0]}_T{s[1]}_G{s[3]}_D{s[4]}_L{s[5]}_{s[10]}" for s in _LARGE])
def test_multi_tile_against_reference(shape, tiles):
  arrays, cotangents, options = _arrays(shape, seed=shape[1])
  block_sizes = None if tiles == "default" else _small_tiles(shape[4])
  got = _run(lambda i, s: mosaic_gpu.attention(i, s, block_sizes=block_sizes), arrays, cotangents, options)
  batch, seq_len, _, group, _, slots = shape[:6]
  dense = batch * shape[2] * group * seq_len * seq_len * (1 + slots)
  want = _run(reference.attention if dense < 3e8 else xla.attention, arrays, cotangents, options)
  dtype = shape[10]
  assert_close("out", got[0], want[0], dtype)
  assert_close("lse", got[1], want[1], dtype)
  for name, g, w in zip(("dq", "dk", "dv", "ddepth_k", "ddepth_v", "ddepth_q"), got[2], want[2]):
    if w is not None:
      assert_close(name, g, w, dtype)
  if slots:
    unread = np.ones(slots, bool)
    unread[shape[6]:shape[7]] = False
    for grad in got[2][3:5]:
      assert not np.asarray(grad, np.float32)[:, :, unread].any()


@pytest.mark.parametrize("shape", [_LARGE[1], _LARGE[2], _LARGE[6]], ids=["train_B8_T4K_G2_L72", "T777_G3_seg",
                                                                          "T2K_nodepth_seg"])
def test_backward_is_bitwise_deterministic(shape):
  arrays, cotangents, options = _arrays(shape, seed=7)
  runs = [jax.tree.map(np.asarray, _run(mosaic_gpu.attention, arrays, cotangents, options)) for _ in range(3)]
  for other in runs[1:]:
    for a, b in zip(jax.tree.leaves(runs[0]), jax.tree.leaves(other)):
      assert a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8))
