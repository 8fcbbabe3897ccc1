"""pallas_triton compiled for a real GPU (no interpret mode): skipped visibly without one.

Run on the GPU machine with `JAX_PLATFORMS=cuda python -m pytest tests/gpu -q` (scripts/gpu_check.sh).
1. Every case of the shared operator table (the full spread, not the reduced interpret one) against the
   float64 oracle, through the shared suite's own check.
2. Multi-tile shapes (several query tiles and key blocks, odd T, G = 3, D up to 256, many slots) against
   the dense `reference` backend on the same GPU, with a separate depth_q whenever there is depth: out,
   lse and all six gradients, for both depth modes and for the separate depth-backward kernel.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import test_moda_attention as suite
from operator_cases import CASES, Impl, assert_close
from pallas_kernels import moda_attention, triton
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


@pytest.mark.parametrize("depth_mode", ["dense", "per_token", "dense_separate", "dense_wholetile"])
@pytest.mark.parametrize("shape", _LARGE, ids=[f"T{s[1]}_G{s[3]}_D{s[4]}_L{s[5]}_{s[9]}" for s in _LARGE])
def test_multi_tile_against_reference(shape, depth_mode):
  batch, seq_len, kv_heads, group, head_dim, slots, depth_len, causal, segments, dtype = shape
  keys = jax.random.split(jax.random.PRNGKey(seq_len), 8)
  normal = lambda key, *s: jax.random.normal(key, s, dtype)
  q = normal(keys[0], batch, seq_len, kv_heads * group, head_dim)
  k, v = normal(keys[1], batch, seq_len, kv_heads, head_dim), normal(keys[2], batch, seq_len, kv_heads, head_dim)
  depth = (normal(keys[3], batch, seq_len, slots, kv_heads, head_dim),
           normal(keys[4], batch, seq_len, slots, kv_heads, head_dim),
           normal(jax.random.fold_in(keys[0], 1), batch, seq_len, kv_heads * group, head_dim),
           ) if slots else (None, None)
  seg = jnp.sort(jax.random.randint(keys[5], (batch, seq_len), 0, 4), axis=1) if segments else None
  d_out = normal(keys[6], batch, seq_len, kv_heads * group, head_dim)
  d_lse = jax.random.normal(keys[7], (batch, seq_len, kv_heads * group), jnp.float32)

  blocks = BlockSizes.get_default(max(16, pl_next_pow2(head_dim)), group, dtype)
  # "_separate": the depth backward as its own kernel; "_wholetile": depth phases over the whole tile (no
  # parts) and dk/dv per kv head, whatever the defaults say (these short shapes launch < 1024 dk/dv
  # programs, so at D <= 64 the other variants run dk/dv per query head).
  mode, variant = depth_mode.split("_")[0], depth_mode.partition("_")[2]
  whole = dict(depth_rows=0) if variant == "wholetile" else {}
  blocks = BlockSizes(
      fwd=dataclasses.replace(blocks.fwd, depth_mode=mode, **whole),
      dq=dataclasses.replace(blocks.dq, depth_mode=mode, separate_depth_kernel=variant == "separate", **whole),
      dkv=dataclasses.replace(blocks.dkv, depth_mode=mode,
                              **(dict(per_query_head_below=0) if variant == "wholetile" else {})))

  def run(impl):
    @jax.jit
    def f(arrays, length):
      def attend(a):
        depth_q = a[5] if len(a) > 5 else None
        if impl == "pallas_triton":
          full_len = None if a[3] is None else (jnp.int32(slots) if length is None else length)
          return triton.attention(*a[:5], full_len, seg, causal=causal, scale=head_dim ** -0.5,
                                  block_sizes=blocks, depth_q_BTHD=depth_q)
        return moda_attention(*a[:5], depth_len=length, causal=causal, segment_ids=seg, return_lse=True,
                              implementation=impl, depth_q=depth_q)
      (out, lse), pullback = jax.vjp(attend, arrays)
      return out, lse, pullback((d_out, d_lse))[0]
    return f((q, k, v, *depth), None if depth_len is None else jnp.int32(depth_len))

  got, want = run("pallas_triton"), run("reference")
  assert_close("out", got[0], want[0], dtype)
  assert_close("lse", got[1], want[1], "float32" if dtype == "float32" else dtype)
  for name, g, w in zip(("dq", "dk", "dv", "ddepth_k", "ddepth_v", "ddepth_q"), got[2], want[2]):
    if w is not None:
      assert_close(name, g, w, dtype)
  if slots and depth_len is not None and depth_len < slots:
    assert not np.asarray(got[2][3][:, :, depth_len:]).astype(np.float32).any()
