"""Per-kernel view of MoDA forward+backward on the GPU, for Nsight Compute (ncu) to read the counters.

    ncu --clock-control none --csv --page details --section SpeedOfLight --section Occupancy \
        --section LaunchStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
        -k 'regex:moda|sdpa|fmha|flash' python3 scripts/gpu_profile_kernels.py run [--impls=A,B] [SHAPE ...] > ncu.csv
    python3 scripts/gpu_profile_kernels.py summarize ncu.csv

`run` executes each shape's jitted fwd+bwd (default tiles) once per implementation after compilation: by
default cuDNN's on the sequence shape, `pallas_triton` without and with depth (`--impls`: any of the
benchmark's names, e.g. `pallas_mosaic_gpu,pallas_mosaic_gpu_nodepth`; Mosaic's kernels are named
`moda_mosaic_*`, which the `moda` regex above matches). `summarize` prints one line per kernel launch:
duration, registers per thread, theoretical / achieved occupancy, SM, issue and DRAM throughput (% of
peak), L1 hit rate. Timing belongs to the benchmark; this answers why a kernel takes the time it does.

Cost, seen on the H200 (2026-11-28): with these five sections ncu profiled ~1 kernel per minute under
XLA (every other launch is instrumented too), so profile one shape with `-c`/`--launch-count` and a
narrow `-k` regex. `--section LaunchStats --section Occupancy` alone (registers, shared memory,
theoretical and achieved occupancy) is cheap: both forward kernels of B8 T4K G2 in well under a
minute (BENCHMARKS.md §1, fifth round). Adding SpeedOfLight made one T4K run spend its 5.5 minutes
before the first MoDA kernel.
"""

from __future__ import annotations

import collections
import csv
import sys

_METRICS = {"Duration": "us", "Registers Per Thread": "regs", "Theoretical Occupancy": "occ_theory%",
            "Achieved Occupancy": "occ_achieved%", "Compute (SM) Throughput": "sm%", "DRAM Throughput": "dram%",
            "Issue Slots Busy": "issue%", "L1/TEX Hit Rate": "l1_hit%", "Grid Size": "grid"}


_DEFAULT_IMPLS = ("cudnn", "pallas_triton_nodepth", "pallas_triton")


def run(shape_names: list[str], impls=_DEFAULT_IMPLS) -> None:
  import jax

  from pallas_kernels import benchmark

  shapes = {s.name: s for s in benchmark.paper_shapes()}
  unknown = [n for n in shape_names if n not in shapes]
  if unknown:
    raise SystemExit(f"shapes {unknown}: expected some of {sorted(shapes)}")
  for name in shape_names:
    for impl in impls:
      arrays, do = benchmark.make_inputs(shapes[name], depth=benchmark.has_depth(impl))
      _, forward_backward = benchmark.build(impl)
      compiled = forward_backward.lower(arrays, do).compile()  # compile outside the profiled launches
      jax.block_until_ready(compiled(arrays, do))
      print(f"ran {name} {impl}", file=sys.stderr, flush=True)


def summarize(path: str) -> None:
  launches: dict[str, dict[str, str]] = collections.OrderedDict()
  with open(path) as f:
    lines = [line for line in f if line.startswith('"')]  # ncu's own log lines are not CSV
  for row in csv.DictReader(lines):
    launch = launches.setdefault(row["ID"], {"kernel": row["Kernel Name"]})
    if row["Metric Name"] in _METRICS:
      value = row["Metric Value"].replace(",", "")
      if row["Metric Name"] == "Duration":  # ncu picks the unit per launch; always microseconds here
        per_us = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3,
                  "s": 1e6, "second": 1e6}[row["Metric Unit"]]
        value = f"{float(value) * per_us:.1f}"
      launch[_METRICS[row["Metric Name"]]] = value
  print(f"{'kernel':48s} " + " ".join(f"{v:>13s}" for v in _METRICS.values()))
  for launch in launches.values():
    print(f"{launch['kernel'][:48]:48s} " + " ".join(f"{launch.get(v, '-'):>13s}" for v in _METRICS.values()))


if __name__ == "__main__":
  command, args = sys.argv[1], sys.argv[2:]
  if command == "run":
    impls = [a.split("=", 1)[1].split(",") for a in args if a.startswith("--impls=")]
    shape_names = [a for a in args if not a.startswith("--impls=")]
    run(shape_names or ["table2_T4K_G8_L64", "train_B8_T4K_G2_L72"], *impls[-1:])
  elif command == "summarize":
    summarize(args[0])
  else:
    raise SystemExit(f"command={command!r}: expected 'run' or 'summarize'")
