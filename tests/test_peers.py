"""The depth-mixing peers (`ModelConfig.depth_mixer`, docs/peers.md) in the model.

Each mixer, alone and with MoDA (depth_kv="attn_ffn"): its paper's equations (a float64 NumPy
reference, tests/peers_reference.py), its initialization (the identity where the paper says so),
causality, both layouts, the linear-memory stack against plain autodiff, decoding against the full
forward pass, finite gradients reaching every mixer parameter, parameter and FLOP counts, sharding.
Memory linear in depth: tests/test_peers_memory.py.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model_cases as cases
import peers_reference
from moda_jax import ModelConfig, Transformer
from moda_jax.model import flops, mixers
from moda_jax.model.hyper_connections import sinkhorn
from moda_jax.model.param_layout import scan_to_loop
from moda_jax.train import sharding

_ATOL, _RTOL = 1e-5, 1e-4    # float32, two evaluation orders
_REF_ATOL, _REF_RTOL = 2e-5, 2e-4  # float32 model vs float64 oracle (as tests/test_model_reference.py)
_LOGIT_ATOL = 5e-5           # decoding sums in another order (tests/test_generate.py)

MIXERS = ("denseformer", "value_residual", "hyper_connections", "mhc", "attention_residuals",
          "depth_attention")


def config(mixer, depth_kv="none", **overrides) -> ModelConfig:
  """A small model with `mixer` ("mhc": manifold-constrained hyper-connections)."""
  fields = dict(depth_mixer=mixer, depth_kv=depth_kv)
  if mixer == "mhc":
    fields.update(depth_mixer="hyper_connections", hyper_connections_manifold=True)
  return cases.config(**{**fields, **overrides})


_ALONE_AND_MODA = [(m, kv) for m in MIXERS for kv in ("none", "attn_ffn")]
_IDS = [f"{m}-{kv}" for m, kv in _ALONE_AND_MODA]
# The slower whole-model checks (causality, layouts, decoding) run each mixer once, alone or with MoDA,
# in two complementary halves: every mixer is seen alone and with MoDA across the pair of halves, at
# half the compile time of the full product (which `_ALONE_AND_MODA` keeps for the cheaper checks).
_HALF_A = [(m, ("none", "attn_ffn")[i % 2]) for i, m in enumerate(MIXERS)]
_HALF_B = [(m, ("attn_ffn", "none")[i % 2]) for i, m in enumerate(MIXERS)]
_ids = lambda cases: [f"{m}-{kv}" for m, kv in cases]


def _close(got, want, atol, rtol):
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=atol, rtol=rtol), got, want)


def _grad_scale(grads) -> float:
  return max(float(np.max(np.abs(g))) for g in jax.tree.leaves(grads))


def _init_params(cfg):
  """The mixer's parameters as `init` creates them (the MixerParams module alone: cheap)."""
  return nn.meta.unbox(mixers.MixerParams(cfg).init(jax.random.key(1)).get("params", {}))


def _params_near_init(cfg, scale=0.2):
  """Random block parameters, and the mixer's parameters at their init plus N(0, scale^2) noise.

  Drawing the mixer's parameters like the others (N(0, 0.2), no identity part) makes dynamic HC
  ill-conditioned: float32-sized relative noise on its parameters moves the float64 reference's
  logits by 3e-5, more than the float32 tolerance; near its init (a trained-like regime) it is 9e-6."""
  params = cases.random_params(cfg)
  if "depth_mixer" in params:
    rng = np.random.default_rng(2)
    params["depth_mixer"] = jax.tree.map(
        lambda a: (np.asarray(a) + scale * rng.standard_normal(a.shape)).astype(np.float32),
        mixers.initial_values(cfg))
  return params


# --- The paper's equations: the model against the float64 reference. ---

_REFERENCE_CASES = ([dict(mixer=m, depth_kv=kv) for m, kv in _ALONE_AND_MODA]
                    + [dict(mixer=m, norm="pre") for m in MIXERS]
                    + [dict(mixer=m, depth_kv="attn_ffn", norm="post") for m in MIXERS])


