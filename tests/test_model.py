"""Model properties: linear-memory stack == autodiff, scan == loop, causality, remat, norms, configs."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model_cases as cases
from moda_jax import ModelConfig, Transformer
from moda_jax.model import block_loop
from moda_jax.model.config import REMAT_OPTIONS
from moda_jax.model.param_layout import loop_to_scan, scan_to_loop
from moda_jax.model.presets import olmo2_700m, table6_small

# float32 tolerances for two evaluation orders of the same float32 computation.
_ATOL, _RTOL = 1e-5, 1e-4


def _assert_trees_close(got, want, atol=_ATOL, rtol=_RTOL):
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=atol, rtol=rtol), got, want)


def _grad_scale(grads) -> float:
  return max(float(np.max(np.abs(g))) for g in jax.tree.leaves(grads))


# One config serves most gradient tests so each compiled function is shared (compiling dominates):
# attn_ffn_extra has every kind of parameter and two slots per block.
_MAIN = cases.config(depth_kv="attn_ffn_extra", num_layers=3)


@pytest.mark.parametrize("cfg", [_MAIN, cases.config(depth_kv="attn", num_layers=4)],
                         ids=["attn_ffn_extra", "attn"])
def test_linear_memory_stack_gradients_equal_naive_scan_autodiff(cfg):
  """The key check of the custom_vjp: same loss and every parameter gradient as plain autodiff."""
  params = cases.random_params(cfg)
  value, grads = cases.grad_fn(cfg)(params, cases.TOKENS)
  want_value, want_grads = cases.naive_value_and_grad(cfg, params, cases.TOKENS)
  np.testing.assert_allclose(value, want_value, rtol=_RTOL)
  scale = _grad_scale(want_grads)
  assert scale > 1e-3  # the comparison is not vacuous
  _assert_trees_close(grads, want_grads, atol=_ATOL * scale)
  if cfg.separate_attn_depth_proj:
    # Depth-only projections get gradient only through later blocks' reads: nonzero in every layer.
    for kernel in (grads["blocks"]["attention"]["depth_kv"]["key"]["kernel"],
                   grads["blocks"]["ffn_depth_kv"]["value"]["kernel"]):
      assert np.all(np.abs(kernel).sum(axis=(1, 2, 3)) > 0)


# The xla backend threads the stack's cotangent carry through each layer's depth read and adds the
# layer's depth cotangent into it in place (`return_depth`): every way a layer reads the buffers.
_THREADED = {
    "attn_ffn_extra": cases.config(depth_kv="attn_ffn_extra", num_layers=3, attention_impl="xla"),
    "window_chunk": cases.config(num_layers=4, depth_window=3, depth_chunk=2, attention_impl="xla"),
    "depth_attention": cases.config(num_layers=3, depth_mixer="depth_attention", attention_impl="xla"),
}  # (DenseFormer's outputs buffer is not threaded: JAX adds its cotangents; tests/test_peers.py covers it)


@pytest.mark.parametrize("cfg", list(_THREADED.values()), ids=list(_THREADED))
def test_in_place_depth_cotangents_equal_plain_autodiff(cfg):
  """The linear stack on the in-place path (xla) against plain autodiff of the naive scan through the
  reference backend, whose full-size depth gradients JAX adds up itself: same loss, same gradients."""
  params = cases.random_params(cfg)
  value, grads = cases.grad_fn(cfg)(params, cases.TOKENS)
  oracle_cfg = dataclasses.replace(cfg, attention_impl="reference")
  want_value, want_grads = cases.naive_value_and_grad(oracle_cfg, params, cases.TOKENS)
  np.testing.assert_allclose(value, want_value, rtol=_RTOL)
  scale = _grad_scale(want_grads)
  assert scale > 1e-3
  _assert_trees_close(grads, want_grads, atol=_ATOL * scale)


def test_scan_equals_loop_outputs_and_gradients():
  loop_cfg = dataclasses.replace(_MAIN, scan_layers=False)
  scan_params = cases.random_params(_MAIN)
  loop_params = scan_to_loop(scan_params)
  np.testing.assert_allclose(cases.forward_fn(loop_cfg)(loop_params, cases.TOKENS),
                             cases.forward_fn(_MAIN)(scan_params, cases.TOKENS),
                             atol=_ATOL, rtol=_RTOL)
  _, scan_grads = cases.grad_fn(_MAIN)(scan_params, cases.TOKENS)
  _, loop_grads = cases.grad_fn(loop_cfg)(loop_params, cases.TOKENS)
  _assert_trees_close(loop_to_scan(loop_grads, _MAIN.num_layers), scan_grads,
                      atol=_ATOL * _grad_scale(scan_grads))


def test_scan_equals_loop_outputs_without_depth():
  # Without depth the blocks run in the plain block loop (lax.scan or a Python loop).
  scan_cfg = cases.config(depth_kv="none")
  loop_cfg = dataclasses.replace(scan_cfg, scan_layers=False)
  params = cases.random_params(scan_cfg)
  np.testing.assert_allclose(cases.forward_fn(loop_cfg)(scan_to_loop(params), cases.TOKENS),
                             cases.forward_fn(scan_cfg)(params, cases.TOKENS), atol=_ATOL, rtol=_RTOL)


def test_param_layouts_match_init_and_round_trip():
  scan_cfg = cases.config(depth_kv="attn_ffn_extra", num_layers=4)
  loop_cfg = dataclasses.replace(scan_cfg, scan_layers=False)
  scan_params = cases.random_params(scan_cfg)
  loop_params = scan_to_loop(scan_params)
  loop_shapes = jax.tree.map(np.shape, cases.random_params(loop_cfg))
  assert jax.tree.map(np.shape, loop_params) == loop_shapes
  _assert_trees_close(loop_to_scan(loop_params, scan_cfg.num_layers), scan_params, atol=0, rtol=0)
  with pytest.raises(ValueError, match="num_layers=5"):
    loop_to_scan(loop_params, 5)


@pytest.mark.parametrize("kw", [dict(depth_kv="attn_ffn_extra", num_layers=4),
                                dict(depth_kv="none", num_layers=3, tie_embeddings=False),
                                dict(num_layers=3, depth_mixer="hyper_connections")],
                         ids=["attn_ffn_extra", "no_depth", "hyper_connections"])
def test_one_seed_gives_both_layouts_the_same_init(kw):
  """scan_layers changes the layout, not the values: the looped init is the scanned one, sliced
  (every parameter, the ones created after the blocks too, and the loop's logical axes)."""
  scan_cfg = cases.config(**kw)
  loop_cfg = dataclasses.replace(scan_cfg, scan_layers=False)
  scan_boxed = jax.jit(Transformer(scan_cfg).init)(jax.random.key(7), cases.TOKENS)["params"]
  loop_boxed = jax.jit(Transformer(loop_cfg).init)(jax.random.key(7), cases.TOKENS)["params"]
  want = scan_to_loop(scan_boxed)
  got = nn.meta.unbox(loop_boxed)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  jax.tree.map(np.testing.assert_array_equal, got, want)
  assert not np.array_equal(got["block_0"]["mlp"]["up"]["kernel"], got["block_1"]["mlp"]["up"]["kernel"])
  specs = nn.get_partition_spec(loop_boxed)
  assert specs["block_1"]["attention"]["query"]["kernel"] == jax.sharding.PartitionSpec(
      "embed", "q_heads", "head_dim")


@pytest.mark.parametrize("depth_kv", ["none", "attn_ffn"])
def test_block_init_runs_whatever_attention_impl_the_config_names(depth_kv):
  """The block initializer's one-token dummy call only creates parameters: with a backend that cannot
  take it (cudnn refuses T = 1, and this CPU has no cuDNN at all) it still runs, to the same values."""
  cfg = cases.config(depth_kv=depth_kv)
  want = block_loop.init_block_params(cfg, writes_depth=True)(jax.random.key(3))
  cudnn_cfg = dataclasses.replace(cfg, attention_impl="cudnn")
  got = block_loop.init_block_params(cudnn_cfg, writes_depth=True)(jax.random.key(3))
  jax.tree.map(np.testing.assert_array_equal, nn.meta.unbox(got), nn.meta.unbox(want))


def test_init_annotates_logical_axes_for_sharding():
  cfg = cases.config(depth_kv="attn_ffn")
  boxed = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), cases.TOKENS)["params"]
  specs = nn.get_partition_spec(boxed)
  assert specs["blocks"]["attention"]["query"]["kernel"] == jax.sharding.PartitionSpec(
      "layers", "embed", "q_heads", "head_dim")
  assert specs["blocks"]["ffn_depth_kv"]["key"]["kernel"] == jax.sharding.PartitionSpec(
      "layers", "embed", "kv_heads", "head_dim")
  assert specs["last_block"]["mlp"]["down"]["kernel"] == jax.sharding.PartitionSpec("mlp", "embed")
  assert specs["embed"]["embedding"] == jax.sharding.PartitionSpec("vocab", "embed")
  assert "ffn_depth_kv" not in specs["last_block"]  # its K/V would never be read
  names = {n for s in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
           for n in s}
  assert names <= {"layers", "vocab", "embed", "q_heads", "kv_heads", "head_dim", "mlp", "norm"}


