"""Trains a byte-level BPE tokenizer (GPT-2 style) offline and writes a Hugging Face `tokenizer.json`.

  python -m moda_jax.data.train_tokenizer --input=a.train.txt.xz,b.train.txt.xz --vocab_size=16384 \\
      --out=tokenizer.json [--text_separator=formfeed] [--sample_mb=0]

The files are read like `data.source="files"` (text / jsonl, `.xz` / `.gz`, documents split on
`--text_separator`). Byte-level pre-tokenization with the full 256-byte alphabet means every text
encodes, with no unknown token. The vocabulary holds `--eos_token` as a special token, so a run uses
`--config.data.tokenizer=hf --config.data.tokenizer_path=tokenizer.json --config.data.eos_token=<it>`
and `model.vocab_size = --vocab_size` exactly. `--sample_mb` trains on a seeded sample of whole
documents of about that many MB (0: everything), for corpora too large to train on in one go.
"""

from __future__ import annotations

import json
import os
import time

import ml_collections
import numpy as np

from moda_jax.data import sources

EOS_TOKEN = "<|endoftext|>"


def read_documents(paths: str, text_separator: str) -> list[str]:
  """The non-empty documents of the comma-separated `paths` (files or globs), in order."""
  cfg = ml_collections.ConfigDict({"source": "files", "path": paths, "format": "", "text_key": "text",
                                   "text_separator": text_separator})
  return list(sources.load_documents(cfg))


def sample_documents(docs: list[str], sample_mb: float, seed: int = 0) -> list[str]:
  """A seeded random subset of whole documents holding about `sample_mb` MB (10^6 bytes) of UTF-8."""
  if sample_mb < 0:
    raise ValueError(f"sample_mb={sample_mb}; expected >= 0 (0: use every document).")
  if sample_mb == 0:
    return docs
  budget, picked = sample_mb * 1e6, []
  for i in np.random.default_rng(seed).permutation(len(docs)):
    if budget <= 0:
      break
    picked.append(int(i))
    budget -= len(docs[int(i)].encode("utf-8"))
  return [docs[i] for i in sorted(picked)]


def train_bpe(docs: list[str], vocab_size: int, *, eos_token: str = EOS_TOKEN, min_frequency: int = 2):
  """A byte-level BPE `tokenizers.Tokenizer` of `vocab_size` ids (the end token included)."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top

  alphabet = pre_tokenizers.ByteLevel.alphabet()
  if vocab_size < len(alphabet) + 1:
    raise ValueError(f"vocab_size={vocab_size}; expected at least {len(alphabet) + 1} (the 256 byte "
                     "symbols and the end token).")
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                special_tokens=[eos_token], initial_alphabet=alphabet,
                                show_progress=False)
  tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
  return tok


def main(argv):
  from absl import app  # pylint: disable=g-import-not-at-top

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  f = _FLAGS
  start = time.perf_counter()
  docs = read_documents(f.input, f.text_separator)
  total_mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
  docs = sample_documents(docs, f.sample_mb, f.seed)
  used_mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
  read_s = time.perf_counter() - start
  tok = train_bpe(docs, f.vocab_size, eos_token=f.eos_token, min_frequency=f.min_frequency)
  train_s = time.perf_counter() - start - read_s
  os.makedirs(os.path.dirname(os.path.abspath(f.out)), exist_ok=True)
  tok.save(f.out)
  summary = {"out": f.out, "vocab_size": tok.get_vocab_size(), "eos_token": f.eos_token,
             "documents": len(docs), "train_mb": round(used_mb, 3), "corpus_mb": round(total_mb, 3),
             "read_s": round(read_s, 1), "train_s": round(train_s, 1),
             "bytes": os.path.getsize(f.out)}
  print(json.dumps(summary))


def cli() -> None:
  """Defines the flags and runs `main` (`python -m moda_jax.data.train_tokenizer`)."""
  global _FLAGS
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags as absl_flags  # pylint: disable=g-import-not-at-top

  absl_flags.DEFINE_string("input", None, "Comma-separated training files or globs.", required=True)
  absl_flags.DEFINE_integer("vocab_size", 16_384, "Vocabulary size, the end token included.")
  absl_flags.DEFINE_string("out", "tokenizer.json", "Where to write the tokenizer.json.")
  absl_flags.DEFINE_string("text_separator", sources.FORMFEED,
                           "Document separator of text files, as data.text_separator ('formfeed': a line "
                           "holding only a form feed; '': one document per file).")
  absl_flags.DEFINE_string("eos_token", EOS_TOKEN, "The end-of-document special token.")
  absl_flags.DEFINE_integer("min_frequency", 2, "Merges need a pair seen at least this often.")
  absl_flags.DEFINE_float("sample_mb", 0.0, "Train on a random ~N MB of whole documents (0: all).")
  absl_flags.DEFINE_integer("seed", 0, "Seed of the --sample_mb document sample.")
  _FLAGS = absl_flags.FLAGS
  app.run(main)


if __name__ == "__main__":
  cli()
