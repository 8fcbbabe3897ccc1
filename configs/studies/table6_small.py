"""The paper's Table 6 (24 layers, post-norm, width 384) at small scale, on the offline study corpus.

  bash scripts/gpu_study.sh            # on the H200 (see there); or, anywhere:
  python -m moda_jax.study run configs/studies/table6_small.py --out=workdir_study/table6 [--only=attn_ffn]
  python -m moda_jax.study report workdir_study/table6 [--depth_mass]

Model: configs/width384.py (6 q / 2 kv heads of 64, G=3; SwiGLU 1536; tied embeddings; QK-norm) with
24 layers and post-norm, the 16K byte-level BPE `tokenizer_bpe16k.json` beside this file (trained on the
five train files: `python -m moda_jax.data.train_tokenizer --input='data_cache/*.train.txt.xz'
--vocab_size=16384 --out=configs/studies/tokenizer_bpe16k.json`, 30 s on a CPU, deterministic).
Entries: the OLMo2-style baseline (no depth), + depth KV (attention K/V reused), + FFN KV (the paper's
default) and the baseline with one more layer (+2.17M parameters vs FFN KV's +2.26M; the paper's Table 3
row 2 control). Every run: 1000 steps of 32 x 1024 tokens = 32.8M tokens (1.87 epochs of the 17.6M-token
corpus), the same data order for a seed in every entry, 3 seeds.

Data (/work/shared/corpus/README.md): `data_cache/<source>.train.txt.xz`, the fixed validation files
`data_cache/<source>.val.txt.xz` (loss per source and overall, every token once), documents split on
form-feed lines. `data_cache/` is ignored by git: copy the corpus there.

Recipe: the paper gives none for these runs. AdamW (0.9, 0.95), weight decay 0.1, clip 1.0, z-loss 1e-5
(base.py, OLMo2), peak LR 1e-3 (a common value for ~60M-parameter models; the 700M recipe's 3e-4 is for
a 10x larger model and 100x longer run), 100 warmup steps, cosine to 10%.
"""

from configs import width384

DATA_DIR = "data_cache"
SOURCES = ("linuxdoc", "pydoc", "javadoc", "tlx", "gcide")
TOKENIZER = "configs/studies/tokenizer_bpe16k.json"
EOS_TOKEN = "<|endoftext|>"


def base_config():
  c = width384.get_config("layers=24,norm=post,depth_kv=attn_ffn")
  c.total_steps = 1000
  c.batch_size = 32
  c.seq_len = 1024
  c.learning_rate = 1e-3
  c.warmup_steps = 100
  c.log_every = 10
  c.eval_every = 100
  c.eval_batches = 1              # > 0: every validation file is scored in full
  c.checkpoint_every = 250        # resumable on the same machine; the last step is saved too
  c.keep_checkpoints = 1
  c.progress_bar = False
  c.model.vocab_size = 16_384     # the tokenizer's ids, end token included (a multiple of 128)
  c.data.source = "files"
  c.data.path = ",".join(f"{DATA_DIR}/{s}.train.txt.xz" for s in SOURCES)
  c.data.val_path = ",".join(f"{DATA_DIR}/{s}.val.txt.xz" for s in SOURCES)
  c.data.text_separator = "formfeed"
  c.data.tokenizer = "hf"
  c.data.tokenizer_path = TOKENIZER
  c.data.eos_token = EOS_TOKEN
  c.data.pretokenize = True       # BPE per step costs the host about a step's time; once up front it does not
  return c


def get_grid():
  c = base_config()
  return {
      "base": c,
      "entries": {
          "none": {"model.depth_kv": "none"},
          "none_25L": {"model.depth_kv": "none", "model.num_layers": 25},
          "attn": {"model.depth_kv": "attn"},
          "attn_ffn": {"model.depth_kv": "attn_ffn"},
      },
      "seeds": [0, 1, 2],
      "baseline": "none",
  }
