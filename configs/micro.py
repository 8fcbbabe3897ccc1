"""The smallest useful run (seconds on CPU): for tests and smoke checks, not for results."""

from configs import tiny


def get_config():
  c = tiny.get_config()
  c.total_steps = 12
  c.batch_size = 8
  c.seq_len = 32
  c.warmup_steps = 2
  c.log_every = 2
  c.eval_every = 6
  c.eval_batches = 1
  c.checkpoint_every = 4
  c.progress_bar = False
  c.model.num_layers = 2
  c.model.d_model = 32
  c.model.num_heads = 2
  c.model.num_kv_heads = 2
  c.model.head_dim = 16
  c.model.mlp_dim = 64
  c.model.max_seq_len = 32
  return c
