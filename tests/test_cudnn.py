"""The cudnn backend on this CPU machine: what it takes, where the dispatcher puts it, what gets logged.

cuDNN itself cannot run here. `check_supported` is checked with a pretended CUDA GPU (its compute
capability patched), and the dispatch with a pretended "gpu" platform where each backend's `attention`
is a spy that runs the backend's real `check_supported` and records its name, so the tests see which
backend `moda_attention` would run and whether `resolve_implementation` names the same one.
Numerics against the oracle on a real GPU: tests/gpu/test_cudnn_gpu.py.
"""

import jax
import jax.numpy as jnp
import pytest

from model_cases import config
from moda_jax import Transformer
from moda_jax.model import kernel_call
from pallas_kernels import IMPLEMENTATIONS, api, cudnn, gpu_capability, moda_attention, mosaic_gpu
from pallas_kernels import resolve_implementation, triton, xla


def _structs(batch=2, seq_len=64, q_heads=4, kv_heads=2, head_dim=64, dtype=jnp.bfloat16, slots=0,
             segments=False, depth_only=False, depth_q=False):
  """(q, k, v, depth_k, depth_v, segment_ids, depth_q) as ShapeDtypeStructs (None where absent)."""
  s = jax.ShapeDtypeStruct
  q = s((batch, seq_len, q_heads, head_dim), dtype)
  kv = None if depth_only else s((batch, seq_len, kv_heads, head_dim), dtype)
  depth = s((batch, seq_len, slots, kv_heads, head_dim), dtype) if slots else None
  seg = s((batch, seq_len), jnp.int32) if segments else None
  return q, kv, kv, depth, depth, seg, q if depth_q else None


def _traced(fn, arrays):
  """fn(q, k, v, depth_k, depth_v, segment_ids, depth_q) traced on abstract arrays: nothing is allocated."""
  result = []
  present = {i: a for i, a in enumerate(arrays) if a is not None}

  def traced(present):
    full = [present.get(i) for i in range(len(arrays))]
    result.append(fn(*full))
    return 0

  jax.eval_shape(traced, present)
  return result[0]


def _check(arrays, interpret=False, **options):
  def check(q, k, v, depth_k, depth_v, segment_ids, depth_q):
    inputs, spec = api.prepare(q, k, v, depth_k, depth_v, segment_ids=segment_ids, depth_q=depth_q, **options)
    cudnn.check_supported(inputs, spec, interpret)
  _traced(check, arrays)


def _resolve(arrays, **options):
  def resolve(q, k, v, depth_k, depth_v, segment_ids, depth_q):
    return resolve_implementation(q, k, v, depth_k, depth_v, segment_ids=segment_ids, depth_q=depth_q, **options)
  return _traced(resolve, arrays)


@pytest.fixture
def hopper(monkeypatch):
  monkeypatch.setattr(gpu_capability, "local", lambda: (9, 0))


@pytest.fixture
def fake_gpu(monkeypatch, hopper):
  """Platform "gpu" with spies for cudnn / pallas_mosaic_gpu / pallas_triton / xla; yields the list of
  backends that ran."""
  ran = []
  monkeypatch.setattr(api, "current_platform", lambda: "gpu")
  backends = (("cudnn", cudnn), ("pallas_mosaic_gpu", mosaic_gpu), ("pallas_triton", triton), ("xla", xla))
  for name, module in backends:
    def spy(inputs, spec, *, interpret=False, name=name, check=module.check_supported):
      check(inputs, spec, interpret)
      ran.append(name)
      return jnp.zeros_like(inputs.q), jnp.zeros(inputs.q.shape[:3], jnp.float32)
    monkeypatch.setattr(module, "attention", spy)
    if hasattr(module, "attention_with_depth"):  # the model threads its depth buffers (return_depth=True)
      monkeypatch.setattr(module, "attention_with_depth",
                          lambda inputs, spec, *, interpret=False, spy=spy: (*spy(inputs, spec, interpret=interpret),
                                                                             inputs.depth_k, inputs.depth_v))
  return ran


def test_registered_and_first_on_gpu_only():
  assert "cudnn" in IMPLEMENTATIONS
  assert api._DEFAULT_ORDER["gpu"][0] == "cudnn"
  assert all("cudnn" not in order for platform, order in api._DEFAULT_ORDER.items() if platform != "gpu")


