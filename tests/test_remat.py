"""Remat policies (`ModelConfig.remat`): what each one makes the backward pass of a block re-do.

Their gradients equal remat="none" (tests/test_model.py). Here, the work: the matmuls in the jaxpr of
one block's VJP, a deterministic count (not a timing). With the xla attention backend the batched
matmuls are the attention kernel's and the unbatched ones the projections, so a policy that keeps the
kernel's residuals leaves exactly the backward kernel's batched matmuls, as without remat.
"""

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import pytest

import model_cases as cases
from moda_jax.model import block_loop, depth_stream
from moda_jax.model.config import REMAT_OPTIONS

_CFG = cases.config(depth_kv="none", attention_impl="xla")
_B, _T = cases.TOKENS.shape


def _sub_jaxprs(value):
  for item in value if isinstance(value, (list, tuple)) else (value,):
    jaxpr = getattr(item, "jaxpr", item)  # a ClosedJaxpr's jaxpr, or a Jaxpr
    if hasattr(jaxpr, "eqns"):
      yield jaxpr


def _count_dots(jaxpr, counts):
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (_, _), (lhs_batch, _) = eqn.params["dimension_numbers"]
      counts["batched" if lhs_batch else "unbatched"] += 1
    for param in eqn.params.values():
      for sub in _sub_jaxprs(param):
        _count_dots(sub, counts)
  return counts


@functools.cache
def _backward_dots(remat: str) -> dict[str, int]:
  """{"batched": n, "unbatched": m} matmuls in the backward pass of the last block under `remat`."""
  cfg = dataclasses.replace(_CFG, remat=remat)
  params = cases.random_params(cfg)["last_block"]
  block = block_loop.block_fn(cfg, False)
  x_BTM = jnp.ones((_B, _T, cfg.d_model), jnp.float32)
  positions_BT = jnp.broadcast_to(jnp.arange(_T, dtype=jnp.int32), (_B, _T))
  stream = depth_stream.empty(cfg, _B, _T)
  out, vjp = jax.vjp(lambda p, x: block(p, x, stream, positions_BT, None, None, False)[0], params, x_BTM)
  return _count_dots(jax.make_jaxpr(vjp)(out).jaxpr, {"batched": 0, "unbatched": 0})


def test_full_recomputes_the_attention_kernel_and_the_projections():
  full, none = _backward_dots("full"), _backward_dots("none")
  assert full["batched"] > none["batched"] and full["unbatched"] > none["unbatched"]


@pytest.mark.parametrize("remat", ["save_attention_out", "save_qkv_attention_out", "save_dots_and_attention"])
def test_policies_keeping_attention_do_not_rerun_its_forward_kernel(remat):
  assert _backward_dots(remat)["batched"] == _backward_dots("none")["batched"]


def test_jax_dot_policies_rerun_the_attention_kernel_but_no_projection():
  # What the ModelConfig docstring says of them: the kernel's residuals are no matmul outputs.
  none = _backward_dots("none")
  for remat in ("dots_with_no_batch_dims_saveable", "dots_saveable"):
    assert _backward_dots(remat)["unbatched"] == none["unbatched"]
  assert _backward_dots("dots_with_no_batch_dims_saveable")["batched"] > none["batched"]


def test_save_qkv_skips_exactly_the_three_qkv_matmuls():
  assert (_backward_dots("save_attention_out")["unbatched"] - _backward_dots("save_qkv_attention_out")["unbatched"]
          == 3)
  assert _backward_dots("save_dots_and_attention")["unbatched"] == _backward_dots("none")["unbatched"]


def test_options_are_ordered_from_most_to_least_recomputed():
  work = [sum(_backward_dots(remat).values()) for remat in REMAT_OPTIONS]
  assert work == sorted(work, reverse=True), dict(zip(REMAT_OPTIONS, work))


@functools.cache
def _model_grad_dots(remat: str, naive: bool) -> dict[str, int]:
  """Matmuls in the jaxpr of a MoDA model's gradient, through the linear-memory stack or (`naive`)
  plain autodiff of the same block loop."""
  cfg = cases.config(depth_kv="attn_ffn", attention_impl="xla", remat=remat, num_layers=4)
  params = cases.random_params(cfg)
  with cases.naive_depth_memory() if naive else contextlib.nullcontext():
    jaxpr = jax.make_jaxpr(jax.grad(functools.partial(cases.loss, cfg)))(params, cases.TOKENS)
  return _count_dots(jaxpr.jaxpr, {"batched": 0, "unbatched": 0})


@pytest.mark.parametrize("remat", ["none", "save_dots_and_attention", "full"])
def test_linear_memory_stack_recomputes_what_plain_autodiff_under_the_policy_does(remat):
  # The stack keeps each writer block's policy residuals (never the depth buffers): under any policy
  # its backward re-does exactly the matmuls that plain autodiff of the same blocks re-does.
  assert _model_grad_dots(remat, naive=False) == _model_grad_dots(remat, naive=True)
  if remat != "full":
    assert sum(_model_grad_dots(remat, False).values()) < sum(_model_grad_dots("full", False).values())
