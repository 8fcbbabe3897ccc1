"""Grain input pipeline: documents -> tokens -> packed fixed-length sequences -> per-host batches.

Each document becomes `tokens + [eos]`; its next-token pairs (`inputs = t[:-1]`, `targets = t[1:]`) are
formed *inside* the document, then packed by concat-then-split into rows of `seq_len`. Packing adds
`segment_ids` (1, 2, ... per document piece in a row, 0 for padding) and per-piece `positions`, so the
model can keep attention within a document and the loss never predicts across a boundary. A document
longer than a row continues in the next row as a new segment.

The held-out validation documents are chosen by a seeded permutation before anything else, so they
never appear in training; or, with `data.val_path`, they are fixed files (one validation set per file,
every token of each scored once, `full_batches`) and every `data.path` document trains. Each host
reads a disjoint slice (`process_index::process_count`) of the documents and produces `global_batch_size / process_count` rows per step.
"""

import dataclasses
from collections.abc import Sequence

import grain
import numpy as np

from moda_jax.data import sources
from moda_jax.data import tokenizers

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions")


@dataclasses.dataclass(frozen=True)
class HostShard:
  index: int = 0
  count: int = 1


class _Subset(Sequence):
  """Documents at fixed indices; a stable repr keeps Grain checkpoints comparable."""

  def __init__(self, docs: Sequence[str], indices: np.ndarray, name: str):
    self._docs = docs
    self._indices = indices
    self._name = name

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, i):
    return self._docs[int(self._indices[i])]

  def __repr__(self) -> str:
    return f"_Subset({self._name}, n={len(self._indices)}, of={self._docs!r})"


class _TokenizedDocuments(Sequence):
  """Documents tokenized once up front (`data.pretokenize`): packing then only copies ids."""

  def __init__(self, docs: Sequence[str], tokenizer: tokenizers.Tokenizer):
    self._ids = tokenizers.encode_all(tokenizer, docs)
    self._name = f"{docs!r} by {tokenizer!r}"

  def __len__(self) -> int:
    return len(self._ids)

  def __getitem__(self, i):
    return self._ids[i]

  def __repr__(self) -> str:
    return f"_TokenizedDocuments({self._name})"


