"""Where a training step's time goes: a `jax.profiler` trace of the trainer's own step, as a table.

  python scripts/profile_train_step.py --config=configs/moda_700m.py --workdir=/dev/shm/prof_moda \
      [--steps=3] [--warmup=2] [--top=25] [--out=DIR] [--exact_names] [--calls=NAME,...]
      [--config.<field>=... as train.py]

The state, the jitted step and the data pipeline are the trainer's (`trainer.prepare_run`: the same
checks, the same shardings, the same `step_fn`); nothing is saved. After `--warmup` steps (the first
compiles), `--steps` steps are timed untraced, then `--steps` more run inside
`jax.profiler.trace(create_perfetto_trace=True)`. The trace (large; not for committing) stays under
`<workdir>/profile_trace`; `profile_summary.md` (the tables printed) and `profile_summary.json` go to --out.

What is counted (`op_events`): on GPU/TPU the kernels on the device processes' stream threads
("/device:GPU:0" / "Stream #..."), never host threads; the derived "XLA Ops"/"XLA Modules" lines repeat
the stream's time and are used only where a device has no stream line (TPU). On CPU there is no device
process: the XLA ops are the host-thread events that carry an `hlo_op` argument. A device kernel counts its
full duration (kernels do not nest; overlapping ones on a line are not children); a CPU op its self
time (an op nested in another on its thread, e.g. a while loop's body, is not counted twice), averaged
over devices and divided by --steps; "% step" is of the traced wall time per step, so ops on
concurrent streams (or CPU threads) can add up to more than 100%; "busy" (the union of the ops'
intervals per device) cannot. Names lose numeric suffixes
("fusion.12" -> "fusion", "loop_add_fusion_3" -> "loop_add_fusion"; `--exact_names` keeps them), so one
row is one kernel over all layers; `--calls` lists each call of the named kernels (one per layer) in stream
order. On GPU with XLA command buffers the kernels still appear on the
stream; `XLA_FLAGS=--xla_gpu_enable_command_buffer=` only restores their `hlo_op` attribution.
"""

import glob
import gzip
import json
import os
import re
import sys
import time

from absl import flags
from absl import logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # moda_jax, configs

from moda_jax import cli_errors  # noqa: E402

# Categories answering "where does MoDA's time go": the first whose substrings occur in the lower-cased
# op name wins, so the order matters (a cuDNN attention kernel is attention, not a copy or a fusion;
# "copy_fusion" is a copy). Written once here; `category` is the only reader.
CATEGORIES = (
    ("attention", ("moda_", "fmha", "cudnn", "flash", "sdpa", "attention")),
    ("matmul", ("gemm", "cublas", "nvjet", "cutlass", "xmma", "matmul", "dot")),
    ("collective", ("all-reduce", "all_reduce", "all-gather", "all_gather", "reduce-scatter",
                    "reduce_scatter", "collective-permute", "all-to-all", "nccl")),
    ("copy/memset", ("memcpy", "memset", "copy")),
    ("fusion", ("fusion", "triton", "loop_", "input_")),
)
OTHER = "other"
_DERIVED_LINES = ("XLA Ops", "XLA Modules")  # summaries of the stream's kernels on a device process
_SUFFIX = re.compile(r"[._]\d+$")


def category(name: str) -> str:
  lower = name.lower()
  return next((cat for cat, keys in CATEGORIES if any(k in lower for k in keys)), OTHER)


def load_trace(path: str) -> list[dict]:
  with gzip.open(path, "rt") as f:
    trace = json.load(f)
  return trace["traceEvents"] if isinstance(trace, dict) else trace


