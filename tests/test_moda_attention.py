"""`moda_attention` against the float64 oracle: out, lse and all gradients, per implementation.

Each case runs forward + `jax.vjp` under `jit` with random cotangents on both out and lse, and compares
with `oracle.py` evaluated on the *same* (dtype-rounded) inputs, so bf16 / f16 errors measure the
backend and not the input rounding. Invariances and identities live in
test_moda_attention_properties.py, jit / vmap / grad / scan in test_moda_attention_transforms.py, bad
inputs in test_moda_attention_errors.py, the MoDA family (chunks, depth-only, depth_start) in
test_moda_family.py; the case table and tolerances in operator_cases.py.
"""

import pytest

from operator_cases import CASES, IMPLEMENTATIONS, assert_matches_oracle, impl_marks, make_inputs, run_case


def _case_params():
  return [pytest.param(impl, case, id=f"{impl.name}-{case.name}", marks=impl_marks(impl))
          for impl in IMPLEMENTATIONS for case in CASES if impl.spread == "full" or case.kernel]


@pytest.mark.parametrize("impl, case", _case_params())
def test_forward_and_gradients_match_oracle(impl, case):
  inputs = make_inputs(case)
  assert_matches_oracle(case, inputs, *run_case(impl, case, inputs))


def test_kernel_spread_is_small_but_covers_every_feature():
  kernel_cases = [c for c in CASES if c.kernel]
  assert len(kernel_cases) <= 15
  covered = lambda attr: {getattr(c, attr) for c in kernel_cases}
  assert {1, 2, 3, 4, 8} <= {c.q_heads // c.kv_heads for c in kernel_cases}
  assert {0, 1, 5, 16, 40} <= covered("slots")
  assert {"float32", "bfloat16", "float16"} <= covered("dtype")
  assert {True, False} <= covered("causal") and {True, False} <= covered("traced")
  assert {True, False} <= covered("garbage") and {None, "packed", "shuffled"} <= covered("segments")
  assert any(c.slots > c.seq_len for c in kernel_cases) and 1 in covered("seq_len")
  assert max(covered("head_dim")) == 256 and max(covered("seq_len")) > 128
  # depth_q != q with a traced depth_len over garbage slots, and with several tiles of tokens.
  assert any(c.depth_q and c.traced and c.garbage for c in kernel_cases)
  assert any(c.depth_q and c.seq_len > 64 and c.segments for c in kernel_cases)
