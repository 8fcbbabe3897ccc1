"""Segment-id layouts and brute-force visibility shared by the segment-skipping tests of the Pallas GPU
backends (tests/test_triton_segments.py, tests/test_mosaic_gpu_segments.py).

The layouts are what a wrong bound gets wrong: an id in two separated runs (bounds from run starts or
run ends miss the other run), documents with padding, one document, every token its own id, shuffled
ids, interleaved ids. `unit` scales the documents' lengths to a backend's tiles (1: T >= 46).
"""

import jax
import jax.numpy as jnp
import numpy as np

import operator_cases as oc
from pallas_kernels import api, spec as spec_lib


def two_runs(seq_len, unit=1):
  """Id 1 in two runs with a document between them, then another document: [1]*12 + [2]*20 + [1]*14 + 3s."""
  return np.array([1] * 12 * unit + [2] * 20 * unit + [1] * 14 * unit + [3] * (seq_len - 46 * unit))


def documents(seq_len, unit=1):
  """Contiguous documents of uneven lengths and the padding (id 0) at the end of the row."""
  return np.array([1] * 13 * unit + [2] * 19 * unit + [3] * 11 * unit + [0] * (seq_len - 43 * unit))


LAYOUTS = {
    "two_runs": two_runs,
    "documents_padding": documents,
    "single_document": lambda t, unit=1: np.full(t, 7),
    "own_ids": lambda t, unit=1: np.arange(t)[::-1] * 3,
    "shuffled": lambda t, unit=1: np.random.default_rng(t).integers(0, 3, t),
    "interleaved": lambda t, unit=1: np.arange(t) % 2 + 4 * (np.arange(t) >= t - 5),
}
CONTIGUOUS = ("documents_padding", "single_document", "own_ids")  # every id one run: bounds are tight


def ids(layouts, seq_len, unit=1, table=LAYOUTS):
  """[len(layouts), T] int32: one batch row per layout, by name in `table` (a backend's own may add some)."""
  return np.stack([table[name](seq_len, unit) for name in layouts]).astype(np.int32)


def span(ids_BT):
  """[B, T, 2] int32: `spec.segment_span` of the ids, as the backends pass it to their launchers."""
  return jnp.stack(spec_lib.segment_span(jnp.asarray(ids_BT)), axis=-1)


def brute_span(ids_T):
  """(first, last) token of each token's segment, by comparing every pair."""
  same = ids_T[None, :] == ids_T[:, None]
  index = np.arange(len(ids_T))
  return np.where(same, index, len(ids_T)).min(1), np.where(same, index, -1).max(1)


def visible(ids_T, causal):
  """[T, T] bool: query t sees key s, by brute force over the ids and positions."""
  index = np.arange(len(ids_T))
  seen = ids_T[:, None] == ids_T[None, :]
  return seen & (index[None, :] <= index[:, None]) if causal else seen


def run_bounds(ids_T, tile_tokens, unit_tokens):
  """The too-aggressive bounds of contiguous runs: the start and end of the run around each token."""
  change = np.flatnonzero(np.diff(ids_T)) + 1
  starts, ends = np.concatenate([[0], change]), np.concatenate([change, [len(ids_T)]]) - 1
  run = np.searchsorted(change, np.arange(len(ids_T)), side="right")
  tiles = [slice(i, i + tile_tokens) for i in range(0, len(ids_T), tile_tokens)]
  return np.array([[starts[run[t]].min() // unit_tokens, ends[run[t]].max() // unit_tokens + 1] for t in tiles])


def case_inputs(name, layouts, seq_len, causal, group, slots, *, unit=1, table=LAYOUTS, kv_heads=2,
                head_dim=16, dtype="float32", depth_chunk=None):
  """(case, inputs) of an oracle case with one batch row per layout; with depth a traced depth_len of 3 and
  garbage in the unread slots."""
  case = oc.Case(name, batch=len(layouts), seq_len=seq_len, q_heads=kv_heads * group, kv_heads=kv_heads,
                 head_dim=head_dim, slots=slots, depth_len=3 if slots else None, traced=bool(slots),
                 garbage=bool(slots), causal=causal, depth_chunk=depth_chunk, dtype=dtype)
  return case, oc.make_inputs(case)._replace(segment_ids=jnp.asarray(ids(layouts, seq_len, unit, table)))


def out_lse_grads(case: oc.Case, inputs: oc.Inputs, attention):
  """`attention(prepared inputs, spec)` -> (out, lse) under one jit, depth_len traced: (out, lse, grads of
  q, k, v, depth_k, depth_v)."""
  @oc.jitted
  def run(arrays, segment_ids, d_out, d_lse, depth_len):
    def attend(a):
      prepared, spec = api.prepare(*a, depth_len=depth_len, causal=case.causal, scale=case.scale,
                                   segment_ids=segment_ids, depth_chunk=case.depth_chunk)
      return attention(prepared, spec)

    (out, lse), pullback = jax.vjp(attend, arrays)
    return out, lse, pullback((d_out, d_lse))[0]

  arrays = (inputs.q, inputs.k, inputs.v, inputs.depth_k, inputs.depth_v)
  depth_len = jnp.int32(case.written) if case.has_depth else None
  return run(arrays, inputs.segment_ids, inputs.d_out, inputs.d_lse, depth_len)
