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
# # 03 · Kernel benchmarks
#
# Plots of the JSON that `python -m pallas_kernels.benchmark --json PATH` writes (on a GPU). This
# notebook only reads JSON, so it runs anywhere: by default the most complete shape-table run committed
# under `benchmarks/results/` (measured on one NVIDIA H200; the newest among equally complete ones);
# point `RESULTS` at your own file instead.
#
# Each row is one (shape, implementation): forward and forward+backward milliseconds (median of timed
# calls), TFLOP/s over the visible logits, and the fraction of the roofline (max of FLOPs / 790 TFLOP/s
# and bytes / 4.3 TB/s) reached. cuDNN runs the same sequence attention **without** depth: it is the
# bar MoDA is measured against.

# %%
import glob
import json
import os
import sys

sys.path.insert(0, os.path.abspath(".."))  # the repository root, when run from notebooks/

import matplotlib.pyplot as plt
import numpy as np

import moda_jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(moda_jax.__file__)))
RESULTS = os.environ.get("MODA_BENCHMARK_JSON", "")


def most_complete_run(root, wanted):
  """The benchmark JSON under benchmarks/results/ whose rows satisfy `wanted` and cover the most shapes
  (a `--quick` run covers 3), the newest among those; or None."""
  runs = []
  for path in glob.glob(os.path.join(root, "benchmarks", "results", "*.json")):
    with open(path) as f:
      run = json.load(f)
    if isinstance(run, dict) and run.get("rows") and wanted(run["rows"]):
      shapes = len({r["shape"] for r in run["rows"]})
      runs.append((shapes, run["meta"].get("date", ""), path))
  return max(runs)[2] if runs else None


# The shape table compares backends against cuDNN; tuning runs (tile variants) and ablations are
# other kinds of runs in the same folder.
is_shape_table = lambda rows: any(r["impl"] == "cudnn" for r in rows) and not any("tune" in r for r in rows)
path = RESULTS or most_complete_run(ROOT, is_shape_table)
if path is None:
  raise FileNotFoundError(f"no benchmark JSON under {ROOT}/benchmarks/results/; run "
                          "`python -m pallas_kernels.benchmark --json PATH` on a GPU first.")
with open(path) as f:
  run = json.load(f)
meta, rows = run["meta"], run["rows"]
print(os.path.relpath(path, ROOT), "|", meta["device"], "| jax", meta["jax"], "|", meta["date"][:16])
print(len(rows), "rows; implementations:", sorted({r["impl"] for r in rows}))

# %% [markdown]
# ## The table

# %%
cudnn = {(r["shape"], m): r.get(f"{m}_ms") for r in rows if r["impl"] == "cudnn" for m in ("fwd", "fwd_bwd")}
print(f"{'shape':30s} {'impl':14s} {'fwd ms':>9s} {'fwd+bwd ms':>11s} {'/cuDNN fwd+bwd':>15s} {'roofline':>9s}")
for r in rows:
  ms_f, ms_fb = r.get("fwd_ms"), r.get("fwd_bwd_ms")
  ref = cudnn.get((r["shape"], "fwd_bwd"))
  fmt = lambda x, w, p: f"{x:{w}.{p}f}" if x is not None else f"{'-':>{w}s}"
  print(f"{r['shape']:30s} {r['impl']:14s} {fmt(ms_f, 9, 3)} {fmt(ms_fb, 11, 3)} "
        f"{fmt(ms_fb / ref if ms_fb and ref else None, 15, 2)} "
        f"{fmt(r.get('fwd_bwd_roofline_fraction', r.get('fwd_roofline_fraction')), 9, 2)}")

# %% [markdown]
# ## Time per shape, per implementation

# %%
shapes = list(dict.fromkeys(r["shape"] for r in rows))
impls = list(dict.fromkeys(r["impl"] for r in rows))
fig, axes = plt.subplots(1, 2, figsize=(12, 0.45 * len(shapes) + 1.8), sharey=True, constrained_layout=True)
for ax, mode in zip(axes, ("fwd", "fwd_bwd")):
  height = 0.8 / len(impls)
  for i, impl in enumerate(impls):
    ms = [next((r.get(f"{mode}_ms") for r in rows if r["shape"] == s and r["impl"] == impl), None)
          for s in shapes]
    y = np.arange(len(shapes)) + i * height
    ax.barh(y[[m is not None for m in ms]], [m for m in ms if m is not None], height, label=impl)
  ax.set_xscale("log")
  ax.set_xlabel(f"{mode.replace('_', '+')} time (ms, log scale)")
  ax.set_title("forward" if mode == "fwd" else "forward + backward")
axes[0].set_yticks(np.arange(len(shapes)) + 0.4 - height / 2, shapes, fontsize=8)
axes[0].invert_yaxis()
axes[1].legend(loc="lower right")
plt.show()

