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


# Beyond the original (off by default; `../shared/reference/tokenizers.md`).


def lecam_reg(logits_real, logits_fake, ema_real, ema_fake):
  """LeCAM (Tseng et al. 2021; MAGVIT's `lecam_reg`): mean relu(D(real) - ema_fake)^2 +
  mean relu(ema_real - D(fake))^2, against EMAs of D's mean logits. It keeps D's outputs on
  reals and fakes from drifting apart, which is what lets a small-data GAN run away."""
  real = jnp.mean(jax.nn.relu(logits_real.astype(jnp.float32) - ema_fake) ** 2)
  fake = jnp.mean(jax.nn.relu(ema_real - logits_fake.astype(jnp.float32)) ** 2)
  return real + fake


def lecam_ema_update(ema, logits_real, logits_fake, decay):
  """The EMAs of D's mean logits ({'real', 'fake'}) after one step."""
  mean = lambda l: jnp.mean(jax.lax.stop_gradient(l).astype(jnp.float32))
  return {
    'real': decay * ema['real'] + (1.0 - decay) * mean(logits_real),
    'fake': decay * ema['fake'] + (1.0 - decay) * mean(logits_fake),
  }


def r1_penalty(disc_fn, x):
  """E_x ||grad_x sum D(x)||^2 over the real images x (the caller weights it by r1_weight / 2;
  differentiable w.r.t. D's params through `disc_fn`)."""
  grad = jax.grad(lambda inp: jnp.sum(disc_fn(inp).astype(jnp.float32)))(x)
  return jnp.mean(jnp.sum(grad.astype(jnp.float32) ** 2, axis=tuple(range(1, grad.ndim))))


def annealed_weight(step, weight, anneal_steps, factor):
  """`factor` x `weight` at step 0, decaying linearly to `weight` at `anneal_steps` and
  constant after (LFQ's entropy weight); `weight` throughout when anneal_steps is 0."""
  if anneal_steps <= 0:
    return jnp.asarray(weight, jnp.float32)
  left = jnp.clip(1.0 - jnp.asarray(step, jnp.float32) / anneal_steps, 0.0, 1.0)
  return weight * (1.0 + (factor - 1.0) * left)
