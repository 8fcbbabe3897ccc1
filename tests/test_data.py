"""Data pipeline: sources, tokenizers, packing invariants, determinism, host sharding, resume."""

import json

import grain
import numpy as np
import pytest

from configs import micro
from moda_jax.data import pipeline
from moda_jax.data import sources
from moda_jax.data import tokenizers


def _docs(n=40, seed=0):
  rng = np.random.default_rng(seed)
  words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
  return sources.TextDocuments(
      [f"doc{i}: " + " ".join(rng.choice(words, size=rng.integers(3, 60))) for i in range(n)], "synthetic")


def _collect(ds, num_batches):
  it = iter(ds)
  return [next(it) for _ in range(num_batches)]


def test_byte_tokenizer_round_trips_utf8():
  tok = tokenizers.ByteTokenizer()
  text = "naïve café – λ"
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and ids.max() < 256
  assert tok.decode(ids) == text


def test_packing_keeps_documents_apart_and_targets_shifted():
  """Reconstruct every document from the packed rows: inputs/targets are next-token pairs *within*
  one document, segments never mix documents, positions count from 0 in every piece."""
  docs = _docs()
  tok = tokenizers.ByteTokenizer()
  batches = _collect(pipeline.packed_dataset(docs, tok, seq_len=48, batch_size=4, seed=None), 6)
  pieces = []
  for b in batches:
    assert set(b) == set(pipeline.BATCH_KEYS)
    for row in range(4):
      seg = b["segment_ids"][row]
      for s in np.unique(seg[seg > 0]):
        idx = np.flatnonzero(seg == s)
        assert np.array_equal(idx, np.arange(idx[0], idx[-1] + 1)), "a segment must be contiguous"
        np.testing.assert_array_equal(b["positions"][row, idx], np.arange(len(idx)))
        np.testing.assert_array_equal(b["inputs"][row, idx[1:]], b["targets"][row, idx[:-1]])
        pieces.append((b["inputs"][row, idx], b["targets"][row, idx]))
  # Unordered (seed=None) packing walks the documents in order: the stream of pieces is doc0, doc1...
  stream_in = np.concatenate([p[0] for p in pieces])
  stream_tg = np.concatenate([p[1] for p in pieces])
  expected = np.concatenate([np.append(tok.encode(d), tok.eos_id) for d in docs])
  n = len(stream_in)
  # Inputs are each document's tokens minus its last (the end id); targets minus its first.
  exp_in = np.concatenate([np.append(tok.encode(d), tok.eos_id)[:-1] for d in docs])[:n]
  exp_tg = np.concatenate([np.append(tok.encode(d), tok.eos_id)[1:] for d in docs])[:n]
  np.testing.assert_array_equal(stream_in, exp_in)
  np.testing.assert_array_equal(stream_tg, exp_tg)
  assert n > 0.9 * 6 * 4 * 48 and expected.size > n


def test_shuffle_is_deterministic_by_seed():
  docs, tok = _docs(), tokenizers.ByteTokenizer()
  run = lambda seed: _collect(pipeline.packed_dataset(docs, tok, seq_len=32, batch_size=2, seed=seed), 3)
  a, b, c = run(1), run(1), run(2)
  assert all(np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, b))
  assert not all(np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, c))


def test_host_shards_are_disjoint_and_cover_the_corpus():
  docs, tok = _docs(n=9), tokenizers.ByteTokenizer()
  seen = []
  for index in range(3):
    ds = pipeline.packed_dataset(docs, tok, seq_len=4096, batch_size=1, seed=None,
                             shard=pipeline.HostShard(index, 3))
    row = next(iter(ds))
    text = tok.decode(row["inputs"][0][row["segment_ids"][0] > 0])
    seen.append({i for i in range(9) if f"doc{i}:" in text})
  assert seen == [{0, 3, 6}, {1, 4, 7}, {2, 5, 8}]


def test_validation_split_is_disjoint_and_seeded():
  train, val = pipeline.split_documents(100, 0.1, seed=3)
  assert len(val) == 10 and len(train) == 90 and not set(train) & set(val)
  assert np.array_equal(val, pipeline.split_documents(100, 0.1, seed=3)[1])
  assert not np.array_equal(val, pipeline.split_documents(100, 0.1, seed=4)[1])


def test_iterator_state_resumes_exactly():
  ds = pipeline.packed_dataset(_docs(), tokenizers.ByteTokenizer(), seq_len=32, batch_size=2, seed=5)
  it = iter(ds)
  for _ in range(7):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  resumed = iter(ds)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for k in pipeline.BATCH_KEYS:
      np.testing.assert_array_equal(got[k], want[k])