# %% [markdown]
# ## MoDA relative to cuDNN (same sequence, no depth), and roofline fraction

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 3.8), constrained_layout=True)
# Shapes are categories, not a continuum: markers only, open for forward, filled for fwd+bwd.
for impl, marker in (("pallas_triton", "o"), ("xla", "s")):
  for mode, fill in (("fwd", "none"), ("fwd_bwd", None)):
    pts = [(s, r[f"{mode}_ms"] / cudnn[(s, mode)]) for s in shapes for r in rows
           if r["shape"] == s and r["impl"] == impl and r.get(f"{mode}_ms") and cudnn.get((s, mode))]
    if pts:
      axes[0].plot([shapes.index(s) for s, _ in pts], [v for _, v in pts], marker=marker, ls="none",
                   mfc=fill, ms=7, label=f"{impl} {mode.replace('_', '+')}")
    frac = [(shapes.index(r["shape"]), r[f"{mode}_roofline_fraction"]) for r in rows
            if r["impl"] == impl and f"{mode}_roofline_fraction" in r]
    if frac:
      axes[1].plot(*zip(*frac), marker=marker, ls="none", mfc=fill, ms=7,
                   label=f"{impl} {mode.replace('_', '+')}")
axes[0].axhline(1.0, color="gray", lw=1, label="cuDNN (no depth)")
axes[0].set_yscale("log")
axes[0].set_ylabel("time / cuDNN time")
axes[1].set_ylabel("fraction of roofline")
axes[1].set_ylim(0, 1)
for ax in axes:
  ax.set_xticks(range(len(shapes)), shapes, rotation=60, ha="right", fontsize=7)
  ax.legend(fontsize=7)
plt.show()

# %% [markdown]
# ## Scaling with sequence length (Table 2 shapes: G = 8, L = 64)

# %%
scaling = sorted(((r["seq_len"], r) for r in rows if r["shape"].startswith("table2_T")
                  and r["group"] == 8 and r["slots"] == 64), key=lambda pair: pair[0])
fig, ax = plt.subplots(figsize=(6.5, 3.8), constrained_layout=True)
for impl in impls:
  pts = [(t, r["fwd_bwd_ms"]) for t, r in scaling if r["impl"] == impl and r.get("fwd_bwd_ms")]
  if pts:
    ax.plot(*zip(*pts), marker="o", label=impl)
ax.set_xscale("log", base=2)
ax.set_yscale("log")
ax.set_xlabel("sequence length T")
ax.set_ylabel("forward+backward ms")
ax.set_title(f"{meta['device']}: B1, Hq 64, Hk 8, D 64, L 64")
ax.legend()
plt.show()

# %% [markdown]
# ## What the depth part costs (ablation, if a run is committed)
# The same `pallas_triton` kernels run with `depth_k = depth_v = None` (`pallas_triton_nodepth`, from
# an ablation run) next to full MoDA from the shape table: the gap is the price of the depth slots.

# %%
ablation_path = most_complete_run(ROOT, lambda rows: any(r["impl"].endswith("_nodepth") for r in rows))
if ablation_path is None:
  print("no ablation run under benchmarks/results/")
else:
  with open(ablation_path) as f:
    no_depth = {r["shape"]: r for r in json.load(f)["rows"] if r["impl"] == "pallas_triton_nodepth"}
  moda = {r["shape"]: r for r in rows if r["impl"] == "pallas_triton"}
  names = [n for n in no_depth if n in moda]
  print(os.path.relpath(ablation_path, ROOT), "| shapes in both runs:", names)
  fig, ax = plt.subplots(figsize=(7, 0.6 * len(names) + 1.6), constrained_layout=True)
  for i, mode in enumerate(("fwd", "fwd_bwd")):
    ratio = [moda[n].get(f"{mode}_ms", np.nan) / no_depth[n].get(f"{mode}_ms", np.nan) for n in names]
    bars = ax.barh(np.arange(len(names)) + 0.4 * i, ratio, 0.4, label=mode.replace("_", "+"))
    ax.bar_label(bars, fmt="%.2fx", fontsize=8, padding=2)
  ax.axvline(1.0, color="gray", lw=1)
  ax.set_yticks(np.arange(len(names)) + 0.2, names, fontsize=8)
  ax.invert_yaxis()
  ax.set_xlabel("MoDA time / same kernel without depth")
  ax.set_title("pallas_triton: what the depth part adds")
  ax.set_xlim(0, ax.get_xlim()[1] * 1.1)  # room for the bar labels
  ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
  plt.show()

# %% [markdown]
# ## Kernel options, A/B (the same ablation run)
# `--ablate` also times each option of `pallas_kernels/block_sizes.py` flipped against the defaults of
# that run, in the same command: a bar right of zero means the flipped option is slower (the run's
# default is the better choice there). Defaults chosen after the run differ where a flip won. It also times JAX's own Pallas Mosaic GPU attention forward (sequence only), a preview
# of what a wgmma/TMA kernel reaches on the same shapes.

