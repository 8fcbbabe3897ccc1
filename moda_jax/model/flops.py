"""Model FLOP count (for MFU), including the depth part of MoDA attention.

Counts multiply-adds as 2 FLOPs, only in matmuls (norms, softmax, RoPE are noise at this scale).
Sequence attention is counted causally (T (T+1) / 2 query-key pairs), ignoring that packing masks
more; the depth part counts the slots each attention actually reads (`depth_len_of_block`), not the
padded `L_max` buffer. Training = 3x forward (backward = 2x forward), without remat recomputation,
the usual MFU convention (PaLM, appendix B).
"""

from moda_jax.model.config import ModelConfig

# Dense bf16 peak per device, FLOP/s (vendor datasheets, no sparsity).
_PEAK_BF16_FLOPS = (
    ("H200", 989e12), ("H100", 989e12), ("H800", 989e12), ("H20", 148e12), ("A100", 312e12),
    ("A800", 312e12), ("L40S", 362e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12), ("TPU v4", 275e12), ("TPU v6", 918e12),
)


def forward_flops_per_sequence(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
  """Forward FLOPs of one sequence of `seq_len` tokens, split into named parts."""
  T, M, H, K, D, F = seq_len, cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  qkvo = 2 * T * M * (2 * H * D + 2 * K * D)
  mlp = 2 * T * M * 3 * F
  kv_proj = 2 * T * M * 2 * K * D  # one extra depth K/V projection (written by non-last blocks)
  extra_projs = int(cfg.ffn_writes_depth) + int(cfg.separate_attn_depth_proj)
  causal_pairs = T * (T + 1) / 2
  parts = {"dense": 0.0, "depth_kv_proj": 0.0, "attention": 0.0, "depth_attention": 0.0}
  for block in range(cfg.num_layers):
    parts["dense"] += qkvo + mlp
    if block < cfg.num_layers - 1:
      parts["depth_kv_proj"] += extra_projs * kv_proj
    parts["attention"] += 2 * 2 * H * D * causal_pairs  # q.k and p.v
    parts["depth_attention"] += 2 * 2 * H * D * T * cfg.depth_len_of_block(block)
  parts["logits"] = 2.0 * T * M * cfg.vocab_size
  return parts


def train_flops_per_sequence(cfg: ModelConfig, seq_len: int) -> float:
  return 3.0 * sum(forward_flops_per_sequence(cfg, seq_len).values())


def peak_flops_per_device(device_kind: str) -> float | None:
  """Dense bf16 peak for a `jax.Device.device_kind`, or None when unknown (e.g. CPU)."""
  for name, peak in _PEAK_BF16_FLOPS:
    if name.lower() in device_kind.lower():
      return peak
  return None
