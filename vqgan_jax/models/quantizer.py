"""The quantizers between the encoder and the decoder.

The original's: VectorQuantizer2 (legacy beta placement, straight-through estimator) and
GumbelQuantize (the released Gumbel f8 model's). Beyond the original (off by default, see
`../shared/reference/tokenizers.md`): the VQ codebook's options (a low-dimensional codebook,
l2-normalised lookup, EMA statistics, dead-code restart), FSQ and LFQ.

Every quantizer is called on the quant_conv output z (..., embed_dim) and returns
(z_q straight-through, loss, indices (...,)), and has `lookup(indices)` (the vectors the
decoder reads) and `latents(z)` (z in the space where codes are picked, for the train step's
codebook updates), so encode, stage 2, sampling and the planner never ask which it is.

`QUANTIZERS` (at the end) is the registry the VQGAN, the config checks and the train step
read: a new quantizer is its module here plus one `QuantizerSpec` entry.
"""

import dataclasses
import math
from typing import Any
from typing import Callable
from typing import Iterator
from typing import Mapping
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqgan_jax import losses
from vqgan_jax.models import kmeans
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


def l2_normalize(x, eps: float = 1e-12):
  """x / max(||x||, eps) along the last axis (torch's F.normalize), float32."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class _Dense(nn.Module):
  """A float32 Dense at HIGHEST precision: the nearest-code search reads its output, so
  accelerators must not round it to TF32/bf16."""

  features: int

  @nn.compact
  def __call__(self, z):
    kernel = self.param(
      'kernel', nn.initializers.lecun_normal(), (z.shape[-1], self.features), jnp.float32
    )
    bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
    return jnp.matmul(z.astype(jnp.float32), kernel, precision=jax.lax.Precision.HIGHEST) + bias


class VectorQuantizer(nn.Module):
  """Nearest-codebook quantizer. torch `quantize.embedding.weight` = `embedding/embedding`.

  With the defaults it is the original's VectorQuantizer2, operation for operation. Options:
  - codebook_dim > 0: codes are searched in that many dimensions: `proj_in` (embed_dim ->
    codebook_dim) before the search, `proj_out` back after it (ViT-VQGAN, LlamaGen).
  - l2_norm: the latents and the codebook are l2-normalised before the search and the losses
    (nearest by cosine); the decoder reads the normalised code.
  - ema: the codebook is the EMA of the latents assigned to each code (`ema_update` /
    `ema_codebook`, applied by the train step, which writes the result into `params`). Its
    statistics live in the non-parameter collection 'quantizer' (`ema_count`, `ema_sum`,
    created by `init` only: inference reads `params` alone), and the codebook term of the
    loss carries no gradient (the commitment term still does).
  """

  n_embed: int
  embed_dim: int
  beta: float = 0.25
  legacy: bool = True
  codebook_dim: int = 0
  l2_norm: bool = False
  ema: bool = False

  @property
  def search_dim(self):
    return self.codebook_dim or self.embed_dim

  def setup(self):
    bound = 1.0 / self.n_embed
    self.embedding = nn.Embed(
      self.n_embed,
      self.search_dim,
      param_dtype=jnp.float32,
      embedding_init=lambda k, s, d=jnp.float32: jax.random.uniform(k, s, d, -bound, bound),
    )
    if self.codebook_dim:
      self.proj_in = _Dense(self.codebook_dim)
      self.proj_out = _Dense(self.embed_dim)
    if self.ema and self.is_initializing():
      stats = ema_init({'embedding': {'embedding': self.embedding.embedding}})
      self.variable('quantizer', 'ema_count', lambda: stats['ema_count'])
      self.variable('quantizer', 'ema_sum', lambda: stats['ema_sum'])

  def latents(self, z):
    """z (..., embed_dim) in the codebook's space (projected, normalised), float32."""
    z = z.astype(jnp.float32)
    if self.codebook_dim:
      z = self.proj_in(z)
    return l2_normalize(z) if self.l2_norm else z

  def codebook(self):
    """The (n_embed, search_dim) vectors codes are searched among and decoded from."""
    codebook = self.embedding.embedding
    return l2_normalize(codebook) if self.l2_norm else codebook

  def __call__(self, z):
    """z: (..., embed_dim). Returns (z_q straight-through, loss, indices (...,))."""
    z = self.latents(z)
    codebook = self.codebook()
    d = codebook_distances(z.reshape(-1, self.search_dim), codebook)
    indices = jnp.argmin(d, axis=-1).reshape(z.shape[:-1])  # first minimum on ties
    z_q = codebook[indices]
    loss = vq_loss(z, jax.lax.stop_gradient(z_q) if self.ema else z_q, self.beta, self.legacy)
    z_q = z + jax.lax.stop_gradient(z_q - z)
    return (self.proj_out(z_q) if self.codebook_dim else z_q), loss, indices

  def lookup(self, indices):
    """Codebook entries (..., embed_dim) for integer indices (...)."""
    e = self.codebook()[indices]
    return self.proj_out(e) if self.codebook_dim else e


