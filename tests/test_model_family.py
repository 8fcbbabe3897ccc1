"""The MoDA family in the model: chunk-visible depth (`depth_chunk`) and the bounded depth window
(`depth_window`), through the linear-memory stack, both layouts, decoding and the analysis tool."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model_cases as cases
from moda_jax import ModelConfig
from moda_jax.eval import analysis
from moda_jax.model.param_layout import scan_to_loop

_ATOL, _RTOL = 1e-5, 1e-4  # float32, two evaluation orders
# Decoding sums in another order than the full forward (same tolerance as tests/test_generate.py).
_LOGIT_ATOL = 5e-5

_CHUNK = cases.config(depth_kv="attn_ffn", num_layers=4, depth_chunk=3)
_WINDOW = cases.config(depth_kv="attn_ffn", num_layers=4, depth_window=2)
_BOTH = cases.config(depth_kv="attn_ffn_extra", num_layers=4, depth_chunk=4, depth_window=3)


@pytest.mark.parametrize("cfg", [_CHUNK, _WINDOW, _BOTH], ids=["chunk3", "window2", "chunk4-window3"])
@pytest.mark.parametrize("scan", [True, False], ids=["scan", "loop"])
def test_decoding_equals_full_forward(cfg, scan):
  cfg = dataclasses.replace(cfg, scan_layers=scan)
  params = cases.random_params(dataclasses.replace(cfg, scan_layers=True))
  if not scan:
    params = scan_to_loop(params)
  full = cases.forward_fn(cfg)(params, cases.TOKENS)
  # A prefill that ends inside a chunk, then single tokens crossing chunk boundaries.
  np.testing.assert_allclose(cases.decoded_logits(cfg, params, cases.TOKENS, prefill=5), full,
                             atol=_LOGIT_ATOL, rtol=0)
  assert float(jnp.abs(full).max()) > 1.0


@pytest.mark.parametrize("cfg", [_CHUNK, _BOTH], ids=["chunk3", "chunk4-window3"])
def test_variants_change_the_model_and_a_covering_window_does_not(cfg):
  params = cases.random_params(cfg)
  own_token = dataclasses.replace(cfg, depth_chunk=1)
  got, want = cases.forward_fn(cfg)(params, cases.TOKENS), cases.forward_fn(own_token)(params, cases.TOKENS)
  # Token 0 reads only its own depth in both models (nothing earlier in its chunk or sequence).
  np.testing.assert_allclose(got[:, 0], want[:, 0], atol=_ATOL, rtol=_RTOL)
  assert float(jnp.max(jnp.abs(got - want))) > 1e-3
  # A window holding every slot reads what no window reads.
  covering = dataclasses.replace(cfg, depth_window=cfg.num_depth_slots)
  np.testing.assert_allclose(cases.forward_fn(covering)(params, cases.TOKENS),
                             cases.forward_fn(dataclasses.replace(cfg, depth_window=0))(params, cases.TOKENS),
                             atol=_ATOL, rtol=_RTOL)


def test_linear_memory_gradients_equal_naive_autodiff_for_the_variants():
  params = cases.random_params(_BOTH)
  value, grads = cases.grad_fn(_BOTH)(params, cases.TOKENS)
  want_value, want_grads = cases.naive_value_and_grad(_BOTH, params, cases.TOKENS)
  np.testing.assert_allclose(value, want_value, rtol=_RTOL)
  scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(want_grads))
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=_ATOL * scale, rtol=_RTOL),
               grads, want_grads)


def test_chunk_visible_model_is_causal():
  """d logits[b, t] / d embedding[b', s] is exactly 0 unless b' == b and s <= t: a chunk reads only
  the depth of its earlier tokens."""
  influence = cases.embedding_influence(_CHUNK, cases.random_params(_CHUNK))
  allowed = cases.causal_pattern(*cases.TOKENS.shape)
  assert np.all(influence[~allowed] == 0.0)
  assert np.all(influence[allowed] > 0.0)


def test_segments_stop_chunk_depth_at_document_boundaries():
  """With two documents packed in a row, the second's logits equal those of it alone."""
  cfg = _CHUNK
  params = cases.random_params(cfg)
  tokens = cases.TOKENS[:1]
  cut = 4  # inside the second chunk (C = 3): the chunk straddles the document boundary
  segment_ids = jnp.asarray([[1] * cut + [2] * (tokens.shape[1] - cut)], jnp.int32)
  positions = jnp.asarray([list(range(cut)) + list(range(tokens.shape[1] - cut))], jnp.int32)
  packed = cases.forward_fn(cfg)(params, tokens, segment_ids, positions)
  alone = cases.forward_fn(cfg)(params, tokens[:, cut:])
  # Chunks are counted from position 0 of the row in both calls only if the document starts a
  # chunk; here it does not, so compare the document's first token, whose chunk (positions 3..5 of
  # the row) holds the previous document's token 3, which segments must hide.
  np.testing.assert_allclose(packed[:, cut], alone[:, 0], atol=_ATOL, rtol=_RTOL)


@pytest.mark.parametrize("overrides,message", [
    (dict(depth_chunk=0), "depth_chunk=0"), (dict(depth_chunk=2.0), "depth_chunk=2.0"),
    (dict(depth_window=-1), "depth_window=-1"), (dict(depth_chunk=True), "depth_chunk=True"),
    (dict(depth_kv="none", depth_chunk=2), "depth_chunk=2 needs a depth stream"),
    (dict(depth_kv="none", depth_window=4), "depth_window=4 needs a depth stream"),
])
def test_bad_variant_settings_raise_value_error(overrides, message):
  with pytest.raises(ValueError, match=message):
    cases.config(**overrides)


def test_analysis_splits_mass_for_chunk_and_window():
  cfg = _BOTH
  params = cases.random_params(cfg)
  maps = analysis.attention_maps(cfg, params, cases.TOKENS[0])
  total = maps.sequence_NHTS.sum(-1) + maps.depth_NHTL.sum(-1)
  np.testing.assert_allclose(total, 1.0, atol=1e-5)
  assert maps.depth_share_N[0] == 0.0 and np.all(maps.depth_share_N[1:] > 0)
  # The window: layer 3 reads slots [3, 6) only (depth_len 6, W = 3), never slots 0..2.
  assert np.all(maps.depth_NHTL[3][..., :3] == 0) and np.all(maps.depth_NHTL[3][..., 3:6] > 0)


def test_from_dict_keeps_variant_fields():
  cfg = dataclasses.replace(_BOTH)
  assert ModelConfig.from_dict(cfg.to_dict()) == cfg
