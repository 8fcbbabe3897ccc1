"""A small MoDA model that trains on CPU in about a minute on the built-in pydoc corpus.

python train.py --config=configs/tiny.py --workdir=/tmp/moda_tiny
"""

from configs import base


def get_config():
  c = base.get_config()
  c.total_steps = 200
  c.batch_size = 16
  c.seq_len = 128
  c.learning_rate = 3e-3
  c.warmup_steps = 20
  c.log_every = 10
  c.eval_every = 50
  c.eval_batches = 2
  c.checkpoint_every = 100
  c.model.num_layers = 4
  c.model.d_model = 64
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.head_dim = 16
  c.model.mlp_dim = 256
  c.model.max_seq_len = 128
  return c
