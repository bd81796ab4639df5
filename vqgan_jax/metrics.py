"""Image-quality and codebook metrics.

Convention: images are float NHWC in [-1, 1] (the model's range). PSNR and
SSIM map them to [0, 1] and use data range 1, so values equal the usual
8-bit-style numbers; clip reconstructions to [-1, 1] first if they may
overshoot. All jnp functions are batched, per image, and jit-able.
`frechet_distance` is host-side numpy (float64), for FID-style statistics.

`STAGE1` is the one list of the stage-1 eval's metrics (training's periodic eval and
`--mode=eval` both compute and name them from it); `format_metrics` is the one way an eval's
figures are printed.
"""

import dataclasses
from typing import Callable
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def _to_unit(x: Array) -> Array:
  return (jnp.asarray(x, jnp.float32) + 1.0) * 0.5


def psnr(x: Array, y: Array) -> Array:
  """Per-image PSNR in dB, shape (B,); inf for identical images.

  Computed on the [0, 1] scale (data range 1) of the [-1, 1] inputs.
  """
  d = _to_unit(x) - _to_unit(y)
  mse = jnp.mean(d * d, axis=tuple(range(1, d.ndim)))
  return -10.0 * jnp.log10(mse)


def _gaussian_taps(sigma: float, radius: int) -> np.ndarray:
  # Same taps as scipy.ndimage.gaussian_filter1d (what skimage uses).
  t = np.arange(-radius, radius + 1, dtype=np.float64)
  w = np.exp(-0.5 * (t / sigma) ** 2)
  return (w / w.sum()).astype(np.float32)


def ssim(x: Array, y: Array, *, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> Array:
  """Per-image SSIM (Wang et al. 2004), shape (B,).

  Gaussian window 11x11 (sigma 1.5, truncated at 3.5 sigma), population
  covariances, data range 1 on the [0, 1] scale, mean over the valid interior
  (windows fully inside the image) and over channels. Matches
  `skimage.metrics.structural_similarity(a, b, gaussian_weights=True,
  sigma=1.5, use_sample_covariance=False, data_range=1, channel_axis=-1)`
  on the [0, 1] images: skimage filters with reflect padding but then crops
  the window radius, so only valid windows count there as well.

  Args:
    x, y: NHWC images in [-1, 1], H and W at least 11.
  """
  if x.shape != y.shape or x.ndim != 4:
    raise ValueError(f'ssim wants two equal NHWC shapes, got {x.shape}, {y.shape}')
  radius = int(3.5 * sigma + 0.5)
  win = 2 * radius + 1
  if min(x.shape[1:3]) < win:
    raise ValueError(f'ssim needs H, W >= {win}, got {x.shape[1:3]}')
  x, y = _to_unit(x), _to_unit(y)
  # The five local moments in one depthwise, separable (H then W) filter.
  maps = jnp.concatenate([x, y, x * x, y * y, x * y], axis=-1)
  taps = jnp.asarray(_gaussian_taps(sigma, radius))
  n = maps.shape[-1]
  dn = ('NHWC', 'HWIO', 'NHWC')
  hp = jax.lax.Precision.HIGHEST  # no TF32/bf16 passes on accelerators
  kh = jnp.tile(taps.reshape(win, 1, 1, 1), (1, 1, 1, n))
  kw = jnp.tile(taps.reshape(1, win, 1, 1), (1, 1, 1, n))
  m = jax.lax.conv_general_dilated(
    maps, kh, (1, 1), 'VALID', dimension_numbers=dn, feature_group_count=n, precision=hp
  )
  m = jax.lax.conv_general_dilated(
    m, kw, (1, 1), 'VALID', dimension_numbers=dn, feature_group_count=n, precision=hp
  )
  ux, uy, uxx, uyy, uxy = jnp.split(m, 5, axis=-1)
  vx = uxx - ux * ux
  vy = uyy - uy * uy
  vxy = uxy - ux * uy
  c1, c2 = k1**2, k2**2
  s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
  return jnp.mean(s, axis=(1, 2, 3))


def codebook_counts(indices: Array, n_embed: int, mask: Optional[Array] = None) -> Array:
  """Histogram of code indices, shape (n_embed,) int32; sums across batches.

  Args:
    indices: integer code indices of any shape, values in [0, n_embed).
    n_embed: codebook size (static).
    mask: optional bool array shaped like `indices`; False entries (e.g. batch
      padding) are not counted.
  """
  idx = jnp.ravel(indices)
  w = None if mask is None else jnp.ravel(mask).astype(jnp.int32)
  return jnp.bincount(idx, weights=w, length=n_embed).astype(jnp.int32)


def usage_from_counts(counts: Array) -> Array:
  """Fraction of codes used at least once: (#counts > 0) / n_embed."""
  counts = jnp.asarray(counts)
  return jnp.mean((counts > 0).astype(jnp.float32))


def perplexity_from_counts(counts: Array) -> Array:
  """exp(-sum p log p) of the code distribution p = counts / sum(counts).

  Ranges from 1 (one code) to n_embed (uniform use); 1 for empty counts.
  """
  counts = jnp.asarray(counts, jnp.float32)
  p = counts / jnp.maximum(jnp.sum(counts), 1.0)
  plogp = jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)
  return jnp.exp(-jnp.sum(plogp))


