"""A 14.7B-parameter MoDA model for fully sharded training: its float32 parameters plus AdamW's two
moments take 165 GiB, more than one H200 (140 GiB) holds, so it trains only with the parameters,
gradients and optimizer state sharded over the "fsdp" mesh axis (issue 8's must-show).

  python train.py --config=configs/moda_15b_fsdp.py --workdir=DIR      # FSDP over every device

Shape: d_model 5120, 48 layers, 40 q / 8 kv heads of 128, SwiGLU 13824, vocab 100352, attn_ffn
depth (95 depth slots). One 4096-token row per device; set --config.batch_size to the device count.
"""

from configs import base


def get_config():
  c = base.get_config()
  c.seq_len = 4096
  c.batch_size = 4                # one row per GPU on 4 GPUs
  c.total_steps = 20_000
  c.learning_rate = 1.5e-4        # wide models need a gentler start than the 700M's 3e-4
  c.warmup_steps = 2000
  c.eval_every = 0
  c.checkpoint_every = 500
  c.mesh.data = 1
  c.mesh.fsdp = -1                # every device
  c.model.dtype = "bfloat16"     # compute; parameters stay float32 (master copy)
  c.model.vocab_size = 100_352
  c.model.num_layers = 48
  c.model.d_model = 5120
  c.model.num_heads = 40
  c.model.num_kv_heads = 8
  c.model.head_dim = 128
  c.model.mlp_dim = 13_824
  c.model.max_seq_len = 4096
  c.model.remat = "full"
  return c
