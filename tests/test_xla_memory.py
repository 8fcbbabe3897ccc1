"""Peak temporary memory of forward + backward: linear in T for `xla`, quadratic for `reference`.

XLA's buffer assignment reports the temporaries a compiled program needs
(`compile().memory_analysis().temp_size_in_bytes`, arguments and outputs excluded), so the claim is
checked on the compiled program itself, without running it. The dense `reference` holds [T, T] logits
per head and must show ~4x per doubling of T (that also shows the measurement can see quadratic
growth); the blocked `xla` backend holds one [block * G, block] tile at a time plus O(T * D) buffers.
Run with `-s` to print the table (BENCHMARKS.md quotes it).
"""

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import moda_attention

_SEQ_LENS = (1024, 2048, 4096)
_BATCH, _Q_HEADS, _KV_HEADS, _HEAD_DIM, _SLOTS = 1, 4, 2, 64, 16

# LLVM's optimization level changes code speed, not buffer assignment (the sizes are identical at
# level 0 and the default); level 0 halves the compile time of these six programs.
_FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _memory(implementation: str, seq_len: int, **options):
  """memory_analysis() of jit(grad) of sum(out) + sum(lse) w.r.t. all five inputs, float32, causal."""
  shape = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  b, t, d = _BATCH, seq_len, _HEAD_DIM
  args = (shape(b, t, _Q_HEADS, d), shape(b, t, _KV_HEADS, d), shape(b, t, _KV_HEADS, d),
          shape(b, t, _SLOTS, _KV_HEADS, d), shape(b, t, _SLOTS, _KV_HEADS, d))

  def loss(*arrays):
    out, lse = moda_attention(*arrays, return_lse=True, implementation=implementation, **options)
    return jnp.sum(out) + jnp.sum(lse)

  grad = jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))), compiler_options=_FAST_COMPILE)
  return grad.lower(*args).compile().memory_analysis()


@pytest.fixture(scope="module")
def table():
  """{implementation: [(temp bytes, argument bytes) per T in _SEQ_LENS]}, printed as markdown."""
  rows = {impl: [_memory(impl, t) for t in _SEQ_LENS] for impl in ("xla", "reference")}
  rows = {impl: [(m.temp_size_in_bytes, m.argument_size_in_bytes) for m in ms]
          for impl, ms in rows.items()}
  print(f"\nforward+backward temp memory, float32 causal, B={_BATCH} Hq={_Q_HEADS} Hk={_KV_HEADS} "
        f"D={_HEAD_DIM} L={_SLOTS} (MiB; ratio to the previous T)")
  print("| implementation | " + " | ".join(f"T={t}" for t in _SEQ_LENS) + " |")
  print("|---|" + "---|" * len(_SEQ_LENS))
  for impl, sizes in rows.items():
    cells = [f"{sizes[0][0] / 2**20:.1f}"]
    cells += [f"{cur / 2**20:.1f} (x{cur / prev:.2f})" for (prev, _), (cur, _) in zip(sizes, sizes[1:])]
    print(f"| {impl} | " + " | ".join(cells) + " |")
  return rows


def _growth(sizes):
  return [cur / prev for (prev, _), (cur, _) in zip(sizes, sizes[1:])]


def test_xla_temp_memory_grows_linearly_in_seq_len(table):
  # Linear growth plus a constant (the tiles) gives a ratio <= 2 per doubling; quadratic gives ~4.
  for ratio in _growth(table["xla"]):
    assert ratio <= 2.2, f"xla temp memory grew x{ratio:.2f} when T doubled: {table['xla']}"


def test_xla_temp_memory_is_smaller_than_its_inputs(table):
  # O(T * D) with a small constant: the temporaries never exceed the inputs (q, k, v, depth pair),
  # while one [T, T] float32 logit matrix per head would be 4x the inputs at T = 4096.
  for temp, arguments in table["xla"]:
    assert temp <= arguments, f"xla temp {temp} B exceeds its {arguments} B of inputs"


def test_reference_temp_memory_grows_quadratically_in_seq_len(table):
  # The control: the measurement does see quadratic growth when it is there.
  for ratio in _growth(table["reference"]):
    assert ratio >= 3.5, f"reference temp memory grew only x{ratio:.2f} when T doubled"
  xla_temp, reference_temp = table["xla"][-1][0], table["reference"][-1][0]
  assert 20 * xla_temp <= reference_temp, (xla_temp, reference_temp)


@pytest.mark.parametrize("depth_chunk", [4, 512], ids=["chunks_in_blocks", "sliding_windows"])
def test_xla_chunk_visible_depth_stays_linear_in_seq_len(depth_chunk):
  # C = 4 fits the CPU tile (chunks inside blocks); C = 512 does not (windows of block + C - 1 tokens
  # and a float32 depth-gradient carry): both are O(T) plus a T-independent tile.
  sizes = [_memory("xla", t, depth_chunk=depth_chunk) for t in _SEQ_LENS]
  sizes = [(m.temp_size_in_bytes, m.argument_size_in_bytes) for m in sizes]
  for ratio in _growth(sizes):
    assert ratio <= 2.2, f"xla temp memory grew x{ratio:.2f} when T doubled (depth_chunk={depth_chunk}): {sizes}"
