"""The chunked loss (train/loss.py): the dense loss's sums and gradients, without its [B, T, V] logits.

Checked three ways: `chunked_objective` against a float64 numpy oracle of the loss and its analytic
gradient (written from the formula, independent of JAX); `loss_sums` of a real Transformer, chunked
against dense (tied and untied embeddings, z-loss on, padding masked); and the compiled gradient's
memory, which must drop by more than one float32 copy of the logits where they dominate.
"""

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import model_cases as cases
from operator_cases import assert_close
from configs import micro
from moda_jax import Transformer
from moda_jax.cli_errors import UserError
from moda_jax.model.layers import Unembedding
from moda_jax.train import loss, run_settings
from moda_jax.train import step as ts

# float32 against the float64 oracle, and two float32 evaluation orders of one computation.
_F32_RTOL, _F32_ATOL = 1e-5, 1e-5
_B, _T, _M, _V = 3, 10, 8, 29


def _oracle(hidden_BTM, table, vocab_first, targets_BT, mask_BT, z_weight):
  """float64: (ce_sum, z_sum, d objective / d hidden, d objective / d table), objective = ce + w z.

  Per token with logits x = h W: p = softmax(x), lse = log sum e^x,
  d ce / d x = p - onehot(target), d z / d x = 2 lse p; both times the mask."""
  h = np.asarray(hidden_BTM, np.float64).reshape(-1, hidden_BTM.shape[-1])
  w_MV = np.asarray(table, np.float64).T if vocab_first else np.asarray(table, np.float64)
  t, m = np.asarray(targets_BT).reshape(-1), np.asarray(mask_BT, np.float64).reshape(-1)
  x = h @ w_MV
  top = x.max(-1, keepdims=True)
  lse = (top + np.log(np.exp(x - top).sum(-1, keepdims=True)))[:, 0]
  p = np.exp(x - lse[:, None])
  onehot = np.eye(x.shape[1])[t]
  ce_sum = np.sum((lse - x[np.arange(len(t)), t]) * m)
  z_sum = np.sum(lse ** 2 * m)
  d_x = ((p - onehot) + z_weight * 2 * lse[:, None] * p) * m[:, None]
  d_h = (d_x @ w_MV.T).reshape(hidden_BTM.shape)
  d_w_MV = h.T @ d_x
  return ce_sum, z_sum, d_h, d_w_MV.T if vocab_first else d_w_MV


def _random_case(seed):
  rng = np.random.default_rng(seed)
  hidden = rng.standard_normal((_B, _T, _M)).astype(np.float32)
  targets = rng.integers(0, _V, (_B, _T)).astype(np.int32)
  mask = (rng.random((_B, _T)) > 0.3).astype(np.float32)
  return hidden, targets, mask


@pytest.mark.parametrize("chunk_len", [1, 5, 3, 4, _T, 64], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("vocab_first", [True, False], ids=["tied", "untied"])
def test_chunked_sums_and_gradients_equal_float64_oracle(chunk_len, vocab_first):
  # 5 divides T = 10; 3 and 4 leave a padded tail chunk; 64 > T is one chunk of T.
  hidden, targets, mask = _random_case(chunk_len)
  table = 2.0 * np.random.default_rng(7).standard_normal((_V, _M) if vocab_first else (_M, _V))
  table = table.astype(np.float32)
  z_weight = 0.3  # large enough that a wrong z-loss gradient shows

  def objective(hidden, table):
    total, ce, z = loss.chunked_objective(hidden, Unembedding(table, vocab_first), targets, mask, chunk_len,
                                          z_weight)
    return total, (ce, z)

  (_, (ce, z)), (d_hidden, d_table) = jax.jit(jax.value_and_grad(objective, (0, 1), has_aux=True))(
      hidden, table)
  want_ce, want_z, want_d_hidden, want_d_table = _oracle(hidden, table, vocab_first, targets, mask, z_weight)
  np.testing.assert_allclose(ce, want_ce, rtol=_F32_RTOL)
  np.testing.assert_allclose(z, want_z, rtol=_F32_RTOL)
  for got, want in ((d_hidden, want_d_hidden), (d_table, want_d_table)):
    np.testing.assert_allclose(got, want, rtol=_F32_RTOL, atol=_F32_ATOL * np.max(np.abs(want)))


def test_masked_positions_give_nothing_and_get_no_gradient():
  hidden, targets, mask = _random_case(0)
  mask[1] = 0.0
  unembedding = Unembedding(np.random.default_rng(1).standard_normal((_M, _V)).astype(np.float32), False)
  sums = lambda h, t: loss.chunked_objective(h, unembedding, t, mask, 4, 1.0)
  d_hidden = np.asarray(jax.grad(lambda h: sums(h, targets)[0])(hidden))
  np.testing.assert_array_equal(np.any(d_hidden != 0.0, axis=-1), mask > 0)  # row 1 all masked
  other = targets.copy()
  other[1] = (other[1] + 1) % _V
  assert [float(s) for s in sums(hidden, other)] == [float(s) for s in sums(hidden, targets)]


@pytest.mark.parametrize("chunk_len", [0, -3, True, 2.0])
def test_bad_chunk_len_is_a_value_error(chunk_len):
  hidden, targets, mask = _random_case(0)
  with pytest.raises(ValueError, match=f"chunk_len={chunk_len!r}"):
    loss.chunked_objective(hidden, Unembedding(np.zeros((_M, _V), np.float32), False), targets, mask,
                           chunk_len, 0.0)


def _logits_sized_dots(fn, *args):
  """How many dot_generals in fn's jaxpr (nested jaxprs included) have a [..., V] operand or output."""
  count = 0

  def visit(jaxpr):
    nonlocal count
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general" and any(
          _V in v.aval.shape for v in (*eqn.invars, *eqn.outvars)):
        count += 1
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        visit(sub)

  visit(jax.make_jaxpr(fn)(*args).jaxpr)
  return count