def codebook_stats(indices: Array, n_embed: int, mask: Optional[Array] = None) -> dict[str, Array]:
  """Code usage of one batch: {'counts', 'usage', 'perplexity'}.

  For a whole eval split, sum the per-batch 'counts' and apply
  `usage_from_counts` / `perplexity_from_counts` to the total (the batch
  values do not average into the split values).
  """
  counts = codebook_counts(indices, n_embed, mask)
  return {
    'counts': counts,
    'usage': usage_from_counts(counts),
    'perplexity': perplexity_from_counts(counts),
  }


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
  w, v = np.linalg.eigh(a)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (float64).

  d = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), with
  tr((S1 S2)^(1/2)) = tr((S1^(1/2) S2 S1^(1/2))^(1/2)): the inner matrix is
  symmetric PSD, so two `eigh` calls replace scipy's sqrtm and its complex
  round-off. Tiny negative eigenvalues from round-off are clipped to 0.
  """
  mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
  mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
  s1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  s2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0],) * 2:
    raise ValueError(f'shape mismatch: mu {mu1.shape}, {mu2.shape}; sigma {s1.shape}, {s2.shape}')
  # Symmetrize against round-off in accumulated covariances.
  s1 = 0.5 * (s1 + s1.T)
  s2 = 0.5 * (s2 + s2.T)
  r1 = _sqrt_psd(s1)
  inner = r1 @ s2 @ r1
  eig = np.linalg.eigvalsh(0.5 * (inner + inner.T))
  tr_covmean = np.sum(np.sqrt(np.clip(eig, 0.0, None)))
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


@dataclasses.dataclass(frozen=True)
class Metric:
  """One reported figure: its key (in metrics.jsonl and eval_<step>.json), whether lower is
  better, how it prints, and, for a per-image mean, how the eval step computes it:
  `per_image(x, xrec, lpips)` -> (B,) with `lpips(x, xrec)` the frozen LPIPS."""

  name: str
  lower_is_better: Optional[bool]  # None: a count, not a quality
  fmt: str = '.4f'
  per_image: Optional[Callable] = None


# The stage-1 eval's figures, in the order they are reported. The per-image ones are summed
# over the real images by the eval step and divided by their count; the code histogram gives
# usage and perplexity; each feature net adds a Frechet distance (`feature_metric`).
STAGE1 = (
  Metric('psnr', False, per_image=lambda x, y, lpips: psnr(x, y)),
  Metric('ssim', False, per_image=lambda x, y, lpips: ssim(x, y)),
  Metric('lpips', True, per_image=lambda x, y, lpips: lpips(x, y)),
  Metric('l1', True, per_image=lambda x, y, lpips: jnp.mean(jnp.abs(x - y), axis=(1, 2, 3))),
  Metric('codebook_usage', False),
  Metric('perplexity', False),
  Metric('num_images', None, 'd'),
  Metric('skipped_files', None, 'd'),  # `--mode=eval` of a folder: files that did not decode
)
PER_IMAGE = tuple(m for m in STAGE1 if m.per_image is not None)
_BY_NAME = {m.name: m for m in STAGE1}


def feature_metric(net_metric: str, stage: int) -> Metric:
  """The Frechet distance a feature net's statistics give: the FID Inception's ('fid') is
  rFID in stage 1 (reconstructions against their inputs), gFID in stage 2 (samples against
  a split); a classifier's ('fd_<name>') keeps its name, never called FID."""
  if net_metric == 'fid':
    return Metric('rfid' if stage == 1 else 'gfid', True)
  return Metric(net_metric, True)


def format_metrics(result: dict) -> str:
  """`name=value, ...` of an eval's result, each as its metric prints (counts as integers,
  the rest to four decimals)."""
  out = []
  for k, v in result.items():
    fmt = _BY_NAME[k].fmt if k in _BY_NAME else ('d' if isinstance(v, int) else '.4f')
    out.append(f'{k}={int(v) if fmt == "d" else v:{fmt}}')
  return ', '.join(out)