@pytest.mark.parametrize("case", _REFERENCE_CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_logits_match_the_papers_equations(case):
  cfg = config(**case)
  params = _params_near_init(cfg)
  got = cases.forward_fn(cfg)(params, cases.TOKENS)
  want = peers_reference.reference_logits(cfg, params, cases.TOKENS)
  np.testing.assert_allclose(got, want, atol=_REF_ATOL, rtol=_REF_RTOL)
  baseline = cases.forward_fn(dataclasses.replace(cfg, depth_mixer="none", hyper_connections_manifold=False))
  blocks = {k: v for k, v in params.items() if k != "depth_mixer"}
  assert float(jnp.max(jnp.abs(got - baseline(blocks, cases.TOKENS)))) > 1e-2  # the mixer matters


def test_sinkhorn_iterations_and_their_limit():
  """t_max = 20 rounds as the reference; enough rounds reach a doubly stochastic matrix."""
  logits = np.random.default_rng(0).normal(size=(5, 4, 4)) * 2
  np.testing.assert_allclose(sinkhorn(jnp.asarray(logits, jnp.float32)), peers_reference.sinkhorn(logits),
                             atol=1e-6)
  m = np.asarray(sinkhorn(jnp.asarray(logits, jnp.float32), iterations=300))
  np.testing.assert_allclose(m.sum(-1), 1, atol=1e-5)
  np.testing.assert_allclose(m.sum(-2), 1, atol=1e-5)
  assert np.all(m > 0)


# --- Initialization. ---

@pytest.mark.parametrize("depth_kv", ["none", "attn_ffn"])
@pytest.mark.parametrize("mixer,norms", [("denseformer", ("pre", "post", "reordered")),
                                         ("hyper_connections", ("pre", "post", "reordered")),
                                         ("mhc", ("pre", "post", "reordered")),
                                         ("attention_residuals", ("pre",))])
def test_identity_at_initialization(mixer, norms, depth_kv):
  """DenseFormer (DWA = identity), HC and mHC (one residual stream copied n times) and, under
  pre-norm, attention residuals (uniform weights: the mean of the outputs, which every next norm
  reads like their sum) equal the model without the mixer at init. RMSNorm is scale-invariant only
  up to its epsilon, so eps is tiny here."""
  for norm in norms:
    cfg = config(mixer, depth_kv, norm=norm, norm_eps=1e-12)
    params = {**cases.random_params(cfg), "depth_mixer": _init_params(cfg)}
    baseline_cfg = dataclasses.replace(cfg, depth_mixer="none", hyper_connections_manifold=False)
    blocks = {k: v for k, v in params.items() if k != "depth_mixer"}
    want = cases.forward_fn(baseline_cfg)(blocks, cases.TOKENS)
    np.testing.assert_allclose(cases.forward_fn(cfg)(params, cases.TOKENS), want, atol=2e-5, rtol=1e-4)


def test_initial_values_follow_the_papers():
  n = 4
  for mixer in MIXERS:
    cfg = config(mixer)
    _close(_init_params(cfg), mixers.initial_values(cfg), 0, 0)
    model = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), cases.TOKENS)["params"]
    assert (jax.tree.map(np.shape, nn.meta.unbox(model.get("depth_mixer", {})))
            == jax.tree.map(np.shape, mixers.initial_values(cfg)))
  dwa = _init_params(config("denseformer"))["dwa"]
  np.testing.assert_array_equal(dwa, [0, 1, 0, 0, 1, 0, 0, 0, 1])  # N = 3: weights 2, 3, 4
  np.testing.assert_array_equal(_init_params(config("value_residual"))["lambdas"], 0.5)
  hc = _init_params(config("hyper_connections"))
  np.testing.assert_array_equal(hc["attention"]["static_alpha_m"], np.eye(n)[[0, 2, 4 % n]])  # e_{k mod n}
  np.testing.assert_array_equal(hc["mlp"]["static_alpha_m"], np.eye(n)[[1, 3, 5 % n]])
  np.testing.assert_array_equal(hc["attention"]["static_alpha_r"], np.broadcast_to(np.eye(n), (3, n, n)))
  np.testing.assert_array_equal(hc["attention"]["static_beta"], 1)
  assert np.all(hc["mlp"]["dynamic_alpha_r"] == 0) and np.allclose(hc["mlp"]["scale_alpha"], 0.01)
  mhc = _init_params(config("mhc"))
  pre = 1 / (1 + np.exp(-mhc["attention"]["bias_pre"]))
  np.testing.assert_allclose(pre.sum(-1), 1, atol=1e-6)  # H_pre sums to 1: h_0 = h on equal streams
  res = np.asarray(sinkhorn(jnp.asarray(mhc["mlp"]["bias_res"])))
  np.testing.assert_allclose(np.diagonal(res, axis1=-2, axis2=-1), 0.85, atol=1e-6)  # H_res ~ I
  attn_res = _init_params(config("attention_residuals"))
  assert all(np.all(q == 0) for q in attn_res.values())  # zero pseudo-queries: uniform weights


