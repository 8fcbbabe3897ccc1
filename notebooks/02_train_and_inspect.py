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
# # 02 · Train a tiny MoDA model on CPU, restore it, evaluate, generate, look inside
#
# The `tiny` config (4 blocks, d_model 128, the paper's `attn_ffn` depth variant) on the built-in
# offline corpus (`pydoc_data.topics`, byte tokenizer), shortened to a few dozen steps so that this
# notebook runs in a couple of minutes. Then the same steps a researcher takes with a real run:
# restore the Orbax checkpoint, evaluate, sample text, and see where the attention mass goes.

# %%
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.abspath(".."))  # the repository root, when run from notebooks/
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import matplotlib.pyplot as plt
import numpy as np

from configs import tiny
from moda_jax.eval import analysis
from moda_jax.train import checkpoint
from moda_jax.eval import evaluate
from moda_jax.eval import generate
from moda_jax.data import tokenizers
from moda_jax.train import trainer

STEPS = 60
# The test suite points this at its temporary directory; interactively, a fresh temp dir.
workdir = os.environ.get("MODA_NOTEBOOK_WORKDIR") or tempfile.mkdtemp(prefix="moda_tiny_")
config = tiny.get_config()
config.total_steps = STEPS
config.warmup_steps = 5
config.batch_size = 8
config.seq_len = 64
config.log_every = 5
config.eval_every = 30
config.checkpoint_every = 30
config.progress_bar = False
config.mesh.data = -1
# At 64 tokens the dense reference kernel is as fast as any on CPU and the quickest to compile.
config.model.attention_impl = "reference"
print(workdir)

# %% [markdown]
# ## Train
# `train_and_evaluate` is what `python train.py --config=configs/tiny.py --workdir=DIR` runs.

# %%
last = trainer.train_and_evaluate(config, workdir)
print({k: round(v, 4) for k, v in last.items() if k in ("loss", "val_loss", "step_time_s")})

# %%
with open(os.path.join(workdir, "metrics.jsonl")) as f:
  log = [json.loads(line) for line in f]
with open(os.path.join(workdir, "data_stats.json")) as f:
  entropy = json.load(f)["unigram_entropy_nats"]
fig, ax = plt.subplots(figsize=(6, 3.2), constrained_layout=True)
ax.plot([r["step"] for r in log], [r["loss"] for r in log], marker=".", label="train loss")
val = [r for r in log if "val_loss" in r]
ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "s", ms=8, label="validation loss")
ax.axhline(entropy, color="gray", ls="--", label=f"unigram entropy {entropy:.2f}")
ax.set_xlabel("step")
ax.set_ylabel("cross-entropy (nats / byte)")
ax.legend()
plt.show()

# %% [markdown]
# ## Restore and evaluate
# `evaluate.evaluate` is what `python -m moda_jax.evaluate --workdir=DIR` runs: the trainer's own
# validation batches (so the loss matches the trainer's `val_loss` at that step) and the built-in
# multiple-choice task (true continuation of a held-out passage vs passages of other documents).

# %%
report = evaluate.evaluate(workdir, builtin_examples=32)
print(evaluate.format_table(report))
assert abs(report["datasets"]["validation"]["loss"] - val[-1]["val_loss"]) < 1e-4

# %%
run_config, model, params = checkpoint.load_checkpoint(workdir)
tokenizer = tokenizers.make_tokenizer(run_config.data.tokenizer)
print(model.config)

# %% [markdown]
# ## Generate
# Cached decoding: a sequence KV cache per attention sublayer; each new token's depth slots are built
# during its own step and never stored (depth attention reads only the token's own slots).

# %%
prompt = "The return statement "
print("greedy   :", repr(prompt + generate.generate_text(model.config, params, tokenizer, prompt,
                                                        max_new_tokens=40)))
for seed in range(2):  # same sampling settings: compiled once
  text = generate.generate_text(model.config, params, tokenizer, prompt, max_new_tokens=40,
                                sampling=generate.Sampling(temperature=0.8, top_p=0.95), seed=seed)
  print(f"sampled {seed}:", repr(prompt + text))

# %% [markdown]
# ## Where the attention goes (paper Fig. 5)
# Probabilities of every layer over [sequence keys | depth slots] for one held-out passage. Block 0
# reads no depth slots (nothing written yet); block $n$ reads $2n$. Grey cells cannot be attended.

# %%
passage = evaluate.validation_documents(run_config)[0][:48]
maps = analysis.attention_maps(model.config, params, tokenizer.encode(passage))
print("depth mass per layer:", np.round(maps.depth_share_N, 3))
fig = analysis.plot_heatmaps(maps, path=os.path.join(workdir, "attention_heatmaps.png"),
                             title=f"tiny MoDA after {STEPS} steps: sequence | depth (mean over heads)")
plt.show()

# %%
fig = analysis.plot_heatmaps(maps, layers=[3], head=0, title="layer 3, head 0")
plt.show()
fig = analysis.plot_depth_share(maps, path=os.path.join(workdir, "depth_share.png"))
plt.show()
