"""Dense float32 MoDA: one softmax over the concatenated [sequence | depth] logits.

Readable above all: this is the formulation the fast backends are checked against. Memory is
O(T^2 + T * L) per head; use `xla` or a Pallas backend for long sequences.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def attention(q_BTHD, k_BTKD, v_BTKD, depth_k_BTLKD, depth_v_BTLKD, depth_len, segment_ids_BT,
              *, causal: bool, scale: float, interpret=False, depth_q_BTHD=None):
  """See `pallas_kernels.api` for the normalized backend signature. `interpret` is ignored."""
  del interpret
  batch, seq_len, num_q_heads, head_dim = q_BTHD.shape
  num_kv_heads = k_BTKD.shape[2]
  group = num_q_heads // num_kv_heads

  # Query head h reads kv head h // G: view q as [B, T, Hk, G, D].
  q_BTKGD = q_BTHD.astype(jnp.float32).reshape(batch, seq_len, num_kv_heads, group, head_dim)
  k_BSKD = k_BTKD.astype(jnp.float32)
  v_BSKD = v_BTKD.astype(jnp.float32)

  # Sequence logits [B, Hk, G, T, S] and which of them a query may see.
  seq_logits = scale * jnp.einsum("btkgd,bskd->bkgts", q_BTKGD, k_BSKD, precision=_HIGHEST)
  visible_TS = jnp.ones((seq_len, seq_len), bool)
  if causal:
    visible_TS = jnp.tril(visible_TS)
  visible_BTS = jnp.broadcast_to(visible_TS, (batch, seq_len, seq_len))
  if segment_ids_BT is not None:
    visible_BTS = visible_BTS & (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])
  seq_logits = jnp.where(visible_BTS[:, None, None], seq_logits, -jnp.inf)

  if depth_k_BTLKD is None:
    logits, values = seq_logits, None
  else:
    num_slots = depth_k_BTLKD.shape[2]
    depth_q_BTKGD = q_BTKGD if depth_q_BTHD is None else depth_q_BTHD.astype(jnp.float32).reshape(
        q_BTKGD.shape)
    # Depth logits [B, Hk, G, T, L]: each token only sees its own slots l < depth_len.
    depth_logits = scale * jnp.einsum("btkgd,btlkd->bkgtl", depth_q_BTKGD,
                                      depth_k_BTLKD.astype(jnp.float32), precision=_HIGHEST)
    slot_valid_L = jnp.arange(num_slots) < depth_len
    depth_logits = jnp.where(slot_valid_L, depth_logits, -jnp.inf)
    logits = jnp.concatenate([seq_logits, depth_logits], axis=-1)

  lse_BKGT = jax.nn.logsumexp(logits, axis=-1)
  probs = jnp.exp(logits - lse_BKGT[..., None])
  out_BTKGD = jnp.einsum("bkgts,bskd->btkgd", probs[..., :seq_len], v_BSKD, precision=_HIGHEST)
  if depth_k_BTLKD is not None:
    out_BTKGD += jnp.einsum("bkgtl,btlkd->btkgd", probs[..., seq_len:],
                            depth_v_BTLKD.astype(jnp.float32), precision=_HIGHEST)

  out_BTHD = out_BTKGD.reshape(batch, seq_len, num_q_heads, head_dim).astype(q_BTHD.dtype)
  lse_BTH = jnp.transpose(lse_BKGT, (0, 3, 1, 2)).reshape(batch, seq_len, num_q_heads)
  return out_BTHD, lse_BTH
