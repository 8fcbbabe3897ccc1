"""Converts parameters between the scanned and the looped block layout (see `model.py`).

scan: {"blocks": <tree with a leading axis of N - 1>, ...}
loop: {"block_0": <tree>, ..., "block_{N-2}": <tree>, ...}
Every other entry (embed, last_block, final_norm, unembed) is shared unchanged. Works on plain
arrays; boxed (`nn.LogicallyPartitioned`) parameters are unboxed first, since the "layers" axis
name does not survive the conversion.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

_STACKED = "blocks"


def looped_name(i: int) -> str:
  """The unscanned layout's name of writer block i."""
  return f"block_{i}"


def scan_to_loop(params: Mapping[str, Any]) -> dict[str, Any]:
  """{"blocks": stacked} -> {"block_i": layer i}."""
  params = dict(nn.meta.unbox(params))
  if _STACKED not in params:
    if "last_block" in params and not any(k.startswith("block_") for k in params):
      return params  # num_layers == 1: no writer blocks, both layouts are the same tree
    raise ValueError(f"params has keys {sorted(params)}: expected a scanned layout with '{_STACKED}'.")
  stacked = params.pop(_STACKED)
  num_layers = jax.tree.leaves(stacked)[0].shape[0]
  for i in range(num_layers):
    params[looped_name(i)] = jax.tree.map(lambda a, i=i: a[i], stacked)
  return params


def loop_to_scan(params: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
  """{"block_i": layer i} -> {"blocks": stacked}; `num_layers` is the model's (N, incl. the last)."""
  params = dict(nn.meta.unbox(params))
  num_writers = num_layers - 1
  names = [looped_name(i) for i in range(num_writers)]
  missing = [n for n in names if n not in params]
  extra = sorted(k for k in params if k.startswith("block_") and k not in names)
  if missing or extra:
    raise ValueError(f"loop_to_scan(num_layers={num_layers}): expected blocks {names}; missing "
                     f"{missing}, unexpected {extra}.")
  if num_writers == 0:
    return params
  layers = [params.pop(n) for n in names]
  params[_STACKED] = jax.tree.map(lambda *a: jnp.stack(a), *layers)
  return params
