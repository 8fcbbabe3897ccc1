"""scripts/profile_train_step.py: the trace parser on a hand-written trace (known durations -> exact
tables), and one profiled micro training run on CPU."""

import importlib.util
import json
import subprocess
import sys

import pytest

from configs import micro
from moda_jax import cli_errors
from train_runs import REPO

_spec = importlib.util.spec_from_file_location("profile_train_step", REPO / "scripts" / "profile_train_step.py")
prof = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prof)


def _meta(pid, tid=None, *, process=None, thread=None):
  if process is not None:
    return {"ph": "M", "pid": pid, "name": "process_name", "args": {"name": process}}
  return {"ph": "M", "pid": pid, "tid": tid, "name": "thread_name", "args": {"name": thread}}


def _op(pid, tid, name, ts, dur, **args):
  return {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": ts, "dur": dur, "args": args}


def _gpu_trace():
  """Two steps of 1000 us on one GPU; the host thread and the derived "XLA Ops" line repeat work that
  must not be counted."""
  events = [_meta(1, process="/device:GPU:0"), _meta(1, 10, thread="Stream #13(Compute)"),
            _meta(1, 12, thread="Stream #20(MemcpyH2D)"), _meta(1, 11, thread="XLA Ops"),
            _meta(7, process="/host:CPU"), _meta(7, 100, thread="python")]
  for step, t0 in enumerate((0, 1000)):
    events += [_op(1, 10, "moda_forward", t0, 300), _op(1, 10, f"loop_add_fusion_{3 + 4 * step}", t0 + 300,
                                                         100 if step == 0 else 50),
               _op(1, 10, "sm90_xmma_gemm_bf16bf16_tn", t0 + 400, 200), _op(1, 12, "MemcpyH2D", t0, 25),
               _op(1, 11, "fusion.3", t0, 600, hlo_op="fusion.3"),
               _op(7, 100, "fusion.3", t0, 900, hlo_op="fusion.3", device_ordinal="0")]
  return events


def test_device_streams_are_counted_and_host_and_derived_lines_are_not():
  s = prof.summarize(_gpu_trace(), steps=2, step_time_ms=1.0)
  assert s["source"] == "device stream kernels" and s["devices"] == 1
  ops = {r["op"]: r for r in s["ops"]}
  assert list(ops) == ["moda_forward", "sm90_xmma_gemm_bf16bf16_tn", "loop_add_fusion", "MemcpyH2D"]
  expect = {"moda_forward": (0.3, "attention", 1, 1), "sm90_xmma_gemm_bf16bf16_tn": (0.2, "matmul", 1, 1),
            "loop_add_fusion": (0.075, "fusion", 1, 2), "MemcpyH2D": (0.025, "copy/memset", 1, 1)}
  for name, (ms, cat, calls, variants) in expect.items():
    r = ops[name]
    assert r["ms_per_step"] == pytest.approx(ms) and r["pct_of_step"] == pytest.approx(100 * ms)
    assert (r["category"], r["calls_per_step"], r["variants"]) == (cat, calls, variants)
  assert s["op_ms_per_step"] == pytest.approx(0.6)
  # Busy: [0, 600] + [1000, 1350] + [1400, 1600] us; the copy overlaps the attention kernel.
  assert s["busy_ms_per_step"] == pytest.approx(0.575)
  cats = {c["category"]: c for c in s["categories"]}
  assert set(cats) == {"attention", "matmul", "fusion", "copy/memset"}
  assert cats["attention"]["pct_of_op_time"] == pytest.approx(50.0)
  assert cats["fusion"]["pct_of_step"] == pytest.approx(7.5) and cats["fusion"]["ops"] == 1
  exact = {r["op"]: r for r in prof.summarize(_gpu_trace(), steps=2, step_time_ms=1.0, exact_names=True)["ops"]}
  assert exact["loop_add_fusion_3"]["ms_per_step"] == pytest.approx(0.05)
  assert exact["loop_add_fusion_7"]["ms_per_step"] == pytest.approx(0.025)


def test_calls_are_listed_per_step_in_stream_order():
  events = _gpu_trace() + [_op(1, 10, "moda_forward", t0, dur) for t0, dur in ((700, 40), (1700, 60))]
  calls = prof.call_durations(events, ["moda_forward", "gemm"], steps=2)
  assert calls["moda_forward"] == {"calls_us": [[300, 40], [300, 60]], "mean_us": [300, 50]}
  assert calls["gemm"]["calls_us"] == [[200], [200]]
  assert "in stream order" in prof.calls_markdown(calls) and prof.calls_markdown({}) == ""
  with pytest.raises(ValueError, match="--calls=moda_forward: 5 calls over 2 steps"):
    prof.call_durations(events + [_op(1, 10, "moda_forward", 900, 5)], ["moda_forward"], steps=2)


def test_overlapping_kernels_on_one_stream_each_count_their_full_duration():
  # As in the H200's traces: a kernel starting before the previous one on its line ends is not nested
  # in it (self time would give the first 100 - 80 = 20 us, or less than zero).
  events = [_meta(1, process="/device:GPU:0"), _meta(1, 10, thread="Stream #13(Compute)"),
            _op(1, 10, "cudnn_flash_bprop", 0, 100), _op(1, 10, "compute_dot_do_o", 20, 80),
            _op(1, 10, "loop_add_fusion", 90, 30)]
  s = prof.summarize(events, steps=1, step_time_ms=0.12)
  assert {r["op"]: r["ms_per_step"] for r in s["ops"]} == pytest.approx(
      {"cudnn_flash_bprop": 0.1, "compute_dot_do_o": 0.08, "loop_add_fusion": 0.03})
  assert s["busy_ms_per_step"] == pytest.approx(0.12)


def test_cpu_ops_are_hlo_events_on_host_threads_counted_by_self_time_per_device():
  events = [_meta(5, process="/host:CPU"), _meta(5, 1, thread="tf_XLAEigen/1"), _meta(5, 2, thread="tf_XLAEigen/2"),
            _op(5, 1, "ThunkExecutor::Execute", 0, 1000),  # no hlo_op: runtime, not an op
            _op(5, 1, "while.2", 0, 100, hlo_op="while.2", device_ordinal="0"),  # its body ran inside it
            _op(5, 1, "fusion.1", 10, 30, hlo_op="fusion.1", device_ordinal="0"),
            _op(5, 1, "fusion.4", 50, 20, hlo_op="fusion.4", device_ordinal="0"),
            _op(5, 2, "fusion.1", 0, 40, hlo_op="fusion.1", device_ordinal="1")]
  s = prof.summarize(events, steps=1, step_time_ms=0.1)
  assert s["source"].startswith("XLA ops") and s["devices"] == 2
  ops = {r["op"]: r for r in s["ops"]}
  assert ops["fusion"]["ms_per_step"] == pytest.approx((30 + 20 + 40) / 2 / 1000)
  assert ops["fusion"]["calls_per_step"] == pytest.approx(1.5)
  assert ops["while"]["ms_per_step"] == pytest.approx(50 / 2 / 1000) and ops["while"]["category"] == "other"
  assert s["busy_ms_per_step"] == pytest.approx((100 + 40) / 2 / 1000)


@pytest.mark.parametrize("name, expected", [
    ("cudnn_generated_fort_native_sdpa_sm90_knob_7", "attention"), ("moda_backward_dkv", "attention"),
    ("triton_gemm_dot_12", "matmul"), ("nvjet_hsh_128x256", "matmul"), ("all-reduce-start", "collective"),
    ("copy_fusion", "copy/memset"), ("input_reduce_fusion", "fusion"), ("wrapped_broadcast", "other")])
def test_categories(name, expected):
  assert prof.category(name) == expected


def test_micro_training_step_end_to_end(tmp_path):
  steps = 2
  s = prof.profile(micro.get_config(), str(tmp_path / "run"), steps=steps, warmup=1, out=str(tmp_path / "out"))
  assert s["ops"] and s["source"].startswith("XLA ops")
  listed = sum(r["ms_per_step"] for r in s["ops"])
  assert 0 < listed <= s["step_time_ms"] * steps
  assert 0 < s["busy_ms_per_step"] <= s["step_time_ms"]
  # Every device runs the same program once per traced step (and nothing from the untraced ones).
  assert all(r["calls_per_step"] == int(r["calls_per_step"]) for r in s["ops"])
  assert json.loads((tmp_path / "out" / "profile_summary.json").read_text())["ops"] == s["ops"]
  assert "| 1 | `" in (tmp_path / "out" / "profile_summary.md").read_text()


def test_bad_steps_is_one_line_error():
  proc = subprocess.run([sys.executable, "scripts/profile_train_step.py", "--config=configs/micro.py",
                         "--workdir=/tmp/unused", "--steps=0"], capture_output=True, text=True, cwd=REPO, timeout=120)
  assert proc.returncode == cli_errors.EXIT_USER_ERROR, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and "--steps" in lines[0], proc.stderr[-2000:]
  with pytest.raises(cli_errors.UserError, match="--warmup=0"):
    prof.profile(micro.get_config(), "/tmp/unused", steps=1, warmup=0)
