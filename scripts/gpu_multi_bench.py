"""Multi-GPU training runs of the 700M-shaped MoDA model (issue 8), one subprocess per run.

  python scripts/gpu_multi_bench.py --runs=dp1,dp2,dp4 [--steps=10] [--out=DIR]
  python scripts/gpu_multi_bench.py --runs=fsdp4,eval1,eval2,fsdp2_tp2,fsdp_15b

Every 700M run trains the same global batch (32 rows x 4096 tokens, seed 0) on a different mesh, so
their first losses must agree to bf16 rounding; per-GPU work is fixed at 8 rows per microbatch
(fewer GPUs accumulate more microbatches, which the trainer's tests show equals the big batch), so
tokens/s per GPU against `dp1` is the data-parallel scaling efficiency. `fsdp4` saves a checkpoint
and logs its val_loss; `eval1` / `eval2` restore it on 1 GPU and on a 2-GPU data-parallel mesh and
must reproduce that loss. `fsdp_15b` trains configs/moda_15b_fsdp.py, whose state exceeds one GPU.

Writes <out>/<run>.jsonl (the trainer's metrics), <out>/<run>.log (output tail) and
<out>/summary.json, and prints a Markdown table. Run from the repo root on the GPU machine.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

_700M = "configs/moda_700m.py"
_GLOBAL_BATCH = 32
_ROWS_PER_GPU = 8
_CHECKPOINTED = "fsdp4"  # the run whose checkpoint eval1 / eval2 restore

# name -> (GPUs, (data, fsdp, tensor) mesh, config file)
TRAIN_RUNS = {
    "dp1": (1, (-1, 1, 1), _700M),
    "dp2": (2, (-1, 1, 1), _700M),
    "dp4": (4, (-1, 1, 1), _700M),
    "fsdp4": (4, (1, -1, 1), _700M),
    "fsdp2_tp2": (4, (1, 2, 2), _700M),
    "fsdp_15b": (4, (1, -1, 1), "configs/moda_15b_fsdp.py"),
}
EVAL_RUNS = {"eval1": 1, "eval2": 2}  # name -> GPUs


def _visible(gpus: int) -> dict[str, str]:
  return {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(gpus))}


def _run(cmd: list[str], env: dict[str, str], log_path: str, timeout: int) -> tuple[int, str]:
  start = time.time()
  try:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    code, text = proc.returncode, proc.stdout + proc.stderr
  except subprocess.TimeoutExpired as e:
    code = 124
    text = f"TIMEOUT after {timeout}s\n" + (e.stdout or b"").decode(errors="replace") + (
        e.stderr or b"").decode(errors="replace")
  with open(log_path, "w") as f:
    f.write(text[-20000:])
  print(f"[{time.strftime('%H:%M:%S')}] {' '.join(cmd[1:3])} exit {code} in {time.time() - start:.0f}s",
        flush=True)
  return code, text


def _train_flags(name: str, gpus: int, mesh, steps: int, workdir: str) -> list[str]:
  data, fsdp, tensor = mesh
  flags = [f"--workdir={workdir}", f"--config.total_steps={steps}", "--config.warmup_steps=5",
           "--config.log_every=1", "--config.progress_bar=False", "--config.checkpoint_async=False",
           f"--config.mesh.data={data}", f"--config.mesh.fsdp={fsdp}",
           f"--config.mesh.tensor={tensor}"]
  if name == "fsdp_15b":
    return flags + [f"--config.batch_size={gpus}", "--config.checkpoint_every=0"]
  accum = max(_GLOBAL_BATCH // (_ROWS_PER_GPU * gpus), 1)
  checkpointed = name == _CHECKPOINTED
  return flags + [f"--config.batch_size={_GLOBAL_BATCH}", f"--config.grad_accum_steps={accum}",
                  f"--config.eval_every={steps if checkpointed else 0}",
                  f"--config.checkpoint_every={steps if checkpointed else 0}"]


def _read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def train(name: str, steps: int, out: str, workroot: str, timeout: int) -> dict:
  gpus, mesh, config = TRAIN_RUNS[name]
  workdir = os.path.join(workroot, name)
  shutil.rmtree(workdir, ignore_errors=True)
  cmd = [sys.executable, "scripts/train_and_report_memory.py", f"--config={config}",
         *_train_flags(name, gpus, mesh, steps, workdir)]
  code, text = _run(cmd, _visible(gpus), os.path.join(out, f"{name}.log"), timeout)
  records = _read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  if records:
    shutil.copy(os.path.join(workdir, "metrics.jsonl"), os.path.join(out, f"{name}.jsonl"))
  peaks = [json.loads(line.split(" ", 1)[1]) for line in text.splitlines()
           if line.startswith("PEAK_GIB_PER_DEVICE ")]
  steady = [r["tokens_per_s"] for r in records if r["step"] >= 4 and "tokens_per_s" in r]
  result = {"exit": code, "gpus": gpus, "mesh": dict(zip(("data", "fsdp", "tensor"), mesh)),
            "config": config, "losses": [r["loss"] for r in records][:steps],
            "val_loss": next((r["val_loss"] for r in records if "val_loss" in r), None),
            "tokens_per_s": statistics.median(steady) if steady else None,
            "mfu": statistics.median([r["mfu"] for r in records if r["step"] >= 4 and "mfu" in r] or [0]),
            "peak_gib_per_gpu": max(peaks[-1]) if peaks else None}
  if result["tokens_per_s"]:
    result["tokens_per_s_per_gpu"] = result["tokens_per_s"] / gpus
  if name != _CHECKPOINTED:
    shutil.rmtree(workdir, ignore_errors=True)
  return result


def evaluate(name: str, out: str, workroot: str, timeout: int) -> dict:
  gpus = EVAL_RUNS[name]
  report = os.path.join(out, f"{name}_report.json")
  cmd = [sys.executable, "-m", "moda_jax.evaluate", f"--workdir={os.path.join(workroot, _CHECKPOINTED)}",
         "--builtin_examples=0", f"--output={report}"]
  code, _ = _run(cmd, _visible(gpus), os.path.join(out, f"{name}.log"), timeout)
  loss = None
  if os.path.exists(report):
    with open(report) as f:
      loss = json.load(f)["datasets"].get("validation", {}).get("loss")
  return {"exit": code, "gpus": gpus, "val_loss": loss}


def markdown(results: dict) -> str:
  base = results.get("dp1", {}).get("tokens_per_s_per_gpu")
  lines = ["| run | GPUs | mesh (data, fsdp, tensor) | tokens/s | tokens/s per GPU | scaling vs dp1 "
           "| MFU | peak GiB per GPU | losses, steps 1-3 | val_loss |", "|" + "---|" * 10]
  for name, r in results.items():
    if name in EVAL_RUNS:
      lines.append(f"| {name} (restore {_CHECKPOINTED}) | {r['gpus']} | data | | | | | | | "
                   f"{r['val_loss']} |")
      continue
    per_gpu = r.get("tokens_per_s_per_gpu")
    scaling = f"{per_gpu / base:.1%}" if per_gpu and base else ""
    mesh = tuple(r["mesh"].values())
    losses = ", ".join(f"{x:.4f}" for x in r["losses"][:3])
    lines.append(f"| {name} | {r['gpus']} | {mesh} | {r['tokens_per_s'] or 0:,.0f} | "
                 f"{per_gpu or 0:,.0f} | {scaling} | {r['mfu']:.1%} | {r['peak_gib_per_gpu']} | "
                 f"{losses} | {r['val_loss'] or ''} |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--runs", default="dp1,dp2,dp4,fsdp4,eval1,eval2,fsdp2_tp2,fsdp_15b")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/multi_gpu_bench"))
  parser.add_argument("--workroot", default="/dev/shm/multi_gpu_bench")
  parser.add_argument("--timeout", type=int, default=300, help="seconds per run")
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  summary_path = os.path.join(args.out, "summary.json")
  results = {}
  for name in args.runs.split(","):
    if name in EVAL_RUNS:
      results[name] = evaluate(name, args.out, args.workroot, args.timeout)
    elif name in TRAIN_RUNS:
      results[name] = train(name, args.steps, args.out, args.workroot, args.timeout)
    else:
      raise SystemExit(f"--runs: unknown run {name!r}; expected one of "
                       f"{sorted(TRAIN_RUNS) + sorted(EVAL_RUNS)}")
    with open(summary_path, "w") as f:  # after every run, so a cut-off command keeps what finished
      json.dump(results, f, indent=2)
    print(json.dumps({name: results[name]}), flush=True)
  print(markdown(results))


if __name__ == "__main__":
  main()
