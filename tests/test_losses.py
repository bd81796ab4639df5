"""Loss terms of taming's VQLPIPSWithDiscriminator against hand computations (spec (c))."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqgan_jax import losses

REAL = np.array([[2.0, 0.5], [-1.0, 1.0]], np.float32)
FAKE = np.array([[-2.0, -0.5], [3.0, 0.0]], np.float32)


def _softplus(v):
  return math.log1p(math.exp(v))


def test_hinge_d_loss_by_hand():
  # relu(1 - real) = [0, .5, 2, 0] -> mean .625; relu(1 + fake) = [0, .5, 4, 1] -> mean 1.375.
  expected = 0.5 * (0.625 + 1.375)
  got = losses.hinge_d_loss(jnp.asarray(REAL), jnp.asarray(FAKE))
  np.testing.assert_allclose(float(got), expected, rtol=1e-6)
  # A perfect discriminator (real >= 1, fake <= -1) has zero hinge loss.
  assert float(losses.hinge_d_loss(jnp.full((3,), 1.5), jnp.full((3,), -1.0))) == 0.0


def test_vanilla_d_loss_by_hand():
  expected = 0.5 * (
    np.mean([_softplus(-v) for v in REAL.ravel()]) + np.mean([_softplus(v) for v in FAKE.ravel()])
  )
  got = losses.vanilla_d_loss(jnp.asarray(REAL), jnp.asarray(FAKE))
  np.testing.assert_allclose(float(got), expected, rtol=1e-6)
  # At zero logits both terms are log 2.
  np.testing.assert_allclose(
    float(losses.vanilla_d_loss(jnp.zeros(4), jnp.zeros(4))), math.log(2.0), rtol=1e-6
  )
  assert set(losses.D_LOSSES) == {'hinge', 'vanilla'}
  assert losses.D_LOSSES['hinge'] is losses.hinge_d_loss
  assert losses.D_LOSSES['vanilla'] is losses.vanilla_d_loss


def test_generator_loss_and_l1_by_hand():
  np.testing.assert_allclose(
    float(losses.generator_loss(jnp.asarray(FAKE))), -np.mean(FAKE), rtol=1e-6
  )  # -0.125
  x = jnp.asarray([[1.0, -1.0], [0.0, 0.5]])
  y = jnp.asarray([[0.5, -1.0], [1.0, 0.0]])
  np.testing.assert_allclose(float(losses.l1(x, y)), (0.5 + 0 + 1 + 0.5) / 4, rtol=1e-6)


def test_adaptive_weight_formula():
  a = jnp.asarray([[3.0, 0.0], [0.0, 4.0]])  # ||a|| = 5
  b = jnp.asarray([[0.0, 1.0], [0.0, 0.0]])  # ||b|| = 1
  got = losses.adaptive_weight(a, b, disc_weight=0.8)
  np.testing.assert_allclose(float(got), 5.0 / (1.0 + 1e-4) * 0.8, rtol=1e-6)
  # delta is 1e-4 (the code), not the paper's 1e-6: visible when ||b|| is tiny.
  small = jnp.asarray([[1e-4, 0.0]])
  np.testing.assert_allclose(
    float(losses.adaptive_weight(small, small, 1.0)), 1e-4 / 2e-4, rtol=1e-4
  )


def test_adaptive_weight_clamps_huge_ratio():
  a = jnp.full((4, 4), 10.0)  # ||a|| = 40
  b = jnp.zeros((4, 4))  # ratio 40 / 1e-4 = 4e5 -> 1e4
  np.testing.assert_allclose(float(losses.adaptive_weight(a, b, 1.0)), 1e4, rtol=1e-6)
  # The clamp happens before disc_weight scales it.
  np.testing.assert_allclose(float(losses.adaptive_weight(a, b, 0.75)), 0.75e4, rtol=1e-6)
  assert float(losses.adaptive_weight(jnp.zeros(3), jnp.ones(3), 1.0)) == 0.0


def test_adaptive_weight_is_stop_gradient():
  a0 = jnp.asarray([3.0, 4.0])
  b0 = jnp.asarray([1.0, 0.0])
  ga, gb = jax.grad(lambda a, b: losses.adaptive_weight(a, b, 0.8), argnums=(0, 1))(a0, b0)
  np.testing.assert_array_equal(np.asarray(ga), 0.0)
  np.testing.assert_array_equal(np.asarray(gb), 0.0)
  # ... while the same expression without the stop-gradient would have gradients.
  ga_raw = jax.grad(lambda a: jnp.linalg.norm(a) / (jnp.linalg.norm(b0) + 1e-4))(a0)
  assert np.abs(np.asarray(ga_raw)).sum() > 0.1


@pytest.mark.parametrize('factor', [1.0, 0.5])
def test_disc_factor_switches_on_at_disc_start(factor):
  assert float(losses.disc_factor(0, 5, factor)) == 0.0
  assert float(losses.disc_factor(4, 5, factor)) == 0.0
  assert float(losses.disc_factor(5, 5, factor)) == factor
  assert float(losses.disc_factor(6, 5, factor)) == factor
  assert float(losses.disc_factor(0, 0, factor)) == factor
  # Traced steps (as inside the jitted train step) and a float32 result.
  steps = jnp.arange(8)
  out = jax.jit(jax.vmap(lambda s: losses.disc_factor(s, 5, factor)))(steps)
  assert out.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(out), [0, 0, 0, 0, 0, factor, factor, factor])


def test_resolve_disc_start():
  assert losses.resolve_disc_start(0.6, 1500) == 900
  assert isinstance(losses.resolve_disc_start(0.6, 1500), int)
  assert losses.resolve_disc_start(250001, 1500) == 250001  # a batch count
  assert losses.resolve_disc_start(250001.0, 1500) == 250001  # a float batch count
  assert losses.resolve_disc_start(4.0, 8) == 4
  assert losses.resolve_disc_start(0, 1500) == 0
  assert losses.resolve_disc_start(1, 1500) == 1  # 1 is a count, not 100 %
  assert losses.resolve_disc_start(0.5, 8) == 4
