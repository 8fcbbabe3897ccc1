"""FLOP count for MFU: matmul FLOPs must equal 2 x (the model's actual weight-matrix sizes) per token,
and the depth part must count the slots each block reads."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moda_jax import ModelConfig, Transformer
from moda_jax.model import flops


def _matmul_params(cfg: ModelConfig) -> int:
  params = nn.meta.unbox(jax.eval_shape(
      lambda: Transformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]))
  sizes = [int(np.prod(x.shape)) for path, x in jax.tree_util.tree_leaves_with_path(params)
           if str(getattr(path[-1], "key", "")) in ("kernel", "unembed")]
  return sum(sizes)


@pytest.mark.parametrize("depth_kv", ["none", "attn", "attn_ffn", "attn_ffn_extra"])
def test_matmul_flops_match_the_parameters(depth_kv):
  cfg = ModelConfig(vocab_size=50, num_layers=3, d_model=16, num_heads=4, num_kv_heads=2, head_dim=8,
                    mlp_dim=24, max_seq_len=64, depth_kv=depth_kv)
  T = 64
  parts = flops.forward_flops_per_sequence(cfg, T)
  assert parts["dense"] + parts["depth_kv_proj"] + parts["logits"] == 2 * T * _matmul_params(cfg)
  slots_read = {"none": 0, "attn": 0 + 1 + 2, "attn_ffn": 0 + 2 + 4, "attn_ffn_extra": 0 + 2 + 4}
  assert parts["depth_attention"] == 4 * cfg.num_heads * cfg.head_dim * T * slots_read[depth_kv]
  assert parts["attention"] == 3 * 4 * cfg.num_heads * cfg.head_dim * T * (T + 1) / 2
  assert flops.train_flops_per_sequence(cfg, T) == 3 * sum(parts.values())


def test_peak_flops_lookup():
  assert flops.peak_flops_per_device("NVIDIA H200") == 989e12
  assert flops.peak_flops_per_device("NVIDIA H20") == 148e12
  assert flops.peak_flops_per_device("cpu") is None
