"""Pallas TPU backend specifics, on CPU: multi-tile grids, the TPU simulator, unread slots, support.

The shared operator suite (test_moda_attention.py, `-k pallas_tpu`) checks `pallas_tpu` against the
float64 oracle with the default tiles, where short test sequences fit one tile. Here small
`TPUBlockSizes` force many query tiles, two key blocks, causal block skipping, padded keys and depth
steps that are wholly read, partly read (below depth_start or at / past depth_len) and unread; the
TPU interpreter (`InterpretParams`) checks one case for races, out-of-bounds reads and unwritten
output (it fills fresh memory with NaN).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

import oracle
from operator_cases import assert_close, segment_ids
from pallas_kernels import api
from pallas_kernels import reference
from pallas_kernels import tpu
from pallas_kernels.tpu_block_sizes import TPUBlockSizes

# 16-token query tiles, 128-token key blocks, 2-slot depth steps.
_SMALL_BLOCKS = TPUBlockSizes(block_q=16, block_k=128, block_slots=2)


def _arrays(rng, batch, seq_len, q_heads, kv_heads, head_dim, slots, depth_q=False):
  """(q, k, v, depth_k, depth_v[, depth_q]), (d_out, d_lse), float32."""
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  arrays = (normal(batch, seq_len, q_heads, head_dim), normal(batch, seq_len, kv_heads, head_dim),
            normal(batch, seq_len, kv_heads, head_dim),
            normal(batch, seq_len, slots, kv_heads, head_dim),
            normal(batch, seq_len, slots, kv_heads, head_dim))
  if depth_q:
    arrays += (normal(batch, seq_len, q_heads, head_dim),)
  cotangents = (normal(batch, seq_len, q_heads, head_dim),
                jnp.asarray(rng.normal(size=(batch, seq_len, q_heads)), jnp.float32))
  return arrays, cotangents


def _poison_unread(x_BTLKD, depth_start, depth_len):
  """NaN in every slot a call must not read."""
  return x_BTLKD.at[:, :, :depth_start].set(jnp.nan).at[:, :, depth_len:].set(jnp.nan)


@functools.partial(jax.jit, static_argnames=("backend", "causal", "scale", "backend_options"))
def _forward_and_grads(arrays, cotangents, depth_start, depth_len, segment_ids_BT, *, backend=tpu, causal,
                       scale, backend_options=(("interpret", True), ("block_sizes", _SMALL_BLOCKS))):
  """(out, lse, grads of arrays) with depth_start / depth_len traced."""
  def attend(a):
    inputs, spec = api.prepare(*a[:5], depth_start=depth_start, depth_len=depth_len, causal=causal,
                            scale=scale, segment_ids=segment_ids_BT, depth_q=(a + (None,))[5])
    return backend.attention(inputs, spec, **dict(backend_options))
  (out, lse), pullback = jax.vjp(attend, arrays)
  return out, lse, pullback(cotangents)[0]


def _check_against_oracle(arrays, cotangents, depth_start, depth_len, seg, *, causal, scale,
                          backend_options=(("interpret", True), ("block_sizes", _SMALL_BLOCKS))):
  """Kernel run on arrays whose unread slots are NaN, against the oracle on the read slots only.

  The oracle has no depth_start: slots [depth_start, depth_len) are exactly the depth arrays sliced
  from depth_start with depth_len - depth_start slots written.
  """
  q, k, v, depth_k, depth_v = arrays[:5]
  poisoned = (q, k, v, _poison_unread(depth_k, depth_start, depth_len),
              _poison_unread(depth_v, depth_start, depth_len), *arrays[5:])
  out, lse, grads = _forward_and_grads(poisoned, cotangents, jnp.int32(depth_start), jnp.int32(depth_len),
                                       seg, causal=causal, scale=scale, backend_options=backend_options)
  depth_q = (arrays + (None,))[5]
  read = (q, k, v, depth_k[:, :, depth_start:], depth_v[:, :, depth_start:])
  common = dict(depth_len=depth_len - depth_start, causal=causal, scale=scale, segment_ids=seg, depth_q=depth_q)
  expected_out, expected_lse = oracle.forward(*read, **common)
  expected = oracle.backward(*read, d_out=cotangents[0], d_lse=cotangents[1], **common)
  assert_close("out", out, expected_out, "float32")
  assert_close("lse", lse, expected_lse, "float32")
  assert len(grads) == len(arrays)
  for name, grad, want in zip(("dq", "dk", "dv", "ddepth_k", "ddepth_v", "ddepth_q"), grads, expected):
    if name in ("ddepth_k", "ddepth_v"):
      unread = np.concatenate([np.asarray(grad[:, :, :depth_start]), np.asarray(grad[:, :, depth_len:])], 2)
      assert not unread.any(), f"{name}: unread slots got gradient"
      grad = grad[:, :, depth_start:]
    assert_close(name, grad, want, "float32")
  return out, lse, grads


@pytest.mark.parametrize("causal, segmented, depth_q", [(True, True, False), (False, False, False),
                                                       (True, False, True)])
def test_many_tiles_match_oracle(causal, segmented, depth_q):
  # T = 150 pads to 256: 16 query tiles x 2 key blocks. Causal skips the upper blocks; non-causal
  # must mask the 106 padded keys. L = 5 in steps of 2 with depth_len = 3: a full, a half-read
  # and an unread depth step. G = 3 query heads share the kv head.
  rng = np.random.default_rng(7)
  arrays, cotangents = _arrays(rng, batch=1, seq_len=150, q_heads=3, kv_heads=1, head_dim=32, slots=5,
                               depth_q=depth_q)
  seg = jnp.asarray(segment_ids(rng, 1, 150, "packed")) if segmented else None
  _check_against_oracle(arrays, cotangents, 0, 3, seg, causal=causal, scale=0.3)


def test_depth_start_matches_oracle_and_reference():
  # L = 7 in steps of 2 with slots [3, 6) read: step 0 lies wholly below depth_start (never fetched),
  # step 1 is read from its second slot, step 2 wholly, step 3 not at all (past depth_len). Unread
  # slots hold NaN, so any read of them shows; their cotangents must be exactly zero.
  start, length = 3, 6
  rng = np.random.default_rng(5)
  arrays, cotangents = _arrays(rng, batch=1, seq_len=20, q_heads=2, kv_heads=1, head_dim=32, slots=7)
  out, lse, grads = _check_against_oracle(arrays, cotangents, start, length, None, causal=True, scale=0.3)
  ref_out, ref_lse, ref_grads = _forward_and_grads(
      arrays, cotangents, jnp.int32(start), jnp.int32(length), None, backend=reference, causal=True,
      scale=0.3, backend_options=())
  assert_close("out vs reference", out, ref_out, "float32")
  assert_close("lse vs reference", lse, ref_lse, "float32")
  for name, grad, ref_grad in zip(("dq", "dk", "dv", "ddepth_k", "ddepth_v"), grads, ref_grads):
    assert_close(f"{name} vs reference", grad, ref_grad, "float32")


def test_tpu_simulator_finds_no_races_or_unwritten_output():
  # pltpu.InterpretParams simulates TPU memory: out-of-bounds reads raise, fresh buffers are NaN (so
  # an output block the kernels forget to write shows up in the oracle check), and with two
  # simulated cores the "parallel" grid axes run concurrently while races are recorded.
  # The race record is reset per kernel, so the forward is checked on its own first. A separate
  # depth_q: its input block, and the d depth_q output and accumulator, are simulated too; depth_start
  # = 1 leaves the first slot of the first depth step unread.
  from jax._src.pallas.mosaic.interpret import interpret_pallas_call as simulator  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(11)
  arrays, cotangents = _arrays(rng, batch=1, seq_len=20, q_heads=2, kv_heads=1, head_dim=32, slots=3,
                               depth_q=True)
  options = (("interpret", pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)),
             ("block_sizes", TPUBlockSizes(block_q=16, block_slots=2)))
  inputs, spec = api.prepare(*arrays[:5], depth_start=1, depth_len=2, scale=0.2, depth_q=arrays[5])
  out, _ = jax.jit(lambda i: tpu.attention(i, spec, **dict(options)))(inputs)
  assert not simulator.races.races_found
  assert np.isfinite(np.asarray(out)).all()
  _check_against_oracle(arrays, cotangents, 1, 2, None, causal=True, scale=0.2, backend_options=options)
  assert not simulator.races.races_found


def _depth_only_and_chunked():
  x = jnp.zeros((1, 8, 1, 32), jnp.float32)
  depth = jnp.zeros((1, 8, 2, 1, 32), jnp.float32)
  return [api.prepare(x, None, None, depth, depth), api.prepare(x, x, x, depth, depth, depth_chunk=2)]


@pytest.mark.parametrize("case, reason", [(0, "depth-only"), (1, "depth_chunk=2")])
def test_depth_only_and_depth_chunk_are_not_built(case, reason):
  inputs, spec = _depth_only_and_chunked()[case]
  with pytest.raises(NotImplementedError, match=reason):
    tpu.check_supported(inputs, spec, True)
  with pytest.raises(NotImplementedError, match=reason):
    tpu.attention(inputs, spec, interpret=True)


def test_float16_on_a_real_tpu_falls_back():
  x = jnp.zeros((1, 8, 1, 32), jnp.float16)
  with pytest.raises(NotImplementedError, match="float16"):
    tpu.attention(*api.prepare(x, x, x), interpret=False)


def test_tiles_over_the_vmem_budget_fall_back():
  q = jax.ShapeDtypeStruct((1, 4096, 64, 2048), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((1, 4096, 1, 2048), jnp.bfloat16)
  with pytest.raises(NotImplementedError, match="VMEM"):
    jax.eval_shape(lambda q, k: tpu.attention(*api.prepare(q, k, k), interpret=False), q, k)


@pytest.mark.parametrize("field, value", [("block_q", 12), ("block_k", 64), ("block_slots", 0),
                                          ("block_q", 16.0)])
def test_block_sizes_reject_untileable_values(field, value):
  with pytest.raises(ValueError, match=field):
    TPUBlockSizes(**{field: value})


def test_block_sizes_fit_short_and_long_sequences():
  short = TPUBlockSizes().fit(seq_len=1, num_slots=5)
  assert (short.block_q, short.block_k, short.padded_len) == (16, 16, 16)
  assert (short.block_slots, short.padded_slots) == (5, 5)
  long = TPUBlockSizes(block_q=256, block_k=128, block_slots=8).fit(seq_len=1000, num_slots=72)
  assert (long.padded_len, long.num_q_blocks, long.num_k_blocks) == (1024, 4, 8)
  assert (long.num_depth_blocks, long.padded_slots) == (9, 72)
