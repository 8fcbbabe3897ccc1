"""Document sources: random-access sequences of text documents for Grain's MapDataset.

`data.source` picks one:
  "pydoc"       the standard library's `pydoc_data.topics` (~0.5 M chars of English, 79 documents):
                ships with every CPython, so the default run needs no download.
  "gensim_wiki" 106 Wikipedia articles (~3.1 M chars) from the gensim wheel's test data, if installed.
  "files"       local files named by `data.path` (comma-separated paths or globs); the format comes from
                `data.format` or the extension: .txt (the whole file is one document, or split on
                `data.text_separator`), .jsonl (`data.text_key` per line), .parquet (column
                `data.text_key`; needs pyarrow), .array_record (one UTF-8 or JSON document per record).
                Text and jsonl files may be compressed: `.xz` or `.gz` after the format's extension
                (`a.txt.xz`), read as a stream.

`data.text_separator="formfeed"` splits text files on every line that holds only a form feed (`\f`),
the document separator of the study corpus (its README). `data.val_path` names fixed validation files,
read the same way one file at a time (`validation_sources`): each is one named validation set.
"""

import bz2
import glob
import gzip
import importlib.util
import json
import lzma
import os
import re
from collections.abc import Sequence

_EXTENSIONS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "jsonl", ".json": "jsonl",
               ".parquet": "parquet", ".array_record": "array_record", ".arrayrecord": "array_record"}
_COMPRESSED = {".xz": lzma.open, ".gz": gzip.open}
# A line holding only a form feed ends a document; the last document's may end the file.
FORMFEED = "formfeed"
_FORMFEED_LINE = re.compile(r"(?:^|\n)\f(?:\n|$)")
_GENSIM_WIKI = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


class TextDocuments(Sequence):
  """An in-memory list of documents with a stable repr (Grain checks it when restoring)."""

  def __init__(self, docs: list[str], name: str):
    self._docs = docs
    self._name = name

  def __len__(self) -> int:
    return len(self._docs)

  def __getitem__(self, index):
    return self._docs[index]

  def __repr__(self) -> str:
    return f"TextDocuments({self._name}, n={len(self._docs)})"


class ArrayRecordDocuments(Sequence):
  """Lazily reads documents from ArrayRecord files, so corpora larger than memory work."""

  def __init__(self, paths: list[str], text_key: str):
    import grain  # pylint: disable=g-import-not-at-top

    self._source = grain.sources.ArrayRecordDataSource(paths)
    self._paths = paths
    self._text_key = text_key

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index) -> str:
    return _record_text(self._source[index], self._text_key)

  def __iter__(self):  # the source raises ValueError, not IndexError, past the end
    return (self[i] for i in range(len(self)))

  def __repr__(self) -> str:
    return f"ArrayRecordDocuments({self._paths}, text_key={self._text_key!r})"


def _record_text(record: bytes, text_key: str) -> str:
  text = record.decode("utf-8")
  # Records are either plain text or JSON objects holding the text under `text_key`.
  if text.startswith("{"):
    try:
      return json.loads(text)[text_key]
    except (json.JSONDecodeError, KeyError, TypeError):
      pass
  return text


def pydoc_documents() -> list[str]:
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top

  return [topics.topics[k] for k in sorted(topics.topics)]


def gensim_wiki_documents() -> list[str]:
  """Plain-text Wikipedia articles from the gensim wheel's test data (gensim must be installed)."""
  spec = importlib.util.find_spec("gensim")
  if spec is None:
    raise ValueError("data.source='gensim_wiki' needs `pip install gensim` (its wheel ships the "
                     "articles); use data.source='pydoc' for the stdlib corpus instead.")
  from gensim.corpora import wikicorpus  # pylint: disable=g-import-not-at-top

  path = os.path.join(spec.submodule_search_locations[0], "test", "test_data", _GENSIM_WIKI)
  with bz2.open(path, "rb") as f:
    pages = wikicorpus.extract_pages(f)
    docs = [wikicorpus.filter_wiki(text).strip() for _, text, _ in pages]
  return [d for d in docs if d]


def _expand_paths(path: str, field: str = "data.path") -> list[str]:
  if not path:
    raise ValueError(f"{field} is empty; data.source='files' needs comma-separated file paths or globs.")
  paths = []
  for pattern in path.split(","):
    matches = sorted(glob.glob(os.path.expanduser(pattern.strip())))
    if not matches:
      raise ValueError(f"{field} entry {pattern.strip()!r} matches no file.")
    paths.extend(m for m in matches if os.path.isfile(m))
  if not paths:
    raise ValueError(f"{field}={path!r} names only directories; expected files.")
  return paths


