"""Which finished runs a grid's (entry, seed) may count as its own: those trained with its config.

Configs are compared field by field on the dotted names both hold, except the fields of how a run runs
(`RUN_ONLY_FIELDS`), so a run from before a field existed still counts (it ran with the default the field
was given) and a changed grid never mixes results.
"""

from __future__ import annotations

import glob
import json
import os

import ml_collections

from moda_jax.eval.study_report import STUDY_JSON, read_json
from moda_jax.train.checkpoint import CONFIG_JSON
from moda_jax.train.run_identity import flat_config

# Fields of how a run runs, not of what it computes: they may differ between a grid and a finished run.
RUN_ONLY_FIELDS = ("progress_bar", "checkpoint_async", "checkpoint_every", "keep_checkpoints",
                   "peak_flops_per_device", "data.num_workers", "mesh.data", "mesh.fsdp", "mesh.tensor")


def config_differences(stored: dict, wanted: ml_collections.ConfigDict) -> list[str]:
  """Fields set in both `stored` (a run's config.json) and `wanted` that differ (RUN_ONLY_FIELDS excepted)."""
  a, b = flat_config(stored), flat_config(json.loads(json.dumps(wanted.to_dict())))
  return sorted(k for k in set(a) & set(b) if k not in RUN_ONLY_FIELDS and a[k] != b[k])


def check_same_config(grid, run_dir: str, entry: str, seed: int) -> None:
  """Raises ValueError if `run_dir` holds a run of another config than `grid` gives (entry, seed)."""
  stored = read_json(os.path.join(run_dir, CONFIG_JSON))
  if stored is None:
    return
  diff = config_differences(stored, grid.config(entry, seed))
  if diff:
    raise ValueError(f"{run_dir} was trained with another config than grid {grid.path} gives {entry!r} "
                     f"(fields {diff}); use another --out, or delete the run directory to retrain it.")


def find_reusable(grid, entry: str, seed: int, studies) -> str | None:
  """A finished run under one of the study directories `studies` trained with the config `grid` gives
  (entry, seed), by `config_differences` (the seed is a config field); None if there is none."""
  wanted = grid.config(entry, seed)
  for directory in studies:
    for candidate in sorted(glob.glob(os.path.join(directory, "*", f"seed{seed}"))):
      stored = read_json(os.path.join(candidate, CONFIG_JSON))
      done = read_json(os.path.join(candidate, STUDY_JSON), {}).get("status") == "done"
      if done and stored is not None and not config_differences(stored, wanted):
        return candidate
  return None