def test_real_init_then_apply():
  cfg = cases.config(depth_kv="attn_ffn_extra", num_layers=2)
  model = Transformer(cfg)
  params = jax.jit(model.init)(jax.random.key(1), cases.TOKENS)["params"]
  logits = jax.jit(model.apply)({"params": params}, cases.TOKENS)
  assert logits.shape == cases.TOKENS.shape + (cases.VOCAB,) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  leaves = jax.tree_util.tree_leaves_with_path(nn.meta.unbox(params))
  stds = [float(np.std(x)) for path, x in leaves if "scale" not in jax.tree_util.keystr(path)]
  np.testing.assert_allclose(stds, cfg.init_std, rtol=0.3)
  scales = [x for path, x in leaves if "scale" in jax.tree_util.keystr(path)]
  assert all(np.all(x == 1.0) for x in scales)


def test_causality_through_gradients():
  """d logits[b, t] / d input embedding[b', s] is exactly 0 unless b' == b and s <= t."""
  influence = cases.embedding_influence(_MAIN, cases.random_params(_MAIN))
  allowed = cases.causal_pattern(*cases.TOKENS.shape)
  assert np.all(influence[~allowed] == 0.0)
  assert np.all(influence[allowed] > 0.0)


@pytest.mark.parametrize("remat", [r for r in REMAT_OPTIONS if r != "none"])
@pytest.mark.parametrize("depth_kv", ["none", "attn_ffn_extra"])
def test_remat_equals_no_remat(remat, depth_kv):
  # Without depth remat wraps every block of the loop; with depth the linear stack recomputes the
  # writers anyway and remat governs the last block.
  base = dataclasses.replace(_MAIN, depth_kv=depth_kv)
  params = cases.random_params(base)
  value, grads = cases.grad_fn(dataclasses.replace(base, remat=remat))(params, cases.TOKENS)
  want_value, want_grads = cases.grad_fn(base)(params, cases.TOKENS)
  np.testing.assert_allclose(value, want_value, rtol=_RTOL)
  _assert_trees_close(grads, want_grads, atol=_ATOL * _grad_scale(want_grads))


