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
# # 01 · The MoDA operator on toy inputs
#
# Mixture-of-Depths Attention: each query at token $t$ attends under **one softmax** to
# * the sequence keys $k_s$ of its layer ($s \le t$ when causal), and
# * the depth keys of **its own token** written by earlier sublayers: slots $l <$ `depth_len`.
#
# $$\mathrm{out}_t = \frac{\sum_s e^{a_s} v_s + \sum_l e^{c_l}\, v^{d}_{t,l}}{\sum_s e^{a_s} + \sum_l e^{c_l}},\quad
#   a_s = \tfrac{q_t\cdot k_s}{\sqrt D},\; c_l = \tfrac{q_t\cdot k^{d}_{t,l}}{\sqrt D}$$
#
# This notebook runs the operator on tiny inputs, draws the masks, shows which depth slots each layer
# of a model reads, and checks that the backends agree. Everything runs on CPU in seconds.

# %%
import os
import sys

sys.path.insert(0, os.path.abspath(".."))  # the repository root, when run from notebooks/
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from moda_jax import ModelConfig
from pallas_kernels import moda_attention

print("jax", jax.__version__, "on", jax.devices()[0].platform)

# %% [markdown]
# ## Toy inputs
# One sequence of T = 8 tokens, 2 query heads sharing 1 kv head (GQA, G = 2), head dim 8, and 3 depth
# slots per token of which the first 2 are written (`depth_len=2`).

# %%
B, T, HQ, HK, D, L = 1, 8, 2, 1, 8, 3
keys = jax.random.split(jax.random.PRNGKey(0), 5)
q = jax.random.normal(keys[0], (B, T, HQ, D))
k = jax.random.normal(keys[1], (B, T, HK, D))
v = jax.random.normal(keys[2], (B, T, HK, D))
depth_k = jax.random.normal(keys[3], (B, T, L, HK, D))
depth_v = jax.random.normal(keys[4], (B, T, L, HK, D))

out, lse = moda_attention(q, k, v, depth_k, depth_v, depth_len=2, return_lse=True,
                          implementation="reference")
print("out", out.shape, out.dtype, "| lse", lse.shape)

# %% [markdown]
# ## One softmax over [sequence | depth]
# Rebuild the output by hand: logits for the visible sequence keys and the token's own written depth
# slots, one softmax over the concatenation, one weighted sum. It matches the operator.

# %%
scale = D ** -0.5
q0 = np.asarray(q[0, :, 0])                      # head 0 reads kv head 0
seq_logits = scale * q0 @ np.asarray(k[0, :, 0]).T                        # [T, T]
depth_logits = scale * np.einsum("td,tld->tl", q0, np.asarray(depth_k[0, :, :, 0]))  # [T, L]
causal = np.tril(np.ones((T, T), bool))
written = np.arange(L) < 2
logits = np.concatenate([np.where(causal, seq_logits, -np.inf),
                         np.where(written[None], depth_logits, -np.inf)], axis=1)
p = np.exp(logits - logits.max(1, keepdims=True))
p /= p.sum(1, keepdims=True)
by_hand = p[:, :T] @ np.asarray(v[0, :, 0]) + np.einsum("tl,tld->td", p[:, T:], np.asarray(depth_v[0, :, :, 0]))
print("max |by hand - operator| =", np.abs(by_hand - np.asarray(out[0, :, 0])).max())
print("share of probability on depth slots per query:", np.round(p[:, T:].sum(1), 3))

# %% [markdown]
# ## Masks: what each query sees
# Rows are queries, columns are [sequence keys | the query's **own** depth slots]. Depth columns are
# per token: query 5's depth slots are token 5's, not a shared set. With `segment_ids` (packed
# documents) the sequence part is also cut at document boundaries; the depth part needs no mask.

# %%
def visibility(seg=None, depth_len=2):
  seq = np.tril(np.ones((T, T), bool))
  if seg is not None:
    seg = np.asarray(seg)
    seq &= seg[:, None] == seg[None, :]
  depth = np.broadcast_to(np.arange(L) < depth_len, (T, L))
  return np.concatenate([seq, depth], axis=1)

segments = [1, 1, 1, 2, 2, 2, 2, 2]
fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), constrained_layout=True)
for ax, (title, mask) in zip(axes, [("causal, depth_len=2", visibility()),
                                    (f"segment_ids={segments}", visibility(segments))]):
  ax.imshow(mask, cmap="Blues", vmin=0, vmax=1.3)
  ax.axvline(T - 0.5, color="crimson", lw=3)
  ax.set_xticks(range(T + L), [f"s{s}" for s in range(T)] + [f"d{l}" for l in range(L)], fontsize=7)
  ax.set_yticks(range(T), [f"t{t}" for t in range(T)], fontsize=7)
  ax.set_title(title)
  ax.set_xlabel("sequence keys | own depth slots")
plt.show()

# %% [markdown]
# The operator agrees: changing a key a query cannot see (a future token, an unwritten slot) leaves
# that query's output unchanged.

