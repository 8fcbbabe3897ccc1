"""Test settings: CPU only, 8 fake devices for sharding tests, strict rank promotion, fast compiles."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The device tests (tests/gpu, JAX_PLATFORMS=cuda) keep XLA's defaults: the setting below is for the
# CPU suite, which spends most of its time compiling small graphs.
_CPU_SUITE = os.environ["JAX_PLATFORMS"] == "cpu"
# LLVM's optimization level changes the generated code's speed, not its semantics (fast-math stays
# off) nor the HLO and its buffer assignment (memory_analysis); level 0 compiles ~40% faster
# (compile-bound tests: ~35% less time). Subprocesses that inherit this environment get it too, as
# tests/train_runs.py gives its runs.
_FAST_COMPILE = " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           + (_FAST_COMPILE if _CPU_SUITE else "")).strip()

import jax  # noqa: E402  (must come after the environment above)

jax.config.update("jax_numpy_rank_promotion", "raise")
