"""Times MoDA forward and forward+backward on the paper's shapes against cuDNN flash attention.

    python -m pallas_kernels.benchmark [--quick] [--json PATH] [--tune | --ablate | --family] [--mosaic]
                                       [--impls A,B] [--shapes NAME,NAME] [--segments N]

Every implementation that runs here is timed on every shape where it fits; cuDNN
(`jax.nn.dot_product_attention(implementation="cudnn")` itself, row `cudnn`) runs the same sequence shape
without depth. Every other row calls `moda_attention` with its implementation named (never None, which on
GPU now picks the `cudnn` backend for calls without depth): `<impl>_nodepth` is `<impl>` without depth,
so `cudnn_nodepth` is the operator's cuDNN backend (`pallas_kernels/cudnn.py`). `--quick` adds the model's
call (`pallas_triton_depth_q`: a depth_q of its own). The threaded depth cotangent of the model's depth
stack (`return_depth`) is timed in the model's own step (`scripts/profile_train_step.py`): a scan of calls
here would save its carried depth buffers once per call (BENCHMARKS.md §0c). `--ablate` times the kernels
without depth, JAX's Mosaic GPU attention forward and each kernel option flipped (`benchmark_modes`);
`--tune` times tile variants (pallas_triton's; with `--mosaic`, pallas_mosaic_gpu's). Otherwise `--mosaic`
adds the Mosaic GPU backend (`pallas_mosaic_gpu`) and both Pallas backends without depth (`*_nodepth`)
to every shape. `--segments N` passes every `moda_attention` row
segment_ids of N equal documents per row (the `cudnn` row stays without: the unsegmented speed of light) and adds
`cudnn_nodepth` and `pallas_triton_nodepth`: the baseline model's call on its two candidate backends.
`--impls` keeps only the named implementations, `--shapes` only the named shapes (of whichever table the mode
times). `--json` is rewritten after every row, so a run cut by a device call's time limit keeps what it
measured. Each time is the median of `--iters` samples
(`time_ms`) after warm-up.
FLOPs count only the visible logits: sequence 4 * B * Hq * D * (T(T+1)/2 causal, T^2 otherwise),
depth 4 * B * Hq * T * L * D; forward+backward is 3.5x the forward (2 matmuls forward, 5 backward);
with `--segments` they still count every causal logit (dense-equivalent rates).
Bytes are every input read once and every output written once. Roofline = max(FLOPs / 790 TFLOP/s,
bytes / 4.3 TB/s), the ceilings measured on the H200 here.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp

from pallas_kernels import moda_attention

PEAK_FLOPS = 790e12
PEAK_BYTES = 4.3e12


@dataclasses.dataclass(frozen=True)
class Shape:
  name: str
  batch: int
  seq_len: int
  group: int
  slots: int
  head_dim: int = 64
  kv_heads: int = 8

  @property
  def q_heads(self) -> int:
    return self.group * self.kv_heads


def paper_shapes() -> list[Shape]:
  """Table 2 (the T sweep first), the training shapes, Table 7, the width-384 study's, then the G and L
  sweeps of Table 2."""
  shapes = [Shape(f"table2_T{t // 1024}K_G8_L64", 1, t, 8, 64) for t in (4096, 65536, 8192, 16384, 32768)]
  shapes += [Shape("train_B8_T4K_G2_L72", 8, 4096, 2, 72),
             Shape("train_B8_T4K_G2_L72_D128", 8, 4096, 2, 72, head_dim=128),
             Shape("table7_T1K_G8_L64", 1, 1024, 8, 64),
             Shape("study_B32_T1K_G3_L46", 32, 1024, 3, 46, kv_heads=2)]  # the width-384 24-layer study's
  shapes += [Shape(f"table2_T16K_G{g}_L64", 1, 16384, g, 64) for g in (2, 4, 16, 32)]
  shapes += [Shape(f"table2_T16K_G8_L{l}", 1, 16384, 8, l) for l in (128, 256)]
  return shapes


def quick_shapes() -> list[Shape]:
  return [Shape("table2_T4K_G8_L64", 1, 4096, 8, 64), Shape("table7_T1K_G8_L64", 1, 1024, 8, 64),
          Shape("train_B8_T4K_G2_L72", 8, 4096, 2, 72)]


def selected(shapes, names: list[str] | None) -> list[Shape]:
  """`shapes` restricted to `names` (all of them without names); a name none of them has is an error,
  so that a typo does not spend a device call timing nothing."""
  if not names:
    return list(shapes)
  known = [s.name for s in shapes]
  unknown = [n for n in names if n not in known]
  if unknown:
    raise ValueError(f"--shapes={','.join(names)}: {', '.join(unknown)} not among this mode's shapes "
                     f"({', '.join(known)}).")
  return [s for s in shapes if s.name in names]


class RowLog(list):
  """The measurements so far, each added one also written to `path` (with `meta`) at once: a benchmark
  cut by its time limit keeps every row it finished."""

  def __init__(self, path: str | None, meta: dict):
    super().__init__()
    self.path, self.meta = path, meta

  def append(self, row: dict) -> None:
    super().append(row)
    self._write()

  def extend(self, rows) -> None:
    super().extend(rows)
    self._write()

  def __iadd__(self, rows):
    self.extend(rows)
    return self

  def _write(self) -> None:
    if self.path:
      with open(self.path, "w") as f:
        json.dump(dict(meta=self.meta, rows=list(self)), f, indent=1)


def flops(shape: Shape, depth: bool, backward: bool, variant: dict | None = None) -> float:
  """Visible-logit FLOPs. A chunk of C tokens shows each query (C + 1) / 2 tokens' slots on average;
  depth-only has no sequence part."""
  variant = variant or {}
  t = shape.seq_len
  depth_tokens = (variant.get("depth_chunk", 1) + 1) / 2
  sequence = 0 if variant.get("depth_only") else t * (t + 1) / 2
  per_head = 4 * shape.head_dim * (sequence + (t * shape.slots * depth_tokens if depth else 0))
  return shape.batch * shape.q_heads * per_head * (3.5 if backward else 1.0)


def bytes_moved(shape: Shape, depth: bool, backward: bool, depth_q: bool = False) -> float:
  b, t, d = shape.batch, shape.seq_len, shape.head_dim
  q = b * t * shape.q_heads * d * 2
  kv = 2 * b * t * shape.kv_heads * d * 2
  dep = 2 * b * t * shape.slots * shape.kv_heads * d * 2 if depth else 0
  dq_in = q if depth_q else 0  # a separate depth_q: read forward and backward, its grad written
  lse = b * t * shape.q_heads * 4
  fwd = q + dq_in + kv + dep + q + lse
  # Backward reads q, k, v, depth, o, do, lse and writes dq, dk, dv and the depth grads.
  return fwd + (3 * q + 2 * dq_in + kv + dep + lse) + (q + kv + dep) if backward else fwd


def make_inputs(shape: Shape, depth: bool, seed: int = 0, depth_q: bool = False):
  """((q, k, v, depth_k, depth_v[, depth_q]), d_out), bfloat16 normal."""
  keys = jax.random.split(jax.random.PRNGKey(seed), 7)
  b, t, d = shape.batch, shape.seq_len, shape.head_dim
  normal = lambda key, *s: jax.random.normal(key, s, jnp.bfloat16)
  q = normal(keys[0], b, t, shape.q_heads, d)
  k, v = normal(keys[1], b, t, shape.kv_heads, d), normal(keys[2], b, t, shape.kv_heads, d)
  dk = normal(keys[3], b, t, shape.slots, shape.kv_heads, d) if depth else None
  dv = normal(keys[4], b, t, shape.slots, shape.kv_heads, d) if depth else None
  do = normal(keys[5], b, t, shape.q_heads, d)
  extra = (normal(keys[6], b, t, shape.q_heads, d),) if depth_q else ()
  return (q, k, v, dk, dv) + extra, do


def segment_ids(q, segments: int):
  """[B, T] int32 ids of `segments` equal contiguous documents per row, or None for 0."""
  if not segments:
    return None
  batch, seq_len = q.shape[:2]
  return jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32) * segments // seq_len + 1, (batch, seq_len))


def build(impl: str, tiled: Callable | None = None, variant: dict | None = None, segments: int = 0):
  """(forward, forward+backward) jitted callables of (arrays, do) for one implementation.

  `tiled`: a backend's `attention(inputs, spec)` with its tiles bound (the tile sweeps': e.g.
  `functools.partial(triton.attention, block_sizes=...)`), called instead of `moda_attention`; `impl`
  then only names the row. `variant`: the MoDA family (`family`): depth_chunk=C, or depth_only=True
  (k = v = None). `segments`: N > 0 passes every `moda_attention` call `segment_ids(q, N)` (not the
  `cudnn` row: jax's call itself)."""
  variant = dict(variant or {})
  seg = lambda q: dict(segment_ids=segment_ids(q, segments))
  if variant.pop("depth_only", False):
    attend = lambda q, k, v, dk, dv: moda_attention(q, None, None, dk, dv, implementation=impl, **seg(q))
  elif variant:
    attend = lambda q, k, v, dk, dv: moda_attention(q, k, v, dk, dv, causal=True, implementation=impl, **variant,
                                                    **seg(q))
  elif impl == "cudnn":
    attend = lambda q, k, v, dk, dv: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
  elif impl.endswith("_nodepth"):  # the sequence phase alone: what the depth phase adds is the rest
    base = impl[:-len("_nodepth")]
    attend = lambda q, k, v, dk, dv: moda_attention(q, k, v, causal=True, implementation=base, **seg(q))
  elif impl == "pallas_triton_depth_q":  # the model's call: depth scored with a depth_q of its own
    attend = lambda q, k, v, dk, dv, dq: moda_attention(q, k, v, dk, dv, depth_q=dq, causal=True,
                                                        implementation="pallas_triton", **seg(q))
  elif tiled is not None:
    from pallas_kernels import api
    attend = lambda q, k, v, dk, dv: tiled(*api.prepare(q, k, v, dk, dv, causal=True, **seg(q)))[0]
  else:
    attend = lambda q, k, v, dk, dv: moda_attention(q, k, v, dk, dv, causal=True, implementation=impl, **seg(q))

  forward = jax.jit(lambda arrays, do: attend(*arrays))

  @jax.jit
  def forward_backward(arrays, do):
    out, pullback = jax.vjp(lambda a: attend(*a), arrays)
    return out, pullback(jnp.broadcast_to(do, out.shape))

  return forward, forward_backward


def time_ms(fn, *args, warmup: int, iters: int, min_sample_ms: float = 25.0) -> float:
  """Median milliseconds per call over `iters` samples.

  A sample enqueues enough back-to-back calls to last about `min_sample_ms` and waits once, so host
  dispatch overlaps device work and a ~1 ms kernel is not timed against the launch latency of a lone
  call (single-call samples of cuDNN at T4K spread 1.69-2.01 ms across machines).
  """
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  calls = max(1, math.ceil(min_sample_ms / max((time.perf_counter() - start) * 1e3, 1e-3)))
  samples = []
  for _ in range(iters):
    start = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - start) * 1e3 / calls)
  return statistics.median(samples)


