"""AdamW with the OLMo2 recipe: linear warmup, cosine to 10% of peak, no decay on embeddings/norms/biases.

Order of the chain: clip the global gradient norm first (so one spike cannot blow up Adam's moments),
then AdamW. Parameters stay float32 (the master copy); the model computes in `model.dtype`.
"""

import jax
import optax

# Leaf names that are never decayed (token embeddings, norm gains, biases), and the module-name
# fragment that marks a norm whose parameters may be named otherwise.
_NO_DECAY_LEAVES = ("bias", "scale", "embedding")
_NO_DECAY_FRAGMENTS = ("norm",)


def learning_rate_schedule(config) -> optax.Schedule:
  """0 -> peak linearly over `warmup_steps`, then cosine down to `min_lr_ratio * peak` at `total_steps`."""
  if config.warmup_steps < 0 or config.warmup_steps >= config.total_steps:
    raise ValueError(f"warmup_steps={config.warmup_steps}; expected 0 <= warmup_steps < "
                     f"total_steps={config.total_steps}.")
  if config.learning_rate <= 0:
    raise ValueError(f"learning_rate={config.learning_rate}; expected a positive number.")
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate, warmup_steps=config.warmup_steps,
      decay_steps=config.total_steps, end_value=config.learning_rate * config.min_lr_ratio)


def _path_names(path) -> list[str]:
  return [str(getattr(k, "key", getattr(k, "name", k))).lower() for k in path]


def decays(path) -> bool:
  """Whether weight decay applies to the parameter at `path` (a jax tree path)."""
  names = _path_names(path)
  if names and names[-1] in _NO_DECAY_LEAVES:
    return False
  return not any(frag in name for name in names for frag in _NO_DECAY_FRAGMENTS)


def weight_decay_mask(params):
  return jax.tree_util.tree_map_with_path(lambda path, _: decays(path), params)


def make_optimizer(config) -> optax.GradientTransformation:
  """The optimizer for `config` (top-level fields: learning_rate, weight_decay, betas, clipping)."""
  chain = []
  if config.grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(config.grad_clip_norm))
  chain.append(optax.adamw(learning_rate_schedule(config), b1=config.adam_b1, b2=config.adam_b2,
                           eps=config.adam_eps, weight_decay=config.weight_decay,
                           mask=weight_decay_mask))
  return optax.chain(*chain)
