"""Where a trained study run's attention goes, per layer: the sequence / depth split of the analysis
tool (`analysis.attention_maps`) on the run's own validation text.

For every entry with depth K/V and every seed whose run directory still holds a checkpoint (the GPU
machine's; benchmarks/results/ keeps only metrics), the first `tokens` tokens of each validation source
(its documents joined by the end token, as the trainer packs them) go through the cached forward pass.
The share of attention mass on depth slots per layer is averaged over heads, queries and sources, then
over seeds (± std over seeds).
"""

from __future__ import annotations

import os

import numpy as np

from moda_jax.data import pipeline
from moda_jax.data import sources
from moda_jax.data import tokenizers
from moda_jax.eval import analysis
from moda_jax.model.config import ModelConfig
from moda_jax.train import checkpoint


def source_tokens(config, tokens: int) -> dict[str, np.ndarray]:
  """The first `tokens` ids of each validation source of the run (one unnamed set without val_path)."""
  tok = tokenizers.make_tokenizer(config.data.tokenizer, config.data.tokenizer_path, config.data.eos_token)
  sets = sources.validation_sources(config.data) or {"validation": pipeline.validation_documents(config)}
  out = {}
  for name, docs in sets.items():
    ids = []
    for doc in docs:
      ids += list(tok.encode(doc)) + [tok.eos_id]
      if len(ids) >= tokens:
        break
    out[name] = np.asarray(ids[:tokens], np.int32)
  return out


def run_depth_share(run_dir: str, tokens: int) -> dict[str, list[float]]:
  """{source: depth share per layer} of the run's latest checkpoint."""
  config, _, params = checkpoint.load_checkpoint(run_dir)
  model_cfg = ModelConfig.from_dict(config.model.to_dict())
  tokens = min(tokens, config.seq_len, model_cfg.max_seq_len)
  return {name: analysis.attention_maps(model_cfg, params, ids).depth_share_N.tolist()
          for name, ids in source_tokens(config, tokens).items()}


def measure(study, tokens: int, previous: dict | None = None) -> dict:
  """{entry: {"tokens": T, "per_seed": {seed: {source: share per layer}}}}: the runs of depth entries
  that hold a checkpoint here, merged into `previous` (an earlier call's, e.g. another machine's seeds)."""
  result = {e: {"tokens": d["tokens"], "per_seed": dict(d["per_seed"])} for e, d in (previous or {}).items()}
  for entry in study.entries:
    for seed, run in study.finished(entry).items():
      if run.config.get("model", {}).get("depth_kv", "none") == "none":
        continue
      if str(seed) in result.get(entry, {}).get("per_seed", {}):
        continue  # measured before (by an earlier call on this machine or another)
      if os.path.isdir(os.path.join(run.directory, checkpoint.CHECKPOINT_DIR)):
        used = min(tokens, int(run.config["seq_len"]))
        entry_result = result.setdefault(entry, {"tokens": used, "per_seed": {}})
        if entry_result["tokens"] != used:
          raise ValueError(f"depth mass of {entry!r} was measured on {entry_result['tokens']} tokens before; "
                           f"--depth_mass_tokens={tokens} would mix {used}.")
        entry_result["per_seed"][str(seed)] = run_depth_share(run.directory, tokens)
  return result


def summarize(depth: dict) -> dict:
  """{entry: {"seeds", "tokens", "share_N", "std_N" (over seeds), "per_source"}} of `measure`'s dict:
  per seed the mean over sources, then mean and std over seeds."""
  out = {}
  for entry, d in depth.items():
    seeds = sorted(d["per_seed"], key=int)
    names = list(d["per_seed"][seeds[0]])
    per_seed = np.array([[d["per_seed"][s][n] for n in names] for s in seeds])  # [seeds, sources, layers]
    over_sources = per_seed.mean(1)
    std = over_sources.std(0, ddof=1) if len(seeds) > 1 else np.full(per_seed.shape[-1], np.nan)
    out[entry] = {"seeds": [int(s) for s in seeds], "tokens": d["tokens"],
                  "share_N": over_sources.mean(0).tolist(), "std_N": std.tolist(),
                  "per_source": {n: per_seed[:, i].mean(0).tolist() for i, n in enumerate(names)}}
  return out
