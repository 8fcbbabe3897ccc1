"""Autoregressive generation with the cached forward pass of `decode.py`.

One prefill step runs the whole prompt (filling every layer's sequence KV cache), then one step per
new token; each step builds that token's depth stream from scratch (depth attention reads only the
token's own slots, see `decode.py`). Sampling: greedy (temperature 0), temperature, top-k, top-p.
Rows stop independently at any of `stop_tokens`; after that they emit `pad_token`.

  python -m moda_jax.generate --workdir=DIR --prompt="def main(" [--max_new_tokens=64] [--temperature=0.8]

`--prompt` has no default: packed training never asks the model for a document's first token, so
there is no neutral "begin a document" prompt; an empty one is a one-line error (exit status 2), as
are the other flags' mistakes. `--verbose` shows the libraries' INFO logs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from moda_jax import cli_errors
from moda_jax.model import decode
from moda_jax.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Sampling:
  """temperature 0 = greedy; top_k 0 = off; top_p 1 = off."""

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature={self.temperature}: expected >= 0 (0 = greedy).")
    if self.top_k < 0:
      raise ValueError(f"top_k={self.top_k}: expected >= 0 (0 = off).")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p={self.top_p}: expected 0 < top_p <= 1 (1 = off).")

  def check_vocab(self, vocab_size: int) -> None:
    if self.top_k > vocab_size:
      raise ValueError(f"top_k={self.top_k}: expected <= vocab_size={vocab_size}.")


def filter_logits(logits_BV: jax.Array, sampling: Sampling) -> jax.Array:
  """Temperature-scaled logits with the tokens outside top-k / the top-p nucleus set to -inf."""
  logits_BV = logits_BV.astype(jnp.float32) / sampling.temperature
  if sampling.top_k:
    kth_B1 = jax.lax.top_k(logits_BV, sampling.top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
  if sampling.top_p < 1:
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    # Keep a token if the mass of the tokens strictly more likely is below top_p: the smallest set
    # reaching top_p, never empty.
    mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    kept_B = jnp.sum(mass_before_BV < sampling.top_p, axis=-1)
    cutoff_B1 = jnp.take_along_axis(sorted_BV, kept_B[:, None] - 1, axis=-1)
    logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
  return logits_BV


def sample(logits_BV: jax.Array, rng: jax.Array, sampling: Sampling) -> jax.Array:
  if sampling.temperature == 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  return jax.random.categorical(rng, filter_logits(logits_BV, sampling), axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "sampling"))
def _generate(params, prompt_BT, rng, stops_S, pad_token, *, config: ModelConfig,
              max_new_tokens: int, sampling: Sampling):
  batch, prompt_len = prompt_BT.shape
  cache = decode.init_cache(config, batch, prompt_len + max_new_tokens)
  logits_BTV, cache, _ = decode.decode_step(config, params, prompt_BT, cache)

  def step(carry, rng_t):
    logits_BV, cache, done_B = carry
    token_B = sample(logits_BV, rng_t, sampling)
    emitted_B = jnp.where(done_B, pad_token, token_B)
    done_B = done_B | jnp.any(emitted_B[:, None] == stops_S[None, :], axis=-1)
    # Finished rows keep decoding their own samples (not `pad_token`, which may not be a valid id).
    logits_B1V, cache, _ = decode.decode_step(config, params, token_B[:, None], cache)
    return (logits_B1V[:, 0], cache, done_B), (emitted_B, logits_BV)

  init = (logits_BTV[:, -1], cache, jnp.zeros((batch,), bool))
  # The last iteration's forward pass computes logits nobody reads; it keeps the loop uniform.
  _, (tokens_NB, logits_NBV) = jax.lax.scan(step, init, jax.random.split(rng, max_new_tokens))
  return tokens_NB.T, jnp.swapaxes(logits_NBV, 0, 1)


def generate(config: ModelConfig, params, prompt_BT, *, max_new_tokens: int,
             sampling: Sampling = Sampling(), rng: jax.Array | None = None,
             stop_tokens: Sequence[int] = (), pad_token: int = 0):
  """Returns (tokens [B, N] int32, logits [B, N, V] float32: the distribution each token was drawn
  from, before filtering). All rows' prompts have the same length T; T + N <= config.max_seq_len."""
  prompt_BT = jnp.asarray(prompt_BT, jnp.int32)
  if prompt_BT.ndim != 2 or prompt_BT.shape[1] < 1:
    raise ValueError(f"prompt has shape {prompt_BT.shape}: expected [B, T] token ids with T >= 1.")
  if max_new_tokens < 1 or prompt_BT.shape[1] + max_new_tokens > config.max_seq_len:
    raise ValueError(f"max_new_tokens={max_new_tokens} with a prompt of {prompt_BT.shape[1]} tokens: "
                     f"expected >= 1 and a total <= max_seq_len={config.max_seq_len}.")
  sampling.check_vocab(config.vocab_size)
  rng = jax.random.PRNGKey(0) if rng is None else rng
  # Stop and pad ids are traced (not static): changing them does not recompile. -1 matches nothing.
  stops_S = jnp.asarray(list(stop_tokens) or [-1], jnp.int32)
  return _generate(params, prompt_BT, rng, stops_S, jnp.int32(pad_token), config=config,
                   max_new_tokens=max_new_tokens, sampling=sampling)


