"""The peers grid (configs/studies/peers_small.py) under pre-norm: the placement every peer's paper uses.

  python -m moda_jax.study run configs/studies/peers_prenorm.py --out=workdir_study/peers_prenorm
  python -m moda_jax.study report workdir_study/peers_prenorm

The same model, data, recipe, seeds and entries as peers_small's, with `model.norm = "pre"` (names end
in "_pre"). There attention residuals and both hyper-connection variants are exactly the residual network
at init; under post-norm they are not, since the norm after each sublayer sees the mixed stream.
"""

from configs.studies import peers_small


def get_grid():
  return {**peers_small.get_grid(), "entries": peers_small.entries("pre", "_pre"), "baseline": "none_pre"}
