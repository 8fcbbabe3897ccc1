"""pallas_triton in interpret mode: features the shared operator suite does not pin down.

The shared suite (test_moda_attention.py) checks every operator case with the default tiles. Here: tiles
small enough that several query tiles and key blocks meet odd T and G = 3 (the fused and the separate depth
backward, depth phases in parts, dk/dv per query head); the MoDA family (depth_start, depth-only attention
with rows that see nothing, depth_chunk inside a tile) against `reference`, with NaN in every slot that
must not be read (proves it is never loaded: a masked NaN logit or NaN * 0 stays NaN) and exact zero
gradients there; what the backend refuses; BlockSizes validation and the dk/dv per-query-head rule; and the
kernels inside `jax.shard_map` on the 8 fake CPU devices.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from pallas_kernels import api, moda_attention, reference, triton
from pallas_kernels.block_sizes import BlockSizes, KernelBlocks, dkv_per_query_head

# float32 inputs, IEEE float32 dots in the kernel, float32 HIGHEST in the reference.
_ATOL = 2e-5
_SLOTS = 5


def _arrays(seq_len, kv_heads=2, group=3, head_dim=16, *, sequence=True, depth_q=False, seed=0):
  """(q, k, v, depth_k, depth_v, depth_q) float32 with None where absent, and (d_out, d_lse)."""
  keys = jax.random.split(jax.random.PRNGKey(seed), 8)
  normal = lambda key, *shape: jax.random.normal(key, shape, jnp.float32)
  q_shape, kv_shape = (1, seq_len, kv_heads * group, head_dim), (1, seq_len, kv_heads, head_dim)
  depth_shape = (1, seq_len, _SLOTS, kv_heads, head_dim)
  arrays = (normal(keys[0], *q_shape),
            normal(keys[1], *kv_shape) if sequence else None, normal(keys[2], *kv_shape) if sequence else None,
            normal(keys[3], *depth_shape), normal(keys[4], *depth_shape),
            normal(keys[5], *q_shape) if depth_q else None)
  return arrays, (normal(keys[6], *q_shape), normal(keys[7], *q_shape[:3]))


def _tiles(block_q=16, depth_rows=0, separate=True, per_query_head=False):
  """Small tiles: G = 3 pads to 4 rows per token, so 16 rows are 4 tokens and parts of 16 rows too."""
  blocks = KernelBlocks(block_q=block_q, block_k=16, depth_cols=16, depth_rows=depth_rows)
  return BlockSizes(fwd=blocks, dq=dataclasses.replace(blocks, separate_depth_kernel=separate),
                    dkv=KernelBlocks(block_q=16, block_k=16, depth_cols=16, per_query_head=per_query_head))


def _out_lse_grads(backend, arrays, cotangents, **options):
  """(out, lse, grads of the six arrays) of one backend called through `api.prepare`."""
  def attend(q, k, v, depth_k, depth_v, depth_q):
    inputs, spec = api.prepare(q, k, v, depth_k, depth_v, depth_q=depth_q, scale=0.3, **options)
    return backend(inputs, spec)

  (out, lse), pullback = jax.vjp(attend, *arrays)
  return out, lse, pullback(cotangents)


def _check_against_reference(arrays, cotangents, tiles, *, read_slots, **options):
  """The kernels on arrays whose unread slots are NaN equal `reference` on the clean arrays, and every
  unread slot's gradient is exactly 0."""
  unread = np.ones(_SLOTS, bool)
  unread[read_slots] = False
  poison = lambda x: jnp.where(unread[None, None, :, None, None], jnp.nan, x)
  poisoned = arrays[:3] + (poison(arrays[3]), poison(arrays[4])) + arrays[5:]
  kernel = lambda inputs, spec: triton.attention(inputs, spec, interpret=True, block_sizes=tiles)
  got = _out_lse_grads(kernel, poisoned, cotangents, **options)
  want = _out_lse_grads(reference.attention, arrays, cotangents, **options)
  for name, g, w in zip(("out", "lse", "grads"), got, want):
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(w)):
      np.testing.assert_allclose(a, b, atol=_ATOL, rtol=_ATOL, err_msg=name)
  for name, grad in zip(("depth_k", "depth_v"), got[2][3:5]):
    assert not np.asarray(grad)[:, :, unread].any(), f"d {name} of an unread slot is not 0"
  return got


# The default tiles are what the shared suite runs; here the separate and fused depth backward, depth
# phases in parts of 16 rows and the per-query-head dk/dv kernel, with depth_q = q and one of its own.
@pytest.mark.parametrize("causal, segments, separate, with_depth_q, depth_rows, per_query_head",
                         [(False, True, True, False, 0, False),
                          (True, False, True, False, 16, True),
                          (True, True, True, True, 16, True),
                          (False, False, False, True, 0, False),
                          (True, False, False, True, 16, False)])
