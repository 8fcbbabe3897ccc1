"""The CUDA compute capability of this process's GPU: what a backend's `check_supported` reads to decide
whether its kernels run here (cuDNN's flash attention from Ampere on, Mosaic GPU's wgmma on Hopper only)."""

from __future__ import annotations

import jax

HOPPER = (9, 0)


def is_hopper(capability: tuple[int, int]) -> bool:
  """Hopper itself (9.x: sm_90's wgmma), not "Hopper or later": Blackwell (10.x) has no wgmma."""
  return capability[0] == HOPPER[0]


def local() -> tuple[int, int] | None:
  """(major, minor) of the first local CUDA GPU; None where there is none (a CPU machine, also while
  lowering there for an abstract GPU) or where the GPU reports no CUDA capability (ROCm's "gfx90a")."""
  try:
    device = jax.local_devices(backend="gpu")[0]
  except RuntimeError:
    return None
  major, _, minor = str(getattr(device, "compute_capability", "")).partition(".")
  if not (major.isdigit() and minor.isdigit()):
    return None
  return int(major), int(minor)
