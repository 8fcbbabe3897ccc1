"""Shared table for the `moda_attention` operator tests: implementations, cases, inputs, tolerances.

Every implementation runs the same tests. `spread="full"` backends (cheap, always available) run every
case; `spread="kernel"` backends (Pallas in interpret mode: slow on CPU) run the cases and property
tests marked `kernel=True`, about 25 tests chosen to still cover every feature once: T = 1, odd T and
T crossing 64 / 128 blocks, G in {1, 2, 3, 4, 8}, L in {0, 1, 5, 16, 40}, L > T, D up to 256,
causal / not, three dtypes, segments, depth_len as int and traced, garbage in unwritten slots.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import zlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oracle
from pallas_kernels import moda_attention


class Impl(NamedTuple):
  name: str          # the `implementation=` string
  interpret: bool    # forwarded to moda_attention; Pallas backends run in interpret mode on CPU
  spread: str        # "full": every case; "kernel": the reduced spread


IMPLEMENTATIONS = (
    Impl("reference", interpret=False, spread="full"),
    Impl("xla", interpret=False, spread="full"),
    Impl("pallas_triton", interpret=True, spread="kernel"),
    Impl("pallas_tpu", interpret=True, spread="kernel"),
)

# Backends still being written: skipped (visibly) until their module exists, then on automatically.
_PENDING_MODULES = {"pallas_triton": "pallas_kernels.triton", "pallas_tpu": "pallas_kernels.tpu"}


def impl_marks(impl: Impl):
  module = _PENDING_MODULES.get(impl.name)
  if module is not None and importlib.util.find_spec(module) is None:
    return [pytest.mark.skip(reason=f"{module} does not exist yet; runs once it lands")]
  return []


def impl_params(kernel: bool):
  """pytest params over implementations; `kernel=False` keeps a test to the full-spread ones."""
  return [pytest.param(impl, id=impl.name, marks=impl_marks(impl))
          for impl in IMPLEMENTATIONS if kernel or impl.spread == "full"]


def call(impl: Impl, *args, **kwargs):
  return moda_attention(*args, implementation=impl.name, interpret=impl.interpret, **kwargs)


# XLA:CPU spends most of these tests compiling small graphs; LLVM's optimization level changes speed,
# not semantics (fast-math stays off), and level 0 compiles ~3x faster.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def jitted(fn):
  return jax.jit(fn, compiler_options=FAST_COMPILE)


def forward_and_grads(impl: Impl, arrays, d_out, d_lse, *, depth_len=None, depth_start=None,
                      segment_ids=None, **options):
  """(out, lse, grads) of `impl` under one jit; grads of sum(out * d_out) + sum(lse * d_lse).

  `arrays` is (q, k, v, depth_k, depth_v) with the depth pair (or k, v: depth-only) possibly None,
  optionally followed by depth_q (then passed as `depth_q=` and differentiated too). A `depth_len` or
  `depth_start` that is a jax Array becomes a traced argument of the jitted function; a Python int
  stays static.
  """
  bounds = {"depth_len": depth_len, "depth_start": depth_start}
  traced = {name: value for name, value in bounds.items() if isinstance(value, jax.Array)}
  static = {name: value for name, value in bounds.items() if name not in traced}

  @jitted
  def run(arrays, segment_ids, d_out, d_lse, traced):
    attend = lambda a: call(impl, *a[:5], segment_ids=segment_ids, return_lse=True, **traced, **static,
                            **({"depth_q": a[5]} if len(a) > 5 else {}), **options)
    (out, lse), pullback = jax.vjp(attend, arrays)
    return out, lse, pullback((d_out, d_lse))[0]

  return run(tuple(arrays), segment_ids, d_out, d_lse, traced)


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  batch: int = 1
  seq_len: int = 8
  q_heads: int = 2
  kv_heads: int = 1
  head_dim: int = 32
  slots: int = 0                  # L; 0 means depth_k = depth_v = None unless empty_depth
  depth_len: int | None = None    # None passes depth_len=None (all L slots written)
  traced: bool = False            # pass depth_len as an int32 array argument of the jitted function
  causal: bool = True
  dtype: str = "float32"
  scale: float | None = None      # None uses the default D ** -0.5
  segments: str | None = None     # None | "packed" (contiguous runs) | "shuffled" (arbitrary ids)
  garbage: bool = False           # large finite values in slots >= depth_len
  empty_depth: bool = False       # pass depth arrays with L = 0 instead of None
  kernel: bool = False            # part of the reduced spread for Pallas backends
  depth_q: bool = False           # pass a separate random depth_q (else depth is scored with q)
  depth_chunk: int | None = None  # chunk-visible depth (None: plain MoDA)
  depth_start: int | None = None  # None passes depth_start=None (slots from 0); traced with depth_len
  depth_only: bool = False        # k = v = None

  @property
  def written(self) -> int:
    return self.slots if self.depth_len is None else self.depth_len

  @property
  def first(self) -> int:
    return 0 if self.depth_start is None else self.depth_start

  @property
  def has_depth(self) -> bool:
    return self.slots > 0 or self.empty_depth


CASES = (
    Case("t1_mha_nodepth", seq_len=1, q_heads=1, kv_heads=1, kernel=True),
    Case("t1_g2_l1", batch=2, seq_len=1, head_dim=64, slots=1, kernel=True),
    Case("odd_g3_l5_garbage_small_scale", seq_len=7, q_heads=3, slots=5, depth_len=3, garbage=True,
         scale=1 / 32, kernel=True),
    Case("g4_l16_traced_noncausal_scale2", batch=2, seq_len=17, q_heads=8, kv_heads=2, head_dim=64,
         slots=16, depth_len=9, traced=True, garbage=True, causal=False, scale=2.0, kernel=True),
    Case("g8_l40_more_slots_than_tokens", seq_len=33, q_heads=8, slots=40, kernel=True),
    Case("g2_packed_segments_d128", batch=2, seq_len=67, q_heads=4, kv_heads=2, head_dim=128, slots=5,
         depth_len=5, segments="packed", kernel=True),
    Case("g1_shuffled_segments_noncausal_traced0", seq_len=67, kv_heads=2, head_dim=64, slots=16,
         depth_len=0, traced=True, garbage=True, causal=False, segments="shuffled"),
    Case("bf16_g3_l1", seq_len=45, q_heads=3, head_dim=64, slots=1, dtype="bfloat16", kernel=True),
    Case("bf16_g4_l40_segments_garbage_noncausal", seq_len=31, q_heads=4, head_dim=128, slots=40,
         depth_len=23, garbage=True, causal=False, segments="packed", dtype="bfloat16", kernel=True),
    Case("f16_g2_l5_scale_half", seq_len=19, q_heads=4, kv_heads=2, head_dim=64, slots=5,
         dtype="float16", scale=0.5, kernel=True),
    Case("d256_f32_noncausal", seq_len=9, head_dim=256, slots=5, causal=False),
    Case("d256_bf16_traced_full", seq_len=13, kv_heads=2, head_dim=256, slots=16, depth_len=16,
         traced=True, dtype="bfloat16", kernel=True),
    Case("long_f32_segments_traced", seq_len=300, q_heads=4, kv_heads=2, head_dim=64, slots=16,
         depth_len=11, traced=True, garbage=True, segments="packed"),
    Case("long_bf16_g8_nodepth_noncausal", seq_len=300, q_heads=8, slots=0, causal=False,
         dtype="bfloat16"),
    Case("empty_depth_arrays", seq_len=11, empty_depth=True),
    Case("depth_len0_int_garbage", seq_len=10, kv_heads=2, slots=5, depth_len=0, garbage=True,
         kernel=True),
    Case("d96_g3_l5", seq_len=23, q_heads=6, kv_heads=2, head_dim=96, slots=5, depth_len=4),
    Case("d40_b2_noncausal", batch=2, seq_len=5, head_dim=40, slots=1, causal=False, scale=1.0),
    Case("bf16_scale_1_32_noncausal", seq_len=29, head_dim=64, slots=5, dtype="bfloat16",
         scale=1 / 32, causal=False),
    Case("g1_l1_traced_scale2", seq_len=21, q_heads=1, slots=1, depth_len=1, traced=True, scale=2.0),
    Case("f16_shuffled_segments_noncausal", batch=2, seq_len=15, q_heads=4, kv_heads=4, slots=16,
         depth_len=7, traced=True, garbage=True, causal=False, segments="shuffled", dtype="float16"),
    Case("l40_t2_noncausal_garbage", seq_len=2, slots=40, depth_len=37, garbage=True, causal=False),
    Case("b3_g2_l1", batch=3, seq_len=8, q_heads=4, kv_heads=2, slots=1, depth_len=1),
    Case("t129_g2_l5", seq_len=129, head_dim=64, slots=5, kernel=True),
    Case("bf16_g8_shuffled_traced", batch=2, seq_len=40, q_heads=8, slots=5, depth_len=2, traced=True,
         garbage=True, segments="shuffled", dtype="bfloat16", kernel=True),
    # depth_q != q: the depth logits score a second query tensor, and its gradient is separate.
    Case("depth_q_g2_l5_traced_garbage", batch=2, seq_len=19, q_heads=4, kv_heads=2, head_dim=64,
         slots=5, depth_len=3, traced=True, garbage=True, depth_q=True, kernel=True),
    Case("depth_q_bf16_g4_l16_noncausal_segments", seq_len=70, q_heads=8, kv_heads=2, slots=16,
         depth_len=11, garbage=True, causal=False, segments="packed", dtype="bfloat16", depth_q=True,
         kernel=True),
    Case("depth_q_f16_g3_l1_d40", seq_len=9, q_heads=3, head_dim=40, slots=1, dtype="float16",
         depth_q=True),
    Case("depth_q_len0_traced", seq_len=6, slots=5, depth_len=0, traced=True, garbage=True,
         depth_q=True),
)

# (norm-relative, max-abs relative to the oracle's largest magnitude), keyed by input dtype. Observed
# with the reference and xla backends: float32 <= 2e-6 / 4e-6, bfloat16 <= 3e-3 / 5e-3, float16
# <= 6e-4 / 8e-4, i.e. >= 4x headroom where rounding of the dtype dominates.
TOLERANCES = {
    "float32": (1e-4, 2e-4),
    "bfloat16": (1e-2, 2e-2),
    "float16": (5e-3, 1e-2),
}

# Garbage magnitude: big enough that exp(scale * q . key) overflows if a backend forgets to mask
# before exponentiating, small enough to stay finite in the dtype.
_GARBAGE = {"float32": 3e4, "bfloat16": 3e4, "float16": 3e3}


class Inputs(NamedTuple):
  q: jnp.ndarray
  k: jnp.ndarray | None   # None for depth-only cases
  v: jnp.ndarray | None
  depth_k: jnp.ndarray | None
  depth_v: jnp.ndarray | None
  segment_ids: jnp.ndarray | None
  d_out: jnp.ndarray   # cotangent of out, in the input dtype
  d_lse: jnp.ndarray   # cotangent of lse, float32
  depth_q: jnp.ndarray | None = None  # only for cases with depth_q=True


def rng_for(name: str) -> np.random.Generator:
  return np.random.default_rng(zlib.crc32(name.encode()))


def segment_ids(rng, batch: int, seq_len: int, kind: str) -> np.ndarray:
  if kind == "packed":  # a few contiguous documents, as in sequence packing
    return np.sort(rng.integers(0, 4, size=(batch, seq_len)), axis=1).astype(np.int32)
  return rng.integers(0, 3, size=(batch, seq_len)).astype(np.int32)


def make_inputs(case: Case) -> Inputs:
  rng = rng_for(case.name)
  dtype = jnp.dtype(case.dtype)
  b, t, d = case.batch, case.seq_len, case.head_dim
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)
  q = normal(b, t, case.q_heads, d)
  k, v = normal(b, t, case.kv_heads, d), normal(b, t, case.kv_heads, d)
  if case.depth_only:
    k = v = None
  depth_k = depth_v = None
  if case.has_depth:
    shape = (b, t, case.slots, case.kv_heads, d)
    depth = [rng.normal(size=shape), rng.normal(size=shape)]
    if case.garbage:
      for x in depth:
        for hidden in (x[:, :, case.written:], x[:, :, :min(case.first, case.written)]):
          hidden[...] = rng.uniform(-1, 1, size=hidden.shape) * _GARBAGE[case.dtype]
    depth_k, depth_v = (jnp.asarray(x, dtype) for x in depth)
  seg = None if case.segments is None else jnp.asarray(segment_ids(rng, b, t, case.segments))
  d_out = normal(b, t, case.q_heads, d)
  d_lse = jnp.asarray(rng.normal(size=(b, t, case.q_heads)), jnp.float32)
  depth_q = normal(b, t, case.q_heads, d) if case.depth_q else None
  return Inputs(q, k, v, depth_k, depth_v, seg, d_out, d_lse, depth_q)


def to_f64(x) -> np.ndarray:
  return np.asarray(x).astype(np.float64)


def assert_close(name: str, actual, expected, dtype: str) -> None:
  """Norm-relative plus max-abs check against a float64 expectation, tolerances keyed by dtype."""
  actual, expected = to_f64(actual), to_f64(expected)
  assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
  assert np.isfinite(actual).all(), f"{name}: non-finite values"
  norm_tol, max_tol = TOLERANCES[dtype]
  scale_norm, scale_max = np.linalg.norm(expected), np.abs(expected).max(initial=0.0)
  if scale_norm == 0:
    assert not actual.any(), f"{name}: expected all zeros, max |actual| = {np.abs(actual).max()}"
    return
  error = actual - expected
  rel = np.linalg.norm(error) / scale_norm
  worst = np.abs(error).max() / scale_max
  assert rel <= norm_tol, f"{name}: norm-relative error {rel:.3g} > {norm_tol} ({dtype})"
  assert worst <= max_tol, (f"{name}: max-abs error {worst:.3g} of max |expected| > {max_tol} "
                            f"({dtype}) at {np.unravel_index(np.abs(error).argmax(), error.shape)}")


# ----------------------------------------------------------------------------------------------
# One case against the oracle: out, lse and every gradient.
# ----------------------------------------------------------------------------------------------

_GRAD_NAMES = ("q", "k", "v", "depth_k", "depth_v", "depth_q")


def oracle_options(case: Case, inputs: Inputs) -> dict:
  return dict(depth_len=case.depth_len, causal=case.causal, scale=case.scale,
              segment_ids=inputs.segment_ids, depth_q=inputs.depth_q, depth_chunk=case.depth_chunk,
              depth_start=case.depth_start)


def run_case(impl: Impl, case: Case, inputs: Inputs):
  """(out, lse, grads) of the implementation for one case, computed under jit."""
  arrays = (inputs.q, inputs.k, inputs.v, inputs.depth_k, inputs.depth_v)
  if case.depth_q:
    arrays += (inputs.depth_q,)
  depth_len = jnp.int32(case.written) if case.traced else case.depth_len
  depth_start = jnp.int32(case.first) if case.traced and case.depth_start is not None else case.depth_start
  return forward_and_grads(impl, arrays, inputs.d_out, inputs.d_lse, depth_len=depth_len,
                           depth_start=depth_start, segment_ids=inputs.segment_ids, causal=case.causal,
                           scale=case.scale, depth_chunk=case.depth_chunk)


def assert_lse_close(lse, expected, dtype: str) -> None:
  """Like assert_close, where rows that see nothing must be exactly -inf in both."""
  empty = np.isneginf(to_f64(expected))
  assert np.array_equal(np.isneginf(to_f64(lse)), empty), "lse: -inf rows differ from the oracle's"
  assert_close("lse", np.where(empty, 0.0, to_f64(lse)), np.where(empty, 0.0, expected), dtype)


def assert_matches_oracle(case: Case, inputs: Inputs, out, lse, grads) -> None:
  """out, lse and all gradients of one run against the float64 oracle on the same inputs."""
  options = oracle_options(case, inputs)
  arrays = (inputs.q, inputs.k, inputs.v, inputs.depth_k, inputs.depth_v)
  expected_out, expected_lse = oracle.forward(*arrays, **options)
  expected_grads = oracle.backward(*arrays, d_out=inputs.d_out, d_lse=inputs.d_lse, **options)

  assert out.dtype == inputs.q.dtype and out.shape == inputs.q.shape
  assert lse.dtype == jnp.float32 and lse.shape == inputs.q.shape[:3]
  assert_close("out", out, expected_out, case.dtype)
  # lse is float32 whatever the input dtype, but a backend may legitimately round scale * q to the
  # input dtype before the dot, so its tolerance follows the input dtype too.
  assert_lse_close(lse, expected_lse, case.dtype)
  primals = (*arrays, inputs.depth_q)
  assert len(grads) == (6 if case.depth_q else 5)
  for name, grad, expected, primal in zip(_GRAD_NAMES, grads, expected_grads, primals):
    if primal is None:
      assert grad is None, name
      continue
    assert grad.dtype == primal.dtype and grad.shape == primal.shape, name
    if expected is None:  # empty depth arrays: L = 0, nothing to compare
      assert grad.size == 0, name
      continue
    assert_close(f"d{name}", grad, expected, case.dtype)

  if case.has_depth and (case.written < case.slots or case.first > 0):
    # Hidden slots (holding garbage when case.garbage) must get exactly zero gradient.
    hidden = np.ones(case.slots, bool)
    hidden[case.first:case.written] = False
    for name, grad in (("ddepth_k", grads[3]), ("ddepth_v", grads[4])):
      leaked = np.asarray(grad[:, :, hidden]).astype(np.float64)
      assert not leaked.any(), f"{name}: hidden slots got gradient up to {np.abs(leaked).max()}"