def _names(events: list[dict]) -> tuple[dict, dict]:
  procs, threads = {}, {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      procs[e["pid"]] = e["args"]["name"]
    elif e.get("ph") == "M" and e.get("name") == "thread_name":
      threads[(e["pid"], e["tid"])] = e["args"]["name"]
  return procs, threads


def _self_times(ops: list[dict]) -> list[tuple[dict, float]]:
  """(event, its duration less its direct children's) for events on one thread."""
  out, stack = [], []  # stack: [event, end, children_us] of the enclosing ops
  for e in sorted(ops, key=lambda e: (e["ts"], -e["dur"])):
    while stack and e["ts"] >= stack[-1][1]:
      done = stack.pop()
      out.append((done[0], done[0]["dur"] - done[2]))
    if stack:
      stack[-1][2] += e["dur"]
    stack.append([e, e["ts"] + e["dur"], 0.0])
  out.extend((s[0], s[0]["dur"] - s[2]) for s in stack)
  return out


def _union_us(intervals: list[tuple[float, float]]) -> float:
  total, end = 0.0, float("-inf")
  for start, stop in sorted(intervals):
    total += max(0.0, stop - max(start, end))
    end = max(end, stop)
  return total


def op_events(events: list[dict]) -> tuple[str, list[tuple[str, dict, float]]]:
  """(what was counted, [(device, event, self time in us)]): the rule in the module docstring."""
  procs, threads = _names(events)
  complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
  devices = {pid for pid, name in procs.items() if name.startswith("/device:")}
  if devices:
    lines = {}  # device pid -> the thread ids counted on it
    for pid in devices:
      tids = {t for (p, t), name in threads.items() if p == pid}
      streams = {t for t in tids if threads[(pid, t)].startswith("Stream")}
      ops_line = {t for t in tids if threads[(pid, t)] == "XLA Ops"}
      lines[pid] = streams or ops_line or {t for t in tids if threads[(pid, t)] not in _DERIVED_LINES}
    selected = [e for e in complete if e["pid"] in devices and e.get("tid") in lines[e["pid"]]]
    # Kernels never nest, but on the H200 consecutive kernels of one stream line overlap in the trace
    # (launch overlap, concurrent streams merged into one line): self time would subtract a kernel from
    # the one it overlaps (measured: -76 ms "self time" for cuDNN's dO.O kernel). Full durations.
    return "device stream kernels", [(procs[e["pid"]], e, e["dur"]) for e in selected]
  selected = [e for e in complete if "hlo_op" in (e.get("args") or {})]
  by_thread: dict = {}
  for e in selected:
    by_thread.setdefault((e["pid"], e.get("tid")), []).append(e)
  return "XLA ops on host threads (CPU)", [(str(e["args"].get("device_ordinal", "0")), e, t)
                                           for ops in by_thread.values() for e, t in _self_times(ops)]


def summarize(events: list[dict], *, steps: int, step_time_ms: float, exact_names: bool = False) -> dict:
  """Per op name and per category: ms per step per device, % of `step_time_ms`, calls per step."""
  source, ops = op_events(events)
  spans: dict = {}  # device -> (start, end) of its ops: their union is the time the device was busy
  for device, e, _ in ops:
    spans.setdefault(device, []).append((e["ts"], e["ts"] + e["dur"]))
  devices = max(len(spans), 1)
  per_op: dict = {}
  for _, e, us in ops:
    name = e["name"]
    key = name if exact_names else _SUFFIX.sub("", name)
    row = per_op.setdefault(key, {"op": key, "category": category(key), "us": 0.0, "calls": 0, "names": set()})
    row["us"] += us
    row["calls"] += 1
    row["names"].add(name)
  scale = 1.0 / (1000.0 * steps * devices)  # us over all steps and devices -> ms per step per device
  rows = []
  for row in sorted(per_op.values(), key=lambda r: -r["us"]):
    ms = row["us"] * scale
    rows.append({"op": row["op"], "category": row["category"], "ms_per_step": ms,
                 "pct_of_step": 100.0 * ms / step_time_ms, "calls_per_step": row["calls"] / (steps * devices),
                 "variants": len(row["names"])})
  total = sum(r["ms_per_step"] for r in rows)
  cats = {}
  for r in rows:
    c = cats.setdefault(r["category"], {"category": r["category"], "ms_per_step": 0.0, "ops": 0})
    c["ms_per_step"] += r["ms_per_step"]
    c["ops"] += 1
  for c in cats.values():
    c["pct_of_step"] = 100.0 * c["ms_per_step"] / step_time_ms
    c["pct_of_op_time"] = 100.0 * c["ms_per_step"] / total if total else 0.0
  return {"source": source, "devices": devices, "steps": steps, "step_time_ms": step_time_ms,
          "op_ms_per_step": total, "busy_ms_per_step": sum(map(_union_us, spans.values())) * scale, "ops": rows,
          "categories": sorted(cats.values(), key=lambda c: -c["ms_per_step"])}


def call_durations(events: list[dict], names: list[str], *, steps: int) -> dict:
  """Per name in `names`: the kernels of the first device whose name contains it, their durations in us in
  stream order, one list per traced step (`calls_us`) and their mean per call index (`mean_us`): the
  calls of one kernel across a step's layers, e.g. a layer's attention time against its depth."""
  if not names:
    return {}
  _, ops = op_events(events)
  first = min((device for device, _, _ in ops), default=None)
  out = {}
  for name in names:
    calls = [e["dur"] for _, e, _ in sorted((op for op in ops if op[0] == first and name in op[1]["name"]),
                                            key=lambda op: op[1]["ts"])]
    if len(calls) % steps:
      raise ValueError(f"--calls={name}: {len(calls)} calls over {steps} steps; expected the same number in each")
    per_step = len(calls) // steps
    rows = [calls[i * per_step:(i + 1) * per_step] for i in range(steps)]
    out[name] = {"calls_us": rows, "mean_us": [sum(col) / steps for col in zip(*rows)]}
  return out


def calls_markdown(calls: dict) -> str:
  lines = []
  for name, c in calls.items():
    lines += ["", f"Calls of `{name}` per step, in stream order (us, mean over {len(c['calls_us'])} steps): "
              + ", ".join(f"{us:.0f}" for us in c["mean_us"])]
  return "\n".join(lines) + "\n" if lines else ""


def markdown(summary: dict, top: int, title: str = "") -> str:
  s = summary
  lines = [f"### {title}" if title else "", "",
           f"Traced step: {s['step_time_ms']:.3f} ms wall ({s['steps']} steps); {s['source']}: "
           f"{s['op_ms_per_step']:.3f} ms per step per device ({s['devices']} device(s)), busy "
           f"{s['busy_ms_per_step']:.3f} ms (union of their intervals); "
           + (f"untraced step {s['untraced_step_time_ms']:.3f} ms; " if "untraced_step_time_ms" in s else "")
           + (s.get("attention", "")), "",
           "| # | op | category | ms/step | % step | calls/step |", "|---|---|---|---:|---:|---:|"]
  for i, r in enumerate(s["ops"][:top], 1):
    name = r["op"].replace("|", "\\|")
    name = name if len(name) <= 90 else name[:87] + "..."
    lines.append(f"| {i} | `{name}` | {r['category']} | {r['ms_per_step']:.3f} | {r['pct_of_step']:.1f} | "
                 f"{r['calls_per_step']:g} |")
  lines += ["", "| category | ms/step | % step | % op time | ops |", "|---|---:|---:|---:|---:|"]
  for c in s["categories"]:
    lines.append(f"| {c['category']} | {c['ms_per_step']:.3f} | {c['pct_of_step']:.1f} | "
                 f"{c['pct_of_op_time']:.1f} | {c['ops']} |")
  return "\n".join(lines).lstrip("\n") + "\n"


def _timed(run, state, batches):
  """Runs one step per batch as the trainer's loop does (dispatch, no per-step sync); the state, the
  wall seconds, and the attention kernels the step was traced with (if it was traced here)."""
  import jax  # pylint: disable=g-import-not-at-top

  start, impls = time.perf_counter(), {}
  for batch in batches:
    state, metrics, traced = run.dispatch_step(state, batch)
    impls = impls or traced
  jax.block_until_ready((state, metrics))
  return state, time.perf_counter() - start, impls


def profile(config, workdir: str, *, steps: int, warmup: int = 2, out: str | None = None, top: int = 25,
            exact_names: bool = False, calls: tuple[str, ...] = ()) -> dict:
  """Profiles `steps` training steps of `config`; returns the summary (also written to `out`)."""
  import jax  # pylint: disable=g-import-not-at-top

  from moda_jax.model import kernel_call  # pylint: disable=g-import-not-at-top
  from moda_jax.train import sharding  # pylint: disable=g-import-not-at-top
  from moda_jax.train import trainer  # pylint: disable=g-import-not-at-top

  for name, value, lowest in (("steps", steps, 1), ("warmup", warmup, 1), ("top", top, 1)):
    if value < lowest:
      raise cli_errors.UserError(f"--{name}={value}: expected an integer >= {lowest}")
  out = out or workdir
  run, _ = trainer.prepare_run(config, workdir, None, restart=False)
  try:
    train_iter = iter(run.pipelines.train)
    take = lambda n: [sharding.global_batch(next(train_iter), run.mesh) for _ in range(n)]
    with sharding.activation_context(run.mesh, constrain_activations=False):
      state = run.init_fn()
    state, _, impls = _timed(run, state, take(warmup))  # compiles
    state, untraced_s, _ = _timed(run, state, take(steps))
    trace_dir = os.path.join(workdir, "profile_trace")
    batches = take(steps)  # assembled before the trace: the table is the step, not the input pipeline
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      state, traced_s, _ = _timed(run, state, batches)
  finally:
    run.ckpt.close()
  path = max(glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "perfetto_trace.json.gz")),
             key=os.path.getmtime)
  events = load_trace(path)
  summary = summarize(events, steps=steps, step_time_ms=1000.0 * traced_s / steps, exact_names=exact_names)
  summary.update(untraced_step_time_ms=1000.0 * untraced_s / steps, trace=path,
                 attention=kernel_call.describe_implementations(impls) if impls else "",
                 device=jax.devices()[0].device_kind, calls=call_durations(events, list(calls), steps=steps))
  table = markdown(summary, top, title=f"{jax.devices()[0].device_kind}: {workdir}") + calls_markdown(summary["calls"])
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "profile_summary.md"), "w") as f:
    f.write(table)
  with open(os.path.join(out, "profile_summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  print(table, flush=True)
  return summary


_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the run's files and the raw trace.")
_STEPS = flags.DEFINE_integer("steps", 3, "Steps traced (and, before them, timed untraced).", lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 2, "Steps run before timing (the first compiles).", lower_bound=1)
_TOP = flags.DEFINE_integer("top", 25, "Rows of the op table printed.", lower_bound=1)
_OUT = flags.DEFINE_string("out", None, "Directory for profile_summary.{md,json} (default: --workdir).")
_EXACT = flags.DEFINE_bool("exact_names", False, "Keep numeric suffixes of op names (one row per name).")
_CALLS = flags.DEFINE_list("calls", [], "Kernel name substrings whose calls' durations are listed in stream order.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # as train.py: library INFO logs would bury the table
  profile(_CONFIG.value, _WORKDIR.value, steps=_STEPS.value, warmup=_WARMUP.value, out=_OUT.value,
          top=_TOP.value, exact_names=_EXACT.value, calls=tuple(_CALLS.value))


if __name__ == "__main__":
  cli_errors.run(main)
