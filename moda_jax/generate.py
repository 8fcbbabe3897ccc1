"""`python -m moda_jax.generate`: the command line of `moda_jax.eval.generate`."""

from moda_jax.eval.generate import cli

if __name__ == "__main__":
  cli()