def test_norm_placements_run_and_differ():
  cfgs = [cases.config(norm=norm) for norm in ("pre", "post", "reordered")]
  params = cases.random_params(cfgs[0])
  outs = [np.asarray(cases.forward_fn(c)(params, cases.TOKENS)) for c in cfgs]
  for i in range(3):
    assert np.all(np.isfinite(outs[i]))
    for j in range(i):
      assert np.max(np.abs(outs[i] - outs[j])) > 1e-2


def test_bfloat16_compute_gives_float32_logits_near_float32():
  cfg = _MAIN
  params = cases.random_params(cfg)
  want = cases.forward_fn(cfg)(params, cases.TOKENS)
  got = cases.forward_fn(dataclasses.replace(cfg, dtype="bfloat16"))(params, cases.TOKENS)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, atol=0.1 * float(np.max(np.abs(want))))


_BAD_CONFIGS = [
    (dict(num_heads=3), "num_heads=3"), (dict(num_layers=0), "num_layers=0"),
    (dict(head_dim=7), "head_dim=7"), (dict(depth_kv="ffn"), "depth_kv='ffn'"),
    (dict(norm="sandwich"), "norm='sandwich'"), (dict(remat="some"), "remat='some'"),
    (dict(dtype="int8"), "dtype='int8'"), (dict(param_dtype="float64"), "param_dtype='float64'"),
    (dict(init_std=0.0), "init_std=0.0"),
    (dict(rope_theta=-1.0), "rope_theta=-1.0"), (dict(qk_norm=1), "qk_norm=1"),
    (dict(attention_impl="flash"), "attention_impl='flash'"), (dict(vocab_size=2.5), "vocab_size=2.5"),
]


