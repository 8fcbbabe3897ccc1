"""`python -m moda_jax.evaluate`: the command line of `moda_jax.eval.evaluate`."""

from moda_jax.eval.evaluate import cli

if __name__ == "__main__":
  cli()