# %%
def plot_against_default(labels, values, *, baseline, fmt, xlim, xlabel, title):
  """Horizontal bars of each variant against the default (`baseline`): red where slower, green where faster."""
  fig, ax = plt.subplots(figsize=(8, 0.32 * len(labels) + 1.4), constrained_layout=True)
  bars = ax.barh(np.arange(len(labels)), values, color=["tab:red" if v > baseline else "tab:green" for v in values])
  ax.bar_label(bars, fmt=fmt, fontsize=7, padding=2)
  ax.axvline(baseline, color="gray", lw=1)
  ax.set_xlim(*xlim)  # room for the bar labels
  ax.set_yticks(np.arange(len(labels)), labels, fontsize=7)
  ax.invert_yaxis()
  ax.set_xlabel(xlabel)
  ax.set_title(title)
  plt.show()


if ablation_path is not None:
  with open(ablation_path) as f:
    ablation = json.load(f)["rows"]
  default = {r["shape"]: r for r in ablation if r["impl"] == "pallas_triton" and "toggled" not in r}
  flips = [r for r in ablation if "toggled" in r and r["shape"] in default]
  labels, change = [], []
  for r in flips:
    mode = "fwd" if "fwd_bwd_ms" not in r else "fwd_bwd"
    if r.get(f"{mode}_ms") and default[r["shape"]].get(f"{mode}_ms"):
      labels.append(f"{r['shape']} | {r['toggled']} ({mode.replace('_', '+')})")
      change.append(100 * (r[f"{mode}_ms"] / default[r["shape"]][f"{mode}_ms"] - 1))
  if labels:
    plot_against_default(labels, change, baseline=0.0, fmt="%+.1f%%",
                         xlim=(min(0, min(change)) * 1.3 - 1, max(0, max(change)) * 1.3 + 1),
                         xlabel="time with the option flipped / default time - 1 (%)",
                         title="pallas_triton options, flipped one at a time")
  cudnn_fwd = {r["shape"]: r.get("fwd_ms") for r in ablation if r["impl"] == "cudnn"}
  for r in ablation:
    if r["impl"].startswith("jax_mgpu") and r.get("fwd_ms") and cudnn_fwd.get(r["shape"]):
      print(f"{r['shape']:28s} {r['impl']:16s} fwd {r['fwd_ms']:8.3f} ms = "
            f"{r['fwd_ms'] / cudnn_fwd[r['shape']]:.2f}x cuDNN (sequence only, float16)")

# %% [markdown]
# ## One-off A/B runs of the fifth round
# Lists of rows, each with a `variant`, timed in one process against the default tiles (`default`).
# The deterministic 5-matmul backward taken apart (`ordered`: the full turn protocol; `nospin`,
# `nosync`, `storeonly`: its parts removed, racy, timing only) and the per-query-head dk/dv threshold
# (BENCHMARKS.md §1, fifth round).

# %%
def plot_variants(name, title, mode="fwd_bwd"):
  path = os.path.join(ROOT, "benchmarks", "results", name)
  if not os.path.exists(path):
    print("not committed:", name)
    return
  with open(path) as f:
    rows = [r for r in json.load(f) if r.get(f"{mode}_ms")]
  default = {r["shape"]: r[f"{mode}_ms"] for r in rows if r["variant"] == "default"}
  rows = [r for r in rows if r["shape"] in default and r["variant"] != "default"]
  labels = [f"{r['shape']} | {r['variant']}" for r in rows]
  ratio = [r[f"{mode}_ms"] / default[r["shape"]] for r in rows]
  plot_against_default(labels, ratio, baseline=1.0, fmt="%.2fx", xlim=(0, max(ratio) * 1.15),
                       xlabel=f"{mode.replace('_', '+')} time / default time", title=title)


plot_variants("h200_ordered_dq_diagnosis_2026-11-28.json", "5-matmul backward (ordered_dq) and its parts")
plot_variants("h200_per_query_head_threshold_2026-11-28.json", "dk/dv per query head vs per kv head")

# %%
ncu_path = os.path.join(ROOT, "benchmarks", "results", "h200_ncu_launch_stats_round5_2026-11-28.json")
if os.path.exists(ncu_path):
  with open(ncu_path) as f:
    for run_name, launches in json.load(f).items():
      print(run_name)
      for launch in launches:
        print(f"  {launch['kernel']:22s} registers {launch['Registers Per Thread']:>4s}  programs per SM "
              f"{min(launch['Block Limit Registers'], launch['Block Limit Shared Mem'], key=int)}  "
              f"occupancy {launch['Theoretical Occupancy']}%")