# %%
bumped_k = depth_k.at[:, :, 2].add(100.0)          # slot 2 is not written (depth_len=2)
bumped_seq = k.at[:, 6].add(100.0)                 # token 6 is in the future for queries 0..5
same = moda_attention(q, k, v, bumped_k, depth_v, depth_len=2, implementation="reference")
print("unwritten slot changed -> max |diff| =", float(jnp.abs(same - out).max()))
future = moda_attention(q, bumped_seq, v, depth_k, depth_v, depth_len=2, implementation="reference")
print("future key changed -> max |diff| over queries 0..5 =", float(jnp.abs(future - out)[:, :6].max()))

# %% [markdown]
# ## Which depth slots a layer reads
# In the model every attention sublayer writes its K/V as a depth slot, and with the paper's default
# variant (`attn_ffn`) every FFN writes one more. Block $n$'s attention reads the $2n$ slots written by
# the blocks before it; the last block writes nothing because nobody would read it.

# %%
cfg = ModelConfig(vocab_size=257, num_layers=6, d_model=64, num_heads=4, num_kv_heads=2, head_dim=16,
                  mlp_dim=128, depth_kv="attn_ffn")
print(f"L_max = {cfg.num_depth_slots} slots, {cfg.slots_per_block} written per block")
for n in range(cfg.num_layers):
  reads = cfg.depth_len_of_block(n)
  names = [f"{'attn' if l % 2 == 0 else 'ffn'}{l // 2}" for l in range(reads)]
  print(f"block {n}: reads {reads:2d} slots {names}")

fig, ax = plt.subplots(figsize=(6, 2.8), constrained_layout=True)
grid = np.array([[l < cfg.depth_len_of_block(n) for l in range(cfg.num_depth_slots)]
                 for n in range(cfg.num_layers)])
ax.imshow(grid, cmap="Greens", vmin=0, vmax=1.3, aspect="auto")
ax.set_xlabel("depth slot (attn0, ffn0, attn1, ffn1, ...)")
ax.set_ylabel("reading block")
ax.set_title("depth slots each block's attention reads (attn_ffn, 6 blocks)")
plt.show()

# %% [markdown]
# ## Reference vs kernels
# `reference` is the dense float32 oracle, `xla` the blocked online-softmax backend (CPU/TPU default),
# `pallas_triton` the GPU kernel, here run in Pallas **interpret mode** on CPU on this tiny shape.

# %%
results = {}
for impl in ("reference", "xla", "pallas_triton"):
  results[impl] = moda_attention(q, k, v, depth_k, depth_v, depth_len=2, implementation=impl,
                                 interpret=impl.startswith("pallas"))
for impl in ("xla", "pallas_triton"):
  print(f"{impl:14s} max |out - reference| = {float(jnp.abs(results[impl] - results['reference']).max()):.2e}")

loss = lambda impl: lambda q_, dk_: jnp.sum(moda_attention(q_, k, v, dk_, depth_v, depth_len=2,
                                                            implementation=impl) ** 2)
g_ref = jax.grad(loss("reference"), argnums=(0, 1))(q, depth_k)
g_xla = jax.grad(loss("xla"), argnums=(0, 1))(q, depth_k)
print("xla grads: max |dq diff| = %.2e, max |d depth_k diff| = %.2e" % tuple(
    float(jnp.abs(a - b).max()) for a, b in zip(g_xla, g_ref)))
print("gradient of the unwritten slot 2:", float(jnp.abs(g_xla[1][:, :, 2]).max()))

# %% [markdown]
# ## Depth utilization
# Two meanings, both worth seeing:
# * **Kernel tiles.** A kernel that flattens depth into a `[T*L]` key axis (the official Triton kernel)
#   computes a dense `BT x (BT/G)*L` logit tile per query tile of `BT` grouped rows, of which only the
#   query's own `L` columns are valid: utilization $\eta = G / BT$. The `pallas_triton` kernel uses
#   the same masked dense depth phase (wasted logits, but tensor cores) in parts of `depth_rows` rows,
#   which cuts the waste; a per-token phase on the CUDA cores (each row reads only its own slots) was
#   slower on every shape measured (BENCHMARKS.md §1).
# * **Attention mass.** How much of the softmax actually lands on depth slots: here for the toy input,
#   in notebook 02 per layer of a trained model.

# %%
bt = np.array([16, 32, 64, 128])
fig, ax = plt.subplots(figsize=(5.5, 3), constrained_layout=True)
for g in (1, 2, 4, 8):
  ax.plot(bt, g / bt, marker="o", label=f"G={g}")
ax.set_xscale("log", base=2)
ax.set_xlabel("query tile rows BT")
ax.set_ylabel("valid depth logits η = G/BT")
ax.set_title("dense flattened-depth tiles waste most of their work")
ax.legend()
plt.show()
print("toy input, mean depth share per query head:",
      np.round([float(jnp.mean(jnp.exp(
          scale * jnp.einsum("td,tld->tl", q[0, :, h], depth_k[0, :, :2, 0]) - lse[0, :, h, None]).sum(-1)))
          for h in range(HQ)], 3))
