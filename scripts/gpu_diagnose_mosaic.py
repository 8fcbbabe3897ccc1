"""Which pallas_mosaic_gpu kernel fails on the GPU, and where: each kernel alone, each in its own process.

A GPU fault (CUDA_ERROR_MISALIGNED_ADDRESS, illegal address) poisons the CUDA context of its process, so
every later call there fails too: here each (kernel, shape) runs in a child process of its own, with a
timeout, and prints one line: ok with the max abs error against `pallas_kernels.reference` (the blockwise
`xla` backend where dense logits would not fit), or crash with the stage and the first error line.

Kernels: fwd (the forward alone); dq (forward, then the dq + depth backward kernel alone); dkv (forward,
then the sequence dk / dv kernel alone); vjp (the public forward + backward, as the operator tests do).
If `compute-sanitizer` is on PATH, the smallest crashing case is rerun under its memcheck tool and the
first 40 lines of its report (the faulting kernel and access) are printed.

  JAX_PLATFORMS=cuda python3 scripts/gpu_diagnose_mosaic.py          # on the GPU machine, ~1-2 minutes
  python3 scripts/gpu_diagnose_mosaic.py --interpret                 # CPU: the plumbing, small shapes only
Options: --shapes a,b  --kernels fwd,dq  --jobs N  --budget SECONDS  --timeout SECONDS.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# name: (batch, T, Hk, G, D, L, depth_start, depth_len, causal, segments, small). `small` shapes also run
# in interpret mode. Before the row-tile fix, G >= 3 (Gp >= 4) put lse / delta / segment TMA boxes at
# 32- or 64-byte SMEM offsets; G <= 2 did not (ctrl is the operator case that passed on the H200).
SHAPES = {
    "aligned_B1_T4096_Hk8_G8_L64_D64": (1, 4096, 8, 8, 64, 64, 0, 64, True, False, False),
    "odd_B1_T7_H3_Hk1_L5_D64": (1, 7, 1, 3, 64, 5, 0, 3, True, False, True),
    "ctrl_B2_T1_G2_L1_D64": (2, 1, 1, 2, 64, 1, 0, 1, True, False, True),
    "nodepth_B1_T1024_Hk2_G4_seg": (1, 1024, 2, 4, 64, 0, 0, 0, True, True, False),
    "d128_B1_T1000_Hk2_G4_L24_seg": (1, 1000, 2, 4, 128, 24, 5, 20, True, True, False),
    "nodepth_B1_T40_Hk2_G4_seg_noncausal": (1, 40, 2, 4, 64, 0, 0, 0, False, True, True),
    "d128_B1_T30_Hk2_G4_L5": (1, 30, 2, 4, 128, 5, 2, 3, True, False, True),
}
GPU_SHAPES = ("aligned_B1_T4096_Hk8_G8_L64_D64", "odd_B1_T7_H3_Hk1_L5_D64", "ctrl_B2_T1_G2_L1_D64",
              "nodepth_B1_T1024_Hk2_G4_seg", "d128_B1_T1000_Hk2_G4_L24_seg")
KERNELS = ("fwd", "dq", "dkv", "vjp")
VJP_SHAPES = ("odd_B1_T7_H3_Hk1_L5_D64", "aligned_B1_T4096_Hk8_G8_L64_D64", "d128_B1_T30_Hk2_G4_L5")
MISMATCH = 2e-2  # max |err| / max |reference| above this is flagged (bf16 inputs and probabilities)


# ---------------------------------------------------------------- child: one kernel on one shape
def _stage(name):
  print(f"STAGE {name}", flush=True)


def _case(shape_name):
  import jax
  import jax.numpy as jnp
  from pallas_kernels import api
  batch, seq_len, kv_heads, group, head_dim, slots, start, length, causal, segments, _ = SHAPES[shape_name]
  keys = jax.random.split(jax.random.PRNGKey(seq_len), 8)
  normal = lambda key, *s: jax.random.normal(key, s, jnp.bfloat16)
  q_shape, kv_shape = (batch, seq_len, kv_heads * group, head_dim), (batch, seq_len, kv_heads, head_dim)
  depth_shape = (batch, seq_len, slots, kv_heads, head_dim)
  arrays = (normal(keys[0], *q_shape), normal(keys[1], *kv_shape), normal(keys[2], *kv_shape),
            normal(keys[3], *depth_shape) if slots else None, normal(keys[4], *depth_shape) if slots else None)
  cotangents = (normal(keys[5], *q_shape), jax.random.normal(keys[6], q_shape[:3], jnp.float32))
  options = dict(causal=causal)
  if slots:
    options.update(depth_start=jnp.int32(start), depth_len=jnp.int32(length))
  if segments:
    options["segment_ids"] = jnp.sort(jax.random.randint(keys[7], (batch, seq_len), 0, 4), axis=1)
  dense = batch * kv_heads * group * seq_len * seq_len * (1 + slots)
  prepare = lambda *a: api.prepare(*a, **options)
  return arrays, cotangents, prepare, dense


def _reference(arrays, cotangents, prepare, dense, *, grads: bool):
  """(out, lse[, grads of (q, k, v, depth_k, depth_v)]) of the reference backend."""
  import jax
  from pallas_kernels import reference, xla
  backend = reference.attention if dense < 3e8 else xla.attention
  attend = lambda *a: backend(*prepare(*a))
  if not grads:
    return jax.jit(attend)(*arrays)

  @jax.jit
  def run(arrays):
    (out, lse), pullback = jax.vjp(attend, *arrays)
    return out, lse, pullback(cotangents)
  return run(arrays)


def _max_err(got, want):
  import numpy as np
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  if got.shape != want.shape:
    return f"shape {got.shape} != {want.shape}"
  if not np.isfinite(got).all():
    return f"non-finite ({int((~np.isfinite(got)).sum())} entries)"
  err, scale = float(np.abs(got - want).max(initial=0.0)), float(np.abs(want).max(initial=0.0))
  flag = " MISMATCH" if err > MISMATCH * max(scale, 1e-6) else ""
  return f"{err:.2e} (ref max {scale:.2e}){flag}"


def child(kernel, shape_name, interpret):
  import jax
  import jax.numpy as jnp
  from pallas_kernels import mosaic_gpu, mosaic_gpu_bwd, mosaic_gpu_bwd_dkv
  from pallas_kernels import mosaic_gpu_tiles as mt
  arrays, cotangents, prepare, dense = _case(shape_name)
  inputs, spec = prepare(*arrays)
  params = mosaic_gpu.interpret_params(interpret)
  head_dim, seq_len = arrays[0].shape[3], arrays[0].shape[1]
  block_sizes = mt.BlockSizes.get_default(head_dim)
  result = {}
  if kernel == "vjp":
    _stage("vjp")

    @jax.jit
    def run(arrays):
      attend = lambda *a: mosaic_gpu.attention(*prepare(*a), interpret=interpret)
      (out, lse), pullback = jax.vjp(attend, *arrays)
      return out, lse, pullback(cotangents)
    got = jax.block_until_ready(run(arrays))
    _stage("reference")
    want = _reference(arrays, cotangents, prepare, dense, grads=True)
    names = ("out", "lse", "dq", "dk", "dv", "ddepth_k", "ddepth_v")
    for name, g, w in zip(names, [got[0], got[1], *got[2]], [want[0], want[1], *want[2]]):
      if w is not None:
        result[name] = _max_err(g, w)
    return result

  operands = mosaic_gpu.operands_of(inputs, spec)
  _stage("fwd")
  out, lse, lse_rows = jax.block_until_ready(
      jax.jit(lambda o: mosaic_gpu.forward(o, spec, block_sizes, params))(operands))
  if kernel == "fwd":
    _stage("reference")
    want = _reference(arrays, cotangents, prepare, dense, grads=False)
    return dict(out=_max_err(out, want[0]), lse=_max_err(lse, want[1]))

  group = arrays[0].shape[2] // arrays[1].shape[2]
  if group > mt.MAX_HEADS_PER_TILE:
    return {"note": "G > 8: the backward is pallas_triton's"}
  d_out, d_lse = cotangents
  delta = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1) - d_lse
  ops = mosaic_gpu.backward_operands(operands, lse_rows, d_out.astype(out.dtype), delta, block_sizes, params)
  num_slots = 0 if arrays[3] is None else arrays[3].shape[2]
  geom = lambda blocks: mt.make_geometry(spec.seq_len, num_slots, group, head_dim, blocks, params is not None)
  _stage(kernel)
  if kernel == "dq":
    outs = jax.block_until_ready(
        jax.jit(lambda o: mosaic_gpu_bwd.dq_and_depth(o, spec, geom(block_sizes.dq), params))(ops))
    names = ["dq"] + (["ddepth_k", "ddepth_v"] if num_slots else [])
  else:
    outs = jax.block_until_ready(
        jax.jit(lambda o: mosaic_gpu_bwd_dkv.dkv(o, spec, geom(block_sizes.dkv), params))(ops))
    names = ["dk", "dv"]
  _stage("reference")
  want = _reference(arrays, cotangents, prepare, dense, grads=True)[2]
  index = dict(dq=0, dk=1, dv=2, ddepth_k=3, ddepth_v=4)
  return {name: _max_err(o[:, :seq_len], want[index[name]]) for name, o in zip(names, outs)}


def child_main(kernel, shape_name, interpret):
  sys.path.insert(0, REPO)
  try:
    result = child(kernel, shape_name, interpret)
    print("RESULT " + json.dumps(dict(status="ok", **result)), flush=True)
  except Exception as e:  # noqa: BLE001  (reported to the parent as this case's crash)
    first = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    print("RESULT " + json.dumps(dict(status="crash", error=first[:300])), flush=True)
    sys.exit(1)


# ---------------------------------------------------------------- parent: the jobs, the lines, the sanitizer
def _env(interpret):
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", PYTHONUNBUFFERED="1")
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  if interpret:  # the interpreter runs each warpgroup as a host thread: it needs several host devices
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
  return env


def _first_error(text):
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  for pattern in (r"CUDA_ERROR_\w+", r"\w+(Error|Exception):", r"(error|Error|fault|Fault|Aborted)"):
    for line in lines:
      if re.search(pattern, line) and not line.startswith("STAGE"):
        return line[:300]
  return lines[-1][:300] if lines else "(no output)"


def run_job(kernel, shape_name, args, deadline, prefix=()):
  timeout = min(args.timeout, deadline - time.time())
  if timeout < 5:
    return dict(status="skipped", error="time budget spent")
  cmd = [*prefix, sys.executable, os.path.abspath(__file__), "--child", kernel, shape_name]
  cmd += ["--interpret"] if args.interpret else []
  start = time.time()
  # A session of its own, so that a timeout ends the whole tree (the sanitizer and its python too).
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(args.interpret),
                          cwd=REPO, start_new_session=True)
  try:
    stdout, stderr = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    stdout, stderr = proc.communicate()
    stages = re.findall(r"STAGE (\w+)", stdout)
    return dict(status="timeout", error=f"after {timeout:.0f} s", stage=stages[-1] if stages else "start",
                seconds=time.time() - start, output=stdout + stderr)
  text, rc = stdout + stderr, proc.returncode
  stages = re.findall(r"STAGE (\w+)", stdout)
  found = re.findall(r"^RESULT (.*)$", stdout, re.M)
  result = json.loads(found[-1]) if found else dict(status="crash", error=_first_error(text))
  if result["status"] == "crash" and "CUDA_ERROR" not in result.get("error", "") and "CUDA_ERROR" in text:
    result["error"] = _first_error(text)  # the device's own message beats a later cascade
  result.update(stage=stages[-1] if stages else "start", seconds=time.time() - start, rc=rc, output=text)
  return result


def _line(kernel, shape_name, r):
  head = f"{kernel:4s} {shape_name:38s} {r['status']:7s} {r.get('seconds', 0):5.1f}s"
  if r["status"] == "ok":
    return head + "  " + "  ".join(f"{k}={v}" for k, v in r.items()
                                   if k not in ("status", "stage", "seconds", "rc", "output"))
  return head + f"  at stage {r.get('stage', '?')}: {r.get('error', '')}"


def sanitize(kernel, shape_name, args, deadline):
  tool = shutil.which("compute-sanitizer")
  if tool is None:
    print("compute-sanitizer: not on PATH, skipped")
    return
  budget = min(args.sanitizer_timeout, deadline - time.time())
  if budget < 10:
    print("compute-sanitizer: no time left in the budget, skipped")
    return
  print(f"compute-sanitizer memcheck on {kernel} {shape_name} (timeout {budget:.0f} s):", flush=True)
  r = run_job(kernel, shape_name, dict_args(args, timeout=budget), time.time() + budget,
              prefix=(tool, "--tool", "memcheck", "--print-limit", "5"))
  report = [l for l in r.get("output", "").splitlines() if l.startswith("=========")]
  for line in (report or r.get("output", "").splitlines())[:40]:
    print("  " + line)
  print(f"  (sanitizer run: {r['status']}, {r.get('seconds', 0):.0f} s)")


def dict_args(args, **changes):
  return argparse.Namespace(**{**vars(args), **changes})


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--child", nargs=2, metavar=("KERNEL", "SHAPE"), help=argparse.SUPPRESS)
  parser.add_argument("--interpret", action="store_true", help="Mosaic GPU interpret mode on the CPU")
  parser.add_argument("--shapes", help=f"comma-separated subset of {', '.join(SHAPES)}")
  parser.add_argument("--kernels", default=",".join(KERNELS), help="comma-separated subset of fwd,dq,dkv,vjp")
  parser.add_argument("--jobs", type=int, default=None, help="child processes at once (GPU 4, CPU 1)")
  parser.add_argument("--budget", type=float, default=None, help="seconds for the whole run (GPU 150, CPU 1500)")
  parser.add_argument("--timeout", type=float, default=None, help="seconds for one child (GPU 90, CPU 300)")
  parser.add_argument("--sanitizer-timeout", type=float, default=45.0)
  args = parser.parse_args()
  if args.child:
    return child_main(*args.child, args.interpret)

  args.budget = args.budget or (1500.0 if args.interpret else 150.0)
  args.timeout = args.timeout or (300.0 if args.interpret else 90.0)
  start = time.time()
  deadline = start + args.budget
  names = args.shapes.split(",") if args.shapes else [n for n in (SHAPES if args.interpret else GPU_SHAPES)
                                                      if SHAPES[n][-1] or not args.interpret]
  unknown = [n for n in names if n not in SHAPES] + [k for k in args.kernels.split(",") if k not in KERNELS]
  if unknown:
    parser.error(f"unknown shapes / kernels: {unknown}")
  jobs = [(k, n) for n in names for k in args.kernels.split(",") if k != "vjp" or n in VJP_SHAPES]
  jobs.sort(key=lambda job: -SHAPES[job[1]][1])  # the long ones first
  import jax  # the version only: the parent never starts a backend (a fault would poison it)
  print(f"jax {jax.__version__}, {len(jobs)} cases, {'interpret (CPU)' if args.interpret else 'GPU'}, "
        f"compute-sanitizer: {shutil.which('compute-sanitizer') or 'absent'}", flush=True)
  workers = args.jobs or (1 if args.interpret else 4)
  results = {}
  with ThreadPoolExecutor(max_workers=workers) as pool:
    futures = {job: pool.submit(run_job, *job, args, deadline) for job in jobs}
    for job, future in futures.items():
      results[job] = future.result()
      print(_line(*job, results[job]), flush=True)
  crashed = [job for job in jobs if results[job]["status"] in ("crash", "timeout")]
  mismatched = [job for job in jobs if re.search("MISMATCH|non-finite|shape", _line(*job, results[job]))]
  print(f"summary: {len(jobs) - len(crashed)} ran, {len(crashed)} crashed / timed out, {len(mismatched)} mismatched")
  if crashed and not args.interpret:
    smallest = min(crashed, key=lambda job: SHAPES[job[1]][0] * SHAPES[job[1]][1] * (1 + SHAPES[job[1]][5]))
    sanitize(*smallest, args, deadline)
  print(f"total wall time {time.time() - start:.1f} s")
  return 1 if crashed or mismatched else 0


if __name__ == "__main__":
  sys.exit(main())
