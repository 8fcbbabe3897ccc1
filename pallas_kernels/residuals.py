"""The name of what a backend's forward computes for its backward pass, so remat policies can keep it.

A model that checkpoints its blocks (`jax.checkpoint` with a policy) saves only the values the policy
can see. The residuals of a backend's `custom_vjp` (its out and lse, a kernel-layout copy of lse) are
made inside the operator: a policy that keeps the attention output from outside still has to re-run
the whole forward kernel in the backward pass, just to get the lse back. So every backend passes the
residuals its forward computes through `named`, and a policy keeps them with
`jax.checkpoint_policies.save_only_these_names(RESIDUALS_NAME, ...)`. The operands (q, k, v, the depth
arrays) are the caller's own values: naming them is the caller's choice. Outside `jax.checkpoint` a
name is the identity.
"""

from jax.ad_checkpoint import checkpoint_name

RESIDUALS_NAME = "moda_attention_residuals"


def named(*arrays):
  """The arrays, each tagged `RESIDUALS_NAME` (a tuple, in order)."""
  return tuple(checkpoint_name(a, RESIDUALS_NAME) for a in arrays)
