"""Tokenizers for the training data: byte-level (default, no files), HF tokenizer.json, SentencePiece.

Every tokenizer exposes `vocab_size`, `eos_id` and `encode(text) -> np.int32[N]`. The model's
`vocab_size` must be at least the tokenizer's; the trainer checks this before building anything.
"""

import os
from typing import Protocol

import numpy as np

BYTE_VOCAB_SIZE = 257  # 256 byte values + one end-of-document id.


class Tokenizer(Protocol):
  vocab_size: int
  eos_id: int

  def encode(self, text: str) -> np.ndarray: ...


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255, id 256 ends a document; needs no vocabulary file."""

  vocab_size = BYTE_VOCAB_SIZE
  eos_id = 256

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

  def __repr__(self) -> str:
    return "ByteTokenizer()"


class HFTokenizer:
  """A local Hugging Face `tokenizer.json` (tokenizers library); never downloads anything."""

  def __init__(self, path: str, eos_token: str = ""):
    import tokenizers  # Imported lazily: only runs that name a tokenizer.json need it.

    self._path = path
    self._tok = tokenizers.Tokenizer.from_file(path)
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    eos_id = self._tok.token_to_id(eos_token) if eos_token else None
    if eos_token and eos_id is None:
      raise ValueError(f"data.eos_token={eos_token!r} is not in the vocabulary of {path}.")
    # Without a named end token, documents end on an extra id just past the vocabulary.
    if eos_id is None:
      eos_id = self.vocab_size
      self.vocab_size += 1
    self.eos_id = eos_id

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids if int(i) != self.eos_id])

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    """`encode` of many texts at once, on all cores (the library's own thread pool)."""
    return [np.asarray(e.ids, np.int32) for e in self._tok.encode_batch(texts, add_special_tokens=False)]

  def __repr__(self) -> str:
    return f"HFTokenizer({self._path!r})"


class SentencePieceTokenizer:
  """A local SentencePiece `.model` file."""

  def __init__(self, path: str):
    try:
      import sentencepiece  # Optional dependency: only needed for .model files.
    except ImportError as e:
      raise ImportError("data.tokenizer_path names a SentencePiece model, which needs "
                        "`pip install sentencepiece`.") from e
    self._path = path
    self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
    self.vocab_size = self._sp.get_piece_size()
    eos_id = self._sp.eos_id()
    if eos_id < 0:  # Model trained without an end token: add one past the vocabulary.
      eos_id = self.vocab_size
      self.vocab_size += 1
    self.eos_id = eos_id

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text), np.int32)

  def decode(self, ids) -> str:
    return self._sp.decode([int(i) for i in ids if int(i) != self.eos_id])

  def __repr__(self) -> str:
    return f"SentencePieceTokenizer({self._path!r})"


def encode_all(tokenizer: Tokenizer, texts, chunk: int = 1024) -> list[np.ndarray]:
  """Every text's ids, in order: in parallel chunks where the tokenizer has `encode_batch`."""
  texts = list(texts)
  if not hasattr(tokenizer, "encode_batch"):
    return [tokenizer.encode(t) for t in texts]
  return [ids for i in range(0, len(texts), chunk) for ids in tokenizer.encode_batch(texts[i:i + chunk])]


def make_tokenizer(kind: str, path: str = "", eos_token: str = "") -> Tokenizer:
  """Builds the tokenizer named by `data.tokenizer` ("byte" | "hf" | "sentencepiece")."""
  if kind == "byte":
    return ByteTokenizer()
  if kind not in ("hf", "sentencepiece"):
    raise ValueError(f"data.tokenizer={kind!r}; expected 'byte', 'hf' or 'sentencepiece'.")
  if not path or not os.path.isfile(path):
    raise ValueError(f"data.tokenizer_path={path!r} is not a file; data.tokenizer={kind!r} needs "
                     "a local tokenizer file.")
  if kind == "hf":
    return HFTokenizer(path, eos_token)
  return SentencePieceTokenizer(path)
