"""pallas_mosaic_gpu compiled for a Hopper GPU (no interpret mode): skipped visibly without one.

Run on the GPU machine with `JAX_PLATFORMS=cuda python -m pytest tests/gpu/test_mosaic_gpu_device.py -q`
(scripts/gpu_check_mosaic.sh).
1. Every case of the shared operator table on the backend's support matrix (float32 -> bfloat16, head
   dims -> 64 / 128; depth-only and depth_chunk cases are not supported) against the float64 oracle.
2. Multi-tile shapes (odd T, G = 3 and 8, D 64 and 128, many slots, segments, causal or not, a traced
   depth_start / depth_len, G = 16 through Triton's backward) against `reference` (`xla` where the
   dense logits would not fit), with the default tiles and with small ones: out, lse, every gradient;
   unread slots get exactly zero gradient.
3. The backward is deterministic: three runs give bitwise-identical gradients (plain and threaded).
4. The threaded depth cotangent (`attention_with_depth`, `return_depth=True`): tests/test_return_depth.py's
   contract on its cases; on multi-tile shapes (the 700M training shape, odd T with G 3 and segments,
   D 128 with a window, G 16 through Triton's backward), default and small tiles, the threaded depth
   gradients are the plain call's plus the carry (bit for bit the carry at unread slots), every other
   gradient bit for bit the plain call's, and a zero carry gives the plain gradients bit for bit.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import test_moda_attention as suite
import test_return_depth as threading_suite
from operator_cases import CASES, Impl, assert_close
from pallas_kernels import api, mosaic_gpu, reference, xla
from pallas_kernels import mosaic_gpu_tiles as mt
from test_mosaic_gpu import supported

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (run scripts/gpu_check_mosaic.sh)")

GPU = Impl("pallas_mosaic_gpu", interpret=False, spread="full")


_CASES = [supported(c) for c in CASES if not c.depth_only and not c.depth_chunk]


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
  # The smallest tiles the GPU takes (`BlockSizes.validate`: multiples of 64 at these head dims), with a
  # deeper ring where it fits: at D 128 three stages overflow the 227 KB of SMEM (265 KB measured).
  stages = 3 if head_dim == 64 else 2
  return mt.BlockSizes(fwd=mt.MosaicBlocks(block_kv=64, depth_cols=64, stages=stages),
                       dq=mt.MosaicBlocks(block_kv=64, depth_cols=64, stages=stages, compute_wgs=2 if head_dim == 64 else 1),
                       dkv=mt.MosaicBlocks(block_kv=64, depth_cols=64, stages=stages, compute_wgs=1))


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
  """(out, lse, grads); `backend` returns (out, lse) or, threaded, (out, lse, depth_k, depth_v), one
  cotangent each."""
  @jax.jit
  def f(arrays, cotangents):
    def attend(q, k, v, depth_k, depth_v, depth_q):
      inputs, spec = api.prepare(q, k, v, depth_k, depth_v, depth_q=depth_q, **options)
      return backend(inputs, spec)
    outputs, pullback = jax.vjp(attend, *arrays)
    return outputs[0], outputs[1], pullback(cotangents)
  return f(arrays, cotangents)


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


def _bitwise_equal(a, b):
  a, b = np.asarray(a), np.asarray(b)
  return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.view(np.uint8), b.view(np.uint8))


def _carry(shape, grads, seed):
  """Carried depth cotangents a quarter of the call's own depth gradients (RMS), as test_return_depth's."""
  keys = jax.random.split(jax.random.PRNGKey(seed), 2)
  rms = lambda g: float(jnp.sqrt(jnp.mean(jnp.square(g.astype(jnp.float32))))) or 1.0
  return tuple((0.25 * rms(g) * jax.random.normal(key, g.shape, jnp.float32)).astype(g.dtype)
               for key, g in zip(keys, grads[3:5]))


@pytest.mark.parametrize("threaded", [False, True], ids=["plain", "threaded"])
@pytest.mark.parametrize("shape", [_LARGE[1], _LARGE[2], _LARGE[6]], ids=["train_B8_T4K_G2_L72", "T777_G3_seg",
                                                                          "T2K_nodepth_seg"])
def test_backward_is_bitwise_deterministic(shape, threaded):
  arrays, cotangents, options = _arrays(shape, seed=7)
  backend = mosaic_gpu.attention
  if threaded:
    if not shape[5]:
      pytest.skip("no depth arrays to thread")
    cotangents += _carry(shape, _run(backend, arrays, cotangents, options)[2], seed=8)
    backend = mosaic_gpu.attention_with_depth
  runs = [jax.tree.map(np.asarray, _run(backend, arrays, cotangents, options)) for _ in range(3)]
  for other in runs[1:]:
    for a, b in zip(jax.tree.leaves(runs[0]), jax.tree.leaves(other)):
      assert _bitwise_equal(a, b)


_THREADED_CASES = [supported(c) for c in threading_suite.CASES if not c.depth_only and not c.depth_chunk]


@pytest.mark.parametrize("case", _THREADED_CASES, ids=[c.name for c in _THREADED_CASES])
def test_threaded_operator_case_on_gpu(case):
  threading_suite.test_threaded_cotangent_comes_back_with_the_calls_added(GPU, case)


@pytest.mark.parametrize("tiles", ["default", "small"])
@pytest.mark.parametrize("shape", [_LARGE[1], _LARGE[2], _LARGE[4], _LARGE[5]],
                         ids=["train_B8_T4K_G2_L72", "T777_G3_seg", "T1000_G4_D128_window", "T513_G16_triton"])
def test_threaded_gradients_are_the_plain_ones_plus_the_carry(shape, tiles):
  arrays, cotangents, options = _arrays(shape, seed=shape[1])
  block_sizes = None if tiles == "default" else _small_tiles(shape[4])
  plain = _run(lambda i, s: mosaic_gpu.attention(i, s, block_sizes=block_sizes), arrays, cotangents, options)[2]
  threaded_run = lambda carry: _run(lambda i, s: mosaic_gpu.attention_with_depth(i, s, block_sizes=block_sizes),
                                    arrays, cotangents + carry, options)[2]
  carry = _carry(shape, plain, seed=shape[1] + 1)
  threaded = threaded_run(carry)
  unread = np.ones(shape[5], bool)
  unread[shape[6]:shape[7]] = False
  for name, t, p, c in zip(("dq", "dk", "dv", "ddepth_k", "ddepth_v", "ddepth_q"), threaded, plain,
                           (None, None, None, *carry, None)):
    if c is None:  # the same kernels as the plain call's
      assert _bitwise_equal(t, p), name
      continue
    own = np.asarray(t, np.float64) - np.asarray(c, np.float64)
    assert_close(name, own, p, shape[10])
    assert _bitwise_equal(np.asarray(t)[:, :, unread], np.asarray(c)[:, :, unread]), name
  zero = threaded_run(tuple(jnp.zeros_like(c) for c in carry))
  for name, z, p in zip(("dq", "dk", "dv", "ddepth_k", "ddepth_v", "ddepth_q"), zero, plain):
    assert _bitwise_equal(z, p), f"{name} with a zero carry"
