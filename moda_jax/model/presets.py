"""The paper's model configurations (docs/paper.md §3-4), as `ModelConfig` factories.

Keyword overrides (e.g. `depth_kv=`, `norm=`, `num_layers=`) pass through to `ModelConfig`.
"""

from __future__ import annotations

from moda_jax.model.config import ModelConfig


def olmo2_700m(**overrides) -> ModelConfig:
  """Table 3's 36-layer model: D=1024, 16 q / 8 kv heads of 64, SwiGLU 4096, vocab 100352.

  With tied embeddings the parameter counts are the paper's to 0.1M: 669.0M (none / attn),
  705.7M (attn_ffn), 742.4M (attn_ffn_extra). OLMo2 recipe: reordered norm, QK-norm (and, in training, z-loss 1e-5).
  """
  base = dict(vocab_size=100_352, num_layers=36, d_model=1024, num_heads=16, num_kv_heads=8,
              head_dim=64, mlp_dim=4096, max_seq_len=4096, depth_kv="attn_ffn", norm="reordered",
              qk_norm=True, rope_theta=500_000.0, tie_embeddings=True,
              init_std=0.02, dtype="bfloat16", param_dtype="float32", remat="full")
  return ModelConfig(**{**base, **overrides})


def table6_small(num_layers: int = 48, **overrides) -> ModelConfig:
  """Table 6's FineWeb-Edu models: width 384, 6 q / 2 kv heads of 64 (G=3), 24 or 48 layers.

  The paper's SwiGLU width, vocabulary and sequence length are not given; 1536 (4x) and the GPT-2
  vocabulary padded to 50304 reproduce its counts to within 0.3% (see tests/test_model.py).
  """
  base = dict(vocab_size=50_304, num_layers=num_layers, d_model=384, num_heads=6, num_kv_heads=2,
              head_dim=64, mlp_dim=1536, max_seq_len=1024, depth_kv="attn_ffn", norm="post",
              qk_norm=True, rope_theta=10_000.0, tie_embeddings=True, init_std=0.02)
  return ModelConfig(**{**base, **overrides})
