"""Where the attention mass goes: sequence keys vs depth slots, per layer and head (paper Fig. 5).

`attention_maps` runs one text through the cached forward pass (`decode.py`, whose dense attention
returns its probabilities) and splits every attention sublayer's softmax into its sequence part
[T queries x T keys] and its depth part [T queries x L_max slots]; the two parts of a row sum to 1.
Layer n reads only the slots written before it (`config.depth_len_of_block(n)`), so its columns
past that are exactly 0 and are drawn greyed out.
"""

from __future__ import annotations

import dataclasses

import jax
import matplotlib
import numpy as np
from matplotlib import colors

from moda_jax.model import decode
from moda_jax.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class AttentionMaps:
  sequence_NHTS: np.ndarray  # [layers, heads, queries, keys]; 0 above the diagonal (causal)
  depth_NHTL: np.ndarray     # [layers, heads, queries, L_max slots]; L_max = 0 without depth
  depth_len_N: np.ndarray    # slots layer n reads

  @property
  def depth_share_NH(self) -> np.ndarray:
    """Mean over queries of the probability mass on depth slots, per layer and head."""
    return self.depth_NHTL.sum(-1).mean(-1)

  @property
  def depth_share_N(self) -> np.ndarray:
    """Mean over heads and queries of the depth mass, per layer (0 for layer 0: nothing written)."""
    return self.depth_share_NH.mean(-1)


def attention_maps(config: ModelConfig, params, tokens_T) -> AttentionMaps:
  """Attention probabilities of every layer and head for one sequence of token ids."""
  tokens_1T = np.asarray(tokens_T, np.int32).reshape(1, -1)
  seq_len = tokens_1T.shape[1]
  if not 1 <= seq_len <= config.max_seq_len:
    raise ValueError(f"tokens has {seq_len} tokens: expected 1 .. max_seq_len={config.max_seq_len}.")
  cache = decode.init_cache(config, 1, seq_len)
  step = jax.jit(lambda p, t, c: decode.decode_step(config, p, t, c, return_probs=True))
  _, _, probs_N1THC = step(params, tokens_1T, cache)
  probs_NHTC = np.asarray(probs_N1THC[:, 0], np.float64).transpose(0, 2, 1, 3)
  depth_len = np.array([config.depth_len_of_block(n) for n in range(config.num_layers)])
  return AttentionMaps(probs_NHTC[..., :seq_len], probs_NHTC[..., seq_len:], depth_len)


def plot_heatmaps(maps: AttentionMaps, *, layers=None, head: int | None = None, path: str | None = None,
                  title: str = ""):
  """One row per layer: queries down, [sequence keys | depth slots] across, log colour scale.

  `head=None` averages the heads. The depth panel is drawn wider than its share of columns so that
  a few slots next to a long sequence stay visible; a thick line marks the boundary.
  """
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  layers = list(range(len(maps.depth_len_N))) if layers is None else list(layers)
  pick = (lambda a: a.mean(1)) if head is None else (lambda a: a[:, head])
  seq_NTS, depth_NTL = pick(maps.sequence_NHTS), pick(maps.depth_NHTL)
  num_slots = depth_NTL.shape[-1]
  norm = colors.LogNorm(vmin=1e-3, vmax=1.0)
  # Masked cells (future keys, slots not yet written) are grey: "cannot attend", unlike a tiny p.
  cmap = matplotlib.colormaps["magma"].with_extremes(bad="0.75", under="black")
  seq_len = seq_NTS.shape[-1]
  future_TS = np.arange(seq_len)[None, :] > np.arange(seq_len)[:, None]
  widths = [3, 1] if num_slots else [1]
  fig, axes = plt.subplots(len(layers), len(widths), squeeze=False, figsize=(6.5, 2.6 * len(layers) + 0.6),
                           gridspec_kw={"width_ratios": widths, "wspace": 0.04}, constrained_layout=True)
  for row, n in zip(axes, layers):
    visible = np.ma.masked_where(future_TS, np.maximum(seq_NTS[n], 1e-12))
    image = row[0].imshow(visible, norm=norm, cmap=cmap, aspect="auto",
                          interpolation="nearest")
    row[0].set_ylabel(f"layer {n}\nquery t")
    row[0].set_xlabel("sequence key s")
    if num_slots:
      depth_ax = row[1]
      depth_ax.imshow(np.maximum(depth_NTL[n], 1e-12), norm=norm, cmap=cmap, aspect="auto",
                      interpolation="nearest")
      if maps.depth_len_N[n] < num_slots:  # slots not yet written for this layer: grey, not "0"
        depth_ax.axvspan(maps.depth_len_N[n] - 0.5, num_slots - 0.5, color="0.75")
      depth_ax.set_yticks([])
      depth_ax.set_xticks(range(num_slots))
      depth_ax.tick_params(axis="x", labelsize=7)
      depth_ax.set_xlabel(f"depth slot l (reads {maps.depth_len_N[n]})")
      depth_ax.spines["left"].set_linewidth(3)  # the sequence | depth boundary
      depth_ax.spines["left"].set_color("cyan")
      share = maps.depth_share_N[n] if head is None else maps.depth_share_NH[n, head]
      depth_ax.set_title(f"depth mass {share:.1%}", fontsize=9)
  fig.colorbar(image, ax=axes, shrink=0.6, label="attention probability")
  head_text = "mean over heads" if head is None else f"head {head}"
  fig.suptitle(title or f"attention: sequence | depth ({head_text})")
  if path:
    fig.savefig(path, dpi=110)
  return fig


def plot_depth_share(maps: AttentionMaps, *, path: str | None = None, title: str = ""):
  """Bars: the mean attention mass on depth slots per layer; dots: the individual heads."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  share_NH = maps.depth_share_NH
  layers = np.arange(share_NH.shape[0])
  fig, ax = plt.subplots(figsize=(6, 3.2), constrained_layout=True)
  ax.bar(layers, share_NH.mean(-1), color="tab:blue", alpha=0.6, label="mean over heads")
  for h in range(share_NH.shape[1]):
    ax.scatter(layers, share_NH[:, h], s=14, color="black", zorder=3,
               label="heads" if h == 0 else None)
  ax.set_xlabel("layer")
  ax.set_ylabel("attention mass on depth slots")
  ax.set_xticks(layers)
  ax.set_ylim(0, max(1e-3, float(share_NH.max()) * 1.15))
  ax.legend(loc="upper left")
  ax.set_title(title or "share of attention on depth slots (mean over query tokens)")
  if path:
    fig.savefig(path, dpi=110)
  return fig
