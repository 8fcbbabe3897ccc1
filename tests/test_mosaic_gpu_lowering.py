"""pallas_mosaic_gpu lowered for an abstract "NVIDIA H200" on this CPU machine.

Interpret mode runs a different wgmma path (`mosaic_gpu_tiles.matmul`: operands staged through SMEM, no
accumulator init), so the GPU path is checked here: forward + backward of benchmark-like shapes go
through jax's Mosaic GPU lowering (`lowering_platforms=("cuda",)`), which builds the kernels' Mosaic GPU
module in Python and so rejects layouts, wgmma shapes, TMA boxes and SMEM budgets (> 227 KB) the GPU
would. Each kernel (forward, dq + depth backward, sequence dk/dv) must become one Mosaic GPU call;
with G > 8 the backward is pallas_triton's (Triton calls). Compiling to PTX and running still needs the
GPU machine: scripts/gpu_check_mosaic.sh.
"""

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import api, mosaic_gpu

_H200 = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="cuda")
_MESH = jax.sharding.AbstractMesh((1,), ("x",), (jax.sharding.AxisType.Explicit,), abstract_device=_H200)
_MOSAIC_CALL = "custom_call @mosaic_gpu_v2("
_TRITON_CALL = "__gpu$xla.gpu.triton"


def _lowered_text(batch, seq_len, group, head_dim, slots, *, depth_q=True, segments=False, causal=True):
  """The lowered jit(grad) of sum(out) + sum(lse) over every floating input."""
  shape = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)
  kv_heads = 8
  q = shape(batch, seq_len, kv_heads * group, head_dim)
  kv = shape(batch, seq_len, kv_heads, head_dim)
  arrays = [q, kv, kv]
  if slots:
    arrays += [shape(batch, seq_len, slots, kv_heads, head_dim)] * 2 + ([q] if depth_q else [])

  def loss(q, k, v, depth_k=None, depth_v=None, dq=None):
    segment_ids = jnp.cumsum(jnp.ones(q.shape[:2], jnp.int32), axis=1) // 300 if segments else None
    inputs, spec = api.prepare(q, k, v, depth_k, depth_v, depth_q=dq, causal=causal, segment_ids=segment_ids,
                               depth_start=jnp.int32(1) if slots else None,
                               depth_len=jnp.int32(slots - 1) if slots else None)
    out, lse = mosaic_gpu.attention(inputs, spec)
    return jnp.sum(out.astype(jnp.float32)) + jnp.sum(lse)

  with jax.sharding.use_abstract_mesh(_MESH):
    grad = jax.jit(jax.grad(loss, argnums=tuple(range(len(arrays)))))
    return grad.trace(*arrays).lower(lowering_platforms=("cuda",)).as_text()


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


def test_many_heads_per_kv_head_use_the_triton_backward():
  # G = 16: the forward spreads a kv head's heads over two programs; the backward is Triton's.
  text = _lowered_text(1, 2048, 16, 64, 64)
  assert text.count(_MOSAIC_CALL) == 1 and text.count(_TRITON_CALL) >= 3
