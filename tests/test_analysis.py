"""Attention maps (sequence vs depth split) and their figures."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import pytest

from moda_jax import ModelConfig, Transformer
from moda_jax.eval import analysis

matplotlib.use("Agg")

T = 12


def _params(cfg):
  tokens = jnp.zeros((1, 4), jnp.int32)
  return nn.meta.unbox(jax.jit(Transformer(cfg).init)(jax.random.PRNGKey(0), tokens)["params"])


@pytest.fixture(scope="module")
def model_and_maps():
  cfg = ModelConfig(vocab_size=64, num_layers=3, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
                    mlp_dim=48, max_seq_len=16, init_std=0.3, attention_impl="reference")
  params = _params(cfg)
  tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (T,), 0, 64))
  return cfg, params, tokens, analysis.attention_maps(cfg, params, tokens)


def test_maps_are_probabilities_with_the_models_masks(model_and_maps):
  cfg, _, _, maps = model_and_maps
  n, h, slots = cfg.num_layers, cfg.num_heads, cfg.num_depth_slots
  assert maps.sequence_NHTS.shape == (n, h, T, T) and maps.depth_NHTL.shape == (n, h, T, slots)
  np.testing.assert_allclose(maps.sequence_NHTS.sum(-1) + maps.depth_NHTL.sum(-1), 1.0, atol=1e-5)
  assert np.all(maps.sequence_NHTS[..., np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]] == 0)
  np.testing.assert_array_equal(maps.depth_len_N, [0, 2, 4])  # attn_ffn: 2 slots per earlier block
  for layer, written in enumerate(maps.depth_len_N):
    assert np.all(maps.depth_NHTL[layer, ..., written:] == 0)
    if written:  # random weights: every written slot gets some mass
      assert np.all(maps.depth_NHTL[layer, ..., :written] > 0)
  assert maps.depth_share_N[0] == 0 and np.all(maps.depth_share_N[1:] > 0)
  np.testing.assert_allclose(maps.depth_share_N, maps.depth_NHTL.sum(-1).mean((1, 2)))


def test_maps_do_not_depend_on_later_tokens(model_and_maps):
  """Causality of the whole stack: the maps of a prefix are the prefix of the maps."""
  cfg, params, tokens, maps = model_and_maps
  prefix = analysis.attention_maps(cfg, params, tokens[:7])
  np.testing.assert_allclose(prefix.sequence_NHTS, maps.sequence_NHTS[:, :, :7, :7], atol=1e-6)
  np.testing.assert_allclose(prefix.depth_NHTL, maps.depth_NHTL[:, :, :7], atol=1e-6)


def test_without_depth_every_row_is_all_sequence():
  cfg = ModelConfig(vocab_size=64, num_layers=1, d_model=16, num_heads=2, num_kv_heads=2, head_dim=8,
                    mlp_dim=16, max_seq_len=16, depth_kv="none", attention_impl="reference")
  params = _params(cfg)
  maps = analysis.attention_maps(cfg, params, np.arange(6))
  assert maps.depth_NHTL.shape[-1] == 0
  np.testing.assert_allclose(maps.sequence_NHTS.sum(-1), 1.0, atol=1e-6)
  np.testing.assert_array_equal(maps.depth_share_N, [0.0])


def test_figures_are_written(model_and_maps, tmp_path):
  _, _, _, maps = model_and_maps
  heat, share = tmp_path / "heat.png", tmp_path / "share.png"
  analysis.plot_heatmaps(maps, path=str(heat))
  analysis.plot_heatmaps(maps, layers=[2], head=1)
  analysis.plot_depth_share(maps, path=str(share))
  for path, min_height in ((heat, 600), (share, 300)):
    image = matplotlib.image.imread(path)
    assert image.shape[0] >= min_height and image.shape[1] >= 600
    assert image[..., :3].std() > 0.05  # not a blank canvas


def test_bad_token_count_raises(model_and_maps):
  cfg, params, _, _ = model_and_maps
  with pytest.raises(ValueError, match="max_seq_len"):
    analysis.attention_maps(cfg, params, np.zeros(17, np.int32))
