"""pallas_triton in interpret mode: features the shared operator suite does not pin down.

The shared suite (test_moda_attention.py) checks every operator case with the default tiles. Here:
tiles small enough that several query tiles and key blocks meet odd T and G = 3, in both depth modes,
with NaN in the unwritten slot (proves it is never loaded: a masked NaN logit or NaN * 0 stays NaN);
BlockSizes validation; and the kernels inside `jax.shard_map` on the 8 fake CPU devices.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from pallas_kernels import moda_attention, reference, triton
from pallas_kernels.block_sizes import BlockSizes, KernelBlocks

# float32 inputs, IEEE float32 dots in the kernel, float32 HIGHEST in the reference.
_ATOL = 2e-5


def _inputs(batch, seq_len, kv_heads, group, head_dim, slots, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 6)
  normal = lambda key, *shape: jax.random.normal(key, shape, jnp.float32)
  q = normal(keys[0], batch, seq_len, kv_heads * group, head_dim)
  k, v = normal(keys[1], batch, seq_len, kv_heads, head_dim), normal(keys[2], batch, seq_len, kv_heads, head_dim)
  dk = normal(keys[3], batch, seq_len, slots, kv_heads, head_dim)
  dv = normal(keys[4], batch, seq_len, slots, kv_heads, head_dim)
  d_out = normal(keys[5], batch, seq_len, kv_heads * group, head_dim)
  return (q, k, v, dk, dv), d_out


def _small_tiles(depth_mode, separate_depth_kernel=False, depth_rows=0, per_query_head=False):
  """per_query_head: dk/dv per query head for every launch size."""
  # With depth parts the tile is 32 rows (8 tokens of G = 3), split into two parts of 16.
  blocks = KernelBlocks(block_q=32 if depth_rows else 16, block_k=16, depth_cols=16, depth_mode=depth_mode,
                        per_token_slots=2, depth_rows=depth_rows)
  return BlockSizes(fwd=blocks, dq=dataclasses.replace(blocks, separate_depth_kernel=separate_depth_kernel),
                    dkv=dataclasses.replace(blocks, depth_rows=0,
                                            per_query_head_below=2 ** 31 if per_query_head else 0))


def _out_lse_grads(fn, arrays, d_out, depth_len, segment_ids, causal):
  """`arrays` may carry a sixth entry, depth_q (passed as depth_q_BTHD and differentiated too)."""
  def attend(a):
    return fn(*a[:5], depth_len, segment_ids, causal=causal, scale=0.3, depth_q_BTHD=(a + (None,))[5])
  (out, lse), pullback = jax.vjp(attend, arrays)
  return out, lse, pullback((d_out, jnp.cos(lse)))[0]


# The default tiles are what the shared suite runs (depth_q or not); here the separate and fused depth
# backward, the per-token mode, depth phases in parts of 16 rows and the per-query-head dk/dv kernel, with
# depth_q = q and with a depth_q of its own.
@pytest.mark.parametrize("depth_mode, causal, segments, separate, with_depth_q, depth_rows, per_query_head",
                         [("dense", False, True, True, False, 0, False),
                          ("per_token", True, False, True, False, 16, True),
                          ("dense", True, True, True, True, 16, True),
                          ("per_token", False, False, False, True, 0, False),
                          ("dense", True, False, False, True, 16, False)])
def test_multi_tile_matches_reference(depth_mode, causal, segments, separate, with_depth_q, depth_rows,
                                      per_query_head):
  # G = 3 pads to 4 rows per token: 4 tokens per 16-row tile, T = 19 ends mid-tile and mid key block.
  arrays, d_out = _inputs(batch=1, seq_len=19, kv_heads=2, group=3, head_dim=16, slots=5)
  segment_ids = jnp.asarray([[0] * 7 + [1] * 9 + [2] * 3]) if segments else None
  depth_len = jnp.int32(4)
  # NaN in the unwritten slot: a kernel that loads it (even to mask it afterwards) returns NaN.
  q, k, v, dk, dv = arrays
  poisoned = (q, k, v, dk.at[:, :, 4:].set(jnp.nan), dv.at[:, :, 4:].set(jnp.nan))
  if with_depth_q:
    depth_q = jax.random.normal(jax.random.PRNGKey(7), q.shape, q.dtype)
    arrays, poisoned = arrays + (depth_q,), poisoned + (depth_q,)
  tiles = _small_tiles(depth_mode, separate, depth_rows, per_query_head)
  kernel = lambda *a, **kw: triton.attention(*a, **kw, interpret=True, block_sizes=tiles)
  got = _out_lse_grads(kernel, poisoned, d_out, depth_len, segment_ids, causal)
  want = _out_lse_grads(reference.attention, arrays, d_out, depth_len, segment_ids, causal)
  for name, g, w in zip(("out", "lse", "grads"), got, want):
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(w)):
      np.testing.assert_allclose(a, b, atol=_ATOL, rtol=_ATOL, err_msg=name)
  unwritten_grads = [np.asarray(g[:, :, 4:]) for g in got[2][3:5]]
  assert all(not g.any() for g in unwritten_grads)


@pytest.mark.parametrize("change, match", [
    (dict(block_q=48), "block_q=48"), (dict(block_k=8), "block_k=8"), (dict(depth_cols=24), "depth_cols=24"),
    (dict(block_q=16), "next_pow2"), (dict(num_warps=3), "num_warps=3"), (dict(depth_mode="sparse"), "depth_mode"),
    (dict(per_token_slots=0), "per_token_slots=0"), (dict(separate_depth_kernel=1), "separate_depth_kernel"),
    (dict(per_query_head_below=-1), "per_query_head_below=-1"), (dict(depth_rows=16), "depth_rows=16"),
    (dict(depth_rows=24), "depth_rows=24")])
def test_block_sizes_are_validated_before_launch(change, match):
  base = BlockSizes.get_default(64, 32, jnp.bfloat16)
  bad = dataclasses.replace(base, dq=dataclasses.replace(base.dq, **change))
  arrays, _ = _inputs(batch=1, seq_len=4, kv_heads=1, group=32, head_dim=64, slots=1)
  with pytest.raises(ValueError, match=match):
    triton.attention(*arrays, jnp.int32(1), None, causal=True, scale=0.125, interpret=True, block_sizes=bad)


def test_defaults_hold_a_whole_token_per_tile():
  for group in (1, 3, 8, 32, 64):
    for dtype in (jnp.float32, jnp.bfloat16):
      sizes = BlockSizes.get_default(256, group, dtype)
      sizes.validate(group)
      assert sizes.fwd.block_q >= group


def test_inside_shard_map_equals_unsharded():
  # 8 fake CPU devices: batch over 2, kv heads (and their query heads) over 4.
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  arrays, d_out = _inputs(batch=2, seq_len=6, kv_heads=4, group=2, head_dim=16, slots=3, seed=2)

  def attend(q, k, v, dk, dv):
    return moda_attention(q, k, v, dk, dv, depth_len=2, implementation="pallas_triton", interpret=True)

  heads, depth_heads = P("data", None, "model", None), P("data", None, None, "model", None)
  sharded = jax.shard_map(attend, mesh=mesh, in_specs=(heads, heads, heads, depth_heads, depth_heads),
                          out_specs=heads, check_vma=False)
  got = jax.jit(sharded)(*arrays)
  np.testing.assert_allclose(got, jax.jit(attend)(*arrays), atol=_ATOL, rtol=_ATOL)
  # Each device ran the kernel on its own batch row and kv heads: the result is sharded, not replicated.
  assert got.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, heads), got.ndim)
