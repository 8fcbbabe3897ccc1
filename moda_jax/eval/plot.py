"""Loss curves of one or more training runs, from their `metrics.jsonl`, drawn to a PNG.

  python -m moda_jax.eval.plot DIR [DIR ...] [--out=loss.png] [--labels=a,b]

Training loss is drawn solid, validation loss (where the run evaluated) dashed with dots, one colour
per run. `plot_loss_curves(runs, path)` is the same drawing for code (e.g. a study's report).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from moda_jax import cli_errors
from moda_jax.train import metrics


def read_metrics(workdir: str) -> list[dict]:
  """The records of `workdir`/metrics.jsonl in step order; a UserError when there is no such file."""
  if not os.path.isfile(os.path.join(workdir, metrics.JSONL_NAME)):
    raise cli_errors.UserError(f"{workdir!r} has no {metrics.JSONL_NAME}: expected a training workdir "
                               "(train.py --workdir=...).")
  return metrics.read_records(workdir)


def _curve(records: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
  points = [(r["step"], r[key]) for r in records if key in r]
  return [s for s, _ in points], [v for _, v in points]


def plot_loss_curves(runs: Mapping[str, str] | Sequence[str], path: str, *,
                     title: str = "loss per step") -> str:
  """Draws the runs' training and validation losses into the PNG at `path`; returns `path`.

  `runs`: workdirs (labelled by their folder name) or {label: workdir}.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")  # files only: no display needed
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  if not isinstance(runs, Mapping):
    names = [os.path.basename(os.path.normpath(d)) or d for d in runs]
    unique = len(set(names)) == len(names)
    runs = {name if unique else d: d for name, d in zip(names, runs)}  # same folder names: full paths
  if not runs:
    raise cli_errors.UserError("no runs to plot: expected one or more training workdirs.")
  fig, ax = plt.subplots(figsize=(8, 5))
  for i, (label, workdir) in enumerate(runs.items()):
    records = read_metrics(workdir)
    color = f"C{i % 10}"
    steps, loss = _curve(records, "loss")
    ax.plot(steps, loss, color=color, label=f"{label} train")
    val_steps, val_loss = _curve(records, "val_loss")
    if val_steps:
      ax.plot(val_steps, val_loss, "o--", color=color, markersize=3, label=f"{label} validation")
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (nats/token)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)
  return path


def main(argv):
  workdirs = argv[1:]
  if not workdirs:
    raise cli_errors.UserError("no workdir given: expected python -m moda_jax.eval.plot DIR [DIR ...] "
                               "[--out=loss.png].")
  labels = [s.strip() for s in _FLAGS.labels.split(",")] if _FLAGS.labels else []
  if labels and len(labels) != len(workdirs):
    raise cli_errors.UserError(f"--labels={_FLAGS.labels!r} has {len(labels)} labels: expected one per "
                               f"workdir ({len(workdirs)}).")
  runs = dict(zip(labels, workdirs)) if labels else workdirs
  print(f"wrote {plot_loss_curves(runs, _FLAGS.out)}")


def cli() -> None:
  """Defines the flags and runs `main` (`python -m moda_jax.eval.plot`)."""
  global _FLAGS
  from absl import flags as absl_flags  # pylint: disable=g-import-not-at-top

  absl_flags.DEFINE_string("out", "loss.png", "PNG file to write.")
  absl_flags.DEFINE_string("labels", "", "Comma-separated legend labels, one per workdir (default: folder names).")
  _FLAGS = absl_flags.FLAGS
  cli_errors.run(main, positional=True)


if __name__ == "__main__":
  cli()