def test_multi_tile_matches_reference(causal, segments, separate, with_depth_q, depth_rows, per_query_head):
  # T = 19 ends mid-tile and mid key block; with parts the tile is 32 rows (8 tokens) in two parts.
  arrays, cotangents = _arrays(19, depth_q=with_depth_q)
  segment_ids = jnp.asarray([[0] * 7 + [1] * 9 + [2] * 3]) if segments else None
  _check_against_reference(arrays, cotangents, _tiles(32 if depth_rows else 16, depth_rows, separate,
                                                       per_query_head),
                           read_slots=slice(0, 4), depth_len=jnp.int32(4), causal=causal,
                           segment_ids=segment_ids)


_SEGMENTS = [[0] * 7 + [1] * 9 + [2] * 3]


# (name, sequence, depth_start, depth_len, depth_chunk, segments, tiles): the MoDA family. A 64-row tile
# (16 tokens) takes one slot per depth step, so with depth_start = 2 the first steps are skipped and their
# slots zero-filled. Chunks of 4 tokens fill a 16-row tile; chunks of 8 fill a 32-row tile whose 16-row
# depth parts widen to a chunk.
_VARIANTS = [
    ("depth_start", True, 2, 4, None, True, _tiles(64, separate=False, per_query_head=True)),
    ("depth_start_parts", True, 1, 3, None, False, _tiles(32, 16)),
    ("depth_only", False, 1, 4, None, False, _tiles(32, 16)),
    ("chunk4", True, 1, 5, 4, True, _tiles()),
    ("chunk8_parts_depth_only", False, 0, 3, 8, True, _tiles(32, 16)),
]


@pytest.mark.parametrize("name, sequence, depth_start, depth_len, depth_chunk, segments, tiles", _VARIANTS,
                         ids=[v[0] for v in _VARIANTS])
def test_variants_match_reference(name, sequence, depth_start, depth_len, depth_chunk, segments, tiles):
  del name
  arrays, cotangents = _arrays(19, sequence=sequence, depth_q=not sequence)
  _check_against_reference(arrays, cotangents, tiles, read_slots=slice(depth_start, depth_len),
                           depth_start=jnp.int32(depth_start), depth_len=jnp.int32(depth_len),
                           depth_chunk=depth_chunk, segment_ids=jnp.asarray(_SEGMENTS) if segments else None)


