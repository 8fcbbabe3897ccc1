"""Next-token cross-entropy and z-loss sums, from dense logits or a chunk of positions at a time.

The sums are (ce_sum, z_sum) over the valid targets (mask 1): ce = lse - logit[target] and z = lse^2
(PaLM/OLMo2's z-loss keeps log Z near 0 so bf16 logits stay in range), with lse the float32
logsumexp over the vocabulary; training minimizes `objective` = ce_sum + z_weight * z_sum. The
per-token formula is `logit_sums`; the two entry points differ only in which logits it sees at once.

Why chunks: at the 700M shape (B8 x T4096, V = 100352) the float32 logits are 13 GB per copy, and
autodiff of the dense loss keeps several copies (the logits, their softmax, the cotangent).
`chunked_objective` forms the logits of `chunk_len` positions of every row at a time from the hidden
states and the output layer (`layers.Unembedding`), in a `lax.scan`, and drops them before the next
chunk. Peak memory is then a few [B, chunk_len, V] float32 tensors instead of [B, T, V] ones.

Its gradient is computed in the forward pass, chunk by chunk, while the chunk's logits exist: the
objective is a scalar, so its cotangent g is one number, and the gradient is g times the gradient at
g = 1. Each chunk's `jax.vjp` of the per-chunk objective (JAX's own derivative of the function the dense
loss uses: nothing about z-loss, masking or tied tables is written twice) is pulled back at 1; the scan
sums the table's gradient and stacks the hidden states'; the backward pass only scales them by g. So the
logits are formed once, and the output layer costs three matmuls (logits, d hidden, d table), not the
four of recomputing each chunk's logits in the backward pass (a checkpointed scan body, as this was:
2 B T M V more FLOPs and the softmax again; at the 700M shape the step's kernels took 19.5 ms less,
BENCHMARKS.md §0k). The forward keeps d hidden (the size of the hidden states) and d table (the size of
the float32 table) for the backward pass. Reverse mode only: a custom_vjp has no forward-mode rule.

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


def objective(ce_sum: jax.Array, z_sum: jax.Array, z_weight: float) -> jax.Array:
  """What training minimizes (before dividing by the token count)."""
  return ce_sum + z_weight * z_sum


def chunked_objective(hidden_BTM: jax.Array, unembedding: Unembedding, targets_BT: jax.Array,
                      mask_BT: jax.Array, chunk_len: int, z_weight: float
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(objective, ce_sum, z_sum) of `logit_sums(unembedding.logits(hidden_BTM), targets_BT, mask_BT)`
  without the [B, T, V] logits.

  `chunk_len` >= 1 positions per chunk (more than T: one chunk of T); see the module docstring.
  Only the objective is differentiable (reverse mode, in hidden_BTM and the table): ce_sum and z_sum
  are metrics and carry no gradient; targets and mask are data.
  """
  if isinstance(chunk_len, bool) or not isinstance(chunk_len, int) or chunk_len < 1:
    raise ValueError(f"chunk_len={chunk_len!r}: expected an int >= 1.")
  total, ce_sum, z_sum = _chunked(min(chunk_len, targets_BT.shape[1]), float(z_weight), hidden_BTM,
                                  unembedding, targets_BT, mask_BT.astype(jnp.float32))
  return total, jax.lax.stop_gradient(ce_sum), jax.lax.stop_gradient(z_sum)


def _chunks(chunk_len: int, seq_len: int):
  """(to_chunks, from_chunks): [B, T, ...] <-> [num_chunks, B, chunk_len, ...], the tail padded."""
  num_chunks = -(-seq_len // chunk_len)
  pad = num_chunks * chunk_len - seq_len

  def to_chunks(x):  # the padded tail has mask 0
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.swapaxes(x.reshape((x.shape[0], num_chunks, chunk_len) + x.shape[2:]), 0, 1)

  def from_chunks(x):
    x = jnp.swapaxes(x, 0, 1)
    return x.reshape((x.shape[0], num_chunks * chunk_len) + x.shape[3:])[:, :seq_len]

  return to_chunks, from_chunks


def _chunk_objective(z_weight, unembedding, hidden_BCM, targets_BC, mask_BC):
  """(objective, (ce_sum, z_sum)) of one chunk."""
  ce_sum, z_sum = logit_sums(unembedding.logits(hidden_BCM), targets_BC, mask_BC)
  return objective(ce_sum, z_sum, z_weight), (ce_sum, z_sum)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _chunked(chunk_len, z_weight, hidden_BTM, unembedding, targets_BT, mask_BT):
  """(objective, ce_sum, z_sum); differentiated, `_chunked_fwd` computes the gradient as it goes."""
  sums, _ = _over_chunks(chunk_len, z_weight, hidden_BTM, unembedding, targets_BT, mask_BT, with_gradient=False)
  return sums


def _chunked_fwd(chunk_len, z_weight, hidden_BTM, unembedding, targets_BT, mask_BT):
  return _over_chunks(chunk_len, z_weight, hidden_BTM, unembedding, targets_BT, mask_BT, with_gradient=True)


def _over_chunks(chunk_len, z_weight, hidden_BTM, unembedding, targets_BT, mask_BT, *, with_gradient: bool):
  """The scan over chunks: ((objective, ce_sum, z_sum), and `with_gradient` (d hidden [B, T, M], d
  unembedding) at cotangent 1, else None)."""
  to_chunks, from_chunks = _chunks(chunk_len, targets_BT.shape[1])

  def body(carry, chunk):
    sums, d_unembedding = carry
    hidden_BCM, targets_BC, mask_BC = chunk
    chunk_objective = lambda u, h: _chunk_objective(z_weight, u, h, targets_BC, mask_BC)
    if with_gradient:
      total, pullback, (ce_sum, z_sum) = jax.vjp(chunk_objective, unembedding, hidden_BCM, has_aux=True)
      d_chunk_unembedding, d_hidden_BCM = pullback(jnp.ones_like(total))  # the gradient at g = 1
      d_unembedding = jax.tree.map(jnp.add, d_unembedding, d_chunk_unembedding)
    else:
      (total, (ce_sum, z_sum)), d_hidden_BCM = chunk_objective(unembedding, hidden_BCM), None
    return (jax.tree.map(jnp.add, sums, (total, ce_sum, z_sum)), d_unembedding), d_hidden_BCM

  zero = jnp.zeros((), jnp.float32)
  d_unembedding = jax.tree.map(jnp.zeros_like, unembedding) if with_gradient else None
  chunks = tuple(map(to_chunks, (hidden_BTM, targets_BT, mask_BT)))
  (sums, d_unembedding), d_hidden_chunks = jax.lax.scan(body, ((zero, zero, zero), d_unembedding), chunks)
  return sums, ((from_chunks(d_hidden_chunks), d_unembedding) if with_gradient else None)


def _chunked_bwd(chunk_len, z_weight, residuals, cotangents):
  del chunk_len, z_weight
  d_hidden_BTM, d_unembedding = residuals
  g = cotangents[0]  # ce_sum and z_sum leave `chunked_objective` through stop_gradient: no cotangent
  scale = lambda d: (g * d.astype(jnp.float32)).astype(d.dtype)
  return scale(d_hidden_BTM), jax.tree.map(scale, d_unembedding), None, None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)
