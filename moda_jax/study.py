"""`python -m moda_jax.study`: the command line of `moda_jax.eval.study` (ablation grids)."""

import sys

from moda_jax.eval.study import main

if __name__ == "__main__":
  sys.exit(main())
