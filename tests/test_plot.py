"""`moda_jax.eval.plot`: metrics.jsonl of several workdirs -> one PNG of loss curves."""

import json

import matplotlib.image
import pytest

from moda_jax import cli_errors
from moda_jax.eval import plot


def _workdir(path, losses, val_every=2, cut_last_line=False):
  path.mkdir()
  lines = [json.dumps({"step": s, "loss": l, **({"val_loss": l + 0.1} if s % val_every == 0 else {})})
           for s, l in losses]
  text = "\n".join(lines) + "\n" + ('{"step": 9, "lo' if cut_last_line else "")
  (path / "metrics.jsonl").write_text(text)
  return str(path)


def test_read_metrics_orders_steps_and_skips_a_line_cut_by_a_kill(tmp_path):
  workdir = _workdir(tmp_path / "a", [(4, 2.0), (2, 3.0)], cut_last_line=True)
  assert [r["step"] for r in plot.read_metrics(workdir)] == [2, 4]


def test_plot_loss_curves_writes_a_png_for_several_runs(tmp_path):
  runs = [_workdir(tmp_path / "a", [(1, 5.0), (2, 4.0), (3, 3.5)]),
          _workdir(tmp_path / "b", [(1, 5.5), (2, 4.5)])]
  out = plot.plot_loss_curves(runs, str(tmp_path / "out" / "loss.png"))
  image = matplotlib.image.imread(out)
  assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300
  assert image[..., :3].std() > 0.05  # something was drawn, not a blank canvas
  labelled = plot.plot_loss_curves({"first": runs[0]}, str(tmp_path / "one.png"))
  assert labelled.endswith("one.png")


def test_a_workdir_without_metrics_is_a_user_error(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(cli_errors.UserError, match="has no metrics.jsonl"):
    plot.plot_loss_curves([str(tmp_path / "empty")], str(tmp_path / "x.png"))
  with pytest.raises(cli_errors.UserError, match="no runs to plot"):
    plot.plot_loss_curves([], str(tmp_path / "x.png"))