# --- Properties of every mixer, alone and with MoDA. ---

@pytest.mark.parametrize("mixer,depth_kv", _HALF_A, ids=_ids(_HALF_A))
def test_causal_and_rows_independent(mixer, depth_kv):
  """Changing token t of row 0 leaves row 0's logits before t and row 1 exactly unchanged."""
  cfg = config(mixer, depth_kv)
  params = cases.random_params(cfg)
  t = 7
  tokens = cases.TOKENS.copy()
  tokens[0, t] = (tokens[0, t] + 1) % cases.VOCAB
  before, after = (np.asarray(cases.forward_fn(cfg)(params, x)) for x in (cases.TOKENS, tokens))
  np.testing.assert_array_equal(after[0, :t], before[0, :t])
  np.testing.assert_array_equal(after[1], before[1])
  assert np.all(np.abs(after[0, t:] - before[0, t:]).max(-1) > 0)


@pytest.mark.parametrize("mixer,depth_kv", _ALONE_AND_MODA, ids=_IDS)
def test_finite_and_every_mixer_parameter_gets_gradient(mixer, depth_kv):
  cfg = config(mixer, depth_kv)
  params = cases.random_params(cfg)
  value, grads = cases.grad_fn(cfg)(params, cases.TOKENS)
  assert np.isfinite(value) and all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert np.all(np.isfinite(cases.forward_fn(cfg)(params, cases.TOKENS)))
  for path, g in jax.tree_util.tree_leaves_with_path(grads.get("depth_mixer", {})):
    assert np.any(g != 0), jax.tree_util.keystr(path)
  if mixer == "denseformer":  # every DWA weight is read
    assert np.all(grads["depth_mixer"]["dwa"] != 0)


@pytest.mark.parametrize("mixer", MIXERS)
def test_bfloat16_compute_stays_near_float32(mixer):
  cfg = config(mixer, "attn_ffn")
  params = _params_near_init(cfg)  # far from init, dynamic HC amplifies rounding (see there)
  want = cases.forward_fn(cfg)(params, cases.TOKENS)
  got = cases.forward_fn(dataclasses.replace(cfg, dtype="bfloat16"))(params, cases.TOKENS)
  assert got.dtype == jnp.float32 and np.all(np.isfinite(got))
  np.testing.assert_allclose(got, want, atol=0.1 * float(np.max(np.abs(want))))  # as tests/test_model.py


@pytest.mark.parametrize("mixer,depth_kv", _HALF_B, ids=_ids(_HALF_B))
def test_scan_equals_loop(mixer, depth_kv):
  scan_cfg = config(mixer, depth_kv)
  loop_cfg = dataclasses.replace(scan_cfg, scan_layers=False)
  params = cases.random_params(scan_cfg)
  np.testing.assert_allclose(cases.forward_fn(loop_cfg)(scan_to_loop(params), cases.TOKENS),
                             cases.forward_fn(scan_cfg)(params, cases.TOKENS), atol=_ATOL, rtol=_RTOL)


@pytest.mark.parametrize("mixer,depth_kv", [("denseformer", "none"), ("attention_residuals", "attn_ffn"),
                                            ("mhc", "attn_ffn")])
def test_scan_equals_loop_gradients(mixer, depth_kv):
  scan_cfg = config(mixer, depth_kv)
  loop_cfg = dataclasses.replace(scan_cfg, scan_layers=False)
  params = cases.random_params(scan_cfg)
  _, scan_grads = cases.grad_fn(scan_cfg)(params, cases.TOKENS)
  _, loop_grads = cases.grad_fn(loop_cfg)(scan_to_loop(params), cases.TOKENS)
  _close(scan_to_loop(scan_grads), loop_grads, _ATOL * _grad_scale(scan_grads), _RTOL)


