"""Pallas TPU backend specifics, on CPU: multi-tile grids, the TPU simulator, unwritten slots, support.

The shared operator suite (test_moda_attention.py, `-k pallas_tpu`) checks `pallas_tpu` against the
float64 oracle with the default tiles, where short test sequences fit one tile. Here small
`TPUBlockSizes` force many query tiles, two key blocks, causal block skipping, padded keys and depth
steps that are fully written, partly written and unwritten; the TPU interpreter (`InterpretParams`)
checks one case for races, out-of-bounds reads and unwritten output (it fills fresh memory with NaN).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

import oracle
from operator_cases import assert_close, segment_ids
from pallas_kernels import tpu
from pallas_kernels.tpu_block_sizes import TPUBlockSizes

# 16-token query tiles, 128-token key blocks, 2-slot depth steps.
_SMALL_BLOCKS = TPUBlockSizes(block_q=16, block_k=128, block_slots=2)


def _inputs(rng, batch, seq_len, q_heads, kv_heads, head_dim, slots, dtype=jnp.float32,
            depth_q=False):
  """(q, k, v, depth_k, depth_v[, depth_q]), (d_out, d_lse)."""
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)
  arrays = (normal(batch, seq_len, q_heads, head_dim), normal(batch, seq_len, kv_heads, head_dim),
            normal(batch, seq_len, kv_heads, head_dim),
            normal(batch, seq_len, slots, kv_heads, head_dim),
            normal(batch, seq_len, slots, kv_heads, head_dim))
  if depth_q:
    arrays += (normal(batch, seq_len, q_heads, head_dim),)
  cotangents = (normal(batch, seq_len, q_heads, head_dim),
                jnp.asarray(rng.normal(size=(batch, seq_len, q_heads)), jnp.float32))
  return arrays, cotangents


@functools.partial(jax.jit, static_argnames=("causal", "scale", "interpret", "block_sizes"))
def _forward_and_grads(arrays, cotangents, depth_len, segment_ids_BT, *, causal, scale, interpret,
                       block_sizes):
  attend = lambda a: tpu.attention(*a[:5], depth_len, segment_ids_BT, causal=causal, scale=scale,
                                   interpret=interpret, block_sizes=block_sizes,
                                   depth_q_BTHD=(a + (None,))[5])
  (out, lse), pullback = jax.vjp(attend, arrays)
  return out, lse, pullback(cotangents)[0]


def _check_against_oracle(arrays, cotangents, depth_len, seg, *, causal, scale, interpret,
                          block_sizes):
  out, lse, grads = _forward_and_grads(arrays, cotangents, jnp.int32(depth_len), seg, causal=causal,
                                       scale=scale, interpret=interpret, block_sizes=block_sizes)
  depth_q = (arrays + (None,))[5]
  expected_out, expected_lse = oracle.forward(*arrays[:5], depth_len=depth_len, causal=causal,
                                              scale=scale, segment_ids=seg, depth_q=depth_q)
  expected_grads = oracle.backward(*arrays[:5], d_out=cotangents[0], d_lse=cotangents[1],
                                   depth_len=depth_len, causal=causal, scale=scale, segment_ids=seg,
                                   depth_q=depth_q)
  assert_close("out", out, expected_out, "float32")
  assert_close("lse", lse, expected_lse, "float32")
  assert len(grads) == len(arrays)
  for name, grad, expected in zip(("dq", "dk", "dv", "ddepth_k", "ddepth_v", "ddepth_q"), grads,
                                  expected_grads):
    assert_close(name, grad, expected, "float32")
  for name, grad in (("ddepth_k", grads[3]), ("ddepth_v", grads[4])):
    assert not np.asarray(grad[:, :, depth_len:]).any(), f"{name}: unwritten slots got gradient"


@pytest.mark.parametrize("causal, segmented, depth_q", [(True, True, False), (False, False, False),
                                                       (True, False, True)])
def test_many_tiles_match_oracle(causal, segmented, depth_q):
  # T = 150 pads to 256: 16 query tiles x 2 key blocks. Causal skips the upper blocks; non-causal
  # must mask the 106 padded keys. L = 5 in steps of 2 with depth_len = 3: a full, a half-written
  # and an unwritten depth step. G = 3 query heads share the kv head.
  rng = np.random.default_rng(7)
  arrays, cotangents = _inputs(rng, batch=1, seq_len=150, q_heads=3, kv_heads=1, head_dim=32,
                               slots=5, depth_q=depth_q)
  seg = jnp.asarray(segment_ids(rng, 1, 150, "packed")) if segmented else None
  _check_against_oracle(arrays, cotangents, 3, seg, causal=causal, scale=0.3, interpret=True,
                        block_sizes=_SMALL_BLOCKS)


def test_tpu_simulator_finds_no_races_or_unwritten_output():
  # pltpu.InterpretParams simulates TPU memory: out-of-bounds reads raise, fresh buffers are NaN (so
  # an output block the kernels forget to write shows up in the oracle check), and with two
  # simulated cores the "parallel" grid axes run concurrently while races are recorded.
  # The race record is reset per kernel, so the forward is checked on its own first. A separate
  # depth_q: its input block, and the d depth_q output and accumulator, are simulated too.
  from jax._src.pallas.mosaic.interpret import interpret_pallas_call as simulator  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(11)
  arrays, cotangents = _inputs(rng, batch=1, seq_len=20, q_heads=2, kv_heads=1, head_dim=32, slots=3,
                               depth_q=True)
  params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)
  blocks = TPUBlockSizes(block_q=16, block_slots=2)
  out, _ = jax.jit(lambda a: tpu.attention(*a[:5], jnp.int32(2), None, causal=True, scale=0.2,
                                           interpret=params, block_sizes=blocks,
                                           depth_q_BTHD=a[5]))(arrays)
  assert not simulator.races.races_found
  assert np.isfinite(np.asarray(out)).all()
  _check_against_oracle(arrays, cotangents, 2, None, causal=True, scale=0.2, interpret=params,
                        block_sizes=blocks)
  assert not simulator.races.races_found


def test_unwritten_slots_are_never_read():
  # NaN in unwritten slots must not change a single bit of the outputs or the gradients: the kernels
  # bound their slot loops by depth_len (and never fetch whole unwritten steps) instead of masking.
  rng = np.random.default_rng(3)
  (q, k, v, depth_k, depth_v), cotangents = _inputs(rng, batch=2, seq_len=12, q_heads=4, kv_heads=2,
                                                    head_dim=32, slots=6)
  written = 3
  poison = lambda x: x.at[:, :, written:].set(jnp.nan)
  run = functools.partial(_forward_and_grads, depth_len=jnp.int32(written), segment_ids_BT=None,
                          causal=True, scale=0.2, interpret=True, block_sizes=_SMALL_BLOCKS)
  clean = run((q, k, v, depth_k.at[:, :, written:].set(0), depth_v.at[:, :, written:].set(0)),
              cotangents)
  poisoned = run((q, k, v, poison(depth_k), poison(depth_v)), cotangents)
  for a, b in zip(jax.tree.leaves(clean), jax.tree.leaves(poisoned)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_float16_on_a_real_tpu_falls_back():
  x = jnp.zeros((1, 8, 1, 32), jnp.float16)
  with pytest.raises(NotImplementedError, match="float16"):
    tpu.attention(x, x, x, None, None, None, None, causal=True, scale=1.0, interpret=False)


def test_tiles_over_the_vmem_budget_fall_back():
  q = jax.ShapeDtypeStruct((1, 4096, 64, 2048), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((1, 4096, 1, 2048), jnp.bfloat16)
  with pytest.raises(NotImplementedError, match="VMEM"):
    jax.eval_shape(functools.partial(tpu.attention, causal=True, scale=1.0, interpret=False),
                   q, k, k, None, None, None, None)


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

