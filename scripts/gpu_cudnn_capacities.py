"""cuDNN's packed-document attention at each ladder of capacities, on the training pipeline's own batches.

`pallas_kernels.cudnn_packed.CAPACITIES` is the ladder of rooms (runs per row) a batch may be given; cuDNN's
time grows with the room, used or not, and every rung is one more cuDNN graph compiled into the program.
This times the sequence attention alone (fwd+bwd, no depth) with the segment_ids of real training batches:
each ladder, pallas_triton's segment-aware kernels, and cuDNN without segments (the floor), and prints how
many runs the batches' rows hold. BENCHMARKS.md §0j has the results.

Run on the GPU machine from the repo root (after the .whl install of scripts/gpu_train_bench.sh):
  python3 scripts/gpu_cudnn_capacities.py --batches=12 --out=$OUT/capacities.json
"""

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from configs import baseline_700m, width384
from moda_jax.data import pipeline
from pallas_kernels import benchmark, cudnn_packed, moda_attention

LADDERS = ((16,), (8, 16), (4, 16), (4, 8, 16), (2, 4, 8, 16))


def training_segment_ids(config, batches: int) -> np.ndarray:
  """[batches, B, T] segment_ids of the first training batches of `config`'s pipeline."""
  train = iter(pipeline.make_pipelines(config).train)
  return np.stack([next(train)["segment_ids"] for _ in range(batches)])


def runs_per_row(segment_ids_NBT: np.ndarray) -> dict:
  runs = 1 + np.sum(segment_ids_NBT[..., 1:] != segment_ids_NBT[..., :-1], axis=-1).ravel()
  return {"rows": int(runs.size), "mean": float(runs.mean()), "median": float(np.median(runs)),
          "p99": float(np.percentile(runs, 99)), "max": int(runs.max())}


def fwd_bwd_ms(implementation: str, shape: benchmark.Shape, segment_ids_NBT, iters: int) -> dict:
  """Mean over the batches of the median fwd+bwd ms with each batch's segment_ids (None: unsegmented)."""
  (q, k, v, _, _), d_out = benchmark.make_inputs(shape, depth=False)

  @jax.jit
  def step(q, k, v, segment_ids):
    attend = lambda q, k, v: moda_attention(q, k, v, causal=True, segment_ids=segment_ids,
                                            implementation=implementation)
    out, pullback = jax.vjp(attend, q, k, v)
    return out, pullback(d_out)

  batches = [None] if segment_ids_NBT is None else [jnp.asarray(s) for s in segment_ids_NBT]
  times = [benchmark.time_ms(step, q, k, v, s, warmup=2, iters=iters) for s in batches]
  return {"mean_ms": float(np.mean(times)), "per_batch_ms": [round(t, 4) for t in times]}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batches", type=int, default=12)
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  studies = {  # name: (config, attention shape of its layers)
      "w384": (width384.get_config("layers=24,norm=post,depth_kv=none"),
               benchmark.Shape("w384", batch=32, seq_len=1024, group=3, slots=0, kv_heads=2)),
      "700m": (baseline_700m.get_config(),
               benchmark.Shape("700m", batch=8, seq_len=4096, group=2, slots=0, kv_heads=8)),
  }
  results = {"jax": jax.__version__, "device": jax.devices()[0].device_kind, "ladders": {}}
  default = cudnn_packed.CAPACITIES
  for name, (config, shape) in studies.items():
    config.batch_size = shape.batch
    segment_ids_NBT = training_segment_ids(config, args.batches)
    row = {"runs_per_row": runs_per_row(segment_ids_NBT),
           "cudnn_unsegmented": fwd_bwd_ms("cudnn", shape, None, args.iters),
           "pallas_triton": fwd_bwd_ms("pallas_triton", shape, segment_ids_NBT, args.iters)}
    for ladder in LADDERS:
      cudnn_packed.CAPACITIES = ladder  # read when `cudnn` traces; each ladder compiles its own program
      row[f"cudnn{ladder}"] = fwd_bwd_ms("cudnn", shape, segment_ids_NBT, args.iters)
    cudnn_packed.CAPACITIES = default
    results["ladders"][name] = row
    print(name, json.dumps(row["runs_per_row"]))
    for key, value in row.items():
      if key != "runs_per_row":
        print(f"  {key:28s} {value['mean_ms']:.3f} ms fwd+bwd")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