def split_documents(num_docs: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Seeded disjoint (train, val) document indices; val gets round(fraction * n), at least 1 if > 0."""
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f"data.val_fraction={val_fraction}; expected 0 <= fraction < 1.")
  order = np.random.default_rng(seed).permutation(num_docs)
  num_val = 0 if val_fraction == 0 else max(1, round(val_fraction * num_docs))
  if num_val >= num_docs:
    raise ValueError(f"the corpus has {num_docs} documents, too few for data.val_fraction={val_fraction} "
                     "to leave any for training.")
  return np.sort(order[num_val:]), np.sort(order[:num_val])


def _next_token_pairs(tokenizer: tokenizers.Tokenizer):
  def fn(doc) -> dict[str, np.ndarray]:  # a text, or its ids (pretokenized)
    ids = doc if isinstance(doc, np.ndarray) else tokenizer.encode(doc)
    tokens = np.append(ids, np.int32(tokenizer.eos_id)).astype(np.int32)
    return {"inputs": tokens[:-1], "targets": tokens[1:]}
  return fn


def _rename_packed(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {"inputs": row["inputs"], "targets": row["targets"],
          "segment_ids": row["inputs_segment_ids"], "positions": row["inputs_positions"]}


def _host_batch_size(global_batch_size: int, shard: HostShard) -> int:
  if global_batch_size % shard.count:
    raise ValueError(f"batch_size={global_batch_size} is not divisible by the number of processes "
                     f"({shard.count}).")
  return global_batch_size // shard.count


def _read_options(docs: Sequence) -> grain.ReadOptions | None:
  """Grain's prefetch threads overlap slow reads (ArrayRecord files); for documents already in memory
  there is nothing to overlap, and their polling costs the host more than the packing itself."""
  inner = docs._docs if isinstance(docs, _Subset) else docs  # pylint: disable=protected-access
  return None if isinstance(inner, sources.ArrayRecordDocuments) else grain.ReadOptions(num_threads=0)


def packed_dataset(docs: Sequence[str], tokenizer: tokenizers.Tokenizer, *, seq_len: int,
                   batch_size: int, seed: int | None, shard: HostShard = HostShard(),
                   num_workers: int = 0) -> grain.IterDataset:
  """Batches of packed rows from this host's slice of `docs`; shuffled by `seed` (None: in order)."""
  if seq_len < 1:
    raise ValueError(f"seq_len={seq_len}; expected a positive length.")
  ds = grain.MapDataset.source(docs)[shard.index::shard.count]
  if len(ds) == 0:
    raise ValueError(f"process {shard.index} of {shard.count} gets no documents: the corpus has only "
                     f"{len(docs)}.")
  if seed is not None:
    ds = ds.shuffle(seed=seed)  # repeat() re-seeds the shuffle every epoch.
  ds = ds.repeat(None).map(_next_token_pairs(tokenizer)).to_iter_dataset(_read_options(docs))
  ds = grain.experimental.ConcatThenSplitIterDataset(
      ds, length_struct={"inputs": seq_len, "targets": seq_len})
  ds = ds.map(_rename_packed).batch(batch_size, drop_remainder=True)
  if num_workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return ds


def full_batches(docs: Sequence[str], tokenizer: tokenizers.Tokenizer, *, seq_len: int,
                 batch_size: int, shard: HostShard = HostShard()) -> list[dict[str, np.ndarray]]:
  """Every token of `docs` once: packed in order into rows of `seq_len`, batched by `batch_size`
  (global rows), the last batch padded with empty rows (segment id 0, which the loss ignores).
  Every host forms the same global batches and keeps its rows, so all hosts see as many batches."""
  host_batch = _host_batch_size(batch_size, shard)
  ds = grain.MapDataset.source(docs).map(_next_token_pairs(tokenizer)).to_iter_dataset()
  ds = grain.experimental.ConcatThenSplitIterDataset(
      ds, length_struct={"inputs": seq_len, "targets": seq_len})  # finite: the last row is flushed
  rows = [_rename_packed(r) for r in ds]
  rows += [{k: np.zeros(seq_len, np.int32) for k in BATCH_KEYS}] * (-len(rows) % batch_size)
  mine = [rows[i + shard.index * host_batch:i + (shard.index + 1) * host_batch]
          for i in range(0, len(rows), batch_size)]
  return [{k: np.stack([r[k] for r in batch]).astype(np.int32) for k in BATCH_KEYS} for batch in mine]


@dataclasses.dataclass
class DataPipelines:
  tokenizer: tokenizers.Tokenizer
  train: grain.IterDataset          # infinite; iterate with iter() and checkpoint the iterator
  val_batches: list[dict[str, np.ndarray]]  # fixed held-out batches (this host's rows), [] if none
  train_docs: Sequence[str]
  # data.val_path: {file's source name: its batches}; val_batches is then all of them in this order.
  val_sets: dict[str, list[dict[str, np.ndarray]]] = dataclasses.field(default_factory=dict)


def make_pipelines(config, shard: HostShard = HostShard()) -> DataPipelines:
  """Builds the training dataset and the fixed validation batches from the run config."""
  data_cfg = config.data
  tokenizer = tokenizers.make_tokenizer(data_cfg.tokenizer, data_cfg.tokenizer_path, data_cfg.eos_token)
  docs = sources.load_documents(data_cfg)
  host_batch = _host_batch_size(config.batch_size, shard)
  val_files = sources.validation_sources(data_cfg)
  pretokenize = data_cfg.get("pretokenize", False)
  if val_files:  # fixed validation files: all of data.path trains, data.val_fraction is not used
    train = packed_dataset(_TokenizedDocuments(docs, tokenizer) if pretokenize else docs, tokenizer,
                           seq_len=config.seq_len, batch_size=host_batch, seed=config.seed, shard=shard,
                           num_workers=data_cfg.num_workers)
    val_sets = {}
    if config.eval_batches > 0:
      val_sets = {name: full_batches(val_docs, tokenizer, seq_len=config.seq_len,
                                     batch_size=config.batch_size, shard=shard)
                  for name, val_docs in val_files.items()}
    return DataPipelines(tokenizer, train, [b for bs in val_sets.values() for b in bs], docs, val_sets)
  train_idx, val_idx = split_documents(len(docs), data_cfg.val_fraction, config.seed)
  train_docs = _Subset(docs, train_idx, "train")
  train = packed_dataset(_TokenizedDocuments(train_docs, tokenizer) if pretokenize else train_docs,
                         tokenizer, seq_len=config.seq_len, batch_size=host_batch, seed=config.seed,
                         shard=shard, num_workers=data_cfg.num_workers)
  val_batches = []
  if len(val_idx) and config.eval_batches > 0:
    val = packed_dataset(_Subset(docs, val_idx, "val"), tokenizer, seq_len=config.seq_len,
                         batch_size=host_batch, seed=None, shard=HostShard(
                             shard.index % len(val_idx), min(shard.count, len(val_idx))))
    val_iter = iter(val)
    val_batches = [next(val_iter) for _ in range(config.eval_batches)]
  return DataPipelines(tokenizer, train, val_batches, train_docs)


def validation_documents(config) -> list[str]:
  """The run's held-out documents: the `data.val_path` files' in order, else the seeded split's."""
  val_files = sources.validation_sources(config.data)
  if val_files:
    return [d for docs in val_files.values() for d in docs]
  docs = sources.load_documents(config.data)
  _, val_idx = split_documents(len(docs), config.data.val_fraction, config.seed)
  return [docs[int(i)] for i in val_idx]


def unigram_entropy(docs: Sequence[str], tokenizer: tokenizers.Tokenizer) -> float:
  """Entropy (nats/token) of the corpus' token frequencies, end tokens included: the loss a model
  that ignores context entirely would reach at best."""
  counts = np.zeros(tokenizer.vocab_size, np.int64)
  for doc in docs:
    counts += np.bincount(tokenizer.encode(doc), minlength=tokenizer.vocab_size)[:tokenizer.vocab_size]
    counts[tokenizer.eos_id] += 1
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())
