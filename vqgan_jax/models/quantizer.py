"""The taming VectorQuantizer2 (legacy beta placement, straight-through estimator)."""

import flax.linen as nn
import jax
import jax.numpy as jnp


def codebook_distances(z, codebook):
  """Squared distances in the original's expanded form ||z||^2 + ||e||^2 - 2 z.e, float32.

  The expanded form (not (z - e)^2) keeps the argmin identical to the original's under
  near-ties; HIGHEST precision keeps accelerators from using TF32 here.
  """
  z = z.astype(jnp.float32)
  codebook = codebook.astype(jnp.float32)
  return (jnp.sum(z ** 2, axis=-1, keepdims=True) + jnp.sum(codebook ** 2, axis=-1)
          - 2.0 * jnp.matmul(z, codebook.T, precision=jax.lax.Precision.HIGHEST))


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
        self.n_embed, self.embed_dim, param_dtype=jnp.float32,
        embedding_init=lambda k, s, d=jnp.float32: jax.random.uniform(k, s, d, -bound, bound))

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
