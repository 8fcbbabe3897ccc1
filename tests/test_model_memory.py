"""Compiled training-step memory grows linearly with depth (docs/moda.md §5; issue 3 "must show").

Measures `jax.jit(grad).lower(...).compile().memory_analysis()` (temp + argument bytes) for the
default `depth_kv="attn_ffn"` (linear-memory custom_vjp stack), the `none` baseline, and the naive
scan (plain autodiff, which saves one depth buffer pair per layer) for contrast. Both models use
the same remat policy ("full" for the issue's bound; the stack saves each writer block's policy
residuals, so other policies are checked too), so the difference is the depth stream's. Run with
`-s` to see the table.
"""

import functools

import jax
import pytest

import model_cases as cases
import pallas_kernels
from moda_jax import ModelConfig
from moda_jax.model import depth_stack, kernel_call

_BATCH, _SEQ = 2, 128
_LAYERS = (8, 16, 32)


def _config(num_layers, **overrides):
  base = dict(vocab_size=64, num_layers=num_layers, d_model=64, num_heads=4, num_kv_heads=2,
              head_dim=16, mlp_dim=128, max_seq_len=_SEQ, depth_kv="attn_ffn", attention_impl="xla",
              remat="full")
  return ModelConfig(**{**base, **overrides})


def _pair_bytes(cfg: ModelConfig) -> int:
  """Bytes of one depth K buffer plus one depth V buffer [B, T, L_max, Hk, D]."""
  return 2 * _BATCH * _SEQ * cfg.num_depth_slots * cfg.num_kv_heads * cfg.head_dim * 4


def _train_step_bytes(cfg: ModelConfig, naive: bool = False) -> tuple[int, int]:
  return cases.train_step_bytes(cfg, _BATCH, _SEQ, naive)


def _depth_parts(remat: str, depths=_LAYERS) -> list[tuple]:
  """(layers, attn_ffn bytes, none bytes, depth part, buffer pair) at each depth, both models under
  `remat`."""
  rows = []
  for layers in depths:
    moda, moda_params = _train_step_bytes(_config(layers, remat=remat))
    base, base_params = _train_step_bytes(_config(layers, depth_kv="none", remat=remat))
    pair = _pair_bytes(_config(layers))
    # The FFN-KV projections are parameters (arguments) with same-size gradients (temps).
    depth_part = moda - base - 2 * (moda_params - base_params)
    rows.append((layers, moda, base, depth_part, pair))
  print(f"\nremat={remat}\nlayers | attn_ffn bytes | none bytes | depth part | depth K+V buffer pair | part / pair")
  for layers, moda, base, depth_part, pair in rows:
    print(f"{layers:6d} | {moda:14,d} | {base:10,d} | {depth_part:10,d} | {pair:21,d} | "
          f"{depth_part / pair:.2f}")
  return rows


def test_train_step_memory_is_linear_in_depth():
  rows = _depth_parts("full")
  for (_, small, *_), (_, large, *_) in zip(rows, rows[1:]):
    assert large / small <= 2.2, rows
  # A constant number of buffer pairs at every depth (the naive scan would need ~N of them). Measured
  # 2.37 / 2.18 / 2.09 pairs at 8 / 16 / 32 layers: the final buffers + the reverse pass's cotangent
  # carry (2 pairs, the design's floor), which each layer's attention backward updates in place
  # (`return_depth`), plus one depth step's temporaries (`xla_depth`: at most T / 8 tokens' slots at a
  # time). It was 3.21 / 3.09 / 3.36 while each layer's backward returned a zero-filled full-size
  # depth cotangent for the stack to add and the `xla` backend copied a whole query block of the buffers
  # head-major (T = 128 is one block), and 4.40 / 4.53 / 4.80 before that, while readers applied their
  # k-norm to the whole depth key buffer. The bound has ~5% headroom over the largest measured value.
  ratios = [depth_part / pair for _, _, _, depth_part, pair in rows]
  assert max(ratios) <= 2.5, ratios
  assert ratios[-1] <= 1.15 * ratios[0], ratios


@pytest.mark.parametrize("remat", ["save_dots_and_attention", "none"])
def test_stack_saving_policy_residuals_stays_linear_in_depth(remat):
  # The stack keeps what the policy saves of each writer block but never the buffers it read: the
  # depth part stays a constant number of buffer pairs. Measured 2.33 / 2.23 / 2.19
  # (save_dots_and_attention) and 3.64 / 3.53 / 3.48 (none) at 8 / 16 / 32 layers; a buffer pair per
  # layer would add 8, 16, 32. Two depths suffice here (the full table: the test above).
  ratios = [depth_part / pair for _, _, _, depth_part, pair in _depth_parts(remat, (_LAYERS[0], _LAYERS[-1]))]
  assert max(ratios) <= {"save_dots_and_attention": 2.5, "none": 3.8}[remat], ratios
  assert ratios[-1] <= 1.05 * ratios[0], ratios


def test_naive_scan_memory_is_quadratic_in_depth():
  """The contrast that motivates the custom_vjp: plain autodiff saves a buffer pair per layer."""
  naive = [_train_step_bytes(_config(n), naive=True)[0] for n in _LAYERS[:2]]
  linear = [_train_step_bytes(_config(n))[0] for n in _LAYERS[:2]]
  print(f"\nnaive scan bytes at {_LAYERS[:2]} layers: {naive}; linear: {linear}")
  assert naive[1] / naive[0] > 2.5
  assert naive[1] > 2 * linear[1]


@pytest.mark.parametrize("impl", ["xla", "pallas_triton", "pallas_mosaic_gpu", "pallas_tpu"])
def test_no_backend_makes_the_stack_save_a_depth_buffer_per_layer(impl, monkeypatch):
  # The stack drops the pullback leaves that *are* the buffers; a backend whose forward saved a copy
  # of them (a cast, a padded or head-major layout) would make memory quadratic on its platform only.
  # Traced (not compiled) with remat="none", which saves the most, the kernels in interpret mode.
  monkeypatch.setattr(kernel_call, "moda_attention", functools.partial(pallas_kernels.moda_attention, interpret=True))
  saved = []
  split = depth_stack._split_residuals
  monkeypatch.setattr(depth_stack, "_split_residuals", lambda *a: saved.append(split(*a)) or saved[-1])
  cfg = cases.config(depth_kv="attn_ffn", attention_impl=impl, remat="none", num_layers=3, dtype="bfloat16",
                     d_model=64, num_heads=2, num_kv_heads=2, head_dim=64)  # D 64: every backend takes it
  jax.make_jaxpr(jax.grad(functools.partial(cases.loss, cfg)))(cases.random_params(cfg), cases.TOKENS)
  buffer_size = cases.TOKENS.size * cfg.num_depth_slots * cfg.num_kv_heads * cfg.head_dim
  assert saved and saved[0], "the stack saved no residual at all: remat='none' should keep activations"
  assert [leaf.shape for leaf in saved[0] if leaf.size >= buffer_size] == []
