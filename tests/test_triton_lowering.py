"""pallas_triton lowered for an abstract "NVIDIA H200" on this CPU machine: Triton lowering errors fail CI.

Interpret mode accepts programs the Triton lowering rejects (batched dot_general, non-power-of-two
loads); this lowers forward + backward of the benchmark shapes with `lowering_platforms=("cuda",)` and
checks that each kernel (forward, dq + depth dk/dv or dq and the depth backward, sequence dk/dv) became a
Triton call. Compiling the Triton IR to PTX still needs the GPU machine: scripts/gpu_check.sh.
"""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import api, moda_attention, triton
from pallas_kernels.block_sizes import BlockSizes, dkv_per_query_head

_H200 = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="cuda")
_MESH = jax.sharding.AbstractMesh((1,), ("x",), (jax.sharding.AxisType.Explicit,), abstract_device=_H200)
_TRITON_CALL = "__gpu$xla.gpu.triton"


def _lowered_text(batch, seq_len, group, head_dim, slots, attend, *, sequence=True):
  """The lowered jit(grad) of sum(out) + sum(lse) of `attend(q, k, v, depth_k, depth_v, depth_q)`."""
  shape = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)
  kv_heads = 8
  q = shape(batch, seq_len, kv_heads * group, head_dim)
  kv = [shape(batch, seq_len, kv_heads, head_dim)] * 2 if sequence else [None, None]
  # With depth, a separate depth_q too: the model's path (the kernels then read and write it).
  depth = [shape(batch, seq_len, slots, kv_heads, head_dim)] * 2 + [q] if slots else [None] * 3

  def loss(*a):
    out, lse = attend(*a)
    return jnp.sum(out.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

  arrays = [q, *kv, *depth]
  argnums = tuple(i for i, a in enumerate(arrays) if a is not None)
  with jax.sharding.use_abstract_mesh(_MESH):
    return jax.jit(jax.grad(loss, argnums=argnums)).trace(*arrays).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("slots", [0, 72])
@pytest.mark.parametrize("group", [2, 3, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_default_tiles_lower_for_h200(head_dim, group, slots):
  # The seq_len is not a multiple of any tile, as in the odd-T contract cases.
  # Through the dispatcher, named: implementation=None picks pallas_mosaic_gpu for an H200.
  attend = lambda q, k, v, dk=None, dv=None, dq=None: moda_attention(q, k, v, dk, dv, depth_q=dq, return_lse=True,
                                                                     implementation="pallas_triton")
  text = _lowered_text(2, 1000, group, head_dim, slots, attend)
  # forward, dq, dk/dv, and with depth at D <= 64 the separate depth-backward kernel (the default there).
  separate = BlockSizes.get_default(head_dim, group, jnp.bfloat16).dq.separate_depth_kernel and slots > 0
  assert text.count(_TRITON_CALL) == 3 + separate


@pytest.mark.parametrize("separate", [False, True])
def test_fused_and_separate_depth_kernel_lower_for_h200(separate):
  base = BlockSizes.get_default(64, 2, jnp.bfloat16)
  sizes = dataclasses.replace(base, dq=dataclasses.replace(base.dq, separate_depth_kernel=separate))

  def attend(q, k, v, dk, dv, dq):
    inputs, spec = api.prepare(q, k, v, dk, dv, depth_q=dq, depth_len=jnp.int32(5))
    return triton.attention(inputs, spec, block_sizes=sizes)

  # forward, dq (+ depth), dk/dv; the separate depth kernel is a fourth.
  assert _lowered_text(1, 4096, 2, 64, 72, attend).count(_TRITON_CALL) == 3 + separate


# (sequence, depth_chunk, segments, kernels): the MoDA family with a traced depth_start, on the default
# tiles (G = 2: 32 tokens per query tile, so chunks up to 32 fit). Depth-only attention has a forward and
# a depth backward only.
@pytest.mark.parametrize("sequence, depth_chunk, segments, kernels",
                         [(True, None, True, 4), (False, None, False, 2), (True, 16, True, 4), (False, 4, True, 2)])
def test_variants_lower_for_h200(sequence, depth_chunk, segments, kernels):
  def attend(q, k, v, dk, dv, dq):
    segment_ids = jnp.cumsum(jnp.ones(q.shape[:2], jnp.int32), axis=1) // 300 if segments else None
    return moda_attention(q, k, v, dk, dv, depth_q=dq, depth_start=jnp.int32(3), depth_chunk=depth_chunk,
                          segment_ids=segment_ids, return_lse=True, implementation="pallas_triton")

  assert _lowered_text(1, 1000, 2, 64, 24, attend, sequence=sequence).count(_TRITON_CALL) == kernels


@pytest.mark.parametrize("slots", [0, 72])
def test_packed_documents_lower_for_h200(slots):
  # The benchmark's packed rows (B8 T4096 G2, 8 documents): enough programs that dk/dv runs per kv head, so
  # the segment bounds reach both dk/dv layouts (test_variants_lower_for_h200 has the per-query-head one).
  def attend(q, k, v, dk=None, dv=None, dq=None):
    segment_ids = jnp.arange(q.shape[1], dtype=jnp.int32)[None, :] // 512 + jnp.zeros(q.shape[:2], jnp.int32)
    return moda_attention(q, k, v, dk, dv, depth_q=dq, segment_ids=segment_ids, return_lse=True,
                          implementation="pallas_triton")

  base = BlockSizes.get_default(64, 2, jnp.bfloat16)
  assert not dkv_per_query_head(base.dkv, 2, 4096 // base.dkv.block_k * 8 * 8)
  separate = base.dq.separate_depth_kernel and slots > 0
  assert _lowered_text(8, 4096, 2, 64, slots, attend).count(_TRITON_CALL) == 3 + separate