@pytest.mark.parametrize("overrides,message", _BAD_CONFIGS, ids=[m for _, m in _BAD_CONFIGS])
def test_bad_config_raises_value_error_naming_the_field(overrides, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(")):
    cases.config(**overrides)


def test_from_dict_round_trips_and_rejects_unknown_keys():
  cfg = cases.config(depth_kv="attn")
  assert ModelConfig.from_dict(cfg.to_dict()) == cfg
  with pytest.raises(ValueError, match="n_layers"):
    ModelConfig.from_dict({**cfg.to_dict(), "n_layers": 3})


def test_bad_inputs_raise_value_error():
  cfg = cases.config()
  params = cases.random_params(cfg)
  model = Transformer(cfg)
  with pytest.raises(ValueError, match="max_seq_len=16"):
    model.apply({"params": params}, np.zeros((1, 17), np.int32))
  with pytest.raises(ValueError, match="segment_ids"):
    model.apply({"params": params}, cases.TOKENS, segment_ids=np.zeros((2, 3), np.int32))
  with pytest.raises(ValueError, match="tokens"):
    model.apply({"params": params}, cases.TOKENS.astype(np.float32))


def test_depth_slot_counts():
  cfg = cases.config(num_layers=5)
  assert dataclasses.replace(cfg, depth_kv="none").num_depth_slots == 0
  assert dataclasses.replace(cfg, depth_kv="attn").num_depth_slots == 4
  assert dataclasses.replace(cfg, depth_kv="attn_ffn").num_depth_slots == 8
  assert [cfg.depth_len_of_block(b) for b in range(5)] == [0, 2, 4, 6, 8]


def _count(cfg: ModelConfig) -> int:
  shapes = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), np.zeros((1, 8), np.int32))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(shapes["params"])))


def test_700m_parameter_counts_match_table_3():
  """Paper: 669.0M / 669.0M / 705.7M / 742.4M. Ours are 0.07M higher in every row: the RMSNorm
  scales (73 x 1024 + 36 x 2 x 64 = 79,360), which the paper's counts evidently leave out."""
  counts = {v: _count(olmo2_700m(depth_kv=v)) for v in ("none", "attn", "attn_ffn", "attn_ffn_extra")}
  norm_scales = (2 * 36 + 1) * 1024 + 36 * 2 * 64
  paper = {"none": 669.0e6, "attn": 669.0e6, "attn_ffn": 705.7e6, "attn_ffn_extra": 742.4e6}
  for variant, count in counts.items():
    assert round((count - norm_scales) / 1e5) == round(paper[variant] / 1e5), (variant, count)
  assert counts["attn"] == counts["none"]  # reusing attention K/V adds nothing
  one_kv_projection = 1024 * 2 * 8 * 64
  assert counts["attn_ffn"] - counts["none"] == 35 * one_kv_projection  # not for the last block
  assert counts["attn_ffn_extra"] - counts["attn_ffn"] == 35 * one_kv_projection


def test_table6_parameter_counts_near_paper():
  """Paper: 71.35M (24L) and 123.38M (48L) baselines. Its MLP width and vocab are not given; ours
  land within 0.3%. The paper's FFN-KV counts include the last block's (unused) projection."""
  for layers, paper in ((24, 71.35e6), (48, 123.38e6)):
    none = _count(table6_small(layers, depth_kv="none"))
    assert abs(none - paper) / paper < 3e-3, (layers, none)
    assert _count(table6_small(layers, depth_kv="attn_ffn")) - none == (layers - 1) * 384 * 2 * 2 * 64