@pytest.mark.parametrize("depth_start, depth_len", [(2, 2), (0, 0)])
def test_depth_only_rows_that_see_nothing(depth_start, depth_len):
  # No readable slot: every row is empty. out 0 and lse -inf (not the average of the masked columns the
  # finite MASK_VALUE would give), gradients exactly 0 and never NaN, whatever the cotangents.
  arrays, cotangents = _arrays(9, sequence=False)
  got = _check_against_reference(arrays, cotangents, _tiles(), read_slots=slice(depth_start, depth_len),
                                 depth_start=depth_start, depth_len=depth_len)
  out, lse, grads = got
  assert not np.asarray(out).any() and np.all(np.asarray(lse) == -np.inf)
  assert all(not np.asarray(g).any() for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("depth_chunk, block_q", [(3, 16), (8, 16)])
def test_chunk_across_query_tiles_is_not_supported(depth_chunk, block_q):
  # 16 rows hold 4 tokens of G = 3: a chunk of 3 or 8 would straddle two tiles.
  arrays, _ = _arrays(9)
  inputs, spec = api.prepare(*arrays[:5], depth_chunk=depth_chunk)
  with pytest.raises(NotImplementedError, match=f"depth_chunk={depth_chunk}"):
    triton.check_supported(inputs, spec, True, block_sizes=_tiles(block_q))
  with pytest.raises(NotImplementedError, match="depth_chunk"):
    triton.attention(inputs, spec, interpret=True, block_sizes=_tiles(block_q))


@pytest.mark.parametrize("change, match", [
    (dict(block_q=48), "block_q=48"), (dict(block_k=8), "block_k=8"), (dict(depth_cols=24), "depth_cols=24"),
    (dict(block_q=16), "next_pow2"), (dict(num_warps=3), "num_warps=3"),
    (dict(separate_depth_kernel=1), "separate_depth_kernel"), (dict(per_query_head=1), "per_query_head=1"),
    (dict(depth_rows=16), "depth_rows=16"), (dict(depth_rows=24), "depth_rows=24")])
def test_block_sizes_are_validated_before_launch(change, match):
  base = BlockSizes.get_default(64, 32, jnp.bfloat16)
  bad = dataclasses.replace(base, dq=dataclasses.replace(base.dq, **change))
  q = jnp.zeros((1, 4, 32, 64), jnp.float32)
  kv, depth = jnp.zeros((1, 4, 1, 64), jnp.float32), jnp.zeros((1, 4, 1, 1, 64), jnp.float32)
  inputs, spec = api.prepare(q, kv, kv, depth, depth)
  with pytest.raises(ValueError, match=match):
    triton.attention(inputs, spec, interpret=True, block_sizes=bad)


def test_defaults_hold_a_whole_token_per_tile():
  for group in (1, 3, 8, 32, 64):
    for dtype in (jnp.float32, jnp.bfloat16):
      sizes = BlockSizes.get_default(256, group, dtype)
      sizes.validate(group)
      assert sizes.fwd.block_q >= group


def test_dkv_per_query_head_default_rule():
  # The measured rule at D <= 64: per query head at G >= 8 for any launch, below it only under 1024
  # programs; never at G = 1; never at the larger head dims (measured slower there); explicit bools win.
  dkv = BlockSizes.get_default(64, 2, jnp.bfloat16).dkv
  assert dkv.per_query_head is None
  assert dkv_per_query_head(dkv, 8, 10 ** 6) and dkv_per_query_head(dkv, 2, 1023)
  assert not dkv_per_query_head(dkv, 4, 1024) and not dkv_per_query_head(dkv, 1, 1)
  assert not dkv_per_query_head(BlockSizes.get_default(128, 8, jnp.bfloat16).dkv, 8, 1)
  assert dkv_per_query_head(dataclasses.replace(dkv, per_query_head=True), 2, 10 ** 6)


def test_inside_shard_map_equals_unsharded():
  # 8 fake CPU devices: batch over 2, kv heads (and their query heads) over 4.
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  keys = jax.random.split(jax.random.PRNGKey(2), 5)
  arrays = [jax.random.normal(keys[0], (2, 6, 8, 16)), jax.random.normal(keys[1], (2, 6, 4, 16)),
            jax.random.normal(keys[2], (2, 6, 4, 16)), jax.random.normal(keys[3], (2, 6, 3, 4, 16)),
            jax.random.normal(keys[4], (2, 6, 3, 4, 16))]

  def attend(q, k, v, dk, dv):
    return moda_attention(q, k, v, dk, dv, depth_len=2, implementation="pallas_triton", interpret=True)

  heads, depth_heads = P("data", None, "model", None), P("data", None, None, "model", None)
  sharded = jax.shard_map(attend, mesh=mesh, in_specs=(heads, heads, heads, depth_heads, depth_heads),
                          out_specs=heads, check_vma=False)
  got = jax.jit(sharded)(*arrays)
  np.testing.assert_allclose(got, jax.jit(attend)(*arrays), atol=_ATOL, rtol=_ATOL)
  # Each device ran the kernel on its own batch row and kv heads: the result is sharded, not replicated.
  assert got.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, heads), got.ndim)


@pytest.mark.parametrize("head_dim, segments", [(16, False), (12, True)], ids=["d16", "d12_padded_segments"])
def test_sequence_backward_is_the_custom_vjps_backward(head_dim, segments):
  """`triton.sequence_backward` (what cudnn's packed path runs for the rows it cannot express) from the
  forward's own out and lse gives the gradients `jax.vjp` of `triton.attention` gives: the same kernels,
  the same layout glue (G = 3 folded, D = 12 zero-padded to 16)."""
  (q, k, v, *_), (d_out, _) = _arrays(19, head_dim=head_dim)
  segment_ids = jnp.asarray(_SEGMENTS, jnp.int32) if segments else None
  inputs, spec = api.prepare(q, k, v, segment_ids=segment_ids)
  tiles = _tiles()

  def attend(q, k, v):
    return triton.attention(inputs._replace(q=q, k=k, v=v), spec, interpret=True, block_sizes=tiles)[0]

  out, pullback = jax.vjp(attend, q, k, v)
  _, lse = triton.attention(inputs, spec, interpret=True, block_sizes=tiles)
  got = triton.sequence_backward(inputs, spec, out, lse, d_out, interpret=True, block_sizes=tiles)
  for name, want, grad in zip("qkv", pullback(d_out), got):
    assert grad.shape == want.shape and grad.dtype == want.dtype, name
    np.testing.assert_allclose(grad, want, atol=_ATOL, rtol=0, err_msg=name)