@pytest.mark.parametrize("mixer,depth_kv", [("denseformer", "none"), ("attention_residuals", "none"),
                                            ("denseformer", "attn_ffn"), ("attention_residuals", "attn_ffn"),
                                            ("value_residual", "attn_ffn"), ("hyper_connections", "attn_ffn"),
                                            ("depth_attention", "attn_ffn")])
def test_linear_memory_stack_gradients_equal_naive_autodiff(mixer, depth_kv):
  """The outputs buffer and the widened residual states through the custom_vjp stack."""
  cfg = config(mixer, depth_kv, num_layers=4)
  assert cfg.uses_linear_stack
  params = cases.random_params(cfg)
  value, grads = cases.grad_fn(cfg)(params, cases.TOKENS)
  want_value, want_grads = cases.naive_value_and_grad(cfg, params, cases.TOKENS)
  np.testing.assert_allclose(value, want_value, rtol=_RTOL)
  _close(grads, want_grads, _ATOL * _grad_scale(want_grads), _RTOL)


def _decoding_atol(cfg, params, full) -> float:
  """Decoding is the full pass in other float32 evaluation orders (one compiled step per token), so its
  distance to the full pass is bounded by a multiple of what another order of the full pass itself
  gives: each sequence alone (batch 1) instead of both. Hyper-connections' unconstrained stream mixing
  amplifies rounding (the instability mHC's doubly-stochastic mixing removes): with these random
  parameters that change moves HC's logits by 1e-5 to 4e-5 against DenseFormer's 5e-7, and decoding by
  1.4x to 5.5x as much (up to 6e-5; an AVX2 CPU, at both XLA optimization levels, 2026-12-02). The
  bound stays far below the size of a wiring error (1e-2 and more)."""
  forward = cases.forward_fn(cfg)
  order_noise = max(float(jnp.abs(forward(params, cases.TOKENS[b:b + 1]) - full[b:b + 1]).max())
                    for b in range(cases.TOKENS.shape[0]))
  atol = max(_LOGIT_ATOL, 10 * order_noise)
  assert atol < 1e-3, f"the full pass alone moves by {order_noise:.2e} between batch sizes"
  return atol


@pytest.mark.parametrize("mixer,depth_kv", _HALF_B, ids=_ids(_HALF_B))
def test_decoding_equals_full_forward(mixer, depth_kv):
  cfg = config(mixer, depth_kv)
  params = cases.random_params(cfg)
  full = cases.forward_fn(cfg)(params, cases.TOKENS)
  np.testing.assert_allclose(cases.decoded_logits(cfg, params, cases.TOKENS, prefill=5), full,
                             atol=_decoding_atol(cfg, params, full), rtol=0)
  assert float(jnp.abs(full).max()) > 1.0


@pytest.mark.parametrize("mixer", ["attention_residuals", "depth_attention"])
def test_decoding_unscanned_with_chunked_depth(mixer):
  cfg = config(mixer, "attn_ffn", scan_layers=False, depth_chunk=3)
  params = scan_to_loop(cases.random_params(dataclasses.replace(cfg, scan_layers=True)))
  np.testing.assert_allclose(cases.decoded_logits(cfg, params, cases.TOKENS, prefill=4),
                             cases.forward_fn(cfg)(params, cases.TOKENS), atol=_LOGIT_ATOL, rtol=0)


# --- Counts, sharding, configuration. ---

def _mixer_params(cfg) -> int:
  shapes = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), cases.TOKENS)["params"]
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(shapes.get("depth_mixer", {}))))


def test_parameter_counts_match_the_formulas():
  N, M, n = 3, 32, 4
  assert _mixer_params(config("denseformer")) == N * (N + 3) // 2
  assert _mixer_params(config("value_residual")) == 2 * (N - 1)
  assert _mixer_params(config("hyper_connections")) == 2 * N * ((n * n + 2 * n + 2) + M * (n + 2))
  assert _mixer_params(config("mhc")) == 2 * N * (n * M * (n * n + 2 * n) + n * n + 2 * n + 3)
  assert _mixer_params(config("attention_residuals")) == 2 * N * M
  count = lambda c: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(
      jax.eval_shape(Transformer(c).init, jax.random.key(0), cases.TOKENS)["params"])))
  assert count(config("depth_attention")) == count(config("none"))  # reads the attention K/V


