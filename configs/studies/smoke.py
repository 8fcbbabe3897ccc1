"""The smallest ablation grid (CPU, a couple of minutes; CI runs it): the Table 6 structure on the
micro model and the stdlib pydoc corpus (no files needed).

  python -m moda_jax.study run configs/studies/smoke.py --out=/tmp/study_smoke
  python -m moda_jax.study report /tmp/study_smoke

Entries: the OLMo2-style baseline (no depth), + depth KV (attention K/V reused), + FFN KV (the paper's
default) and the baseline with one more layer (the parameter-matched control); 2 seeds each.
"""

from configs import micro


def get_grid():
  c = micro.get_config()
  c.model.norm = "post"
  c.checkpoint_every = 6          # a mid-run checkpoint, so an interrupted run resumes
  c.keep_checkpoints = 1
  return {
      "base": c,
      "entries": {
          "none": {"model.depth_kv": "none"},
          "none_plus1": {"model.depth_kv": "none", "model.num_layers": c.model.num_layers + 1},
          "attn": {"model.depth_kv": "attn"},
          "attn_ffn": {"model.depth_kv": "attn_ffn"},
      },
      "seeds": [0, 1],
      "baseline": "none",
  }
