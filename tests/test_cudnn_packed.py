"""The cudnn backend's own custom_vjp and packed layout, checked on CPU (cuDNN itself runs in tests/gpu).

1. `cudnn_packed.describe` against a plain-Python reading of each row's runs; `fits` exactly when the
   packed layout means the same as `segment_ids` (every id one run, at most M runs per row).
2. `cudnn_packed.lse_from_stats` reads each token's statistic where the packed layout keeps it.
3. jax's private cuDNN rules that `cudnn.py` binds still have the signatures it calls them with.
4. `cudnn_packed.capacity_index` picks the smallest capacity that holds every row's runs, or none, and
   `Packing.at_capacity` is `describe` at that room.
5. Under a remat policy that keeps the attention residuals, the gradient runs cuDNN's forward once (jax's
   own cuDNN attention ran it twice: its residuals carry no name); with segments, one of a `lax.switch`'s
   branches, one per capacity and pallas_triton, whose forward returns only what the backward reads (no
   copies of q, k, v), the batch described once. Traced with a pretended Hopper GPU: nothing is compiled.
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


@pytest.mark.parametrize("name", list(_ROWS))
def test_capacity_index_is_the_smallest_room_for_every_row(name):
  rows = np.array(_ROWS[name], np.int32)
  capacities = (2, 4, 8)
  runs = [_runs(row.tolist()) for row in rows]
  single_runs = all(len(r) == len(set(row.tolist())) for r, row in zip(runs, rows))
  most = max(len(r) for r in runs)
  expected = next((i for i, c in enumerate(capacities) if most <= c), 3) if single_runs else 3
  packing = cudnn_packed.describe(jnp.asarray(rows), capacities[-1])
  index = jax.jit(cudnn_packed.capacity_index, static_argnums=1)(packing, capacities)
  assert int(index) == expected
  # The capacity it names is one `describe` fits, and the one below it is not.
  if expected < 3:
    assert bool(cudnn_packed.describe(jnp.asarray(rows), capacities[expected]).fits)
  if 0 < expected < 3 or not single_runs:
    assert not bool(cudnn_packed.describe(jnp.asarray(rows), capacities[max(expected - 1, 0)]).fits)
  # And the packing at that room is what `describe` gives there (every room that holds the rows' runs).
  for room in capacities[expected:] if single_runs else ():
    want = cudnn_packed.describe(jnp.asarray(rows), room)
    jax.tree.map(np.testing.assert_array_equal, packing.at_capacity(room), want)


def test_capacity_index_wants_the_packing_at_the_largest_capacity():
  packing = cudnn_packed.describe(jnp.ones((1, 8), jnp.int32), 8)
  with pytest.raises(ValueError, match="room for 8 runs per row; expected the largest capacity, 16"):
    cudnn_packed.capacity_index(packing, (4, 16))


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


def _count(jaxpr, name, skip_branches_with=None):
  """Equations named `name` in `jaxpr` and every jaxpr inside it, but for switch branches that hold a
  `skip_branches_with` equation."""
  total = 0
  for eqn in jaxpr.eqns:
    total += eqn.primitive.name == name
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else (param,):
        sub = getattr(sub, "jaxpr", sub)
        skipped = eqn.primitive.name == "cond" and skip_branches_with and _count(sub, skip_branches_with)
        if hasattr(sub, "eqns") and not skipped:
          total += _count(sub, name, skip_branches_with)
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
  # With segments, one forward (and one backward) per capacity: the switch's branches, one of which runs.
  branches = len(cudnn_packed.CAPACITIES) if packed else 1
  assert _count(jaxpr, "dot_product_attention_fwd_wrapper") == branches
  assert _count(jaxpr, "dot_product_attention_bwd_wrapper") == branches
  # With segments, pallas_triton's kernels are the switch's last branch (rows that are not single runs).
  assert (_count(jaxpr, "pallas_call") > 0) == packed
  # The batch is described once per call (`describe` sorts each row's ids): not again in every cuDNN
  # branch, nor in the backward pass, the policy keeping the packing. (pallas_triton's branches take
  # their own segment spans, by a sort of their own.)
  assert _count(jaxpr, "sort", skip_branches_with="pallas_call") == packed
  # Without the policy the same forward is rerun for the backward: the count above is the policy's doing.
  rerun = jax.make_jaxpr(jax.grad(jax.checkpoint(loss), argnums=(0, 1, 2)))(q, kv, kv, segment_ids).jaxpr
  assert _count(rerun, "dot_product_attention_fwd_wrapper") == 2 * branches


def test_packed_forward_switch_returns_only_the_residuals_its_backward_reads(pretend_hopper):
  """out, cuDNN's statistics and Triton's lse: a cond over two differentiable branches returned every
  branch's residuals, q, k, v and out copied among them (~0.2 ms per call on the H200, BENCHMARKS §0j)."""
  batch, seq_len, kv_heads, group, head_dim = 2, 64, 2, 2, 64
  q = jax.ShapeDtypeStruct((batch, seq_len, kv_heads * group, head_dim), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((batch, seq_len, kv_heads, head_dim), jnp.bfloat16)
  segment_ids = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)

  def loss(q, k, v, segment_ids):
    inputs, spec = api.prepare(q, k, v, segment_ids=segment_ids)
    return jnp.sum(cudnn.attention(inputs, spec)[0].astype(jnp.float32))

  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, kv, kv, segment_ids).jaxpr
  switches = [e for e in jaxpr.eqns if e.primitive.name == "cond"]
  assert len(switches) == 2  # the forward's and the backward's
  forward_outputs = [(tuple(v.aval.shape), v.aval.dtype) for v in switches[0].outvars]
  max_runs = batch * cudnn_packed.MAX_SEGMENTS
  assert forward_outputs == [(q.shape, jnp.bfloat16), ((max_runs, kv_heads * group, seq_len), jnp.float32),
                             (q.shape[:3], jnp.float32)]
  assert len(switches[0].params["branches"]) == len(cudnn_packed.CAPACITIES) + 1
  assert [tuple(v.aval.shape) for v in switches[1].outvars] == [q.shape, kv.shape, kv.shape]