def generate_text(config: ModelConfig, params, tokenizer, prompt: str, *, max_new_tokens: int,
                  sampling: Sampling = Sampling(), seed: int = 0) -> str:
  """The continuation of `prompt`, stopped at the tokenizer's end-of-document token."""
  prompt_ids = np.asarray(tokenizer.encode(prompt), np.int32)[None]
  max_new_tokens = min(max_new_tokens, config.max_seq_len - prompt_ids.shape[1])
  tokens, _ = generate(config, params, prompt_ids, max_new_tokens=max_new_tokens, sampling=sampling,
                       rng=jax.random.PRNGKey(seed), stop_tokens=(tokenizer.eos_id,),
                       pad_token=tokenizer.eos_id)
  return tokenizer.decode(np.asarray(tokens[0]))


def _check_cli_inputs(f) -> tuple[Sampling, object]:
  """(sampling, tokenizer) after the flags' checks, before any checkpoint array is read."""
  from moda_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  from moda_jax.data import tokenizers  # pylint: disable=g-import-not-at-top

  if not f.prompt:
    raise cli_errors.UserError("--prompt is empty: expected the text to continue, e.g. --prompt='The "
                               "module' (the model learned to continue documents, not to start one).")
  if f.max_new_tokens < 1:
    raise cli_errors.UserError(f"--max_new_tokens={f.max_new_tokens}: expected a positive int.")
  sampling = Sampling(f.temperature, f.top_k, f.top_p)
  run_config, _ = checkpoint.load_run_config(f.workdir, f.step)
  sampling.check_vocab(run_config.model.vocab_size)
  data = run_config.data
  tokenizer = tokenizers.make_tokenizer(data.tokenizer, data.tokenizer_path, data.eos_token)
  prompt_len, max_len = len(tokenizer.encode(f.prompt)), run_config.model.max_seq_len
  if prompt_len >= max_len:
    raise cli_errors.UserError(f"--prompt is {prompt_len} tokens: expected fewer than the model's "
                               f"max_seq_len={max_len}, leaving room for new tokens.")
  return sampling, tokenizer


def main(argv):
  del argv  # cli_errors.run rejects positional arguments
  from absl import logging  # pylint: disable=g-import-not-at-top

  from moda_jax.train import checkpoint  # pylint: disable=g-import-not-at-top

  f = _FLAGS
  if not f.verbose:
    logging.set_verbosity(logging.WARNING)  # Orbax's INFO lines would bury the text
  with cli_errors.checking_inputs():
    sampling, tokenizer = _check_cli_inputs(f)
  _, model, params = checkpoint.load_checkpoint(f.workdir, f.step)
  text = generate_text(model.config, params, tokenizer, f.prompt, max_new_tokens=f.max_new_tokens,
                       sampling=sampling, seed=f.seed)
  print(f.prompt + text)


def cli() -> None:
  """Defines the flags and runs `main` (`python -m moda_jax.generate`)."""
  global _FLAGS
  from absl import flags as absl_flags  # pylint: disable=g-import-not-at-top

  absl_flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.", required=True)
  absl_flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  absl_flags.DEFINE_string("prompt", "", "Text to continue (required: the model continues documents).")
  absl_flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate (capped by max_seq_len).")
  absl_flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
  absl_flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0 = off).")
  absl_flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
  absl_flags.DEFINE_integer("seed", 0, "Sampling seed.")
  absl_flags.DEFINE_bool("verbose", False, "Show the libraries' INFO logs (Orbax, JAX).")
  _FLAGS = absl_flags.FLAGS
  cli_errors.run(main)


if __name__ == "__main__":
  cli()
