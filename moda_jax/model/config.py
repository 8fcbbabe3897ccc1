"""`ModelConfig`: the frozen model description, validated once at construction.

Every string option of the model is interpreted here (as properties), so the modules never compare
strings themselves.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

DEPTH_KV_VARIANTS = ("none", "attn", "attn_ffn", "attn_ffn_extra")
NORM_PLACEMENTS = ("pre", "post", "reordered")
# From the least saved (most recomputed) to the most; see `ModelConfig.remat`.
REMAT_OPTIONS = ("full", "save_attention_out", "save_qkv_attention_out", "dots_with_no_batch_dims_saveable",
                 "dots_saveable", "save_dots_and_attention", "none")
DTYPES = ("float32", "bfloat16", "float16")
# The depth-mixing peers (docs/peers.md): other ways for a layer to read earlier layers.
DEPTH_MIXERS = ("none", "denseformer", "value_residual", "hyper_connections", "attention_residuals",
                "depth_attention")
_RETIRED_FIELDS = ("z_loss_weight", "depth_memory")
_NEUTRAL = {"depth_chunk": 1, "depth_window": 0}  # the values that keep plain MoDA
_HC_DEFAULTS = {"hyper_connections_streams": 4, "hyper_connections_manifold": False}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """An OLMo2-style decoder with an optional MoDA depth stream (docs/moda.md has the math).

  Attributes:
    vocab_size, num_layers, d_model, num_heads, num_kv_heads, head_dim, mlp_dim, max_seq_len: sizes.
      `num_heads` query heads share `num_kv_heads` K/V heads (GQA); `mlp_dim` is the SwiGLU hidden.
    depth_kv: "none" (plain OLMo2), "attn" (attention K/V reused as depth K/V, no extra params),
      "attn_ffn" (+ a K/V projection of each FFN input, the paper's default) or "attn_ffn_extra"
      (+ a separate depth K/V projection of each attention input instead of reusing its K/V).
    norm: "pre" x + f(n(x)); "post" n(x + f(x)); "reordered" (OLMo2) x + n(f(x)).
    qk_norm: per-head RMSNorm on q and k (and, at read time, on depth keys).
    rope_theta: rotary base. tie_embeddings: logits use the input embedding.
    scan_layers: blocks as `nn.scan` (params with a leading "layers" axis) or a Python loop.
    remat: what each block keeps for the backward pass (the rest is recomputed there), in every
      block, the linear-memory stack's depth writers included (it saves a writer's policy residuals
      but never the depth buffers it read, so memory stays linear in depth). Options, least memory
      first; the memory is
      an estimate per block at the 700M shape (B8 x T4096 = 32K tokens, M 1024, 16 q / 8 kv heads of
      64, SwiGLU 4096, bf16: one [tokens, 1024] activation is 64 MiB):
        "full": only the block input (64 MiB); the whole block, attention kernel included, runs twice.
        "save_attention_out": + the attention output and the kernel's lse (~130 MiB): the backward
          pass skips the attention forward kernel and recomputes the projections, norms and FFN.
        "save_qkv_attention_out": + the q / k / v projection outputs (~260 MiB): also skips the QKV
          matmuls (QK-norm and RoPE are redone elementwise).
        "dots_with_no_batch_dims_saveable" (JAX's): every projection output, q / k / v / out, FFN
          gate / up / down (~830 MiB), but not the attention kernel's: it runs twice.
        "dots_saveable" (JAX's): every matmul output, batched ones too; but an attention backend's
          matmuls are hidden in its custom_vjp, so the kernel still runs twice.
        "save_dots_and_attention": projections and attention (~900 MiB): only elementwise work
          (norms, RoPE, SwiGLU's activation) is recomputed.
        "none": no checkpoint, every intermediate is kept (float32 norm internals too; ~3 GiB).
    dtype, param_dtype: compute and parameter dtypes. attention_impl: `moda_attention`'s
      `implementation=` (None = best for the platform).
    init_std: N(0, init_std) weights. norm_eps: RMSNorm epsilon.
    depth_chunk: C >= 1, chunk-visible MoDA in every attention: a token reads the depth slots of
      every earlier token of its chunk [(t // C) * C, t] (same document), not only its own. 1 is
      plain MoDA.
    depth_window: W >= 0: each attention reads only the W most recent depth slots
      (depth_start = max(0, depth_len - W)); 0 reads all.
    depth_mixer: another way to read earlier layers (docs/peers.md): "none" (the plain residual
      stream), "denseformer", "value_residual", "hyper_connections", "attention_residuals" or
      "depth_attention" (depth-only attention over the depth stream with its own softmax, added to the
      sequence attention; without depth_kv it reads the attention K/V, i.e. the "attn" layout).
      Every mixer combines with every depth_kv.
    hyper_connections_streams: n >= 1 residual streams of hyper_connections (mHC: n >= 2).
    hyper_connections_manifold: mHC, the residual mixing projected to doubly stochastic matrices.
  """

  vocab_size: int
  num_layers: int
  d_model: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  max_seq_len: int = 4096
  depth_kv: str = "attn_ffn"
  norm: str = "reordered"
  qk_norm: bool = True
  rope_theta: float = 10_000.0
  tie_embeddings: bool = False
  scan_layers: bool = True
  remat: str = "none"
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention_impl: str | None = None
  init_std: float = 0.02
  norm_eps: float = 1e-6
  depth_chunk: int = 1
  depth_window: int = 0
  depth_mixer: str = "none"
  hyper_connections_streams: int = 4
  hyper_connections_manifold: bool = False

  def __post_init__(self):
    for name in ("vocab_size", "num_layers", "d_model", "num_heads", "num_kv_heads", "head_dim",
                 "mlp_dim", "max_seq_len"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"ModelConfig.{name}={value!r}: expected a positive int.")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"ModelConfig.num_heads={self.num_heads}: expected a multiple of "
                       f"num_kv_heads={self.num_kv_heads} (GQA groups).")
    if self.head_dim % 2:
      raise ValueError(f"ModelConfig.head_dim={self.head_dim}: expected an even number (RoPE rotates "
                       "pairs of dimensions).")
    for name, allowed in (("depth_kv", DEPTH_KV_VARIANTS), ("norm", NORM_PLACEMENTS),
                          ("remat", REMAT_OPTIONS), ("dtype", DTYPES), ("param_dtype", DTYPES),
                          ("depth_mixer", DEPTH_MIXERS)):
      if getattr(self, name) not in allowed:
        raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}: expected one of {allowed}.")
    for name, lowest in (("depth_chunk", 1), ("depth_window", 0)):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
        raise ValueError(f"ModelConfig.{name}={value!r}: expected an int >= {lowest}.")
      if value != _NEUTRAL[name] and not self.uses_depth:
        raise ValueError(f"ModelConfig.{name}={value!r} needs a depth stream, but depth_kv='none'; "
                         f"use depth_kv='attn' or another variant, or {name}={_NEUTRAL[name]}.")
    self._validate_hyper_connections()
    for name in ("qk_norm", "tie_embeddings", "scan_layers"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}: expected a bool.")
    for name in ("rope_theta", "init_std", "norm_eps"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"ModelConfig.{name}={value!r}: expected a number > 0.")
    if self.attention_impl is not None:
      from pallas_kernels import IMPLEMENTATIONS  # local: keeps config importable without jax
      if self.attention_impl not in IMPLEMENTATIONS:
        raise ValueError(f"ModelConfig.attention_impl={self.attention_impl!r}: expected None or one "
                         f"of {IMPLEMENTATIONS}.")

  def _validate_hyper_connections(self):
    streams, manifold = self.hyper_connections_streams, self.hyper_connections_manifold
    if isinstance(streams, bool) or not isinstance(streams, int) or streams < 1:
      raise ValueError(f"ModelConfig.hyper_connections_streams={streams!r}: expected an int >= 1.")
    if not isinstance(manifold, bool):
      raise ValueError(f"ModelConfig.hyper_connections_manifold={manifold!r}: expected a bool.")
    if self.depth_mixer != "hyper_connections":
      for name, neutral in _HC_DEFAULTS.items():
        if getattr(self, name) != neutral:
          raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r} needs depth_mixer="
                           f"'hyper_connections', but depth_mixer={self.depth_mixer!r}; set it or "
                           f"{name}={neutral!r}.")
    if manifold and streams < 2:
      raise ValueError(f"ModelConfig.hyper_connections_streams={streams}: mHC "
                       "(hyper_connections_manifold=True) expects n >= 2 streams.")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
    """From a plain dict (e.g. `ConfigDict.to_dict()`); unknown keys raise ValueError."""
    known = {f.name for f in dataclasses.fields(cls)}
    # Fields of earlier versions, dropped so their checkpoints still load (z_loss_weight is now the
    # run setting `config.z_loss_weight`; depth memory is always linear).
    d = {k: v for k, v in d.items() if k not in _RETIRED_FIELDS}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"ModelConfig.from_dict got unknown keys {unknown}; expected a subset of "
                       f"{sorted(known)}.")
    return cls(**dict(d))

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  # --- The depth stream's layout, derived from `depth_kv` (docs/moda.md). ---

  @property
  def depth_layout(self) -> str:
    """What the depth stream holds: `depth_kv`, except that depth attention without it reads the
    attention K/V (the "attn" layout, no extra parameters)."""
    if self.depth_kv == "none" and self.depth_mixer == "depth_attention":
      return "attn"
    return self.depth_kv

  @property
  def uses_depth(self) -> bool:
    return self.depth_layout != "none"

  @property
  def ffn_writes_depth(self) -> bool:
    """Whether each FFN writes kv_proj(its input) as a depth slot."""
    return self.depth_layout in ("attn_ffn", "attn_ffn_extra")

  @property
  def separate_attn_depth_proj(self) -> bool:
    """Whether attention writes a separate depth K/V projection instead of its own raw K/V."""
    return self.depth_layout == "attn_ffn_extra"

  # --- The depth mixers (docs/peers.md), derived from `depth_mixer`. ---

  @property
  def has_mixer(self) -> bool:
    return self.depth_mixer != "none"

  @property
  def joint_depth_read(self) -> bool:
    """MoDA: sequence and depth keys under one softmax; False: depth attention's own softmax."""
    return self.depth_mixer != "depth_attention"

  @property
  def mixes_values(self) -> bool:
    """Value residual learning: every attention's values mixed with the first layer's."""
    return self.depth_mixer == "value_residual"

  @property
  def hyper_streams(self) -> int:
    """Residual streams of hyper-connections (0: a single plain residual stream)."""
    return self.hyper_connections_streams if self.depth_mixer == "hyper_connections" else 0

  @property
  def attention_residuals(self) -> bool:
    return self.depth_mixer == "attention_residuals"

  @property
  def outputs_per_block(self) -> int:
    """Outputs a (non-last) block writes to the outputs buffer: DenseFormer its block output,
    attention residuals its two sublayer outputs; 0 without such a buffer."""
    return {"denseformer": 1, "attention_residuals": 2}.get(self.depth_mixer, 0)

  @property
  def num_output_slots(self) -> int:
    """Slots of the outputs buffer: the embedding, then the non-last blocks' outputs (0: none)."""
    per_block = self.outputs_per_block
    return 1 + (self.num_layers - 1) * per_block if per_block else 0

  @property
  def uses_linear_stack(self) -> bool:
    """Whether the writer blocks have write-once buffers (depth K/V, earlier outputs) whose
    training memory the linear-memory stack keeps linear in depth."""
    return self.num_layers > 1 and (self.num_depth_slots > 0 or self.num_output_slots > 0)

  @property
  def slots_per_block(self) -> int:
    """Depth slots one (non-last) block writes: its attention's, then its FFN's."""
    return int(self.uses_depth) + int(self.ffn_writes_depth)

  @property
  def num_depth_slots(self) -> int:
    """L_max: the slots any sublayer reads, i.e. the last block's attention `depth_len`.

    The last block writes nothing: its FFN's K/V and its attention's K/V would be read by no later
    sublayer, so they are neither computed (no parameters for them) nor stored.
    """
    return (self.num_layers - 1) * self.slots_per_block

  def depth_read_start(self, depth_len):
    """The first slot an attention reading `depth_len` slots sees: the bounded window's start."""
    if self.depth_window == 0:
      return 0
    start = depth_len - self.depth_window
    return max(start, 0) if isinstance(start, int) else start.clip(min=0)

  def depth_len_of_block(self, block: int) -> int:
    """Slots written before block `block`'s attention reads the stream."""
    return block * self.slots_per_block