def _file_format(path: str, fmt: str) -> str:
  if fmt:
    if fmt not in set(_EXTENSIONS.values()):
      raise ValueError(f"data.format={fmt!r}; expected one of {sorted(set(_EXTENSIONS.values()))} "
                       "or '' to infer it from the extension.")
    return fmt
  stem, ext = os.path.splitext(path)
  if ext.lower() in _COMPRESSED:
    ext = os.path.splitext(stem)[1]
  ext = ext.lower()
  if ext not in _EXTENSIONS:
    raise ValueError(f"cannot infer the format of {path!r} from its extension {ext!r}; set "
                     f"data.format to one of {sorted(set(_EXTENSIONS.values()))}.")
  return _EXTENSIONS[ext]


def _open_text(path: str):
  """Opens a text file for reading, decompressing `.xz` / `.gz` on the fly."""
  opener = _COMPRESSED.get(os.path.splitext(path)[1].lower(), open)
  return opener(path, "rt", encoding="utf-8")


def split_text(text: str, separator: str) -> list[str]:
  """Documents of one text file: all of it ("" separator), split on `separator`, or on form-feed lines."""
  if separator == FORMFEED:
    return _FORMFEED_LINE.split(text)
  return text.split(separator) if separator else [text]


def _read_file(path: str, fmt: str, text_key: str, separator: str) -> list[str]:
  compressed = os.path.splitext(path)[1].lower() in _COMPRESSED
  if compressed and fmt not in ("text", "jsonl"):
    raise ValueError(f"{path!r} is compressed; only text and jsonl files may be (.xz / .gz), "
                     f"not data.format={fmt!r}.")
  if fmt == "text":
    with _open_text(path) as f:
      text = f.read()
    return split_text(text, separator)
  if fmt == "jsonl":
    docs = []
    with _open_text(path) as f:
      for line_no, line in enumerate(f, 1):
        if not line.strip():
          continue
        record = json.loads(line)
        if text_key not in record:
          raise ValueError(f"{path}:{line_no} has no key data.text_key={text_key!r}; keys: {sorted(record)}.")
        docs.append(record[text_key])
    return docs
  if fmt == "parquet":
    try:
      import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError("reading .parquet files needs `pip install pyarrow`.") from e
    table = pq.read_table(path)
    if text_key not in table.column_names:
      raise ValueError(f"{path} has no column data.text_key={text_key!r}; columns: {table.column_names}.")
    return [str(t) for t in table.column(text_key).to_pylist()]
  raise ValueError(f"unsupported data.format={fmt!r} for {path!r}.")


def load_documents(data_cfg) -> Sequence[str]:
  """Returns the corpus named by `data_cfg` as a random-access sequence of non-empty documents."""
  source = data_cfg.source
  if source == "pydoc":
    docs, name = pydoc_documents(), "pydoc_data.topics"
  elif source == "gensim_wiki":
    docs, name = gensim_wiki_documents(), "gensim_wiki"
  elif source == "files":
    paths = _expand_paths(data_cfg.path)
    formats = {_file_format(p, data_cfg.format) for p in paths}
    if formats == {"array_record"}:
      docs = ArrayRecordDocuments(paths, data_cfg.text_key)
      if len(docs) == 0:
        raise ValueError(f"data.path={data_cfg.path!r} holds no records.")
      return docs
    if "array_record" in formats:
      raise ValueError(f"data.path={data_cfg.path!r} mixes ArrayRecord with other formats {formats}.")
    docs = []
    for p in paths:
      docs.extend(_read_file(p, _file_format(p, data_cfg.format), data_cfg.text_key,
                             data_cfg.text_separator))
    name = data_cfg.path
  else:
    raise ValueError(f"data.source={source!r}; expected 'pydoc', 'gensim_wiki' or 'files'.")
  docs = [d for d in docs if d and d.strip()]
  if not docs:
    raise ValueError(f"the corpus (data.source={source!r}, data.path={data_cfg.path!r}) has no "
                     "non-empty documents.")
  return TextDocuments(docs, name)


def source_name(path: str) -> str:
  """A validation file's set name: its file name up to the first dot (`pydoc.val.txt.xz` -> pydoc)."""
  return os.path.basename(path).split(".", 1)[0]


def validation_sources(data_cfg) -> dict[str, TextDocuments]:
  """The fixed validation sets named by `data.val_path` ({} when unset): {source_name: documents},
  each file read like a `data.source="files"` file, in the order the paths are listed."""
  val_path = data_cfg.get("val_path", "")
  if not val_path:
    return {}
  sets = {}
  for path in _expand_paths(val_path, "data.val_path"):
    fmt = _file_format(path, data_cfg.format)
    if fmt == "array_record":
      raise ValueError(f"data.val_path file {path!r} is ArrayRecord; validation files must be text, "
                       "jsonl or parquet.")
    name = source_name(path)
    if name in sets:
      raise ValueError(f"data.val_path has two files named {name!r} (up to the first dot); each "
                       "validation file needs its own name, e.g. `<source>.val.txt.xz`.")
    docs = [d for d in _read_file(path, fmt, data_cfg.text_key, data_cfg.text_separator) if d.strip()]
    if not docs:
      raise ValueError(f"data.val_path file {path!r} holds no non-empty documents.")
    sets[name] = TextDocuments(docs, path)
  return sets