def test_pydoc_corpus_pipeline_from_config():
  cfg = micro.get_config()
  pipes = pipeline.make_pipelines(cfg)
  batch = next(iter(pipes.train))
  assert batch["inputs"].shape == (cfg.batch_size, cfg.seq_len)
  assert len(pipes.val_batches) == cfg.eval_batches
  assert 3.0 < pipeline.unigram_entropy(pipes.train_docs, pipes.tokenizer) < 3.6  # English bytes


def _files_cfg(path, **kw):
  cfg = micro.get_config()
  cfg.data.source = "files"
  cfg.data.path = str(path)
  cfg.data.update(kw)
  return cfg.data


def test_text_jsonl_parquet_and_array_record_files(tmp_path):
  texts = ["first document", "second one", "third"]
  (tmp_path / "a.txt").write_text("@@".join(texts))
  (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"body": t}) for t in texts) + "\n")
  assert list(sources.load_documents(_files_cfg(tmp_path / "a.txt", text_separator="@@"))) == texts
  assert list(sources.load_documents(_files_cfg(tmp_path / "b.jsonl", text_key="body"))) == texts
  pq = pytest.importorskip("pyarrow.parquet")
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  pq.write_table(pa.table({"text": texts}), tmp_path / "c.parquet")
  assert list(sources.load_documents(_files_cfg(tmp_path / "c.parquet"))) == texts
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  writer = array_record_module.ArrayRecordWriter(str(tmp_path / "d.array_record"), "group_size:1")
  for t in texts:
    writer.write(json.dumps({"text": t}).encode() if t != "third" else t.encode())
  writer.close()
  assert list(sources.load_documents(_files_cfg(tmp_path / "d.array_record"))) == texts


def test_bad_paths_and_empty_corpora_raise_value_error(tmp_path):
  with pytest.raises(ValueError, match="matches no file"):
    sources.load_documents(_files_cfg(tmp_path / "missing.txt"))
  (tmp_path / "empty.jsonl").write_text("\n")
  with pytest.raises(ValueError, match="no non-empty documents"):
    sources.load_documents(_files_cfg(tmp_path / "empty.jsonl"))
  (tmp_path / "x.bin").write_text("x")
  with pytest.raises(ValueError, match="data.format"):
    sources.load_documents(_files_cfg(tmp_path / "x.bin"))
  with pytest.raises(ValueError, match="data.tokenizer_path"):
    tokenizers.make_tokenizer("hf", str(tmp_path / "nope.json"))
  with pytest.raises(ValueError, match="data.source"):
    sources.load_documents(_files_cfg(tmp_path, source="web"))


def test_hf_tokenizer_json_by_path(tmp_path):
  hf = pytest.importorskip("tokenizers")
  trainer = hf.trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"])
  tok = hf.Tokenizer(hf.models.BPE())
  tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel()
  tok.decoder = hf.decoders.ByteLevel()
  tok.train_from_iterator(list(_docs()), trainer)
  tok.save(str(tmp_path / "tokenizer.json"))
  ours = tokenizers.make_tokenizer("hf", str(tmp_path / "tokenizer.json"), eos_token="<eos>")
  assert ours.eos_id == tok.token_to_id("<eos>") and ours.vocab_size == tok.get_vocab_size()
  ids = ours.encode("alpha beta gamma")
  assert ids.dtype == np.int32 and ours.decode(ids).strip() == "alpha beta gamma"
  batch = next(iter(pipeline.packed_dataset(_docs(), ours, seq_len=16, batch_size=2, seed=0)))
  assert batch["inputs"].max() < ours.vocab_size


def test_sentencepiece_model_by_path(tmp_path):
  spm = pytest.importorskip("sentencepiece")
  (tmp_path / "corpus.txt").write_text("\n".join(_docs(200)))
  spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "sp"),
                                 vocab_size=40, minloglevel=2)
  ours = tokenizers.make_tokenizer("sentencepiece", str(tmp_path / "sp.model"))
  ids = ours.encode("alpha beta")
  assert ours.decode(ids) == "alpha beta" and 0 <= ours.eos_id < ours.vocab_size


def test_grain_checkpoint_handler_round_trip(tmp_path):
  """The iterator state survives Orbax's Grain handler (what the trainer's checkpoint uses)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  ds = pipeline.packed_dataset(_docs(), tokenizers.ByteTokenizer(), seq_len=32, batch_size=2, seed=1)
  it = iter(ds)
  next(it), next(it)
  with ocp.CheckpointManager(tmp_path) as mngr:
    mngr.save(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    want = next(it)
    fresh = iter(ds)
    mngr.restore(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  np.testing.assert_array_equal(next(fresh)["inputs"], want["inputs"])
