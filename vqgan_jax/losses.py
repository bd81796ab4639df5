"""Loss terms of taming's `VQLPIPSWithDiscriminator`, as pure functions in float32."""

import jax
import jax.numpy as jnp


def l1(x, xrec):
  return jnp.mean(jnp.abs(x.astype(jnp.float32) - xrec.astype(jnp.float32)))


def hinge_d_loss(logits_real, logits_fake):
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real, logits_fake):
  return 0.5 * (jnp.mean(jax.nn.softplus(-logits_real)) + jnp.mean(jax.nn.softplus(logits_fake)))


D_LOSSES = {'hinge': hinge_d_loss, 'vanilla': vanilla_d_loss}


def generator_loss(logits_fake):
  """g = -mean(D(xrec)), used for both hinge and vanilla in the original."""
  return -jnp.mean(logits_fake)


def adaptive_weight(nll_grad, g_grad, disc_weight, delta=1e-4, max_value=1e4):
  """lambda = ||grad nll|| / (||grad g|| + 1e-4), clamped to [0, 1e4], times disc_weight.

  The gradients are those of the decoder's last conv kernel; the paper writes delta=1e-6,
  the code uses 1e-4.
  """
  w = jnp.linalg.norm(nll_grad.ravel()) / (jnp.linalg.norm(g_grad.ravel()) + delta)
  return jax.lax.stop_gradient(jnp.clip(w, 0.0, max_value) * disc_weight)


def disc_factor(step, disc_start, factor=1.0):
  """`adopt_weight`: zero before `disc_start` batches, `factor` from then on."""
  return jnp.where(step >= disc_start, factor, 0.0).astype(jnp.float32)


def resolve_disc_start(disc_start, num_steps):
  """`disc_start` is a batch count, or a fraction of the run when in (0, 1)."""
  if 0 < disc_start < 1:
    return int(round(disc_start * num_steps))
  return int(disc_start)
