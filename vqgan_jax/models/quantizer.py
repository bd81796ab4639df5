"""The taming quantizers: VectorQuantizer2 (legacy beta placement, straight-through
estimator) and GumbelQuantize (the released Gumbel f8 model's)."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqgan_jax.models import layers


def codebook_distances(z, codebook):
  """Squared distances in the original's expanded form ||z||^2 + ||e||^2 - 2 z.e, float32.

  The expanded form (not (z - e)^2) keeps the argmin identical to the original's under
  near-ties; HIGHEST precision keeps accelerators from using TF32 here.
  """
  z = z.astype(jnp.float32)
  codebook = codebook.astype(jnp.float32)
  return (
    jnp.sum(z**2, axis=-1, keepdims=True)
    + jnp.sum(codebook**2, axis=-1)
    - 2.0 * jnp.matmul(z, codebook.T, precision=jax.lax.Precision.HIGHEST)
  )


def vq_loss(z, z_q, beta: float, legacy: bool):
  """Codebook + commitment terms, plain means over all elements.

  legacy=True is what every released taming VQModel trained with: beta multiplies the
  *codebook* term and the commitment term has weight 1.
  """
  sg = jax.lax.stop_gradient
  commit = jnp.mean((sg(z_q) - z) ** 2)
  codebook = jnp.mean((z_q - sg(z)) ** 2)
  if legacy:
    return commit + beta * codebook
  return beta * commit + codebook


class VectorQuantizer(nn.Module):
  """Nearest-codebook quantizer. torch `quantize.embedding.weight` = `embedding/embedding`."""

  n_embed: int
  embed_dim: int
  beta: float = 0.25
  legacy: bool = True

  def setup(self):
    bound = 1.0 / self.n_embed
    self.embedding = nn.Embed(
      self.n_embed,
      self.embed_dim,
      param_dtype=jnp.float32,
      embedding_init=lambda k, s, d=jnp.float32: jax.random.uniform(k, s, d, -bound, bound),
    )

  def __call__(self, z):
    """z: (..., embed_dim). Returns (z_q straight-through, loss, indices (...,))."""
    z = z.astype(jnp.float32)
    codebook = self.embedding.embedding
    d = codebook_distances(z.reshape(-1, self.embed_dim), codebook)
    indices = jnp.argmin(d, axis=-1).reshape(z.shape[:-1])  # first minimum on ties
    z_q = codebook[indices]
    loss = vq_loss(z, z_q, self.beta, self.legacy)
    z_q = z + jax.lax.stop_gradient(z_q - z)
    return z_q, loss, indices

  def lookup(self, indices):
    """Codebook entries (..., embed_dim) for integer indices (...)."""
    return self.embedding.embedding[indices]


# --------------------------------------------------------------------------------------------
# Gumbel quantizer (taming `GumbelQuantize`, the quantizer of `GumbelVQ`)
# --------------------------------------------------------------------------------------------


def gumbel_softmax(logits, gumbels, tau, hard: bool = True):
  """`torch.nn.functional.gumbel_softmax(logits, tau, hard, dim=-1)` with the noise given.

  y_soft = softmax((logits + gumbels) / tau); index = argmax(y_soft) (first maximum);
  hard: the straight-through one-hot `one_hot(index) - sg(y_soft) + y_soft` (forward value the
  one-hot, gradient that of y_soft). Returns (weights over the codebook, index).
  """
  y_soft = jax.nn.softmax((logits + gumbels) / tau, axis=-1)
  index = jnp.argmax(y_soft, axis=-1)
  if not hard:
    return y_soft, index
  y_hard = jax.nn.one_hot(index, logits.shape[-1], dtype=y_soft.dtype)
  return y_hard - jax.lax.stop_gradient(y_soft) + y_soft, index


def gumbel_kl_loss(logits, kl_weight: float):
  """taming's KL-to-uniform term: kl_weight * mean_positions sum_k q_k log(q_k K + 1e-10)."""
  n_embed = logits.shape[-1]
  qy = jax.nn.softmax(logits, axis=-1)
  return kl_weight * jnp.mean(jnp.sum(qy * jnp.log(qy * n_embed + 1e-10), axis=-1))


class _Proj(nn.Module):
  """The original's 1x1 `proj` Conv2d (with bias, torch init) as a float32 matmul on NHWC.

  HIGHEST precision: the argmax of these logits is the code, so accelerators must not round
  the inputs to TF32/bf16 here.
  """

  features: int

  @nn.compact
  def __call__(self, z):
    fan_in = z.shape[-1]
    bound = 1.0 / jnp.sqrt(fan_in)
    kernel = self.param('kernel', layers.torch_kernel_init, (fan_in, self.features))
    bias = self.param(
      'bias', lambda k, s: jax.random.uniform(k, s, jnp.float32, -bound, bound), (self.features,)
    )
    return jnp.matmul(z.astype(jnp.float32), kernel, precision=jax.lax.Precision.HIGHEST) + bias


class GumbelQuantizer(nn.Module):
  """taming's `GumbelQuantize` (straight_through=True, no remap), as `GumbelVQ` builds it.

  torch `quantize.proj.weight` (K, C, 1, 1) / `.bias` = `proj/kernel` (C, K) / `proj/bias`;
  `quantize.embed.weight` (K, D) = `embed/embedding`.

  logits = proj(z) (K = n_embed per position). The loss is the KL-to-uniform term
  (`gumbel_kl_loss`), computed in both modes as the original does.
  - train=True: Gumbel-softmax with `temperature` and the straight-through hard one-hot,
    z_q = weights @ embed, indices = argmax of the noisy softmax: the original's training
    forward. The noise comes from the 'gumbel' rng (or `gumbels`, for tests).
  - train=False (inference): indices = argmax(logits), z_q = embed[indices]. **No Gumbel
    noise**: the original adds noise even in eval mode (its encoding samples a code from
    softmax(logits)); we drop it deliberately so encoding is deterministic. Codes therefore
    equal the original's only where its noise did not change the argmax.
  """

  n_embed: int
  embed_dim: int
  kl_weight: float = 1e-8
  temperature: float = 1.0

  def setup(self):
    self.proj = _Proj(self.n_embed)
    # torch nn.Embedding's default init, N(0, 1).
    self.embed = nn.Embed(
      self.n_embed,
      self.embed_dim,
      param_dtype=jnp.float32,
      embedding_init=jax.nn.initializers.normal(1.0),
    )

  def logits(self, z):
    return self.proj(z)

  def __call__(self, z, train: bool = False, gumbels=None, temperature=None):
    """z: (..., C). Returns (z_q (..., embed_dim) float32, loss, indices (...,))."""
    logits = self.proj(z)
    loss = gumbel_kl_loss(logits, self.kl_weight)
    codebook = self.embed.embedding
    if train:
      if gumbels is None:
        gumbels = jax.random.gumbel(self.make_rng('gumbel'), logits.shape, jnp.float32)
      tau = self.temperature if temperature is None else temperature
      weights, indices = gumbel_softmax(logits, gumbels, tau, hard=True)
      z_q = jnp.matmul(weights, codebook, precision=jax.lax.Precision.HIGHEST)
    else:
      indices = jnp.argmax(logits, axis=-1)  # first maximum on ties, as torch
      z_q = codebook[indices]
    return z_q, loss, indices

  def lookup(self, indices):
    """Codebook entries (..., embed_dim) for integer indices (...)."""
    return self.embed.embedding[indices]
