# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · The Table 6 study: loss curves, the table, cost beside benefit, where depth attention goes
#
# The paper's Table 6 (24 layers, post-norm, width 384) reproduced at small scale by
# `configs/studies/table6_small.py`: the OLMo2-style baseline, + depth KV, + FFN KV and the baseline with
# one more layer, 3 seeds each, the same tokens for every run. The runs' `metrics.jsonl` are committed
# under `benchmarks/results/study_table6/`; this notebook rebuilds the report from them
# (`python -m moda_jax.study report DIR` does the same). Where they are absent (a fresh checkout before
# the GPU runs), it trains two entries of the CPU smoke grid (`configs/studies/smoke.py`, about a minute)
# instead, so every cell below still runs; their numbers say nothing about MoDA.

# %%
import io
import os
import shutil
import subprocess
import sys
import tempfile

import moda_jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(moda_jax.__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np
from IPython.display import Image, Markdown, display
from matplotlib.figure import Figure

from moda_jax.eval import study_depth
from moda_jax.eval import study_plots
from moda_jax.eval import study_report

RESULTS = os.path.join(REPO, "benchmarks", "results", "study_table6")


def show(fig):
  """Displays a pyplot-free Figure (the report's) as a PNG, whatever the notebook's backend."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=100)
  display(Image(buffer.getvalue()))


# The report is written next to the runs: work on a copy, never on the committed files.
workdir = os.environ.get("MODA_NOTEBOOK_WORKDIR") or tempfile.mkdtemp(prefix="moda_study_")
committed = os.path.isdir(RESULTS) and any(
    os.path.exists(os.path.join(RESULTS, e, s, "metrics.jsonl"))
    for e in os.listdir(RESULTS) if os.path.isdir(os.path.join(RESULTS, e))
    for s in os.listdir(os.path.join(RESULTS, e)))
study_dir = os.path.join(workdir, "study")
if committed:
  shutil.copytree(RESULTS, study_dir, dirs_exist_ok=True)
  print(f"committed results: {RESULTS}")
else:
  print("no committed results: training the CPU smoke grid (numbers for the plumbing only)")
  env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="--xla_backend_optimization_level=0")
  subprocess.run([sys.executable, "-m", "moda_jax.study", "run", "configs/studies/smoke.py",
                  f"--out={study_dir}", "--only=none,attn_ffn", "--progress_every=600"],
                 cwd=REPO, env=env, check=True)

# %% [markdown]
# ## The report
# One row per entry: final validation loss (mean ± std over seeds), the difference to the baseline
# paired by seed, and the cost (parameters, FLOPs per token, step time). Per-source tables follow when the
# runs validated on the corpus' fixed per-source files.

# %%
# The smoke grid's runs still hold their checkpoints: measure the depth share here. The committed results
# carry it in depth_mass.json (measured on the GPU machine before the checkpoints went away).
os.chdir(REPO)  # run configs name their data and tokenizer relative to the repository root
report_path = study_report.write_report(study_dir, depth_mass=not committed, depth_mass_tokens=32)
report = open(report_path).read()
if committed:  # the report names the copy it was built in; a reader rebuilds it from the committed runs
  report = report.replace(study_dir, os.path.relpath(RESULTS, REPO))
display(Markdown(report.split("## Plots")[0]))

# %% [markdown]
# ## Loss curves
# Mean over seeds per entry, the band spanning the seeds' minimum to maximum. The validation panel is
# zoomed to the second half of training, where the entries separate.

# %%
study = study_report.load_study(study_dir)
show(study_plots.loss_curves(study))

# %% [markdown]
# ## The difference to the baseline, per validation source
# Bars: the mean over seeds of (entry − baseline) at the same seed; whiskers: the std of those paired
# differences. A bar whose whisker crosses zero is not separated from the baseline by these seeds.

# %%
show(study_plots.source_differences(study))

# %% [markdown]
# ## Cost beside benefit
# Final validation loss against step time and against parameters: the parameter-matched baseline
# (one more layer) is the fair control for the FFN-KV projections.

# %%
fig = Figure(figsize=(11, 3.8), layout="constrained")
axes = fig.subplots(1, 2)
for entry, color in zip(study.entries, study_plots._colors(len(study.entries))):  # the curves' colours
  s = study_report.entry_summary(study, entry)
  mean, std, n = s["val_loss"]
  for ax, x in ((axes[0], s["step_time_s"] * 1e3), (axes[1], s["params"] / 1e6)):
    ax.errorbar([x], [mean], yerr=[0 if n < 2 else std], fmt="o", color=color, capsize=4, label=entry)
axes[0].set_xlabel("step time (ms, median over steps)")
axes[1].set_xlabel("parameters (M)")
for ax in axes:
  ax.set_ylabel("final validation loss")
  ax.grid(alpha=0.3)
axes[1].legend(fontsize=8)
show(fig)

# %% [markdown]
# ## Where the depth attention goes
# For each depth entry, the share of every attention sublayer's softmax mass that lands on depth slots
# (the analysis tool's sequence / depth split), mean over heads, query positions and validation sources.
# Layer 0 reads no slot (nothing is written before it).

# %%
depth = study_depth.summarize(study_report.read_json(os.path.join(study_dir, study_report.DEPTH_MASS_JSON), {}))
if depth:
  for entry, d in depth.items():
    share = np.asarray(d["share_N"])
    print(f"{entry}: mean depth share over layers 1.. = {share[1:].mean():.3f}; "
          f"largest at layer {int(share.argmax())} ({share.max():.3f}); seeds {d['seeds']}")
  show(study_plots.depth_share(depth))
else:
  print("no depth_mass.json: run `python -m moda_jax.study report DIR --depth_mass` where the checkpoints are")
