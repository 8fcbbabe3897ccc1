"""pallas_triton lowered for an abstract "NVIDIA H200" on this CPU machine: Triton lowering errors fail CI.

Interpret mode accepts programs the Triton lowering rejects (batched dot_general, non-power-of-two
loads); this lowers forward + backward of the benchmark shapes with `lowering_platforms=("cuda",)` and
checks that each of the three kernels (forward, dq + depth dk/dv, sequence dk/dv) became a Triton call.
Compiling the Triton IR to PTX still needs the GPU machine: scripts/gpu_check.sh.
"""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import moda_attention, triton
from pallas_kernels.block_sizes import BlockSizes

_H200 = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="cuda")
_MESH = jax.sharding.AbstractMesh((1,), ("x",), (jax.sharding.AxisType.Explicit,), abstract_device=_H200)


def _lowered_text(batch, seq_len, group, head_dim, slots, attend):
  shape = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)
  kv_heads = 8
  arrays = [shape(batch, seq_len, kv_heads * group, head_dim), shape(batch, seq_len, kv_heads, head_dim),
            shape(batch, seq_len, kv_heads, head_dim)]
  # With depth, a separate depth_q too: the model's path (the kernels then read and write it).
  depth = ([shape(batch, seq_len, slots, kv_heads, head_dim)] * 2 + [arrays[0]]) if slots else [None, None]

  def loss(*a):
    out, lse = attend(*a)
    return jnp.sum(out.astype(jnp.float32)) + jnp.sum(lse)

  grad = jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5) if slots else (0, 1, 2))
  with jax.sharding.use_abstract_mesh(_MESH):
    return jax.jit(grad).trace(*arrays, *depth).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("slots", [0, 72])
@pytest.mark.parametrize("group", [2, 3, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_default_tiles_lower_for_h200(head_dim, group, slots):
  # The seq_len is not a multiple of any tile, as in the odd-T contract cases.
  # implementation=None picks pallas_triton on cuda.
  attend = lambda q, k, v, dk=None, dv=None, dq=None: moda_attention(q, k, v, dk, dv, depth_q=dq, return_lse=True)
  text = _lowered_text(2, 1000, group, head_dim, slots, attend)
  # forward, dq, dk/dv, and with depth at D <= 64 the separate depth-backward kernel (the default there).
  separate = BlockSizes.get_default(head_dim, group, jnp.bfloat16).dq.separate_depth_kernel and slots > 0
  assert text.count("__gpu$xla.gpu.triton") == 3 + separate


@pytest.mark.parametrize("separate", [False, True])
def test_per_token_and_separate_depth_kernel_lower_for_h200(separate):
  base = BlockSizes.get_default(64, 2, jnp.bfloat16)
  sizes = BlockSizes(*(dataclasses.replace(b, depth_mode="per_token") for b in (base.fwd, base.dq, base.dkv)))
  sizes = dataclasses.replace(sizes, dq=dataclasses.replace(sizes.dq, separate_depth_kernel=separate))
  attend = lambda q, k, v, dk, dv, dq: triton.attention(q, k, v, dk, dv, jnp.int32(5), None, causal=True,
                                                        scale=0.125, block_sizes=sizes, depth_q_BTHD=dq)
  # forward, dq (+ depth), dk/dv; the separate depth kernel is a fourth.
  assert _lowered_text(1, 4096, 2, 64, 72, attend).count("__gpu$xla.gpu.triton") == 3 + separate
