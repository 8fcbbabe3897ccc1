"""The benchmark's own plumbing on CPU: what it times is the operator (no GPU here, so no timings).

The tile sweeps call a backend's `attention` with its tiles bound (`build(..., tiled=...)`) instead of
`moda_attention`: that path must compute the same attention, forward and backward. And every Mosaic GPU
tile variant the sweep lists must be a launch the H200 accepts (`BlockSizes.validate` with the wgmma
rule), or its row measures nothing.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import benchmark, benchmark_modes, mosaic_gpu_tiles, xla


def test_tiled_build_computes_the_operator_forward_and_backward():
  shape = benchmark.Shape("tiny", 2, 64, 2, 3)
  arrays, do = benchmark.make_inputs(shape, depth=True)
  want = benchmark.build("xla")
  got = benchmark.build("xla_tiled", tiled=xla.attention)  # the same backend, reached directly
  for w, g in zip(want, got):
    for a, b in zip(jax.tree.leaves(w(arrays, do)), jax.tree.leaves(g(arrays, do))):
      np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


@pytest.mark.parametrize("kernel", sorted(benchmark_modes._MOSAIC_VARIANTS))
def test_mosaic_tile_variants_are_valid_h200_launches(kernel):
  base = mosaic_gpu_tiles.BlockSizes.get_default(64)
  variants = benchmark_modes._mosaic_variants(kernel, benchmark_modes._MOSAIC_VARIANTS[kernel])
  assert variants[0] == getattr(base, kernel), "the first variant is the default (the sweep's reference)"
  assert len(set(variants)) == len(variants)
  for blocks in variants:
    dataclasses.replace(base, **{kernel: blocks}).validate(wgmma_operand=(64, jnp.bfloat16))
