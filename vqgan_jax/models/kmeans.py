"""The pixel first stage (f = 1): k-means over pixel values, as Image GPT's colour palette
and the original's f = 1 baseline (512 RGB centres there).

A quantizer plug-in (`quantizer.QUANTIZERS['kmeans']`) that reads pixels: the VQGAN built
with it has no encoder, decoder or 1x1 convs, so encode is the nearest centre of each pixel
and decode the centre's value. Its "training" is the fit: k-means++ seeding on one batch of
pixels (`kmeans_init`), then mini-batch k-means (Sculley 2010: each centre moves to the
running mean of the pixels assigned to it, `kmeans_step`), both jitted and deterministic per
key and batches.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp


def sq_distances(x, centers):
  """Squared distances (N, K) float32 of points x (N, D) to centers (K, D), as differences
  (exact for the few channels of a pixel)."""
  d = x.astype(jnp.float32)[:, None, :] - centers.astype(jnp.float32)[None, :, :]
  return jnp.sum(d * d, axis=-1)


def nearest(x, centers):
  """(indices (N,) of the nearest centre, first on ties; their squared distances (N,))."""
  d = sq_distances(x, centers)
  idx = jnp.argmin(d, axis=-1)
  return idx, jnp.take_along_axis(d, idx[:, None], axis=-1)[:, 0]


def kmeans_init(x, k: int, key):
  """k-means++ seeding: k centres (k, D) drawn from the points x (N, D), each with
  probability proportional to its squared distance to the centres drawn before it (so an
  exact duplicate of a drawn point, e.g. the background value, is never drawn again while
  another value is left; when none is, the draw is uniform)."""
  x = x.astype(jnp.float32)
  keys = jax.random.split(key, k)
  first = x[jax.random.randint(keys[0], (), 0, x.shape[0])]
  centers = jnp.zeros((k, x.shape[1]), jnp.float32).at[0].set(first)
  d2 = jnp.sum((x - first) ** 2, axis=-1)

  def body(i, carry):
    centers, d2 = carry
    logits = jnp.where(jnp.sum(d2) > 0, jnp.log(jnp.maximum(d2, 0.0)), 0.0)
    c = x[jax.random.categorical(keys[i], logits)]
    return centers.at[i].set(c), jnp.minimum(d2, jnp.sum((x - c) ** 2, axis=-1))

  centers, _ = jax.lax.fori_loop(1, k, body, (centers, d2))
  return centers


def kmeans_step(centers, counts, x):
  """One mini-batch k-means step: the points x (N, D) go to their nearest centres, and each
  centre moves to the running mean of every point assigned to it so far (per-centre rate
  1 / count; `counts` (K,) float32, the points assigned before). Returns (centers, counts,
  metrics: `inertia`, the batch's mean squared distance to its centre before the step, and
  `codebook_usage`, the share of centres that got a point)."""
  x = x.astype(jnp.float32)
  idx, d2 = nearest(x, centers)
  onehot = jax.nn.one_hot(idx, centers.shape[0], dtype=jnp.float32)
  batch_counts = jnp.sum(onehot, axis=0)
  batch_sums = jnp.matmul(onehot.T, x, precision=jax.lax.Precision.HIGHEST)
  counts = counts + batch_counts
  rate = jnp.where(batch_counts > 0, 1.0 / jnp.maximum(counts, 1.0), 0.0)
  centers = centers + rate[:, None] * (batch_sums - batch_counts[:, None] * centers)
  metrics = {
    'inertia': jnp.mean(d2),
    'codebook_usage': jnp.mean((batch_counts > 0).astype(jnp.float32)),
  }
  return centers, counts, metrics


class KMeansQuantizer(nn.Module):
  """Nearest-centre quantizer of pixels: z (..., D) in [-1, 1] (D = the image channels) ->
  (the centre's value, straight-through; loss 0; indices). Params: `centers` (n_embed, D),
  set by the fit (`kmeans_init` / `kmeans_step`), not by gradients."""

  n_embed: int
  embed_dim: int

  def setup(self):
    self.centers = self.param(
      'centers',
      lambda k, s: jax.random.uniform(k, s, jnp.float32, -1.0, 1.0),
      (self.n_embed, self.embed_dim),
    )

  def latents(self, z):
    return z.astype(jnp.float32)

  def __call__(self, z):
    z = z.astype(jnp.float32)
    centers = self.centers
    idx, _ = nearest(z.reshape(-1, self.embed_dim), centers)
    indices = idx.reshape(z.shape[:-1])
    z_q = centers[indices]
    return z + jax.lax.stop_gradient(z_q - z), jnp.zeros((), jnp.float32), indices

  def lookup(self, indices):
    return self.centers[indices]


def fit_init(m, x, key):
  """The fit's start (the `QuantizerSpec.fit_init` hook): ({'centers'} params, {'counts'})."""
  centers = kmeans_init(x, m.n_embed, key)
  return {'centers': centers}, {'counts': jnp.zeros((m.n_embed,), jnp.float32)}


def fit_step(m, params, stats, x):
  """One fit step (the `QuantizerSpec.fit_step` hook): (params, stats, metrics)."""
  centers, counts, metrics = kmeans_step(params['centers'], stats['counts'], x)
  return {'centers': centers}, {'counts': counts}, metrics


def checks(m):
  """config.model's problems for quantizer='kmeans' (`QuantizerSpec.validate`)."""
  if len(m.ch_mult) != 1:
    yield (
      f'config.model.ch_mult={tuple(m.ch_mult)}: quantizer=kmeans reads pixels (f = 1), '
      'so ch_mult must have one entry, e.g. (1,)'
    )
  if m.embed_dim != m.in_channels:
    yield (
      f'config.model.embed_dim={m.embed_dim} must equal config.model.in_channels='
      f'{m.in_channels} (quantizer=kmeans: a centre is a pixel value)'
    )
