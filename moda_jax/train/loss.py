"""Next-token cross-entropy and z-loss sums, from dense logits or a chunk of positions at a time.

Both return (ce_sum, z_sum) over the valid targets (mask 1): ce = lse - logit[target] and z = lse^2
(PaLM/OLMo2's z-loss keeps log Z near 0 so bf16 logits stay in range), with lse the float32
logsumexp over the vocabulary. The per-token formula is `logit_sums`; the two entry points differ only
in which logits it sees at once.

Why chunks: at the 700M shape (B8 x T4096, V = 100352) the float32 logits are 13 GB per copy, and
autodiff of the dense loss keeps several copies (the logits, their softmax, the cotangent).
`chunked_loss_sums` forms the logits of `chunk_len` positions of every row at a time from the hidden
states and the output layer (`layers.Unembedding`), inside a `lax.scan` whose body is a
`jax.checkpoint`: the forward saves only each chunk's inputs (a slice of the hidden states, which
exist anyway), and the backward pass recomputes that chunk's logits, uses them, and drops them before
the next chunk. Peak memory is then a few [B, chunk_len, V] float32 tensors instead of [B, T, V] ones,
for one extra logits matmul (2 B T M V FLOPs, ~1/3 more output-layer work).
Checkpoint-in-scan rather than a hand-written `custom_vjp`: the gradient is JAX's own derivative of the
same per-chunk function as the dense loss, so the two agree to float rounding by construction, and
nothing about the gradient (z-loss, masking, tied tables) is written twice.

Chunks run along the sequence axis with all rows at once, not over the flattened B*T tokens: a batch
sharded over devices along B stays sharded inside every chunk (a chunk of flattened tokens would sit on
one device). A tail shorter than `chunk_len` is padded with masked positions.
"""

import functools

import jax
import jax.numpy as jnp

from moda_jax.model.layers import Unembedding


def logit_sums(logits_NV: jax.Array, targets_N: jax.Array, mask_N: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(ce_sum, z_sum) of float32 logits [..., V] against int targets [...] weighted by mask [...]."""
  logits_NV = logits_NV.astype(jnp.float32)
  lse_N = jax.nn.logsumexp(logits_NV, axis=-1)
  target_logit_N = jnp.take_along_axis(logits_NV, targets_N[..., None], axis=-1)[..., 0]
  return jnp.sum((lse_N - target_logit_N) * mask_N), jnp.sum(jnp.square(lse_N) * mask_N)


def chunked_loss_sums(hidden_BTM: jax.Array, unembedding: Unembedding, targets_BT: jax.Array,
                      mask_BT: jax.Array, chunk_len: int) -> tuple[jax.Array, jax.Array]:
  """`logit_sums(unembedding.logits(hidden_BTM), targets_BT, mask_BT)` without the [B, T, V] logits.

  `chunk_len` >= 1 positions per chunk (more than T: one chunk of T); see the module docstring.
  """
  if isinstance(chunk_len, bool) or not isinstance(chunk_len, int) or chunk_len < 1:
    raise ValueError(f"chunk_len={chunk_len!r}: expected an int >= 1.")
  batch, seq_len = targets_BT.shape
  chunk_len = min(chunk_len, seq_len)
  num_chunks = -(-seq_len // chunk_len)
  pad = num_chunks * chunk_len - seq_len

  def to_chunks(x):  # [B, T, ...] -> [num_chunks, B, chunk_len, ...]; the padded tail has mask 0
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.swapaxes(x.reshape((batch, num_chunks, chunk_len) + x.shape[2:]), 0, 1)

  # The default policy saves nothing but the inputs: the chunk's logits are recomputed in the
  # backward pass. prevent_cse=False: inside scan, CSE cannot merge the recomputation away.
  @functools.partial(jax.checkpoint, prevent_cse=False)
  def chunk_sums(unembedding, hidden_BCM, targets_BC, mask_BC):
    return logit_sums(unembedding.logits(hidden_BCM), targets_BC, mask_BC)

  def body(sums, chunk):
    return jax.tree.map(jnp.add, sums, chunk_sums(unembedding, *chunk)), None

  zero = jnp.zeros((), jnp.float32)
  chunks = (to_chunks(hidden_BTM), to_chunks(targets_BT), to_chunks(mask_BT.astype(jnp.float32)))
  sums, _ = jax.lax.scan(body, (zero, zero), chunks)
  return sums
