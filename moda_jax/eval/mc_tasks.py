"""Multiple-choice tasks scored by the log-likelihood of each choice given its context.

Sources:
  * local jsonl files in the common layouts (one example per line, detected per record):
      HellaSwag  {"ctx" | "ctx_a" + "ctx_b", "endings": [...], "label": int}
      ARC        {"question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}  (AI2 release), or
                 {"question": str, "choices": {"text": [...], "label": [...]}, "answerKey"} (HF export)
      PIQA       {"goal", "sol1", "sol2", "label": int}
      generic    {"context" | "query" | "prompt", "choices": [...], "label" | "gold" | "answer": int}
  * `continuation_task`: built from held-out documents, so it works offline: the true continuation of
    a passage against continuations taken from other documents at the same offset.

Scores: `accuracy` picks the choice with the highest summed log-likelihood; `accuracy_norm` divides
it by the choice's UTF-8 length first (lm-evaluation-harness' acc_norm), which removes the bias
towards short choices.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Example:
  context: str
  choices: tuple[str, ...]
  label: int


def _join(context: str, choice: str) -> str:
  """The choice as appended to the context: one space between them unless one is already there."""
  if not context or context[-1].isspace() or choice[:1].isspace():
    return choice
  return " " + choice


def _int_label(value, where: str, num_choices: int) -> int:
  try:
    label = int(value)
  except (TypeError, ValueError):
    raise ValueError(f"{where}: label {value!r} is not an integer index.") from None
  if not 0 <= label < num_choices:
    raise ValueError(f"{where}: label {label} is outside the {num_choices} choices.")
  return label


def parse_record(record: dict, where: str) -> Example:
  """One jsonl record in any of the layouts in the module docstring -> Example."""
  if "endings" in record:  # HellaSwag
    context = record.get("ctx") or f"{record.get('ctx_a', '')} {record.get('ctx_b', '')}".strip()
    choices = tuple(record["endings"])
    return Example(context, choices, _int_label(record.get("label"), where, len(choices)))
  if "answerKey" in record and "question" in record:  # ARC
    question = record["question"]
    if isinstance(question, dict):
      stem, options = question["stem"], question["choices"]
      texts, labels = [c["text"] for c in options], [c["label"] for c in options]
    else:
      stem, texts, labels = question, record["choices"]["text"], record["choices"]["label"]
    key = record["answerKey"]
    if key not in labels:
      raise ValueError(f"{where}: answerKey {key!r} is not one of the choice labels {labels}.")
    return Example(f"Question: {stem}\nAnswer:", tuple(texts), labels.index(key))
  if "goal" in record and "sol1" in record:  # PIQA
    if "label" not in record:
      raise ValueError(f"{where}: PIQA record without 'label' (the release keeps labels in a separate "
                       "file): merge them into the jsonl as \"label\": 0 | 1.")
    return Example(f"Question: {record['goal']}\nAnswer:", (record["sol1"], record["sol2"]),
                   _int_label(record["label"], where, 2))
  context_key = next((k for k in ("context", "query", "prompt") if k in record), None)
  label_key = next((k for k in ("label", "gold", "answer") if k in record), None)
  if context_key and label_key and "choices" in record:
    choices = tuple(record["choices"])
    return Example(record[context_key], choices, _int_label(record[label_key], where, len(choices)))
  raise ValueError(f"{where}: unrecognized multiple-choice layout with keys {sorted(record)}; expected "
                   "HellaSwag (ctx, endings, label), ARC (question, answerKey), PIQA (goal, sol1, "
                   "sol2, label) or generic (context, choices, label).")


def read_jsonl(path: str, limit: int | None = None) -> list[Example]:
  examples = []
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, 1):
      if line.strip():
        examples.append(parse_record(json.loads(line), f"{path}:{line_no}"))
      if limit is not None and len(examples) >= limit:
        break
  if not examples:
    raise ValueError(f"task file {path!r} holds no examples.")
  return examples


def continuation_task(docs: Sequence[str], *, num_examples: int = 64, num_choices: int = 4,
                      context_chars: int = 96, continuation_chars: int = 32,
                      seed: int = 0) -> list[Example]:
  """Passages cut from `docs` (held-out text): the true continuation vs other documents' text.

  Distractors come from *other* documents at the same offset, so only a model that follows the
  passage (not one that merely knows what text looks like) beats chance (1 / num_choices).
  """
  window = context_chars + continuation_chars
  passages = [(d, start) for d, doc in enumerate(docs)
              for start in range(0, len(doc) - window + 1, window)]
  if len({d for d, _ in passages}) < num_choices:
    raise ValueError(f"continuation_task needs passages of {window} characters from at least "
                     f"num_choices={num_choices} documents; the {len(docs)} documents give "
                     f"{len({d for d, _ in passages})}.")
  rng = np.random.default_rng(seed)
  picks = rng.permutation(len(passages))[:num_examples]
  examples = []
  for i in picks:
    d, start = passages[i]
    cut = start + context_chars
    others = [p for p in passages if p[0] != d]
    distractors = [others[j] for j in rng.choice(len(others), num_choices - 1, replace=False)]
    choices = [docs[d][cut:cut + continuation_chars]]
    choices += [docs[o][s + context_chars:s + window] for o, s in distractors]
    order = rng.permutation(num_choices)
    examples.append(Example(docs[d][start:cut], tuple(choices[j] for j in order),
                            int(np.argmin(order))))
  return examples


def _choice_rows(examples: Sequence[Example], encode: Callable[[str], np.ndarray], seq_len: int):
  """One row per (example, choice): inputs/targets [seq_len] and a mask over the choice's targets.

  A context too long for the row loses its beginning; a choice longer than the row is cut to it.
  """
  inputs, targets, mask = [], [], []
  for ex in examples:
    context_ids = encode(ex.context)
    for choice in ex.choices:
      choice_ids = encode(_join(ex.context, choice))[:seq_len]
      ids = np.concatenate([context_ids, choice_ids])[-(seq_len + 1):]
      row_in, row_tgt, row_mask = (np.zeros(seq_len, np.int32) for _ in range(3))
      n = len(ids) - 1
      row_in[:n], row_tgt[:n] = ids[:-1], ids[1:]
      scored = min(len(choice_ids), n)  # without context, a choice's first token has no predictor
      row_mask[n - scored:n] = 1
      inputs.append(row_in), targets.append(row_tgt), mask.append(row_mask)
  return np.stack(inputs), np.stack(targets), np.stack(mask)


def make_row_scorer(model, batch_rows: int):
  """A function (params, inputs, targets, mask) -> per-row summed log-likelihood of the masked
  targets, evaluated `batch_rows` rows at a time (the last batch padded) by one compiled step."""
  @jax.jit
  def score(params, inputs_BT, targets_BT, mask_BT):
    logits_BTV = model.apply({"params": params}, inputs_BT).astype(jnp.float32)
    logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
    target_logp_BT = jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
    return jnp.sum(target_logp_BT * mask_BT, axis=-1)

  def score_rows(params, inputs, targets, mask) -> np.ndarray:
    out = []
    for i in range(0, len(inputs), batch_rows):
      chunk = [a[i:i + batch_rows] for a in (inputs, targets, mask)]
      pad = batch_rows - len(chunk[0])
      chunk = [np.pad(a, ((0, pad), (0, 0))) for a in chunk]
      out.append(np.asarray(score(params, *chunk))[:batch_rows - pad])
    return np.concatenate(out)

  return score_rows


def evaluate_task(score_rows, params, examples: Sequence[Example],
                  encode: Callable[[str], np.ndarray], seq_len: int) -> dict[str, float]:
  """{"accuracy", "accuracy_norm", "examples", "chance"} of `examples` under `score_rows`."""
  inputs, targets, mask = _choice_rows(examples, encode, seq_len)
  logliks = score_rows(params, inputs, targets, mask)
  raw_hits = norm_hits = 0
  chance = 0.0
  offset = 0
  for ex in examples:
    scores = logliks[offset:offset + len(ex.choices)]
    offset += len(ex.choices)
    lengths = np.array([max(len(_join(ex.context, c).encode("utf-8")), 1) for c in ex.choices])
    raw_hits += int(np.argmax(scores) == ex.label)
    norm_hits += int(np.argmax(scores / lengths) == ex.label)
    chance += 1.0 / len(ex.choices)
  n = len(examples)
  return {"accuracy": raw_hits / n, "accuracy_norm": norm_hits / n, "examples": n, "chance": chance / n}
