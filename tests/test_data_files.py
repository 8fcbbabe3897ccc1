"""Study data: compressed text files, form-feed documents, fixed per-file validation sets, BPE training."""

import gzip
import lzma

import numpy as np
import pytest

from configs import micro
from moda_jax.data import pipeline
from moda_jax.data import sources
from moda_jax.data import tokenizers
from moda_jax.data import train_tokenizer

DOCS = ["first page.\n\nits second paragraph", "second page", "third\fpage with a form feed inside"]


def _corpus_text(docs):
  return "".join(d + "\n\f\n" for d in docs)  # the corpus' layout: every document ends on a \f line


def _write(path, text):
  opener = {".xz": lzma.open, ".gz": gzip.open}.get(path.suffix, open)
  with opener(path, "wt", encoding="utf-8") as f:
    f.write(text)
  return path


def _files_cfg(path, **kw):
  cfg = micro.get_config()
  cfg.data.source, cfg.data.path, cfg.data.text_separator = "files", str(path), "formfeed"
  cfg.data.update(kw)
  return cfg


@pytest.mark.parametrize("name", ["c.txt", "c.txt.xz", "c.txt.gz"])
def test_formfeed_lines_split_documents_in_plain_and_compressed_files(tmp_path, name):
  path = _write(tmp_path / name, _corpus_text(DOCS))
  assert list(sources.load_documents(_files_cfg(path).data)) == DOCS  # a \f inside a line stays


def test_formfeed_split_without_a_final_separator_and_jsonl_xz(tmp_path):
  assert sources.split_text("a\n\f\nb", "formfeed") == ["a", "b"]
  assert sources.split_text("\f\na\n\f\n", "formfeed") == ["", "a", ""]  # empty ones are dropped later
  path = _write(tmp_path / "d.jsonl.xz", '{"text": "x y"}\n{"text": "z"}\n')
  assert list(sources.load_documents(_files_cfg(path, text_separator="").data)) == ["x y", "z"]


def test_compressed_parquet_is_rejected(tmp_path):
  (tmp_path / "t.parquet.gz").write_bytes(b"")
  with pytest.raises(ValueError, match="compressed"):
    sources.load_documents(_files_cfg(tmp_path / "t.parquet.gz").data)


def test_full_batches_score_every_token_once_and_agree_across_hosts():
  docs = [f"document {i} " + "word " * (3 * i) for i in range(11)]
  tok = tokenizers.ByteTokenizer()
  expected = np.concatenate([np.append(tok.encode(d), tok.eos_id)[1:] for d in docs])
  batches = pipeline.full_batches(docs, tok, seq_len=16, batch_size=4)
  targets = np.concatenate([b["targets"][b["segment_ids"] > 0] for b in batches])
  np.testing.assert_array_equal(targets, expected)  # in order, every target once, padding masked
  hosts = [pipeline.full_batches(docs, tok, seq_len=16, batch_size=4, shard=pipeline.HostShard(i, 2))
           for i in range(2)]
  assert len(hosts[0]) == len(hosts[1]) == len(batches)  # the same number of eval steps everywhere
  for whole, h0, h1 in zip(batches, *hosts):
    for k in pipeline.BATCH_KEYS:
      np.testing.assert_array_equal(np.concatenate([h0[k], h1[k]]), whole[k])


def test_val_path_gives_one_named_set_per_file_and_all_train_documents(tmp_path):
  train = _write(tmp_path / "a.train.txt.xz", _corpus_text(DOCS * 4))
  va = _write(tmp_path / "a.val.txt.xz", _corpus_text(["alpha val doc", "more alpha"]))
  vb = _write(tmp_path / "b.val.txt.gz", _corpus_text(["beta val doc " * 20]))
  cfg = _files_cfg(train, val_path=f"{va},{vb}")
  pipes = pipeline.make_pipelines(cfg)
  assert list(pipes.val_sets) == ["a", "b"] and len(pipes.train_docs) == 12  # no fraction held out
  assert pipes.val_batches == [b for bs in pipes.val_sets.values() for b in bs]
  tok = pipes.tokenizer
  for name, texts in (("a", ["alpha val doc", "more alpha"]), ("b", ["beta val doc " * 20])):
    scored = sum(int((b["segment_ids"] > 0).sum()) for b in pipes.val_sets[name])
    assert scored == sum(len(tok.encode(t)) for t in texts)  # each token predicted once (+eos - first)
  assert pipeline.validation_documents(cfg) == ["alpha val doc", "more alpha", "beta val doc " * 20]
  cfg.eval_batches = 0
  assert pipeline.make_pipelines(cfg).val_batches == []


def test_val_path_names_must_differ(tmp_path):
  a = _write(tmp_path / "x.val.txt", "one")
  b = _write(tmp_path / "x.test.txt", "two")
  with pytest.raises(ValueError, match="two files named 'x'"):
    sources.validation_sources(_files_cfg(a, val_path=f"{a},{b}").data)
  with pytest.raises(ValueError, match="data.val_path entry"):
    sources.validation_sources(_files_cfg(a, val_path=str(tmp_path / "nope.txt")).data)


def test_train_tokenizer_cli_pieces_make_a_bpe_the_pipeline_can_use(tmp_path):
  rng = np.random.default_rng(0)
  words = ["kernel", "module", "python", "function", "the", "of", "and", "returns", "value"]
  texts = [" ".join(rng.choice(words, 40)) for _ in range(50)]
  path = _write(tmp_path / "t.train.txt.xz", _corpus_text(texts))
  docs = train_tokenizer.read_documents(str(path), "formfeed")
  assert docs == texts
  sample = train_tokenizer.sample_documents(docs, 0.001, seed=1)
  assert 0 < len(sample) < len(docs) and set(sample) <= set(docs)
  tok = train_tokenizer.train_bpe(docs, 300)
  tok.save(str(tmp_path / "tok.json"))
  ours = tokenizers.make_tokenizer("hf", str(tmp_path / "tok.json"), train_tokenizer.EOS_TOKEN)
  assert ours.vocab_size == 300 and ours.eos_id < 300  # the end token is in the vocabulary
  unseen = "naïve ∑ text never seen"
  assert ours.decode(ours.encode(unseen)) == unseen  # byte-level: no unknown token
  assert len(ours.encode(texts[0])) < len(texts[0].encode()) / 2  # merges learned
  with pytest.raises(ValueError, match="vocab_size=100"):
    train_tokenizer.train_bpe(docs, 100)


def test_pretokenized_training_batches_equal_the_per_step_ones(tmp_path):
  rng = np.random.default_rng(1)
  texts = [" ".join(rng.choice(["ab", "cd", "efg", "h"], rng.integers(5, 80))) for _ in range(30)]
  train = _write(tmp_path / "p.train.txt", _corpus_text(texts))
  tok = train_tokenizer.train_bpe(texts, 270)
  tok.save(str(tmp_path / "tok.json"))
  batches = {}
  for pretokenize in (False, True):
    cfg = _files_cfg(train, tokenizer="hf", tokenizer_path=str(tmp_path / "tok.json"), pretokenize=pretokenize)
    it = iter(pipeline.make_pipelines(cfg).train)
    batches[pretokenize] = [next(it) for _ in range(5)]
  for a, b in zip(batches[False], batches[True]):
    for k in pipeline.BATCH_KEYS:
      np.testing.assert_array_equal(a[k], b[k])
