"""The paper's width-384 models (Table 6; docs/paper.md §4): 6 q / 2 kv heads of 64 (G=3), SwiGLU
1536, tied ~50K vocab (GPT-2 style, 50304 padded). The argument sets layers, norm and depth variant:

  --config=configs/width384.py:layers=48,norm=pre,depth_kv=none        OLMo2 48L pre-norm
  --config=configs/width384.py:layers=48,norm=post,depth_kv=attn       + depth KV
  --config=configs/width384.py:layers=24,norm=post,depth_kv=attn_ffn   + FFN KV (default args)

The paper gives no training recipe for these runs; the OLMo2 recipe of base.py is used, and
`--config.data.tokenizer=hf --config.data.tokenizer_path=.../tokenizer.json` selects a GPT-2 style
tokenizer (the default byte tokenizer uses 257 of the 50304 ids).
"""

from configs import base

_ARGS = {"layers": int, "norm": str, "depth_kv": str}


def get_config(arg: str = "layers=24,norm=post,depth_kv=attn_ffn"):
  settings = {"layers": 24, "norm": "post", "depth_kv": "attn_ffn"}
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in _ARGS:
      raise ValueError(f"width384 config argument {item!r}: expected keys {sorted(_ARGS)}.")
    settings[key] = _ARGS[key](value)
  c = base.get_config()
  c.seq_len = 1024
  c.model.dtype = "bfloat16"     # compute; parameters stay float32 (master copy)
  c.model.vocab_size = 50_304
  c.model.tie_embeddings = True
  c.model.num_layers = settings["layers"]
  c.model.d_model = 384
  c.model.num_heads = 6
  c.model.num_kv_heads = 2
  c.model.head_dim = 64
  c.model.mlp_dim = 1536
  c.model.max_seq_len = 1024
  c.model.norm = settings["norm"]
  c.model.depth_kv = settings["depth_kv"]
  return c
