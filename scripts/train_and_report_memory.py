"""Runs train.py with the given flags, then prints every local device's peak memory on one line:

  PEAK_GIB_PER_DEVICE [37.0, 36.9, ...]

Usage (from the repo root): python scripts/train_and_report_memory.py --config=... --workdir=... [...]
Used by the GPU benchmark scripts, which read that line from the log.
"""

import json
import os
import runpy
import sys

import jax

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TRAIN = os.path.join(_REPO, "train.py")

if __name__ == "__main__":
  sys.argv = [_TRAIN, *sys.argv[1:]]
  sys.path.insert(0, _REPO)  # configs import each other as `configs.<name>`
  try:
    runpy.run_path(_TRAIN, run_name="__main__")
  except SystemExit as exit_:
    if exit_.code not in (None, 0):
      raise
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use", 0) / 2**30 for d in jax.local_devices()]
  print("PEAK_GIB_PER_DEVICE " + json.dumps([round(p, 2) for p in peaks]), flush=True)
