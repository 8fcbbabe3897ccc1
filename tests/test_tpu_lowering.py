"""The Pallas TPU kernels lower for the TPU platform at the benchmark shapes (on CPU, no execution).

Lowering with `lowering_platforms=("tpu",)` runs Pallas' Mosaic lowering, which enforces the real
TPU block rules (last two block dims divisible by 8 and 128 or spanning the array) and rejects kernel
operations Mosaic has no lowering for; interpret mode checks neither. An abstract TPU device makes
`moda_attention`'s dispatcher see a TPU. What this cannot check is Mosaic's own compilation (vector
layouts, VMEM limits): that happens inside the TPU compiler.
"""

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import moda_attention

_KERNELS = ("moda_tpu_fwd", "moda_tpu_bwd_dq_depth", "moda_tpu_bwd_dk_dv")

# (B, T, G, D, L): every benchmark value of each axis at least once (Hk = 8, bf16 throughout).
_BENCHMARK_SHAPES = [
    (8, 4096, 2, 64, 72),     # the 700M-like training shape
    (1, 4096, 8, 64, 64),     # paper Table 2 style: G 8, L 64
    (8, 1024, 3, 128, 72),    # G 3 (the paper's 6q / 2kv small models), D 128
    (1, 1024, 8, 128, 0),     # no depth
    (8, 4096, 3, 64, 0),
    (1, 1024, 2, 128, 64),
]


def _abstract_tpu_mesh():
  device = jax.sharding.AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
  return jax.sharding.AbstractMesh((1,), ("x",), (jax.sharding.AxisType.Explicit,),
                                   abstract_device=device)


def _lower_forward_and_backward(batch, seq_len, group, head_dim, slots, *, dtype=jnp.bfloat16,
                                causal=True, segments=False, implementation="pallas_tpu",
                                with_depth_start=False, depth_chunk=None):
  """StableHLO text of jit(forward) and jit(grad) lowered for TPU (with a separate depth_q when L > 0,
  the model's path; depth_len, and depth_start when asked, traced)."""
  kv_heads = 8
  spec = jax.ShapeDtypeStruct
  q = spec((batch, seq_len, kv_heads * group, head_dim), dtype)
  kv = spec((batch, seq_len, kv_heads, head_dim), dtype)
  depth = spec((batch, seq_len, slots, kv_heads, head_dim), dtype) if slots else None
  seg = spec((batch, seq_len), jnp.int32) if segments else None

  def forward(q, k, v, depth_k, depth_v, depth_q, depth_range, segment_ids):
    depth_start, depth_len = depth_range if slots else (None, None)
    return moda_attention(q, k, v, depth_k, depth_v, depth_len=depth_len, causal=causal,
                          segment_ids=segment_ids, return_lse=True, implementation=implementation,
                          depth_q=depth_q, depth_start=depth_start if with_depth_start else None,
                          depth_chunk=depth_chunk)

  def loss(arrays, depth_range, segment_ids):
    out, lse = forward(*arrays, depth_range, segment_ids)
    return jnp.sum(out.astype(jnp.float32)) + jnp.sum(lse)

  arrays = (q, kv, kv, depth, depth, q if slots else None)
  depth_range = (spec((), jnp.int32), spec((), jnp.int32))
  with jax.sharding.use_abstract_mesh(_abstract_tpu_mesh()):
    lowered = [jax.jit(forward).trace(*arrays, depth_range, seg),
               jax.jit(jax.grad(loss)).trace(arrays, depth_range, seg)]
    return [t.lower(lowering_platforms=("tpu",)).as_text() for t in lowered]


@pytest.mark.parametrize("batch, seq_len, group, head_dim, slots", _BENCHMARK_SHAPES)
def test_benchmark_shapes_lower_for_tpu(batch, seq_len, group, head_dim, slots):
  forward_text, grad_text = _lower_forward_and_backward(batch, seq_len, group, head_dim, slots)
  assert "tpu_custom_call" in forward_text and _KERNELS[0] in forward_text
  for kernel in _KERNELS:
    assert kernel in grad_text, kernel


@pytest.mark.parametrize("seq_len, slots, causal, segments, dtype", [
    (1, 5, True, False, jnp.bfloat16),       # T = 1: one 16-row tile spanning the padded sequence
    (100, 3, False, True, jnp.bfloat16),     # a single short block, padded keys, segment ids
    (1000, 72, False, True, jnp.bfloat16),   # many blocks, padded to whole tiles, with segments
    (512, 8, True, True, jnp.float32),       # float32: full-precision MXU matmuls
])
def test_odd_shapes_lower_for_tpu(seq_len, slots, causal, segments, dtype):
  forward_text, grad_text = _lower_forward_and_backward(1, seq_len, 3, 64, slots, causal=causal,
                                                        segments=segments, dtype=dtype)
  assert _KERNELS[0] in forward_text and all(k in grad_text for k in _KERNELS)


def test_default_dispatch_on_tpu_picks_the_kernel():
  forward_text, _ = _lower_forward_and_backward(1, 256, 2, 64, 8, implementation=None)
  assert _KERNELS[0] in forward_text


def test_float16_on_tpu_falls_back_to_xla():
  forward_text, _ = _lower_forward_and_backward(1, 256, 2, 64, 8, dtype=jnp.float16,
                                                implementation=None)
  assert "tpu_custom_call" not in forward_text


def test_traced_depth_start_lowers_for_tpu():
  forward_text, grad_text = _lower_forward_and_backward(1, 512, 2, 64, 8, with_depth_start=True)
  assert all(k in grad_text for k in _KERNELS) and _KERNELS[0] in forward_text


def test_depth_chunk_on_tpu_falls_back_to_xla():
  forward_text, grad_text = _lower_forward_and_backward(1, 256, 2, 64, 8, implementation=None, depth_chunk=2)
  assert "tpu_custom_call" not in forward_text and "tpu_custom_call" not in grad_text
