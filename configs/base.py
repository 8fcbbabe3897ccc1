"""Every default of a training run, once. Other configs import this and override a few fields.

Run: python train.py --config=configs/base.py --workdir=DIR [--config.<field>=<value> ...]
"""

import dataclasses

import ml_collections

from moda_jax.model.config import ModelConfig


def model_fields(**sizes) -> ml_collections.ConfigDict:
  """A ConfigDict with every ModelConfig field: `sizes` for the required ones, defaults otherwise."""
  fields = {}
  for field in dataclasses.fields(ModelConfig):
    if field.name in sizes:
      fields[field.name] = sizes.pop(field.name)
    elif field.default is None:  # optional strings (attention_impl): overridable from the command line
      fields[field.name] = ml_collections.config_dict.placeholder(str)
    elif field.default is not dataclasses.MISSING:
      fields[field.name] = field.default
  if sizes:
    raise ValueError(f"model_fields got {sorted(sizes)}: expected ModelConfig fields.")
  return ml_collections.ConfigDict(fields)


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0                      # parameters, data order and the validation split
  c.total_steps = 10_000
  c.batch_size = 32               # global rows per optimizer step (all microbatches, all hosts)
  c.seq_len = 1024
  c.grad_accum_steps = 1          # microbatches per step; the update equals the big-batch one

  # Optimizer: the OLMo2 recipe (AdamW, linear warmup, cosine to 10% of peak).
  c.learning_rate = 3e-4
  c.min_lr_ratio = 0.1
  c.warmup_steps = 500
  c.weight_decay = 0.1            # not on embeddings, norms or biases
  c.adam_b1 = 0.9
  c.adam_b2 = 0.95
  c.adam_eps = 1e-8
  c.grad_clip_norm = 1.0          # 0 disables clipping
  c.z_loss_weight = 1e-5          # weight of the log(Z)^2 term (OLMo2); 0 disables it
  c.loss_chunk_len = 0            # > 0: the loss forms the logits this many positions at a time
                                  # (moda_jax/train/loss.py), never the [B, T, V] float32 ones;
                                  # 0: dense logits (fastest while they fit)

  # Cadences (in optimizer steps).
  c.log_every = 10
  c.eval_every = 500              # 0 disables evaluation
  c.eval_batches = 4              # fixed held-out batches per evaluation (data.val_path: > 0 scores all)
  c.checkpoint_every = 500         # and at the last step; 0: never (benchmarks; SIGTERM still saves)
  c.keep_checkpoints = 3
  c.checkpoint_async = True
  c.progress_bar = True
  c.peak_flops_per_device = 0.0   # bf16 FLOP/s for MFU; 0 = look up the device kind (CPU: no MFU)

  # Device mesh: data * fsdp * tensor = number of devices; one axis may be -1 (takes the rest).
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1

  # Model: the fields of moda_jax.ModelConfig. Every default not set below is ModelConfig's own
  # (moda_jax/model/config.py), read from the dataclass, so the two can never disagree; only the
  # sizes, which ModelConfig has no defaults for, are chosen here. GPU configs add dtype="bfloat16".
  c.model = model_fields(vocab_size=257,  # the byte tokenizer's 256 bytes + end-of-document
                         num_layers=12, d_model=512, num_heads=8, num_kv_heads=4, head_dim=64,
                         mlp_dim=1536)

  # Data: see moda_jax/data/sources.py and moda_jax/data/tokenizers.py.
  c.data = ml_collections.ConfigDict()
  c.data.source = "pydoc"         # pydoc | gensim_wiki | files
  c.data.path = ""                # files: comma-separated paths or globs
  c.data.format = ""              # text | jsonl | parquet | array_record; "" = from the extension
  c.data.text_key = "text"        # jsonl / parquet / JSON ArrayRecord field with the text
  c.data.text_separator = ""      # text files: split documents on this string ("" = one per file;
                                  # "formfeed" = on lines holding only a form feed)
  c.data.tokenizer = "byte"       # byte | hf | sentencepiece
  c.data.tokenizer_path = ""      # tokenizer.json or .model file for hf / sentencepiece
  c.data.eos_token = ""           # hf: end-of-document token ("" = an extra id past the vocab)
  c.data.val_fraction = 0.05      # held-out documents
  c.data.val_path = ""            # fixed validation files (comma-separated; one set each, scored in
                                  # full, named up to the first dot); set: val_fraction is not used
  c.data.num_workers = 0          # Grain worker processes (0 = in the training process)
  c.data.pretokenize = False      # tokenize the training documents once at start (all cores), not per step
  c.data.entropy_sample_docs = 10_000  # documents used for the logged unigram entropy
  return c
