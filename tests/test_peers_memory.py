"""Training-step memory of the depth mixers grows linearly with depth (docs/peers.md).

Measures `jax.jit(grad).lower(...).compile().memory_analysis()` (temp + argument bytes) like
tests/test_model_memory.py, for each mixer alone against the plain model of the same depth (all with
remat="full", so the difference is the mixer's). The mixer's part is reported in units of one
[B, T, M] float32 activation per layer; linear memory means a constant number of them per layer:

  * DenseFormer, attention residuals: the write-once outputs buffer (1 and 2 slots per block) read
    through the linear-memory stack; floor 2 and 4 (the buffer and its cotangent carry);
  * hyper-connections (and mHC): the n = 4 streams saved per layer instead of one residual: floor 4;
  * value residual: V_1 [B, T, Hk, D] carried with the residual, half an activation here.

Plain autodiff of the outputs buffer in the scan carry saves one buffer per layer (quadratic): the
contrast. Run with `-s` to see the table.
"""

import pytest

import model_cases as cases
from moda_jax import ModelConfig

_BATCH, _SEQ, _WIDTH = 2, 128, 64
_ACTIVATION = _BATCH * _SEQ * _WIDTH * 4  # bytes of one [B, T, M] float32 activation


def _config(num_layers, mixer, **overrides):
  base = dict(vocab_size=64, num_layers=num_layers, d_model=_WIDTH, num_heads=4, num_kv_heads=2, head_dim=16,
              mlp_dim=128, max_seq_len=_SEQ, depth_kv="none", attention_impl="xla", remat="full",
              depth_mixer=mixer)
  if mixer == "mhc":
    base.update(depth_mixer="hyper_connections", hyper_connections_manifold=True)
  return ModelConfig(**{**base, **overrides})


def _train_step_bytes(cfg: ModelConfig, naive: bool = False) -> tuple[int, int]:
  return cases.train_step_bytes(cfg, _BATCH, _SEQ, naive)


def _mixer_part(num_layers, mixer, naive=False) -> int:
  """The mixer's bytes: the step's minus the plain model's, less its parameters and their gradients."""
  total, params = _train_step_bytes(_config(num_layers, mixer), naive)
  base, base_params = _train_step_bytes(_config(num_layers, "none"))
  return total - base - 2 * (params - base_params)


# (mixer, bound on the slope in activations per added layer). Measured slopes: DenseFormer 4.0,
# attention residuals 6.2, HC 3.0, mHC 3.0 / 3.3, value residual 0.5 (the plain model's own saved
# residual is already subtracted, so HC's floor is n - 1 = 3); the rest are the buffers' transients
# (one layer's read cotangent, the [B, T, P] logits). The bounds leave ~10-15% headroom.
# One mixer per mechanism keeps the suite's time down: the outputs buffer (DenseFormer, attention
# residuals) and the widened residual state (hyper-connections; mHC's and value residual's state is the
# same kind: mHC measured 3.0 / 3.3, value residual 0.5).
_CASES = [("denseformer", 4.5), ("attention_residuals", 7.0), ("hyper_connections", 3.5)]
_DEPTHS = (8, 16, 32)


@pytest.mark.parametrize("mixer,bound", _CASES, ids=[c[0] for c in _CASES])
def test_mixer_memory_is_linear_in_depth(mixer, bound):
  """Bytes per added layer stay constant: quadratic memory would double the slope per doubling.
  (At 8 layers XLA reuses some of the plain model's memory, so ratios of totals overstate growth.)"""
  parts = [_mixer_part(n, mixer) for n in _DEPTHS]
  slopes = [(b - a) / (m - n) / _ACTIVATION for (n, a), (m, b) in zip(zip(_DEPTHS, parts), zip(_DEPTHS[1:], parts[1:]))]
  print(f"\n{mixer}: layers {_DEPTHS}, mixer bytes {parts}, activations per added layer "
        f"{[round(x, 2) for x in slopes]}")
  assert slopes[1] <= 1.3 * slopes[0], slopes
  assert max(slopes) <= bound, slopes


@pytest.mark.parametrize("mixer", ["denseformer", "attention_residuals"])
def test_naive_outputs_buffer_is_quadratic(mixer):
  """The contrast that motivates the stack: the buffer in a plain scan carry, saved per layer."""
  naive = [_mixer_part(n, mixer, naive=True) for n in (8, 16)]
  linear = [_mixer_part(n, mixer) for n in (8, 16)]
  print(f"\n{mixer} naive scan bytes at 8 / 16 layers: {naive}; linear: {linear}")
  # Doubling the depth: a quadratic term makes the naive bytes grow towards 4x, the stack's ~2x.
  # Measured (both with the blocks checkpointed as the config says): denseformer naive 3.8x and 4.8x
  # the stack's at 16 layers.
  assert naive[1] / naive[0] > 3.0
  assert naive[1] / naive[0] > 1.5 * linear[1] / linear[0]
  assert naive[1] > 4 * linear[1]
