"""A Table 6-shaped grid small enough for two CPU cores (~15 minutes): the tiny model, post-norm, byte
tokens on two sources of the study corpus, 3 seeds. A check that the tool and the comparison work end
to end, and a directional reading at toy scale; not the paper's setting (configs/studies/table6_small.py
is, on the H200).

  python -m moda_jax.study run configs/studies/cpu_tiny.py --out=workdir_study/cpu_tiny
  python -m moda_jax.study report workdir_study/cpu_tiny

Data: `data_cache/{pydoc,javadoc}.train.txt.xz` and their fixed validation files (copy the corpus into
the ignored `data_cache/`), documents split on form-feed lines, the byte tokenizer.
Every run: 400 steps of 16 x 128 tokens (0.82M tokens), the same data order for a seed in every entry,
AdamW at 3e-3 (tiny.py's), validation once at the end, every validation token once.
"""

from configs import tiny

SOURCES = ("pydoc", "javadoc")


def get_grid():
  c = tiny.get_config()
  c.total_steps = 400
  c.warmup_steps = 40
  c.eval_every = 400
  c.eval_batches = 1
  c.checkpoint_every = 200
  c.keep_checkpoints = 1
  c.progress_bar = False
  c.model.norm = "post"
  c.data.source = "files"
  c.data.path = ",".join(f"data_cache/{s}.train.txt.xz" for s in SOURCES)
  c.data.val_path = ",".join(f"data_cache/{s}.val.txt.xz" for s in SOURCES)
  c.data.text_separator = "formfeed"
  return {
      "base": c,
      "entries": {
          "none": {"model.depth_kv": "none"},
          "none_plus1": {"model.depth_kv": "none", "model.num_layers": c.model.num_layers + 1},
          "attn": {"model.depth_kv": "attn"},
          "attn_ffn": {"model.depth_kv": "attn_ffn"},
      },
      "seeds": [0, 1, 2],
      "baseline": "none",
  }
