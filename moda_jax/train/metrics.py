"""Run metrics: TensorBoard events, `metrics.jsonl`, a tqdm progress bar, and throughput/MFU.

Only process 0 writes (every process computes the same global scalars). `metrics.jsonl` holds one
JSON object per logged step, always with `step` and `loss`; evaluation steps add `val_loss`.
"""

import json
import math
import os
import time

import tqdm

JSONL_NAME = "metrics.jsonl"


def read_records(workdir: str) -> list[dict]:
  """The step records of `workdir`/metrics.jsonl in step order; [] without the file. A line cut
  short by a kill is skipped."""
  path = os.path.join(workdir, JSONL_NAME)
  if not os.path.isfile(path):
    return []
  records = []
  with open(path) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return sorted((r for r in records if "step" in r), key=lambda r: r["step"])
TENSORBOARD_DIR = "tensorboard"


class MetricsWriter:
  """Appends metrics to DIR/metrics.jsonl and TensorBoard; shows progress on the console."""

  def __init__(self, workdir: str, *, enabled: bool, start_step: int, total_steps: int,
               progress_bar: bool = True):
    self._enabled = enabled
    self._jsonl_path = os.path.join(workdir, JSONL_NAME)
    self._tb = None
    self._bar = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._drop_entries_after(start_step)
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

    self._tb = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR))
    if progress_bar:
      self._bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

  def _drop_entries_after(self, step: int) -> None:
    """A resumed run repeats the steps after its checkpoint: drop their old lines so the file has
    exactly one entry per step, as an uninterrupted run would."""
    if not os.path.exists(self._jsonl_path):
      return
    with open(self._jsonl_path) as f:
      lines = [line for line in f if line.strip()]
    kept = []
    for line in lines:
      try:
        if json.loads(line)["step"] <= step:
          kept.append(line)
      except (json.JSONDecodeError, KeyError):
        pass  # a line cut short by a kill: drop it
    with open(self._jsonl_path, "w") as f:
      f.writelines(kept)

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self._enabled:
      return
    record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    with open(self._jsonl_path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for name, value in scalars.items():
      if math.isfinite(value):
        self._tb.add_scalar(name, value, step)
    if self._bar is not None and "loss" in scalars:
      self._bar.set_postfix(loss=f"{scalars['loss']:.4f}", refresh=False)

  def advance(self, steps: int = 1) -> None:
    if self._bar is not None:
      self._bar.update(steps)

  def message(self, text: str) -> None:
    if self._enabled:
      (self._bar.write if self._bar is not None else print)(text)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    if self._tb is not None:
      self._tb.close()


class Throughput:
  """Wall-clock rates between two log points: step time, tokens/s, MFU."""

  def __init__(self, *, tokens_per_step: int, flops_per_step: float, peak_flops: float | None):
    self._tokens_per_step = tokens_per_step
    self._flops_per_step = flops_per_step
    self._peak_flops = peak_flops  # all devices together; None: MFU unknown (e.g. CPU)
    self.reset(0)

  def reset(self, step: int) -> None:
    self._step, self._time = step, time.perf_counter()

  def measure(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    steps = step - self._step
    if steps <= 0:
      return {}  # nothing timed since the last reset (e.g. right after the compiling first step)
    step_time = (now - self._time) / steps
    self.reset(step)
    rates = {"step_time_s": step_time, "tokens_per_s": self._tokens_per_step / step_time}
    if self._peak_flops:
      rates["mfu"] = self._flops_per_step / step_time / self._peak_flops
    return rates


def perplexity(loss: float) -> float:
  return math.exp(min(loss, 80.0))  # capped: a diverged early loss must not overflow the log line
