"""MoDA against the other ways of reading earlier layers (docs/peers.md), at the Table 6 scale.

  python -m moda_jax.study run configs/studies/peers_small.py --out=workdir_study/peers [--only=NAME,...]
  python -m moda_jax.study report workdir_study/peers

Model, data and recipe: exactly the table6_small grid's (configs/studies/table6_small.py: the
width-384 24-layer model of configs/width384.py, post-norm, the offline study corpus with its 16K
BPE tokenizer, 1000 steps of 32 x 1024 tokens, AdamW 1e-3): only `model.depth_kv`, `model.norm` and
the mixer fields differ between entries, and a seed gives every entry the same tokens in the same
order (config.seed sets parameters and data order).

Entries, post-norm (the recipe's placement, where MoDA does best):
  none                the OLMo2-style baseline (no depth stream, no mixer)
  moda_attn_ffn       MoDA with the paper's default FFN KV projection
  denseformer         DWA after every block (Pagliardini et al. 2024)
  value_residual      Learnable-ResFormer (arXiv 2410.17897)
  hyper_connections   dynamic HC, n = 4 streams (Zhu et al. 2025)
  mhc                 manifold-constrained HC, n = 4, Sinkhorn t_max = 20 (arXiv 2512.24880)
  attention_residuals full attention residuals (Kimi Team 2026)
  depth_attention     the attn_ffn depth stream read by its own softmax (MoDA Fig. 3c): MoDA attn_ffn
                      with sequence and depth under two softmaxes instead of one
Two seeds. The same eight under pre-norm, the placement every peer's paper uses, are their own grid:
configs/studies/peers_prenorm.py.
"""

from configs.studies import table6_small

_MIXERS = {
    "denseformer": {"model.depth_mixer": "denseformer"},
    "value_residual": {"model.depth_mixer": "value_residual"},
    "hyper_connections": {"model.depth_mixer": "hyper_connections", "model.hyper_connections_streams": 4},
    "mhc": {"model.depth_mixer": "hyper_connections", "model.hyper_connections_streams": 4,
            "model.hyper_connections_manifold": True},
    "attention_residuals": {"model.depth_mixer": "attention_residuals"},
    "depth_attention": {"model.depth_mixer": "depth_attention", "model.depth_kv": "attn_ffn"},
}


def entries(norm: str, suffix: str = "") -> dict:
  """The baseline, MoDA attn_ffn and every mixer, under `norm`, named with `suffix`."""
  named = {"none" + suffix: {"model.depth_kv": "none"},
           "moda_attn_ffn" + suffix: {"model.depth_kv": "attn_ffn"}}
  for name, overrides in _MIXERS.items():
    named[name + suffix] = {"model.depth_kv": "none", **overrides}
  return {name: {**overrides, "model.norm": norm} for name, overrides in named.items()}


def get_grid():
  return {
      "base": table6_small.base_config(),
      "entries": entries("post"),
      "seeds": [0, 1],
      "baseline": "none",
  }
