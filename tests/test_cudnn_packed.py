"""The cudnn backend's own custom_vjp and packed layout, checked on CPU (cuDNN itself runs in tests/gpu).

1. `cudnn_packed.describe` against a plain-Python reading of each row's runs; `fits` exactly when the
   packed layout means the same as `segment_ids` (every id one run, at most M runs per row).
2. `cudnn_packed.lse_from_stats` reads each token's statistic where the packed layout keeps it.
3. jax's private cuDNN rules that `cudnn.py` binds still have the signatures it calls them with.
4. Under a remat policy that keeps the attention residuals, the gradient runs cuDNN's forward once (jax's
   own cuDNN attention ran it twice: its residuals carry no name); with segments, behind a `lax.cond`
   whose other branch is pallas_triton. Traced with a pretended Hopper GPU: nothing is compiled.
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.cudnn import fused_attention_stablehlo as fa

from pallas_kernels import api, cudnn, cudnn_packed, gpu_capability, residuals


def _runs(row):
  """[(id, start, length)] of a row, read token by token."""
  runs = []
  for t, segment in enumerate(row):
    if runs and runs[-1][0] == segment:
      runs[-1][2] += 1
    else:
      runs.append([segment, t, 1])
  return runs


_ROWS = {
    "one document": [[3] * 12],
    "pieces then padding": [[1, 1, 1, 2, 2, 3, 3, 3, 3, 0, 0, 0], [1] * 7 + [2] * 5],
    "id repeats after another": [[1, 1, 2, 2, 1, 1, 3, 3, 3, 3, 3, 3]],      # same id, two runs: no fit
    "more runs than M": [[i // 2 for i in range(12)]],                           # 6 runs, M = 4: no fit
    "exactly M runs": [[5, 5, 5, 6, 6, 6, 7, 7, 7, 8, 8, 8], [0] * 12],
}


@pytest.mark.parametrize("name", list(_ROWS))
def test_describe_reads_each_rows_runs(name):
  rows = np.array(_ROWS[name], np.int32)
  max_segments = 4
  packing = jax.jit(cudnn_packed.describe, static_argnums=1)(jnp.asarray(rows), max_segments)
  runs = [_runs(row.tolist()) for row in rows]
  single_runs = all(len(r) == len(set(row.tolist())) for r, row in zip(runs, rows))
  assert bool(packing.fits) == (single_runs and all(len(r) <= max_segments for r in runs))
  if not packing.fits:
    return
  for b, row_runs in enumerate(runs):
    pad = [-1] * (max_segments - len(row_runs))
    np.testing.assert_array_equal(packing.seqlen_BM[b], [length for _, _, length in row_runs] + pad)
    np.testing.assert_array_equal(packing.offsets_BM1[b], [start for _, start, _ in row_runs] + pad + [-1])
    np.testing.assert_array_equal(packing.run_BT[b], [r for r, (_, _, n) in enumerate(row_runs) for _ in range(n)])


def test_lse_from_stats_reads_each_tokens_run_and_position():
  rows = np.array(_ROWS["pieces then padding"], np.int32)
  batch, seq_len, heads, max_segments = rows.shape[0], rows.shape[1], 3, 4
  packing = cudnn_packed.describe(jnp.asarray(rows), max_segments)
  # The packed statistics: runs in batch order at the front, a run's tokens from position 0; a value
  # that names (run, head, position) so any misplaced read shows.
  stats = np.full((batch * max_segments, heads, seq_len), np.nan, np.float32)
  expected = np.zeros((batch, seq_len, heads), np.float32)
  packed_run = 0
  for b, row in enumerate(rows):
    for _, start, length in _runs(row.tolist()):
      for local in range(length):
        value = 1000 * packed_run + 10 * np.arange(heads) + 0.01 * local
        stats[packed_run, :, local] = value
        expected[b, start + local] = value
      packed_run += 1
  np.testing.assert_array_equal(cudnn_packed.lse_from_stats(jnp.asarray(stats), packing), expected)


def test_private_cudnn_rules_keep_the_signatures_cudnn_py_calls():
  """A jax upgrade that changes them fails here, not on the GPU."""
  params = lambda fn: list(inspect.signature(fn).parameters)
  arrays = ["query", "key", "value", "bias", "q_seqlen", "kv_seqlen", "q_offsets", "kv_offsets",
            "page_table_k", "page_table_v"]
  assert params(fa._dot_product_attention_fwd_rule) == arrays + [
      "scale", "seed", "dropout_rate", "variadic_args", "mask_type", "layout", "sliding_window_length",
      "cudnn_version", "return_residual"]
  assert params(fa._dot_product_attention_bwd_rule) == [
      "scale", "seed", "dropout_rate", "variadic_args", "mask_type", "layout", "sliding_window_length",
      "is_training", "return_residual", "res", "grad_output"]
  assert {m.name for m in fa.MaskType} >= {"NO_MASK", "PADDING", "CAUSAL", "PADDING_CAUSAL"}
  assert fa.AttentionLayout.BTNH.value == cudnn._LAYOUT


@pytest.fixture
def pretend_hopper(monkeypatch):
  monkeypatch.setattr(gpu_capability, "local", lambda: (9, 0))
  monkeypatch.setattr(cudnn, "_cudnn_version", lambda: 91000)
  monkeypatch.setattr(fa, "check_compute_capability", lambda capability: True)


def _count(jaxpr, name):
  total = 0
  for eqn in jaxpr.eqns:
    total += eqn.primitive.name == name
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else (param,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          total += _count(sub, name)
  return total


@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
def test_gradient_under_remat_runs_the_cudnn_forward_once(pretend_hopper, packed):
  batch, seq_len, kv_heads, group, head_dim = 2, 64, 2, 2, 64
  q = jax.ShapeDtypeStruct((batch, seq_len, kv_heads * group, head_dim), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((batch, seq_len, kv_heads, head_dim), jnp.bfloat16)
  segment_ids = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32) if packed else None
  policy = jax.checkpoint_policies.save_only_these_names(residuals.RESIDUALS_NAME)

  def loss(q, k, v, segment_ids):
    inputs, spec = api.prepare(q, k, v, segment_ids=segment_ids)
    out, _ = cudnn.attention(inputs, spec)
    return jnp.sum(jnp.sin(out.astype(jnp.float32)))

  grad = jax.grad(jax.checkpoint(loss, policy=policy), argnums=(0, 1, 2))
  jaxpr = jax.make_jaxpr(grad)(q, kv, kv, segment_ids).jaxpr
  assert _count(jaxpr, "dot_product_attention_fwd_wrapper") == 1
  assert _count(jaxpr, "dot_product_attention_bwd_wrapper") == 1
  # With segments, pallas_triton's kernels are the cond's other branch (rows that are not single runs).
  assert (_count(jaxpr, "pallas_call") > 0) == packed
  # Without the policy the same forward is rerun for the backward: the count above is the policy's doing.
  rerun = jax.make_jaxpr(jax.grad(jax.checkpoint(loss), argnums=(0, 1, 2)))(q, kv, kv, segment_ids).jaxpr
  assert _count(rerun, "dot_product_attention_fwd_wrapper") == 2