# Laplace smoothing of the EMA codebook's counts (taming's EMAVQ and VQ-VAE-2 use 1e-5).
EMA_EPS = 1e-5


def ema_init(params):
  """The EMA statistics of a VectorQuantizer with `params` (its 'quantizer' collection):
  pseudo-count 1 at the codebook, so ema_sum / ema_count starts as the codebook, and a code
  nobody picks decays in both and stays where it is."""
  codebook = params['embedding']['embedding']
  return {
    'ema_count': jnp.ones(codebook.shape[:1], jnp.float32),
    'ema_sum': jnp.asarray(codebook, jnp.float32),
  }


def ema_update(count, ema_sum, z, indices, decay):
  """One EMA step of the codebook statistics (VQ-VAE-2): each code's count of assigned
  latents and their sum move by (1 - decay) towards this batch's.

  count (K,), ema_sum (K, D); z (N, D) float32 latents, indices (N,). In a sharded jit the
  batch sums are global (XLA adds the partial sums), so every device holds the same result.
  """
  onehot = jax.nn.one_hot(indices, count.shape[0], dtype=jnp.float32)  # (N, K)
  batch_count = jnp.sum(onehot, axis=0)
  batch_sum = jnp.matmul(onehot.T, z.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
  return (
    decay * count + (1.0 - decay) * batch_count,
    decay * ema_sum + (1.0 - decay) * batch_sum,
  )


def ema_codebook(count, ema_sum, eps):
  """The codebook the EMA statistics describe: ema_sum / count, the counts Laplace-smoothed
  ((c + eps) / (n + K eps) * n, n the total) so that no code divides by ~0."""
  n = jnp.sum(count)
  smoothed = (count + eps) / (n + count.shape[0] * eps) * n
  return ema_sum / smoothed[:, None]


def mark_used(last_used, indices, step, mask=None):
  """`last_used` (K,) int32, the step each code was last picked at (0: never), with this
  step's `indices` (any shape; `mask` False entries not counted) set to `step` (1-based)."""
  used = jnp.bincount(
    jnp.ravel(indices),
    weights=None if mask is None else jnp.ravel(mask).astype(jnp.int32),
    length=last_used.shape[0],
  )
  return jnp.where(used > 0, jnp.asarray(step, last_used.dtype), last_used)


def window_usage(last_used, step, window: int):
  """Fraction of the codes picked at least once in the last `window` steps up to `step`."""
  return jnp.mean(((last_used > 0) & (last_used > step - window)).astype(jnp.float32))


def dead_codes(last_used, step, window: int):
  """Codes not picked in the last `window` steps (never picked counts from step 0)."""
  return step - last_used >= window


def restart_codes(codebook, dead, z, key):
  """Dead codes (bool (K,)) re-seeded from the batch's latents z (N, D), one drawn uniformly
  per code with `key` (jittable; the same key draws the same vectors on any mesh); live codes
  are untouched. Returns (codebook, the drawn vectors (K, D))."""
  pick = jax.random.randint(key, dead.shape, 0, z.shape[0])
  drawn = z.astype(jnp.float32)[pick]
  return jnp.where(dead[:, None], drawn, codebook), drawn


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

  def latents(self, z):
    return z.astype(jnp.float32)

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


# --------------------------------------------------------------------------------------------
# FSQ (Mentzer et al. 2023) and LFQ (MAGVIT-v2): no codebook to collapse
# --------------------------------------------------------------------------------------------


def fsq_bound(z, levels, eps: float = 1e-3):
  """Each channel squashed into (-(L-1)/2, (L-1)/2) (shifted by 1/2 for even L) so that
  rounding gives exactly L values. The shift is atanh(offset / half_l), which maps z = 0 to
  0 (the official notebook writes tan, nearly equal for these small arguments)."""
  levels = jnp.asarray(levels, jnp.float32)
  half_l = (levels - 1.0) * (1.0 - eps) / 2.0
  offset = jnp.where(levels % 2 == 0, 0.5, 0.0)
  shift = jnp.arctanh(offset / half_l)
  return jnp.tanh(z + shift) * half_l - offset


def _fsq_basis(levels):
  return jnp.asarray([math.prod(levels[:i]) for i in range(len(levels))], jnp.int32)


def fsq_codes_to_indices(codes, levels):
  """Codes (..., d) on FSQ's grid -> indices (...,) int32: the mixed-radix number whose
  digits are the per-channel levels, basis cumprod([1] + L[:-1])."""
  half = jnp.asarray([l // 2 for l in levels], jnp.float32)
  digits = jnp.round(codes * half + half).astype(jnp.int32)
  return jnp.sum(digits * _fsq_basis(levels), axis=-1)


def fsq_indices_to_codes(indices, levels):
  """Indices (...,) -> the codes (..., d) float32 that `fsq_codes_to_indices` maps to them."""
  half = jnp.asarray([l // 2 for l in levels], jnp.float32)
  digits = (indices[..., None] // _fsq_basis(levels)) % jnp.asarray(levels, jnp.int32)
  return (digits.astype(jnp.float32) - half) / half


class FSQuantizer(nn.Module):
  """Finite scalar quantization: channel i of z (embed_dim == len(levels)) is bounded, rounded
  to one of levels[i] values (straight-through) and scaled into [-1, 1]. prod(levels) codes,
  no parameters, no loss, every code reachable by construction."""

  levels: Sequence[int]

  def latents(self, z):
    return z.astype(jnp.float32)

  def __call__(self, z):
    levels = tuple(self.levels)
    bounded = fsq_bound(z.astype(jnp.float32), levels)
    rounded = bounded + jax.lax.stop_gradient(jnp.round(bounded) - bounded)
    codes = rounded / jnp.asarray([l // 2 for l in levels], jnp.float32)
    indices = fsq_codes_to_indices(jax.lax.stop_gradient(codes), levels)
    return codes, jnp.zeros((), jnp.float32), indices

  def lookup(self, indices):
    return fsq_indices_to_codes(indices, tuple(self.levels))


def lfq_indices(bits):
  """Sign bits (..., k) (True: +1) -> indices (...,) int32, the first channel the most
  significant bit."""
  k = bits.shape[-1]
  return jnp.sum(bits.astype(jnp.int32) << jnp.arange(k - 1, -1, -1, dtype=jnp.int32), axis=-1)


def lfq_codes(indices, k: int):
  """Indices (...,) -> the codes (..., k) in {-1, +1}, float32."""
  bits = (indices[..., None] >> jnp.arange(k - 1, -1, -1, dtype=jnp.int32)) & 1
  return 2.0 * bits.astype(jnp.float32) - 1.0


# Up to this many bits the batch-mean code distribution is computed over all 2**bits codes;
# above it, per bit (an upper bound of its entropy), since N x 2**bits would not fit.
LFQ_EXACT_BITS = 12


def _bernoulli_entropy(logit):
  p = jax.nn.sigmoid(logit)
  return -(p * jax.nn.log_sigmoid(logit) + (1.0 - p) * jax.nn.log_sigmoid(-logit))


def lfq_entropy_loss(z, temperature: float):
  """MAGVIT-v2's entropy term: mean per-latent entropy - entropy of the batch-mean
  distribution, of q(c | z) = softmax_c(2 z.c / T) over the codes c in {-1, +1}^k (the
  -distance logits of Open-MAGVIT2). q factorises over bits, p(bit_i = +1) = sigmoid(4 z_i
  / T), so the per-latent entropy is a sum of k Bernoulli entropies, exactly; the batch mean
  is taken over all codes up to LFQ_EXACT_BITS bits. Low per-latent entropy makes codes
  confident; high batch entropy spreads them over the whole vocabulary."""
  k = z.shape[-1]
  z = z.reshape(-1, k).astype(jnp.float32)
  per_latent = jnp.mean(jnp.sum(_bernoulli_entropy(4.0 * z / temperature), axis=-1))
  if k <= LFQ_EXACT_BITS:
    codes = lfq_codes(jnp.arange(2**k, dtype=jnp.int32), k)  # (2**k, k)
    logits = 2.0 * jnp.matmul(z, codes.T, precision=jax.lax.Precision.HIGHEST) / temperature
    avg = jnp.mean(jax.nn.softmax(logits, axis=-1), axis=0)
    batch = -jnp.sum(jnp.where(avg > 0, avg * jnp.log(jnp.where(avg > 0, avg, 1.0)), 0.0))
  else:
    p = jnp.mean(jax.nn.sigmoid(4.0 * z / temperature), axis=0)
    p = jnp.clip(p, 1e-7, 1.0 - 1e-7)
    batch = -jnp.sum(p * jnp.log(p) + (1.0 - p) * jnp.log(1.0 - p))
  return per_latent - batch


class LookupFreeQuantizer(nn.Module):
  """Lookup-free quantization: the code is the sign of each of the `bits` channels of z
  (embed_dim == bits), 2**bits codes, z_q in {-1, +1}^bits straight-through. Loss: beta x
  commitment, plus `entropy_weight` x `lfq_entropy_loss` when the train step passes a
  weight (it anneals it; inference passes none and skips the term)."""

  bits: int
  beta: float = 0.25

  def latents(self, z):
    return z.astype(jnp.float32)

  def __call__(self, z, entropy_weight=None, entropy_temperature: float = 0.01):
    z = z.astype(jnp.float32)
    positive = z > 0
    q = jnp.where(positive, 1.0, -1.0)
    loss = self.beta * jnp.mean((z - jax.lax.stop_gradient(q)) ** 2)
    if entropy_weight is not None:
      loss = loss + entropy_weight * lfq_entropy_loss(z, entropy_temperature)
    return z + jax.lax.stop_gradient(q - z), loss, lfq_indices(positive)

  def lookup(self, indices):
    return lfq_codes(indices, self.bits)


# --------------------------------------------------------------------------------------------
# The registry: each quantizer as a plug-in
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class QuantizerSpec:
  """What the VQGAN, the config checks and the stage-1 train step know of one quantizer. `m`:
  the stage-1 model fields with attribute access (config.model, or the VQGAN module itself).

  build(m): its flax module (the VQGAN names it `quantize`: the checkpoints' param layout).
  num_codes(m): its vocabulary; model.n_embed must equal it (stage 2 sizes its vocabulary by
    n_embed).
  validate(m): its fields' problems (config.model only), one sentence each naming
    config.model.<field>, lazily: the first is reported, and a check may assume the ones
    before it passed.
  options: model fields only it reads, with the value that means off: a config of another
    quantizer must leave them off.
  shape_fields: model fields (beyond quantizer, n_embed, embed_dim) that decide its params'
    shapes: a run starting from another's params (`init_from`) needs them equal.
  code_fields: further model fields that change which code a latent gets: stage 2 needs
    them equal to its stage-1 checkpoint's.
  train_forward: its __call__ takes `train` (a training forward that differs from inference).
  train_state(m): the train state holds its 'quantizer' collection (statistics the train
    step updates; config.model only); init_state(params): that collection from the
    module's params, for a state not made by the module's init (a converted or init_from
    run).
  train_update(m, params, stats, latents, indices, last_used, t, key): its update after the
    optimizer's step, on its own params and `stats` (its collection, None when the state
    holds none), given the step's latents (None unless the step asked for them) and codes,
    the usage record `last_used` (None when off), the 1-based update number and a key.
    Returns (params, stats, last_used, metrics). None: none.
  train_terms(loss, step): (keywords of its __call__, metrics) of the train step, from
    config.loss and the step (an annealed loss term); None: none.
  pixels: it reads and writes pixels: the VQGAN has no encoder, decoder or 1x1 convs (f = 1;
    its validate requires ch_mult of one entry and embed_dim == in_channels).
  fit_init(m, x, key) -> (params, stats) and fit_step(m, params, stats, x) -> (params, stats,
    metrics): a quantizer fitted on its latents x (N, embed_dim) (the pixels, for `pixels`)
    instead of trained by the GAN loop; the stage-1 trainer then runs only these. None: none.
  """

  build: Callable[[Any], nn.Module]
  num_codes: Callable[[Any], int]
  validate: Callable[[Any], Iterator[str]] = lambda m: iter(())
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  shape_fields: tuple[str, ...] = ()
  code_fields: tuple[str, ...] = ()
  train_forward: bool = False
  train_state: Callable[[Any], bool] = lambda m: False
  init_state: Callable[[Any], dict] | None = None
  train_update: Callable[..., tuple] | None = None
  train_terms: Callable[[Any, Any], tuple[dict, dict]] | None = None
  pixels: bool = False
  fit_init: Callable[..., tuple] | None = None
  fit_step: Callable[..., tuple] | None = None


def _vq_checks(m):
  if m.codebook_dim < 0:
    yield f'config.model.codebook_dim must be >= 0, got {m.codebook_dim}'
  if not 0.0 <= m.ema_decay < 1.0:
    yield f'config.model.ema_decay must be in [0, 1), got {m.ema_decay}'
  if m.restart_window < 0:
    yield f'config.model.restart_window must be >= 0, got {m.restart_window}'


def _vq_train_update(m, params, stats, latents, indices, last_used, t, key):
  """The VQ codebook after the optimizer's step: the EMA of the latents assigned to each code
  (stats held: model.ema_decay > 0), then dead-code restart (model.restart_window > 0)."""
  restart = m.restart_window > 0 and last_used is not None
  if stats is None and not restart:
    return params, stats, last_used, {}
  codebook = params['embedding']['embedding']
  flat = None if latents is None else latents.reshape(-1, latents.shape[-1])
  metrics = {}
  if stats is not None:
    count, ema_sum = ema_update(
      stats['ema_count'], stats['ema_sum'], flat, indices.reshape(-1), m.ema_decay
    )
    codebook = ema_codebook(count, ema_sum, EMA_EPS)
  if restart:
    dead = dead_codes(last_used, t, m.restart_window)
    codebook, drawn = restart_codes(codebook, dead, flat, key)
    last_used = jnp.where(dead, t, last_used)  # a fresh window for a re-seeded code
    if stats is not None:  # count 1 at the drawn latent, as at init
      count = jnp.where(dead, 1.0, count)
      ema_sum = jnp.where(dead[:, None], drawn, ema_sum)
    metrics['codes_restarted'] = jnp.sum(dead.astype(jnp.int32))
  if stats is not None:
    stats = {'ema_count': count, 'ema_sum': ema_sum}
  return dict(params, embedding={'embedding': codebook}), stats, last_used, metrics


def _gumbel_checks(m):
  if not m.temperature > 0:
    yield f'config.model.temperature must be > 0, got {m.temperature}'
  if not m.kl_weight >= 0:
    yield f'config.model.kl_weight must be >= 0, got {m.kl_weight}'


def _fsq_levels(m):
  return tuple(m.fsq_levels or ())


def _fsq_checks(m):
  levels = _fsq_levels(m)
  if not (len(levels) >= 1 and all(int(l) == l and l >= 2 for l in levels)):
    yield f'config.model.fsq_levels must be a tuple of integers >= 2, got {levels!r}'
  if m.embed_dim != len(levels):
    yield (
      f'config.model.embed_dim={m.embed_dim} must equal len(config.model.fsq_levels)='
      f'{len(levels)} (one channel per level)'
    )
  if m.n_embed != math.prod(levels):
    yield (
      f'config.model.n_embed={m.n_embed} must equal prod(fsq_levels)={math.prod(levels)} '
      '(the vocabulary stage 2 reads)'
    )


def _lfq_checks(m):
  bits = m.lfq_bits
  if not 1 <= bits <= 30:
    yield f'config.model.lfq_bits must be in [1, 30], got {bits}'
  if m.embed_dim != bits:
    yield (
      f'config.model.embed_dim={m.embed_dim} must equal config.model.lfq_bits={bits} '
      '(one channel per bit)'
    )
  if m.n_embed != 2**bits:
    yield (
      f'config.model.n_embed={m.n_embed} must equal 2**lfq_bits={2**bits} '
      '(the vocabulary stage 2 reads)'
    )


def _lfq_train_terms(loss, step):
  """LFQ's entropy term, its weight annealed over the steps (also logged)."""
  weight = losses.annealed_weight(
    step, loss.entropy_weight, loss.entropy_anneal_steps, loss.entropy_anneal_factor
  )
  terms = {'entropy_weight': weight, 'entropy_temperature': loss.entropy_temperature}
  return terms, {'entropy_weight': weight}


QUANTIZERS = {
  'vq': QuantizerSpec(
    build=lambda m: VectorQuantizer(
      m.n_embed,
      m.embed_dim,
      m.beta,
      m.legacy_beta,
      codebook_dim=m.codebook_dim,
      l2_norm=m.codebook_l2_norm,
      ema=m.ema_decay > 0,
    ),
    num_codes=lambda m: m.n_embed,
    validate=_vq_checks,
    # The original's quantizer when off; the train step's EMA codebook and restart read them.
    options={'codebook_dim': 0, 'codebook_l2_norm': False, 'ema_decay': 0.0, 'restart_window': 0},
    shape_fields=('codebook_dim',),
    code_fields=('codebook_l2_norm',),
    train_state=lambda m: m.ema_decay > 0,
    init_state=ema_init,
    train_update=_vq_train_update,
  ),
  'gumbel': QuantizerSpec(
    build=lambda m: GumbelQuantizer(m.n_embed, m.embed_dim, m.kl_weight, m.temperature),
    num_codes=lambda m: m.n_embed,
    validate=_gumbel_checks,
    train_forward=True,
  ),
  'fsq': QuantizerSpec(
    build=lambda m: FSQuantizer(_fsq_levels(m)),
    num_codes=lambda m: math.prod(_fsq_levels(m)),
    validate=_fsq_checks,
    shape_fields=('fsq_levels',),
  ),
  'lfq': QuantizerSpec(
    build=lambda m: LookupFreeQuantizer(m.lfq_bits, m.beta),
    num_codes=lambda m: 2**m.lfq_bits,
    validate=_lfq_checks,
    shape_fields=('lfq_bits',),
    train_terms=_lfq_train_terms,
  ),
  # f = 1: k-means over pixel values (Image GPT's palette), fitted instead of trained.
  'kmeans': QuantizerSpec(
    build=lambda m: kmeans.KMeansQuantizer(m.n_embed, m.embed_dim),
    num_codes=lambda m: m.n_embed,
    validate=kmeans.checks,
    pixels=True,
    fit_init=kmeans.fit_init,
    fit_step=kmeans.fit_step,
  ),
}


def shape_fields() -> tuple[str, ...]:
  """The model fields that decide a quantizer's params and codes, of every quantizer."""
  return ('quantizer', 'n_embed', 'embed_dim') + tuple(
    f for spec in QUANTIZERS.values() for f in spec.shape_fields
  )


def code_fields() -> tuple[str, ...]:
  """The model fields that decide which code a latent gets, of every quantizer."""
  return ('quantizer',) + tuple(
    f for spec in QUANTIZERS.values() for f in spec.shape_fields + spec.code_fields
  )
