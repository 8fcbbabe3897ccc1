"""Test settings: CPU only, 8 fake devices for sharding tests, strict rank promotion."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402  (must come after the environment above)

jax.config.update("jax_numpy_rank_promotion", "raise")