def test_flops_of_the_mixers():
  T, N, M, n = 64, 3, 32, 4
  mixer = lambda c: flops.forward_flops_per_sequence(c, T)["depth_mixer"]
  assert mixer(config("none")) == 0 and mixer(config("depth_attention")) == 0
  assert mixer(config("denseformer")) == 2 * T * M * (2 + 3 + 4)
  assert mixer(config("value_residual")) == 3 * T * 2 * 8 * (N - 1)
  assert mixer(config("attention_residuals")) == 4 * T * M * ((2 + 3) + (4 + 5) + (6 + 7))
  mixing = 2 * n * M * (n + 2)
  assert mixer(config("hyper_connections")) == 2 * N * T * (2 * n * M * (n + 2) + mixing)
  assert mixer(config("mhc")) == 2 * N * T * (2 * n * M * n * (n + 2) + mixing)
  # Depth attention reads what MoDA "attn" reads: the depth part counts it.
  parts = flops.forward_flops_per_sequence(config("depth_attention"), T)
  assert parts["depth_attention"] == flops.forward_flops_per_sequence(config("none", "attn"), T)["depth_attention"] > 0
  assert flops.train_flops_per_sequence(config("mhc"), T) == 3 * sum(
      flops.forward_flops_per_sequence(config("mhc"), T).values())


@pytest.mark.parametrize("mixer", ["denseformer", "mhc", "attention_residuals"])
def test_sharded_model_equals_unsharded(mixer):
  cfg = config(mixer, "attn_ffn")
  tokens = np.concatenate([cases.TOKENS, cases.TOKENS[::-1]])  # batch 4 over data x fsdp
  params = cases.random_params(cfg, tokens=tokens)
  boxed = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), tokens)["params"]
  names = {a for s in jax.tree.leaves(nn.get_partition_spec(boxed["depth_mixer"]),
                                      is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)) for a in s}
  assert names <= {rule for rule, _ in sharding.LOGICAL_AXIS_RULES}
  want = cases.forward_fn(cfg)(params, tokens)
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  shardings = sharding.logical_shardings(boxed, mesh)
  with sharding.activation_context(mesh):
    got = jax.jit(lambda p, t: Transformer(cfg).apply({"params": p}, t))(jax.device_put(params, shardings),
                                                                        tokens)
  np.testing.assert_allclose(got, want, atol=_ATOL, rtol=_RTOL)


@pytest.mark.parametrize("mixer", ("none",) + MIXERS)
@pytest.mark.parametrize("depth_kv", ["none", "attn", "attn_ffn", "attn_ffn_extra"])
def test_every_mixer_combines_with_every_depth_variant(mixer, depth_kv):
  cfg = config(mixer, depth_kv)
  assert ModelConfig.from_dict(cfg.to_dict()) == cfg
  assert cfg.uses_depth == (depth_kv != "none" or mixer == "depth_attention")


@pytest.mark.parametrize("overrides,message", [
    (dict(depth_mixer="dense"), "depth_mixer='dense'"),
    (dict(depth_mixer=None), "depth_mixer=None"),
    (dict(hyper_connections_streams=2), "hyper_connections_streams=2 needs depth_mixer='hyper_connections'"),
    (dict(hyper_connections_manifold=True), "hyper_connections_manifold=True needs depth_mixer"),
    (dict(depth_mixer="hyper_connections", hyper_connections_streams=0), "hyper_connections_streams=0"),
    (dict(depth_mixer="hyper_connections", hyper_connections_streams=1, hyper_connections_manifold=True),
     "hyper_connections_streams=1: mHC"),
    (dict(depth_mixer="hyper_connections", hyper_connections_manifold=1), "hyper_connections_manifold=1"),
])
def test_bad_mixer_settings_raise_value_error_naming_the_field(overrides, message):
  with pytest.raises(ValueError, match=message):
    cases.config(**overrides)