@pytest.mark.parametrize("arrays, options", [
    (_structs(), {}),
    (_structs(dtype=jnp.float16, q_heads=2, kv_heads=2), dict(causal=False, scale=0.5)),
    (_structs(head_dim=256), {}),                                            # D 256 on Hopper
    (_structs(head_dim=40, seq_len=130), dict(causal=False)),
    (_structs(batch=8, seq_len=4096, q_heads=16, kv_heads=8), {}),          # the 700M shape, unpacked
    (_structs(segments=True), {}),                                           # packed documents (Hopper)
    (_structs(batch=8, seq_len=4096, segments=True), dict(causal=False)),
])
def test_takes_plain_attention_on_a_cuda_gpu(hopper, arrays, options):
  _check(arrays, **options)


@pytest.mark.parametrize("arrays, options, match", [
    (_structs(slots=4), {}, "depth"),
    (_structs(slots=4, depth_only=True), {}, "depth"),
    (_structs(slots=4, depth_q=True), dict(depth_len=0), "depth"),
    (_structs(dtype=jnp.float32), {}, "float32"),
    (_structs(head_dim=36), {}, "head_dim=36"),
    (_structs(head_dim=264), {}, "head_dim=264"),
    (_structs(seq_len=63), {}, "odd T=63"),
    (_structs(seq_len=1, q_heads=8, kv_heads=1), {}, "odd T=1"),           # fails on the H200 (backward)
])
def test_refuses_what_cudnn_cannot_do(hopper, arrays, options, match):
  with pytest.raises(NotImplementedError, match=match):
    _check(arrays, **options)


_ON_CPU = pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks this CPU machine's own dispatch")


@_ON_CPU
def test_refuses_interpret_mode_old_gpus_and_no_gpu(monkeypatch):
  with pytest.raises(NotImplementedError, match="no local CUDA GPU"):  # this machine
    _check(_structs())
  with pytest.raises(NotImplementedError, match="interpret"):
    _check(_structs(), interpret=True)
  monkeypatch.setattr(gpu_capability, "local", lambda: (8, 0))
  _check(_structs(head_dim=128))
  with pytest.raises(NotImplementedError, match="Hopper"):
    _check(_structs(head_dim=192))
  with pytest.raises(NotImplementedError, match="segment_ids need cuDNN's packed layout, Hopper"):
    _check(_structs(segments=True))
  monkeypatch.setattr(gpu_capability, "local", lambda: (7, 5))
  with pytest.raises(NotImplementedError, match="compute capability"):
    _check(_structs())


# (arrays, options, the backend that must run on a Hopper GPU)
_GPU_CALLS = [
    (_structs(), {}, "cudnn"),
    (_structs(), dict(causal=False), "cudnn"),
    (_structs(segments=True), {}, "cudnn"),                # packed layout (pallas_triton inside for other ids)
    (_structs(slots=4), {}, "pallas_mosaic_gpu"),
    (_structs(slots=4, segments=True, depth_q=True), {}, "pallas_mosaic_gpu"),
    (_structs(slots=4, head_dim=32), {}, "pallas_triton"),  # Mosaic's head dims are 64 and 128
    (_structs(slots=4), dict(depth_chunk=4), "pallas_triton"),
    (_structs(slots=4, depth_only=True), {}, "pallas_triton"),
    (_structs(dtype=jnp.float32), {}, "pallas_triton"),
    (_structs(seq_len=63, segments=True), {}, "pallas_mosaic_gpu"),  # odd T: not cuDNN; Mosaic pads it
    (_structs(), dict(return_lse=True), "pallas_mosaic_gpu"),  # cuDNN's lse has no gradient
    (_structs(), dict(interpret=True), "pallas_mosaic_gpu"),   # interpret mode never reaches cuDNN
]


@pytest.mark.parametrize("arrays, options, expected", _GPU_CALLS)
def test_gpu_dispatch_and_resolve_agree(fake_gpu, arrays, options, expected):
  def run(q, k, v, depth_k, depth_v, segment_ids, depth_q):
    return moda_attention(q, k, v, depth_k, depth_v, segment_ids=segment_ids, depth_q=depth_q, **options)
  _traced(run, arrays)
  assert fake_gpu == [expected]
  assert _resolve(arrays, **options) == expected