def test_gradient_forms_each_chunks_logits_once_and_scales_with_the_cotangent():
  # Three matmuls touch the vocabulary (logits, d hidden, d table), once per chunk of the scan body:
  # no recomputed logits in the backward pass. The gradient is linear in the objective's cotangent.
  hidden, targets, mask = _random_case(5)
  unembedding = Unembedding(np.random.default_rng(6).standard_normal((_M, _V)).astype(np.float32), False)
  total = lambda h, u, scale: scale * loss.chunked_objective(h, u, targets, mask, 4, 0.2)[0]
  grad = jax.grad(total, argnums=(0, 1))
  assert _logits_sized_dots(grad, hidden, unembedding, 1.0) == 3
  (d_h1, d_u1), (d_h3, d_u3) = grad(hidden, unembedding, 1.0), grad(hidden, unembedding, -3.0)
  np.testing.assert_allclose(d_h3, -3.0 * d_h1, rtol=_F32_RTOL, atol=_F32_ATOL)
  np.testing.assert_allclose(d_u3.table, -3.0 * d_u1.table, rtol=_F32_RTOL, atol=_F32_ATOL)


def test_chunked_metrics_carry_no_gradient():
  hidden, targets, mask = _random_case(8)
  unembedding = Unembedding(np.random.default_rng(9).standard_normal((_M, _V)).astype(np.float32), False)
  for index in (1, 2):  # ce_sum, z_sum
    d_hidden = jax.grad(lambda h: loss.chunked_objective(h, unembedding, targets, mask, 4, 0.5)[index])(hidden)
    assert not np.any(np.asarray(d_hidden))


def _model_batch(seed=0):
  rng = np.random.default_rng(seed)
  seg = np.ones_like(cases.TOKENS)
  seg[0, :4] = 0  # packing padding at the start of row 0
  return dict(inputs=cases.TOKENS, targets=rng.integers(0, cases.VOCAB, cases.TOKENS.shape).astype(np.int32),
              segment_ids=seg, positions=np.broadcast_to(np.arange(cases.TOKENS.shape[1], dtype=np.int32),
                                                         cases.TOKENS.shape))


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_transformer_chunked_loss_equals_dense(tie):
  """The first losses and gradients of a run are unchanged: loss_sums chunked == dense, T = 12 in
  chunks of 5 (padded tail) and 4 (exact)."""
  cfg = cases.config(tie_embeddings=tie, depth_kv="attn")
  params, model, batch = cases.random_params(cfg), Transformer(cfg), _model_batch()

  def value_and_grad(chunk_len):
    fn = lambda p: ts.loss_sums(model, p, batch, 0.1, chunk_len)
    return jax.jit(jax.value_and_grad(fn, has_aux=True))(params)

  (want, want_sums), want_grads = value_and_grad(0)
  scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(want_grads))
  for chunk_len in (5, 4):
    (got, sums), grads = value_and_grad(chunk_len)
    np.testing.assert_allclose(got, want, rtol=_F32_RTOL)
    for key in ("ce_sum", "z_sum", "tokens"):
      np.testing.assert_allclose(sums[key], want_sums[key], rtol=_F32_RTOL)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=_F32_ATOL * scale),
                 grads, want_grads)


def test_first_train_steps_are_unchanged():
  """Two optimizer steps of train_step (z-loss on, two microbatches): chunked == dense."""
  from moda_jax.train import optimizer
  cfg, run = cases.config(depth_kv="attn"), micro.get_config()
  model, opt = Transformer(cfg), optimizer.make_optimizer(run)
  state = ts.TrainState(step=jnp.zeros((), jnp.int32), params=cases.random_params(cfg),
                        opt_state=opt.init(cases.random_params(cfg)), rng=jax.random.PRNGKey(0))
  batch = _model_batch()

  def two_steps(chunk_len):
    step = jax.jit(lambda s, b: ts.train_step(s, b, model=model, optimizer=opt,
                                              schedule=optimizer.learning_rate_schedule(run),
                                              cfg=ts.StepConfig(1e-2, 2, chunk_len)))
    first, m1 = step(state, batch)
    second, m2 = step(first, batch)
    return second.params, (m1, m2)

  want_params, want_metrics = two_steps(0)
  got_params, got_metrics = two_steps(5)
  for got, want in zip(got_metrics, want_metrics):
    for key in ("loss", "z_loss", "grad_norm", "tokens"):
      np.testing.assert_allclose(got[key], want[key], rtol=_F32_RTOL)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6), got_params, want_params)


