"""The paper's 700M model (Table 3; docs/paper.md §3): D=1024, 36 layers, 16 q / 8 kv heads of 64,
SwiGLU 4096, OLMo2 reordered norm and recipe. The argument picks the depth-KV variant:

  --config=configs/moda_700m.py              attn_ffn (the paper's default, row 4)
  --config=configs/moda_700m.py:attn         reuse attention K/V as depth K/V (row 3)
  --config=configs/moda_700m.py:attn_ffn_extra   + separate attention depth K/V projection (row 5)
  --config=configs/moda_700m.py:none         the OLMo2 baseline (row 1; see baseline_700m.py)

The batch is the paper's global 1024 x 4096 tokens, as 128 microbatches of 8; on one GPU override
`--config.batch_size=8 --config.grad_accum_steps=1` (see BENCHMARKS.md for the throughput command).
The loss runs in chunks of 512 positions: dense float32 logits of 8 x 4096 x 100352 are 13 GB per copy,
a chunk's 1.6 GB (`--config.loss_chunk_len=0` for the dense loss).
"""

from configs import base


def get_config(depth_kv: str = "attn_ffn"):
  c = base.get_config()
  c.seq_len = 4096
  c.batch_size = 1024
  c.grad_accum_steps = 128
  c.total_steps = 95_400          # ~400 B tokens
  c.learning_rate = 3e-4
  c.warmup_steps = 2000
  c.eval_every = 1000
  c.checkpoint_every = 1000
  c.loss_chunk_len = 512
  c.model.dtype = "bfloat16"     # compute; parameters stay float32 (master copy)
  c.model.vocab_size = 100_352    # OLMo2's tokenizer (padded); byte data uses only 257 of them
  c.model.num_layers = 36
  c.model.d_model = 1024
  c.model.num_heads = 16
  c.model.num_kv_heads = 8
  c.model.head_dim = 64
  c.model.mlp_dim = 4096
  c.model.max_seq_len = 4096
  c.model.rope_theta = 500_000.0   # OLMo2's, as in moda_jax.model.presets.olmo2_700m
  c.model.depth_kv = depth_kv or "attn_ffn"
  return c
