"""pallas_triton compiled for a real GPU (no interpret mode): skipped visibly without one.

Run on the GPU machine with `JAX_PLATFORMS=cuda python -m pytest tests/gpu -q` (scripts/gpu_check.sh).
1. Every case of the shared operator table (the full spread, not the reduced interpret one) against the
   float64 oracle, through the shared suite's own check.
2. Multi-tile shapes (several query tiles and key blocks, odd T, G = 3, D up to 256, many slots) against
   the dense `reference` backend on the same GPU (`xla` where reference's [T, T * L] depth logits would
   not fit), with a separate depth_q whenever there is depth: out,
   lse and all six gradients, with the default tiles, the fused and the separate depth backward, and
   whole-tile depth phases with per-kv-head dk/dv.
3. The MoDA family on the default tiles: a traced depth_start, depth-only attention (with rows that see
   nothing) and depth_chunk inside a query tile, against `reference`.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import test_moda_attention as suite
import test_return_depth
from operator_cases import CASES, Impl, assert_close
from pallas_kernels import api, reference, triton, xla
from pallas_kernels.block_sizes import BlockSizes
from pallas_kernels.block_sizes import next_pow2 as pl_next_pow2

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (run scripts/gpu_check.sh)")

GPU = Impl("pallas_triton", interpret=False, spread="full")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_operator_case_on_gpu(case):
  suite.test_forward_and_gradients_match_oracle(GPU, case)


# (batch, T, Hk, G, D, L, depth_len, causal, segments, dtype)
_LARGE = [
    (2, 1031, 2, 8, 64, 72, 72, True, False, "bfloat16"),
    (1, 777, 2, 3, 64, 40, 17, True, True, "bfloat16"),
    (1, 1024, 4, 2, 128, 16, 16, False, False, "float16"),
    (1, 513, 1, 16, 256, 8, 5, True, False, "bfloat16"),
    (1, 300, 2, 4, 96, 9, 0, True, False, "float32"),
    (2, 2048, 8, 2, 64, 0, None, True, True, "bfloat16"),
]


def _tiles(variant: str, head_dim: int, group: int, dtype) -> BlockSizes:
  """The default tiles, or with one option forced: "fused" / "separate" depth backward; "wholetile": depth
  phases over the whole tile (no parts) and dk/dv per kv head, whatever the defaults say."""
  blocks = BlockSizes.get_default(max(16, pl_next_pow2(head_dim)), group, dtype)
  if variant in ("fused", "separate"):
    return dataclasses.replace(blocks, dq=dataclasses.replace(blocks.dq, separate_depth_kernel=variant == "separate"))
  if variant == "wholetile":
    return BlockSizes(fwd=dataclasses.replace(blocks.fwd, depth_rows=0),
                      dq=dataclasses.replace(blocks.dq, depth_rows=0),
                      dkv=dataclasses.replace(blocks.dkv, per_query_head=False))
  return blocks


def _random(key, shape, dtype):
  return None if shape is None else jax.random.normal(key, shape, dtype)


def _compare(arrays, cotangents, dtype, tiles, **options):
  """out, lse and the gradients of the six arrays (None where absent): pallas_triton vs reference."""
  def run(backend):
    @jax.jit
    def f(arrays):
      def attend(q, k, v, depth_k, depth_v, depth_q):
        inputs, spec = api.prepare(q, k, v, depth_k, depth_v, depth_q=depth_q, **options)
        return backend(inputs, spec)
      (out, lse), pullback = jax.vjp(attend, *arrays)
      return out, lse, pullback(cotangents)
    return f(arrays)

  # reference's logits are [B, Hq, T, T + T * L] float32: past ~1 GB per copy the oracle is `xla`.
  (batch, seq_len, num_q_heads, _), depth_k = arrays[0].shape, arrays[3]
  dense_entries = batch * num_q_heads * seq_len * seq_len * (1 + (0 if depth_k is None else depth_k.shape[2]))
  got = run(lambda inputs, spec: triton.attention(inputs, spec, block_sizes=tiles))
  want = run(reference.attention if dense_entries < 3e8 else xla.attention)
  assert_close("out", got[0], want[0], dtype)
  finite = np.isfinite(np.asarray(want[1]))
  np.testing.assert_array_equal(np.isfinite(np.asarray(got[1])), finite)
  assert_close("lse", np.where(finite, got[1], 0.0), np.where(finite, want[1], 0.0),
               "float32" if dtype == "float32" else dtype)
  for name, g, w in zip(("dq", "dk", "dv", "ddepth_k", "ddepth_v", "ddepth_q"), got[2], want[2]):
    if w is not None:
      assert_close(name, g, w, dtype)
  return got


@pytest.mark.parametrize("variant", ["default", "fused", "separate", "wholetile"])
@pytest.mark.parametrize("shape", _LARGE, ids=[f"T{s[1]}_G{s[3]}_D{s[4]}_L{s[5]}_{s[9]}" for s in _LARGE])
def test_multi_tile_against_reference(shape, variant):
  batch, seq_len, kv_heads, group, head_dim, slots, depth_len, causal, segments, dtype = shape
  keys = jax.random.split(jax.random.PRNGKey(seq_len), 8)
  q_shape, kv_shape = (batch, seq_len, kv_heads * group, head_dim), (batch, seq_len, kv_heads, head_dim)
  depth_shape = (batch, seq_len, slots, kv_heads, head_dim) if slots else None
  arrays = (_random(keys[0], q_shape, dtype), _random(keys[1], kv_shape, dtype), _random(keys[2], kv_shape, dtype),
            _random(keys[3], depth_shape, dtype), _random(keys[4], depth_shape, dtype),
            _random(keys[5], q_shape if slots else None, dtype))
  seg = jnp.sort(jax.random.randint(keys[6], (batch, seq_len), 0, 4), axis=1) if segments else None
  cotangents = (_random(keys[7], q_shape, dtype), jax.random.normal(keys[0], q_shape[:3], jnp.float32))
  got = _compare(arrays, cotangents, dtype, _tiles(variant, head_dim, group, dtype),
                 depth_len=None if depth_len is None else jnp.int32(depth_len), causal=causal, segment_ids=seg)
  if slots and depth_len is not None and depth_len < slots:
    assert not np.asarray(got[2][3][:, :, depth_len:]).astype(np.float32).any()


# (name, sequence, depth_start, depth_len, depth_chunk): B1 T777 Hk2 G2 D64 L24 bf16 with packed segments on
# the default tiles (32 tokens per query tile: chunks up to 32 fit; the depth parts widen to a chunk).
_VARIANTS = [("depth_start", True, 5, 20, None), ("depth_only", False, 3, 24, None),
             ("depth_only_empty", False, 7, 7, None), ("chunk16", True, 2, 24, 16),
             ("chunk4_depth_only", False, 0, 9, 4)]


@pytest.mark.parametrize("name, sequence, depth_start, depth_len, depth_chunk", _VARIANTS,
                         ids=[v[0] for v in _VARIANTS])
def test_variants_against_reference(name, sequence, depth_start, depth_len, depth_chunk):
  del name
  batch, seq_len, kv_heads, group, head_dim, slots, dtype = 1, 777, 2, 2, 64, 24, "bfloat16"
  keys = jax.random.split(jax.random.PRNGKey(depth_start), 8)
  q_shape, kv_shape = (batch, seq_len, kv_heads * group, head_dim), (batch, seq_len, kv_heads, head_dim)
  depth_shape = (batch, seq_len, slots, kv_heads, head_dim)
  kv = (_random(keys[1], kv_shape, dtype), _random(keys[2], kv_shape, dtype)) if sequence else (None, None)
  arrays = (_random(keys[0], q_shape, dtype), *kv, _random(keys[3], depth_shape, dtype),
            _random(keys[4], depth_shape, dtype), _random(keys[5], q_shape, dtype))
  seg = jnp.sort(jax.random.randint(keys[6], (batch, seq_len), 0, 4), axis=1)
  cotangents = (_random(keys[7], q_shape, dtype), jax.random.normal(keys[0], q_shape[:3], jnp.float32))
  tiles = BlockSizes.get_default(head_dim, group, dtype)
  got = _compare(arrays, cotangents, dtype, tiles, depth_start=jnp.int32(depth_start),
                 depth_len=jnp.int32(depth_len), depth_chunk=depth_chunk, segment_ids=seg)
  unread = np.ones(slots, bool)
  unread[depth_start:depth_len] = False
  for grad in got[2][3:5]:
    assert not np.asarray(grad)[:, :, unread].astype(np.float32).any()


@pytest.mark.parametrize("case", test_return_depth.CASES, ids=[c.name for c in test_return_depth.CASES])
def test_threaded_depth_cotangent_on_gpu(case):
  """The in-place add into a threaded depth cotangent (the aliased load-add-store), compiled."""
  test_return_depth.test_threaded_cotangent_comes_back_with_the_calls_added(GPU, case)