def _dot_operand_dtypes(fn, *args):
  """The input dtypes of every dot_general in fn's jaxpr (nested jaxprs included)."""
  found = []

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        visit(sub)

  visit(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


@pytest.mark.parametrize("vocab_first", [True, False], ids=["tied", "untied"])
def test_bf16_logits_backward_runs_bf16_matmuls_and_matches_the_float64_oracle(vocab_first):
  # Autodiff of a float32-output einsum would run the backward matmuls on a float32 cotangent (TF32
  # GEMMs on the GPU); the backward must contract in the compute dtype, like every other layer.
  hidden, targets, mask = _random_case(3)
  table = np.random.default_rng(4).standard_normal((_V, _M) if vocab_first else (_M, _V)).astype(np.float32)
  hidden_bf16 = jnp.asarray(hidden, jnp.bfloat16)

  def ce(h, t):
    return loss.logit_sums(Unembedding(t, vocab_first).logits(h), targets, mask)[0]

  assert _dot_operand_dtypes(jax.grad(ce, argnums=(0, 1)), hidden_bf16, table) == [("bfloat16", "bfloat16")] * 3
  d_hidden, d_table = jax.grad(ce, argnums=(0, 1))(hidden_bf16, table)
  assert (d_hidden.dtype, d_table.dtype) == (jnp.bfloat16, jnp.float32)
  # The oracle sees the inputs as the model does: both rounded to bf16.
  rounded = lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64)
  _, _, want_d_hidden, want_d_table = _oracle(rounded(hidden), rounded(table), vocab_first, targets, mask, 0.0)
  assert_close("d_hidden", d_hidden, want_d_hidden, "bfloat16")
  assert_close("d_table", d_table, want_d_table, "bfloat16")
  # float32 compute: autodiff of the plain einsum (another float32 evaluation order).
  spec = "...m,vm->...v" if vocab_first else "...m,mv->...v"
  plain = lambda h, t: loss.logit_sums(jnp.einsum(spec, h, t), targets, mask)[0]
  for got, want in zip(jax.grad(ce, argnums=(0, 1))(hidden, table), jax.grad(plain, argnums=(0, 1))(hidden, table)):
    np.testing.assert_allclose(got, want, rtol=_F32_RTOL, atol=_F32_ATOL)


def test_return_hidden_gives_the_logits_exactly():
  cfg = cases.config(depth_kv="none")
  params, model = cases.random_params(cfg), Transformer(cfg)
  hidden, unembedding = model.apply({"params": params}, cases.TOKENS, return_hidden=True)
  logits = model.apply({"params": params}, cases.TOKENS)
  np.testing.assert_array_equal(unembedding.logits(hidden), logits)
  with pytest.raises(ValueError, match="return_hidden=True was given with cache"):
    model.apply({"params": params}, cases.TOKENS, cache=object(), return_hidden=True)


def _train_loss_bytes(cfg, batch: int, seq_len: int, chunk_len: int) -> int:
  """temp + argument bytes of the compiled gradient of `loss_sums` (the train step's loss)."""
  tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
  params = nn.meta.unbox(jax.eval_shape(Transformer(cfg).init, jax.random.key(0), tokens)["params"])
  data = {key: tokens for key in ("inputs", "targets", "segment_ids", "positions")}
  grad = jax.grad(lambda p, b: ts.loss_sums(Transformer(cfg), p, b, 1e-4, chunk_len)[0])
  analysis = jax.jit(grad).lower(params, data).compile().memory_analysis()
  return analysis.temp_size_in_bytes + analysis.argument_size_in_bytes


def test_chunked_loss_memory_is_below_dense_by_more_than_one_logits_copy():
  """Big vocabulary, small model: the logits dominate. Chunks of T/8 save more than one [B, T, V]
  float32 copy (autodiff of the dense loss holds several)."""
  batch, seq_len, vocab = 2, 256, 8192
  cfg = cases.config(vocab_size=vocab, num_layers=2, max_seq_len=seq_len, depth_kv="none",
                     attention_impl="xla")
  dense = _train_loss_bytes(cfg, batch, seq_len, 0)
  chunked = _train_loss_bytes(cfg, batch, seq_len, seq_len // 8)
  logits_copy = batch * seq_len * vocab * 4
  assert chunked + logits_copy < dense, (chunked, dense, logits_copy)


def test_loss_chunk_len_is_a_checked_run_setting():
  config = micro.get_config()
  config.loss_chunk_len = -1
  with pytest.raises(UserError, match=r"config.loss_chunk_len=-1: expected an int >= 0"):
    run_settings.check(config)
  config.loss_chunk_len = 16
  run_settings.check(config)


def test_700m_configs_use_the_chunked_loss_and_base_keeps_dense():
  from configs import base, baseline_700m, moda_700m
  assert base.get_config().loss_chunk_len == 0
  for config in (moda_700m.get_config(), baseline_700m.get_config()):
    assert 0 < config.loss_chunk_len < config.seq_len
