"""Every bad input to `moda_attention` raises ValueError naming the argument (and the value, where
one is short enough to print); a known backend that cannot run here raises NotImplementedError.

Each case changes one argument of a valid call (`_valid`, itself checked to run), so a test can only
pass because that one argument was rejected; `test_edge_values_are_accepted` pins the boundary from the
other side. `gap=` marks an input api.py is known to accept although it is wrong, as a strict xfail
that fails loudly the day validation catches it (none at present).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import moda_attention

_B, _T, _HQ, _HK, _D, _L = 2, 5, 4, 2, 8, 3


def _zeros(*shape, dtype=jnp.float32):
  return jnp.zeros(shape, dtype)


def _valid(**overrides):
  kwargs = dict(q=_zeros(_B, _T, _HQ, _D), k=_zeros(_B, _T, _HK, _D), v=_zeros(_B, _T, _HK, _D),
                depth_k=_zeros(_B, _T, _L, _HK, _D), depth_v=_zeros(_B, _T, _L, _HK, _D),
                depth_len=2, segment_ids=_zeros(_B, _T, dtype=jnp.int32), implementation="reference")
  kwargs.update(overrides)
  return kwargs


def _case(name, overrides, match, gap=None):
  marks = [pytest.mark.xfail(strict=True, reason=f"api.py validation gap: {gap}")] if gap else []
  return pytest.param(overrides, match, id=name, marks=marks)


_BAD_VALUES = [
    # ranks and shapes
    _case("q_rank3", dict(q=_zeros(_B, _T, _HQ * _D)), r"q\.shape=\(2, 5, 32\)"),
    _case("k_rank5", dict(k=_zeros(_B, _T, 1, _HK, _D)), r"k\.shape"),
    _case("v_rank3", dict(v=_zeros(_B, _T, _HK * _D)), r"v\.shape"),
    _case("v_other_shape", dict(v=_zeros(_B, _T, _HK, 2 * _D)), r"v\.shape=\(2, 5, 2, 16\)"),
    _case("k_v_other_batch", dict(k=_zeros(1, _T, _HK, _D), v=_zeros(1, _T, _HK, _D)), r"k\.shape"),
    _case("k_v_other_seq_len", dict(k=_zeros(_B, 6, _HK, _D), v=_zeros(_B, 6, _HK, _D)), r"k\.shape"),
    _case("k_v_other_head_dim", dict(k=_zeros(_B, _T, _HK, 4), v=_zeros(_B, _T, _HK, 4)), r"k\.shape"),
    _case("hq_not_multiple_of_hk", dict(q=_zeros(_B, _T, 3, _D)), r"Hq=3.*Hk=2"),
    _case("zero_kv_heads", dict(k=_zeros(_B, _T, 0, _D), v=_zeros(_B, _T, 0, _D)), r"Hk=0"),
    _case("zero_tokens", dict(q=_zeros(_B, 0, _HQ, _D), k=_zeros(_B, 0, _HK, _D),
                              v=_zeros(_B, 0, _HK, _D), depth_k=None, depth_v=None, depth_len=None,
                              segment_ids=None), r"q\.shape"),
    _case("q_not_an_array", dict(q=np.zeros((_B, _T, _HQ, _D)).tolist()), r"\bq\b"),
    # dtypes
    _case("q_int32", dict(q=_zeros(_B, _T, _HQ, _D, dtype=jnp.int32)), r"q\.dtype=int32"),
    _case("q_bool", dict(q=_zeros(_B, _T, _HQ, _D, dtype=jnp.bool_)), r"q\.dtype=bool"),
    _case("all_float64", dict(q=np.zeros((_B, _T, _HQ, _D)), k=np.zeros((_B, _T, _HK, _D)),
                              v=np.zeros((_B, _T, _HK, _D)), depth_k=None, depth_v=None),
          r"q\.dtype=float64"),
    _case("k_float16", dict(k=_zeros(_B, _T, _HK, _D, dtype=jnp.float16)), r"k=float16"),
    _case("v_bfloat16", dict(v=_zeros(_B, _T, _HK, _D, dtype=jnp.bfloat16)), r"v=bfloat16"),
    _case("depth_k_bfloat16", dict(depth_k=_zeros(_B, _T, _L, _HK, _D, dtype=jnp.bfloat16)),
          r"depth_k\.dtype=bfloat16"),
    # depth_q: like q, and only with depth
    _case("depth_q_kv_heads", dict(depth_q=_zeros(_B, _T, _HK, _D)), r"depth_q\.shape=\(2, 5, 2, 8\)"),
    _case("depth_q_rank5", dict(depth_q=_zeros(_B, _T, 1, _HQ, _D)), r"depth_q\.shape"),
    _case("depth_q_bfloat16", dict(depth_q=_zeros(_B, _T, _HQ, _D, dtype=jnp.bfloat16)),
          r"depth_q\.dtype=bfloat16"),
    _case("depth_q_not_an_array", dict(depth_q=np.zeros((_B, _T, _HQ, _D)).tolist()), r"\bdepth_q\b"),
    _case("depth_q_without_depth", dict(depth_q=_zeros(_B, _T, _HQ, _D), depth_k=None, depth_v=None,
                                        depth_len=None), r"depth_q .*depth_k / depth_v are None"),
    _case("depth_v_float16", dict(depth_v=_zeros(_B, _T, _L, _HK, _D, dtype=jnp.float16)),
          r"depth_v\.dtype=float16"),
    # the depth pair
    _case("only_depth_k", dict(depth_v=None), r"depth_v"),
    _case("only_depth_v", dict(depth_k=None), r"depth_k"),
    _case("depth_k_rank4", dict(depth_k=_zeros(_B, _T, _HK, _D)), r"depth_k\.shape"),
    _case("depth_k_other_kv_heads", dict(depth_k=_zeros(_B, _T, _L, _HQ, _D)), r"depth_k\.shape"),
    _case("depth_k_other_seq_len", dict(depth_k=_zeros(_B, 4, _L, _HK, _D)), r"depth_k\.shape"),
    _case("depth_v_other_head_dim", dict(depth_v=_zeros(_B, _T, _L, _HK, 4)), r"depth_v\.shape"),
    _case("depth_pair_other_slots", dict(depth_v=_zeros(_B, _T, _L + 1, _HK, _D)), r"depth_v\.shape"),
    # depth_len
    _case("depth_len_negative", dict(depth_len=-1), r"depth_len=-1"),
    _case("depth_len_above_L", dict(depth_len=_L + 1), r"depth_len=4"),
    _case("depth_len_float", dict(depth_len=2.0), r"depth_len=2\.0"),
    _case("depth_len_bool", dict(depth_len=True), r"depth_len=True"),
    _case("depth_len_string", dict(depth_len="2"), r"depth_len"),
    _case("depth_len_vector", dict(depth_len=jnp.array([1, 2], jnp.int32)), r"depth_len"),
    _case("depth_len_float_array", dict(depth_len=jnp.float32(2)), r"depth_len"),
    _case("depth_len_bool_array", dict(depth_len=jnp.bool_(True)), r"depth_len"),
    _case("depth_len_without_depth", dict(depth_k=None, depth_v=None, depth_len=1), r"depth_len=1"),
    _case("depth_len_array_without_depth", dict(depth_k=None, depth_v=None, depth_len=jnp.int32(0)),
          r"depth_len"),
    _case("depth_len_above_empty_L", dict(depth_k=_zeros(_B, _T, 0, _HK, _D),
                                          depth_v=_zeros(_B, _T, 0, _HK, _D), depth_len=1),
          r"depth_len=1"),
    _case("depth_len_concrete_array_negative", dict(depth_len=jnp.int32(-1)), r"depth_len"),
    _case("depth_len_concrete_array_above_L", dict(depth_len=jnp.int32(_L + 1)), r"depth_len"),
    # segment_ids
    _case("segment_ids_rank1", dict(segment_ids=_zeros(_B, dtype=jnp.int32)),
          r"segment_ids\.shape=\(2,\)"),
    _case("segment_ids_other_seq_len", dict(segment_ids=_zeros(_B, _T + 1, dtype=jnp.int32)),
          r"segment_ids\.shape"),
    _case("segment_ids_float", dict(segment_ids=_zeros(_B, _T)), r"segment_ids\.dtype=float32"),
    _case("segment_ids_bool", dict(segment_ids=_zeros(_B, _T, dtype=jnp.bool_)),
          r"segment_ids\.dtype"),
    _case("segment_ids_list", dict(segment_ids=[[0] * _T] * _B), r"segment_ids"),
    # scale, causal, return_lse, implementation
    _case("scale_zero", dict(scale=0.0), r"scale=0\.0"),
    _case("scale_negative", dict(scale=-0.5), r"scale=-0\.5"),
    _case("scale_nan", dict(scale=float("nan")), r"scale=nan"),
    _case("scale_inf", dict(scale=float("inf")), r"scale=inf"),
    _case("scale_string", dict(scale="0.5"), r"scale='0\.5'"),
    _case("scale_bool", dict(scale=True), r"scale"),
    _case("causal_string", dict(causal="yes"), r"causal='yes'"),
    _case("causal_none", dict(causal=None), r"causal=None"),
    _case("return_lse_string", dict(return_lse="no"), r"return_lse"),
    _case("implementation_unknown", dict(implementation="flash"), r"implementation='flash'"),
    _case("implementation_wrong_case", dict(implementation="XLA"), r"implementation='XLA'"),
    _case("implementation_list", dict(implementation=["xla"]), r"implementation"),
    _case("implementation_mosaic_misspelt", dict(implementation="pallas_mosaic"),
          r"implementation='pallas_mosaic'.*'reference', 'xla', 'pallas_triton', 'pallas_mosaic_gpu', 'pallas_tpu'"),
    # which pairs are present: k / v both or neither (depth-only), and something to attend to
    _case("only_k", dict(v=None), r"v is None but k is given"),
    _case("only_v", dict(k=None), r"k is None but v is given"),
    _case("nothing_to_attend_to", dict(k=None, v=None, depth_k=None, depth_v=None, depth_len=None),
          r"nothing to attend to"),
    _case("depth_only_empty_depth", dict(k=None, v=None, depth_k=_zeros(_B, _T, 0, _HK, _D),
                                         depth_v=_zeros(_B, _T, 0, _HK, _D), depth_len=None),
          r"depth_k\.shape=\(2, 5, 0, 2, 8\).*nothing to attend to"),
    _case("depth_only_heads_not_dividing", dict(k=None, v=None, depth_k=_zeros(_B, _T, _L, 3, _D),
                                                depth_v=_zeros(_B, _T, _L, 3, _D)), r"Hq=4.*Hk=3"),
    _case("depth_only_depth_v_other_heads", dict(k=None, v=None, depth_v=_zeros(_B, _T, _L, 1, _D)),
          r"depth_v\.shape=\(2, 5, 3, 1, 8\)"),
    # depth_chunk
    _case("depth_chunk_zero", dict(depth_chunk=0), r"depth_chunk=0"),
    _case("depth_chunk_negative", dict(depth_chunk=-2), r"depth_chunk=-2"),
    _case("depth_chunk_float", dict(depth_chunk=2.0), r"depth_chunk=2\.0"),
    _case("depth_chunk_bool", dict(depth_chunk=True), r"depth_chunk=True"),
    _case("depth_chunk_string", dict(depth_chunk="2"), r"depth_chunk='2'"),
    _case("depth_chunk_array", dict(depth_chunk=jnp.int32(2)), r"depth_chunk"),
    _case("depth_chunk_noncausal", dict(depth_chunk=2, causal=False), r"depth_chunk=2 with causal=False"),
    _case("depth_chunk_without_depth", dict(depth_chunk=4, depth_k=None, depth_v=None, depth_len=None),
          r"depth_chunk=4 .*depth_k / depth_v are None"),
    # depth_start: like depth_len
    _case("depth_start_negative", dict(depth_start=-1), r"depth_start=-1"),
    _case("depth_start_above_L", dict(depth_start=_L + 1), r"depth_start=4.*L=3"),
    _case("depth_start_float", dict(depth_start=1.0), r"depth_start=1\.0"),
    _case("depth_start_bool", dict(depth_start=False), r"depth_start=False"),
    _case("depth_start_vector", dict(depth_start=jnp.array([0, 1], jnp.int32)), r"depth_start"),
    _case("depth_start_float_array", dict(depth_start=jnp.float32(1)), r"depth_start"),
    _case("depth_start_concrete_array_above_L", dict(depth_start=jnp.int32(_L + 1)), r"depth_start=4"),
    _case("depth_start_array_without_depth", dict(depth_k=None, depth_v=None, depth_len=None,
                                                  depth_start=jnp.int32(0)), r"depth_start"),
    _case("depth_start_without_depth", dict(depth_k=None, depth_v=None, depth_len=None, depth_start=1),
          r"depth_start=1"),
]


def test_valid_call_runs():
  # The baseline every error case perturbs: it must run, or the error tests would prove nothing.
  out = moda_attention(**_valid())
  assert out.shape == (_B, _T, _HQ, _D)


@pytest.mark.parametrize("overrides, match", _BAD_VALUES)
def test_bad_argument_raises_value_error(overrides, match):
  with pytest.raises(ValueError, match=match):
    moda_attention(**_valid(**overrides))


def test_errors_also_raise_under_jit():
  # Shapes are checked while tracing, so a jitted caller gets the same ValueError.
  bad_q = _zeros(_B, _T, 3, _D)
  with pytest.raises(ValueError, match=r"Hq=3"):
    jax.jit(lambda q: moda_attention(**_valid(q=q)))(bad_q)
  with pytest.raises(ValueError, match=r"depth_len"):
    jax.jit(lambda n: moda_attention(**_valid(depth_len=n)))(jnp.float32(1))


@pytest.mark.parametrize("name", ["pallas_tpu", "pallas_triton"])
def test_backend_for_another_platform_raises_not_implemented(name):
  # On CPU these need interpret=True; without it the dispatcher must say why it cannot run them.
  with pytest.raises(NotImplementedError, match=rf"{name}.*interpret=True"):
    moda_attention(**_valid(implementation=name))


@pytest.mark.parametrize("overrides", [
    dict(depth_chunk=1, causal=False),  # C = 1 is plain MoDA, which is defined without causality
    dict(depth_chunk=1, depth_k=None, depth_v=None, depth_len=None),
    dict(depth_start=3, depth_len=3),  # no slot visible: the sequence alone
    dict(depth_start=0, depth_len=0, depth_k=None, depth_v=None),  # 0 is in [0, L = 0]
    dict(k=None, v=None, depth_start=2, depth_len=1),  # depth-only rows that see nothing
    dict(k=None, v=None, depth_chunk=2, depth_q=_zeros(_B, _T, _HQ, _D)),
])
def test_edge_values_are_accepted(overrides):
  out = moda_attention(**_valid(**overrides))
  assert out.shape == (_B, _T, _HQ, _D)
