"""The benchmark's own plumbing on CPU: what it times is the operator (no GPU here, so no timings).

The tile sweeps call a backend's `attention` with its tiles bound (`build(..., tiled=...)`) instead of
`moda_attention`: that path must compute the same attention, forward and backward. And every Mosaic GPU
tile variant the sweep lists must be a launch the H200 accepts (`BlockSizes.validate` with the wgmma
rule), or its row measures nothing. `--shapes` and the row log keep a time-limited device call useful.
"""

import dataclasses
import json
import os
import subprocess
import sys

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


def test_shapes_selects_by_name_and_rejects_a_name_the_mode_lacks():
  shapes = benchmark.quick_shapes()
  assert [s.name for s in benchmark.selected(shapes, None)] == [s.name for s in shapes]
  assert [s.name for s in benchmark.selected(shapes, ["train_B8_T4K_G2_L72"])] == ["train_B8_T4K_G2_L72"]
  with pytest.raises(ValueError, match=r"--shapes=train_B8_T4K_G2_L72,table2_T64K_G8_L64: table2_T64K_G8_L64"):
    benchmark.selected(shapes, ["train_B8_T4K_G2_L72", "table2_T64K_G8_L64"])  # a paper shape, not a quick one


def test_row_log_file_holds_every_row_added_so_far(tmp_path):
  # A device call's time limit can kill the benchmark at any row: the file must already hold the others.
  path = tmp_path / "rows.json"
  rows = benchmark.RowLog(str(path), dict(jax="x"))
  rows.append(dict(impl="a"))
  assert json.loads(path.read_text()) == dict(meta=dict(jax="x"), rows=[dict(impl="a")])
  rows += [dict(impl="b"), dict(impl="c")]
  assert [r["impl"] for r in json.loads(path.read_text())["rows"]] == ["a", "b", "c"]
  assert [r["impl"] for r in rows] == ["a", "b", "c"]
  benchmark.RowLog(None, {}).append(dict(impl="d"))  # no path: kept in memory only


def test_cli_reports_an_unknown_shape_in_one_line():
  proc = subprocess.run([sys.executable, "-m", "pallas_kernels.benchmark", "--quick", "--shapes", "table2_T4K_G8"],
                        capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=120)
  assert proc.returncode != 0
  assert proc.stderr.strip().splitlines() == [
      "pallas_kernels.benchmark: --shapes=table2_T4K_G8: table2_T4K_G8 not among this mode's shapes "
      "(table2_T4K_G8_L64, table7_T1K_G8_L64, train_B8_T4K_G2_L72)."]
