"""The MoDA family at the Table 6 analog's scale (configs/studies/table6_small.py: 24 layers, post-norm,
width 384, G = 3, BPE 16K on the study corpus, 32.8M tokens per run): plain MoDA (attn_ffn) against
chunk-visible depth (C = 4, 16: every attention also reads the depth of the earlier tokens of its chunk)
and a bounded depth window (W = 8, 16 of the 46 slots: each attention reads only the most recent
sublayers), 2 seeds. On the H200 every entry runs on pallas_triton (C divides the 16 tokens of its
query tile at G = 3).

  python -m moda_jax.study run configs/studies/family_small.py --out=workdir_study/family [--only=...]
  python -m moda_jax.study report workdir_study/family
"""

from configs.studies import table6_small


def get_grid():
  return {
      "base": table6_small.base_config(),
      "entries": {
          "attn_ffn": {},
          "chunk4": {"model.depth_chunk": 4},
          "chunk16": {"model.depth_chunk": 16},
          "window8": {"model.depth_window": 8},
          "window16": {"model.depth_window": 16},
      },
      "seeds": [0, 1],
      "baseline": "attn_ffn",
  }