@pytest.mark.parametrize("arrays, options", [(_structs(slots=4), {}), (_structs(seq_len=63, segments=True), {}),
                                             (_structs(), dict(return_lse=True))])
def test_before_hopper_moda_calls_run_on_pallas_triton(fake_gpu, monkeypatch, arrays, options):
  monkeypatch.setattr(gpu_capability, "local", lambda: (8, 0))
  _traced(lambda q, k, v, dk, dv, seg, dq: moda_attention(q, k, v, dk, dv, segment_ids=seg, depth_q=dq, **options),
          arrays)
  assert fake_gpu == ["pallas_triton"]
  assert _resolve(arrays, **options) == "pallas_triton"
  with pytest.raises(NotImplementedError, match="Hopper"):
    _resolve(arrays, implementation="pallas_mosaic_gpu", **options)


def test_named_cudnn_raises_instead_of_falling_back(fake_gpu):
  assert _resolve(_structs(), implementation="cudnn") == "cudnn"
  with pytest.raises(NotImplementedError, match="lse"):
    _resolve(_structs(), implementation="cudnn", return_lse=True)
  with pytest.raises(NotImplementedError, match="depth"):
    _resolve(_structs(slots=4), implementation="cudnn")


@_ON_CPU
def test_on_cpu_cudnn_is_never_tried_and_resolve_names_xla(monkeypatch):
  ran = []
  real = xla.attention
  monkeypatch.setattr(xla, "attention", lambda *a, **kw: ran.append("xla") or real(*a, **kw))
  for arrays in (_structs(), _structs(slots=4, segments=True)):
    _traced(lambda q, k, v, dk, dv, seg, dq: moda_attention(q, k, v, dk, dv, segment_ids=seg), arrays)
    assert _resolve(arrays) == ran[-1] == "xla"
  with pytest.raises(NotImplementedError, match="cudnn"):
    _resolve(_structs(), implementation="cudnn")
  with pytest.raises(NotImplementedError, match="interpret"):
    _resolve(_structs(), implementation="cudnn", interpret=True)


def test_lse_gradient_raises_unless_unused():
  x = jnp.arange(3.0)
  grad = jax.grad(lambda x: jnp.sum(jnp.sin(x) + 0 * cudnn._lse_without_gradient(x).sum()))
  with pytest.raises(NotImplementedError, match="lse has no gradient"):
    grad(x)
  unused = lambda x: (jnp.sin(x), cudnn._lse_without_gradient(jnp.cos(x)))[0].sum()
  assert jnp.allclose(jax.grad(unused)(x), jnp.cos(x))
  assert jnp.allclose(jax.jit(jax.grad(lambda x: jax.checkpoint(unused)(x)))(x), jnp.cos(x))


@pytest.mark.parametrize("depth_kv, gpu, packed, expected", [
    pytest.param("none", False, True, {"sequence": {"xla"}}, marks=_ON_CPU),
    pytest.param("attn_ffn", False, True, {"sequence+depth": {"xla"}}, marks=_ON_CPU),
    ("none", True, False, {"sequence": {"cudnn"}}),
    ("none", True, True, {"sequence": {"cudnn"}}),          # packed documents: segment_ids
    ("attn_ffn", True, True, {"sequence+depth": {"pallas_mosaic_gpu"}}),  # Hopper
])
def test_model_records_the_kernels_it_is_traced_on(request, depth_kv, gpu, packed, expected):
  ran = request.getfixturevalue("fake_gpu") if gpu else None
  cfg = config(depth_kv=depth_kv, attention_impl=None, dtype="bfloat16", head_dim=64)
  tokens = jax.ShapeDtypeStruct((2, 12), jnp.int32)
  params = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), tokens)["params"]
  segments = lambda t: jnp.ones_like(t) if packed else None
  with kernel_call.recording_implementations() as used:
    jax.eval_shape(lambda p, t: Transformer(cfg).apply({"params": p}, t, segment_ids=segments(t)), params,
                   tokens)
  assert used == expected
  if gpu:  # what was recorded ran (the blocks' one-token parameter-creating call, not recorded, may run another)
    assert set.union(*expected.values()) <= set(ran)
  kind, (name,) = next(iter(expected.items()))
  assert kernel_call.describe_implementations(used) == f"attention kernels: {kind} -> {name}"
