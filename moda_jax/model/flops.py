"""Model FLOP count (for MFU), including the depth part of MoDA attention.

Counts multiply-adds as 2 FLOPs, only in matmuls (norms, softmax, RoPE are noise at this scale).
Sequence attention is counted causally (T (T+1) / 2 query-key pairs), ignoring that packing masks
more; the depth part counts the slots each attention actually reads (`depth_len_of_block`), not the
padded `L_max` buffer. Training = 3x forward (backward = 2x forward), without remat recomputation,
the usual MFU convention (PaLM, appendix B). A depth mixer's own work is the "depth_mixer" part.
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
  parts["depth_mixer"] = float(mixer_flops_per_sequence(cfg, seq_len))
  return parts


def mixer_flops_per_sequence(cfg: ModelConfig, seq_len: int) -> int:
  """Forward FLOPs of the depth mixer (docs/peers.md), by the same convention: its contractions
  (weighted sums over earlier outputs or streams, the small projections that make the weights);
  its norms, tanh / sigmoid and the Sinkhorn iterations' n x n work are noise next to them.
  Depth attention reads the depth stream: counted in "depth_attention" above."""
  T, N, M = seq_len, cfg.num_layers, cfg.d_model
  if cfg.outputs_per_block == 1:  # DenseFormer: DWA_b sums b + 2 tensors, N (N + 3) / 2 in all
    return 2 * T * M * (N * (N + 3) // 2)
  if cfg.mixes_values:  # lambda_1 V_1 + lambda_2 V in blocks 1 .. N-1
    return 3 * T * cfg.num_kv_heads * cfg.head_dim * (N - 1)
  if cfg.hyper_streams:
    n = cfg.hyper_streams
    # Per sublayer and token: the weights from the n streams (HC: W_b, W_m [M], W_r [M, n] on each
    # stream; mHC: phi [n M, n^2 + 2 n] on the flattened streams), then h_0 = sum a_i H_i,
    # the n x n stream mix and the write-back b_j T(h_0).
    weights = 2 * n * M * (n * n + 2 * n) if cfg.hyper_connections_manifold else 2 * n * M * (n + 2)
    mixing = 2 * n * M + 2 * n * n * M + 2 * n * M
    return 2 * N * T * (weights + mixing)
  if cfg.attention_residuals:  # every entry read: a logit w . v_i and a weighted term
    entries = 2 * N * N + 3 * N  # block b: 2 b + 2 for its FFN's input, 2 b + 3 for the next one's
    return 4 * T * M * entries
  return 0


def train_flops_per_sequence(cfg: ModelConfig, seq_len: int) -> float:
  return 3.0 * sum(forward_flops_per_sequence(cfg, seq_len).values())


def peak_flops_per_device(device_kind: str) -> float | None:
  """Dense bf16 peak for a `jax.Device.device_kind`, or None when unknown (e.g. CPU)."""
  for name, peak in _PEAK_BF16_FLOPS:
    if name.lower() in device_kind.lower():
      return peak
  return None