def implementations_for(shape: Shape, quick: bool, mosaic: bool = False, segments: int = 0) -> list[str]:
  impls = ["pallas_triton", "pallas_triton_depth_q"] if quick else ["pallas_triton"]
  if mosaic:
    impls += ["pallas_mosaic_gpu", "pallas_triton_nodepth", "pallas_mosaic_gpu_nodepth"]
  if segments:  # the baseline model's call (no depth, packed documents) on cuDNN and on its fallback
    impls += [i for i in ("cudnn_nodepth", "pallas_triton_nodepth") if i not in impls]
  if shape.batch * shape.seq_len <= 4096 or quick:
    impls.append("xla")
  # The dense reference materializes [B, Hq, T, T] float32 logits: only small shapes.
  if shape.batch * shape.q_heads * shape.seq_len ** 2 <= 2 ** (30 if quick else 27):
    impls.append("reference")
  return impls


def has_depth(impl: str) -> bool:
  """Whether a benchmark row of `impl` calls with depth arrays (all but `cudnn` and `*_nodepth`)."""
  return impl != "cudnn" and not impl.endswith("_nodepth")


def measure(shape: Shape, impl: str, *, iters: int, tiled: Callable | None = None, modes=("fwd", "fwd_bwd"),
            variant: dict | None = None, segments: int = 0) -> dict:
  depth = has_depth(impl)
  depth_q = impl == "pallas_triton_depth_q"
  arrays, do = make_inputs(shape, depth, depth_q=depth_q)
  forward, forward_backward = build(impl, tiled, variant, segments)
  row = dict(shape=shape.name, impl=impl, **dataclasses.asdict(shape))
  if segments and impl != "cudnn":
    row["segments"] = segments
  for mode, fn in (("fwd", forward), ("fwd_bwd", forward_backward)):
    if mode not in modes:
      continue
    try:
      ms = time_ms(fn, arrays, do, warmup=2, iters=iters)
    except Exception as e:  # noqa: BLE001  (an implementation that cannot run a shape is reported, not fatal)
      row[f"{mode}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
      continue
    f = flops(shape, depth, mode == "fwd_bwd", variant)
    by = bytes_moved(shape, depth, mode == "fwd_bwd", depth_q)
    row[f"{mode}_ms"] = ms
    row[f"{mode}_tflops"] = f / ms / 1e9
    row[f"{mode}_gbps"] = by / ms / 1e6
    row[f"{mode}_roofline_fraction"] = max(f / PEAK_FLOPS, by / PEAK_BYTES) * 1e3 / ms
  return row


def print_table(rows: list[dict]) -> None:
  cudnn = {(r["shape"], m): r.get(f"{m}_ms") for r in rows if r["impl"] == "cudnn" for m in ("fwd", "fwd_bwd")}
  print(f"{'shape':28s} {'impl':25s} {'mode':8s} {'ms':>9s} {'TFLOP/s':>8s} {'GB/s':>7s} {'/cuDNN':>7s} {'roofl':>6s}")
  for r in rows:
    if "tune" in r:
      continue
    for mode in ("fwd", "fwd_bwd"):
      if f"{mode}_ms" not in r:
        if f"{mode}_error" in r:
          print(f"{r['shape']:28s} {r['impl']:25s} {mode:8s} ERROR {r[f'{mode}_error'][:60]}")
        continue
      ref = cudnn.get((r["shape"], mode))
      ratio = f"{r[f'{mode}_ms'] / ref:7.2f}" if ref else "      -"
      print(f"{r['shape']:28s} {r['impl']:25s} {mode:8s} {r[f'{mode}_ms']:9.3f} {r[f'{mode}_tflops']:8.1f} "
            f"{r[f'{mode}_gbps']:7.0f} {ratio} {r[f'{mode}_roofline_fraction']:6.2f}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="a ~1-minute subset")
  parser.add_argument("--json", default=None, help="write every measurement here (rewritten after each)")
  parser.add_argument("--tune", action="store_true", help="time tile variants instead of the shape table")
  parser.add_argument("--ablate", action="store_true",
                      help="time the kernels without depth, JAX's Mosaic GPU forward and each kernel option flipped")
  parser.add_argument("--family", action="store_true",
                      help="time chunk-visible depth and depth-only attention (pallas_triton vs xla)")
  parser.add_argument("--mosaic", action="store_true",
                      help="also time pallas_mosaic_gpu and both Pallas backends without depth")
  parser.add_argument("--impls", default=None,
                      help="comma-separated implementations to keep (e.g. cudnn,pallas_mosaic_gpu)")
  parser.add_argument("--segments", type=int, default=0,
                      help="segment_ids of N equal documents per row in every moda_attention row")
  parser.add_argument("--shapes", default=None,
                      help="comma-separated shape names to keep (e.g. train_B8_T4K_G2_L72)")
  parser.add_argument("--iters", type=int, default=None)
  args = parser.parse_args()
  try:
    run(args)
  except ValueError as e:  # a user error: one line, not a traceback
    raise SystemExit(f"pallas_kernels.benchmark: {e}") from None


def run(args) -> None:
  iters = args.iters or (5 if args.quick else 10)
  names = args.shapes.split(",") if args.shapes else None
  meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(), jax=jax.__version__,
              device=jax.devices()[0].device_kind, iters=iters, peak_flops=PEAK_FLOPS, peak_bytes=PEAK_BYTES,
              segments=args.segments)
  rows = RowLog(args.json, meta)
  from pallas_kernels import benchmark_modes as modes  # they build on this module's measure
  if args.tune:
    (modes.tune_mosaic if args.mosaic else modes.tune)(iters, rows, names)
  elif args.ablate:
    modes.ablate(iters, rows, names)
  elif args.family:
    modes.family(iters, rows, names)
  else:
    for shape in selected(quick_shapes() if args.quick else paper_shapes(), names):
      for impl in ["cudnn"] + implementations_for(shape, args.quick, args.mosaic, args.segments):
        if args.impls and impl not in args.impls.split(","):
          continue
        # Long sequences: fewer repeats keep the full run inside its time budget.
        n = iters if shape.seq_len * shape.group <= 16384 * 8 else max(3, iters // 2)
        rows.append(measure(shape, impl, iters=n, segments=args.segments))
        print(json.dumps(rows[-1]), flush=True)
  print(meta)
  print_table(rows)


if __name__ == "__main__":
  main()
