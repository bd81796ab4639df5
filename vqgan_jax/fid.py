"""FID, Inception Score and reference statistics: what `--mode=eval` calls.

A feature extractor is anything with `name`, `feature_dim` and `__call__(images) ->
{'features': (B, feature_dim), 'logits': (B, classes), ...}` on NHWC images in [-1, 1]: the
FID Inception below (`load_inception`), or a classifier trained on the data (whose Fréchet
distance must not be called FID). `StatsAccumulator`, `save_stats` / `load_stats` and
`fid_from_stats` only see feature arrays, so they serve every extractor alike.

Statistics files are pytorch-fid's `.npz` (`mu`, `sigma`), plus our optional `count` and
`extractor`, so pytorch-fid's `--save-stats` output and published statistics load here and
ours load there.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any
from typing import Optional
import zipfile

import jax
import numpy as np

from vqgan_jax import metrics
from vqgan_jax import parallel
from vqgan_jax.convert import ConversionError
from vqgan_jax.models import inception as inception_model
from vqgan_jax.models import inception_load
from vqgan_jax.validate import ConfigError

WEIGHTS_ENV = 'VQGAN_JAX_INCEPTION'
MISSING_WEIGHTS = (
  "FID and Inception Score are skipped: no Inception weights were given; supply pytorch-fid's "
  f'{inception_load.WEIGHTS_FILE} (or the .npz `python -m vqgan_jax.convert inception` '
  f'makes of it) via --config.eval.inception_weights=PATH or ${WEIGHTS_ENV}.'
)
INCEPTION_NAME = 'pt_inception-2015-12-05'


def _weights_source(configured: Optional[str]) -> tuple[Optional[str], str]:
  """(path or None, the setting it came from, for messages)."""
  if configured:
    return os.path.expanduser(configured), 'config.eval.inception_weights'
  path = os.environ.get(WEIGHTS_ENV)
  source = f'config.eval.inception_weights (from ${WEIGHTS_ENV})'
  return (os.path.expanduser(path) if path else None), source


def weights_path(configured: Optional[str]) -> Optional[str]:
  """The Inception weights to use: `configured` (config.eval.inception_weights), else
  $VQGAN_JAX_INCEPTION, else None (FID skipped; say `MISSING_WEIGHTS`). A named file that
  does not exist is a ConfigError, so a typo is not mistaken for "no weights"."""
  path, source = _weights_source(configured)
  if path and not os.path.isfile(path):
    raise ConfigError(
      f"{source}: no file {path!r}; it should be pytorch-fid's "
      f'{inception_load.WEIGHTS_FILE} or a .npz converted from it'
    )
  return path


def load_weights(configured: Optional[str]) -> Optional[dict]:
  """The Inception variables of `weights_path(configured)`, read and checked whole (every
  key and shape); None when no weights are given. Any unusable file (not a .npz or .pth, a
  text or truncated file, other arrays, a .pth without torch) is one ConfigError naming the
  setting and the file, so eval can call this before it computes anything."""
  path = weights_path(configured)
  if path is None:
    return None
  _, source = _weights_source(configured)
  try:
    return inception_load.load(path)
  except ConversionError as e:
    raise ConfigError(f'{source}: {e}') from None
  except ImportError as e:  # a .pth without torch
    raise ConfigError(
      f'{source}: {e}; or convert it once where torch is installed '
      f'(python -m vqgan_jax.convert inception --pth {path} --out FILE.npz) and pass the .npz'
    ) from None
  except OSError as e:  # unreadable (permissions, I/O)
    raise ConfigError(f'{source}: cannot read {path!r} ({e.strerror or e})') from None


@dataclasses.dataclass(eq=False)
class Extractor:
  """The FID Inception as a feature extractor, jitted (once per input shape) and
  data-parallel over `mesh` (default: one local device): the batch split over the mesh's
  batch axes, the weights replicated.

  `__call__(images)`: (B, H, W, 1 or 3) in [-1, 1], numpy or a (global, sharded) jax array;
  B must divide by `parallel.batch_divisor(mesh)` (pad and mask the last batch).
  Returns float32 jax arrays {'features': (B, 2048) pool3, 'logits': (B, 1008) fc with its
  bias, 'logits_unbiased': (B, 1008) the Inception Score logits, see `inception_score`}.
  """

  variables: Any
  mesh: Optional[jax.sharding.Mesh] = None
  name: str = INCEPTION_NAME
  feature_dim: int = inception_model.FEATURE_DIM
  num_classes: int = inception_model.NUM_CLASSES

  def __post_init__(self):
    if self.mesh is None:  # one local device: the same code path as a real mesh
      self.mesh = parallel.make_mesh({'data': 1, 'fsdp': 1}, jax.local_devices()[:1])
    self._batch = parallel.batch_sharding(self.mesh)
    rep = parallel.replicated(self.mesh)
    self.variables = jax.device_put(self.variables, rep)
    self._fn = jax.jit(
      inception_model.inception_apply, in_shardings=(rep, self._batch), out_shardings=self._batch
    )

  def __call__(self, images) -> dict[str, jax.Array]:
    n = parallel.batch_divisor(self.mesh)
    if images.shape[0] % n:
      raise ValueError(
        f"Inception batch of {images.shape[0]} does not split over the mesh's {n} batch "
        'shards; pad it to a multiple and mask the padding in StatsAccumulator.add'
      )
    return self._fn(self.variables, jax.device_put(images, self._batch))


def load_inception(path: str, mesh: Optional[jax.sharding.Mesh] = None) -> Extractor:
  """The FID Inception from pytorch-fid's `.pth` (needs torch) or its converted `.npz`."""
  return Extractor(inception_load.load(path), mesh=mesh)


def _host(x) -> np.ndarray:
  """A (possibly multi-process, sharded) array as a global host numpy array."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(x)


class StatsAccumulator:
  """Running mean and covariance of features, in float64 on the host.

  Keeps sum(x - c) and sum((x - c)(x - c)^T) with c the first batch's mean (shifting by a
  rough mean keeps the covariance from cancelling), so 50k images of any batch size take
  O(dim^2) memory. `mu_sigma` equals `np.mean(x, 0)`, `np.cov(x, rowvar=False)` (unbiased,
  as pytorch-fid computes them) of all rows added.
  """

  def __init__(self, dim: int):
    self.dim = int(dim)
    self.count = 0
    self._shift = None
    self._sum = np.zeros((self.dim,), np.float64)
    self._outer = np.zeros((self.dim, self.dim), np.float64)

  def add(self, features, mask=None) -> None:
    """Adds the rows of `features` (B, dim) where `mask` (B,) is true (all rows if None)."""
    x = _host(features).astype(np.float64)
    if x.ndim != 2 or x.shape[1] != self.dim:
      raise ValueError(f'features of shape {x.shape}, expected (B, {self.dim})')
    if mask is not None:
      x = x[_host(mask).astype(bool).reshape(-1)]
    if not len(x):
      return
    if self._shift is None:
      self._shift = x.mean(axis=0)
    x = x - self._shift
    self._sum += x.sum(axis=0)
    self._outer += x.T @ x
    self.count += len(x)

  def mu_sigma(self) -> tuple[np.ndarray, np.ndarray]:
    """(mu (dim,), sigma (dim, dim)) in float64; sigma with the n - 1 denominator."""
    if self.count < 2:
      raise ValueError(f'a covariance needs at least 2 feature rows, got {self.count}')
    n = self.count
    mean = self._sum / n
    sigma = (self._outer - n * np.outer(mean, mean)) / (n - 1)
    return self._shift + mean, 0.5 * (sigma + sigma.T)


def save_stats(path: str, mu, sigma, count: int, extractor_name: str) -> None:
  """pytorch-fid's statistics `.npz` (`mu`, `sigma`) plus `count` and `extractor`, written
  atomically (call it on one process)."""
  mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
  if mu.ndim != 1 or sigma.shape != (mu.shape[0],) * 2:
    raise ValueError(f'mu {mu.shape} and sigma {sigma.shape} are no (d,), (d, d) pair')
  inception_load.write_npz_atomic(
    path, {'mu': mu, 'sigma': sigma, 'count': np.int64(count), 'extractor': np.str_(extractor_name)}
  )


def load_stats(path: str) -> dict:
  """{'mu', 'sigma', 'count', 'extractor'} of a statistics `.npz`; `count` and `extractor` are
  None in files that lack them (pytorch-fid's own). FileNotFoundError when there is no file
  (compute the statistics then); ValueError for a file that holds no statistics."""
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: f[k] for k in f.files}
  except FileNotFoundError:
    raise
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise ValueError(f'{path} is no readable statistics .npz ({type(e).__name__}: {e})') from None
  if 'mu' not in arrays or 'sigma' not in arrays:
    raise ValueError(f'{path} holds {sorted(arrays)}, not the statistics `mu` and `sigma`')
  mu, sigma = np.asarray(arrays['mu'], np.float64), np.asarray(arrays['sigma'], np.float64)
  if mu.ndim != 1 or sigma.shape != (mu.shape[0],) * 2:
    raise ValueError(f'{path}: mu {mu.shape} and sigma {sigma.shape} do not pair')
  return {
    'mu': mu,
    'sigma': sigma,
    'count': int(arrays['count']) if 'count' in arrays else None,
    'extractor': str(arrays['extractor']) if 'extractor' in arrays else None,
  }


def fid_from_stats(a: dict, b: dict) -> float:
  """Fréchet distance of two statistics dicts (`load_stats` or {'mu', 'sigma'}); the same
  number as pytorch-fid's `calculate_frechet_distance`. Statistics of two different named
  extractors are refused: their distance would mean nothing."""
  ea, eb = a.get('extractor'), b.get('extractor')
  if ea and eb and ea != eb:
    raise ValueError(f'statistics from different feature extractors: {ea!r} vs {eb!r}')
  return metrics.frechet_distance(a['mu'], a['sigma'], b['mu'], b['sigma'])


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
  """Inception Score (Salimans et al. 2016): (mean, std) over `splits` contiguous splits.

  exp(E_x KL(p(y|x) || p(y))) per split, p(y|x) the softmax over all of `logits`' classes,
  p(y) its split mean; splits cut at i * N // splits and the std has no Bessel correction,
  as in the original TF code. Comparable numbers need the logits that code used: the FID
  Inception's 1008 outputs (0 = background, 1-1000 the ImageNet classes in TF's synset
  order, 1001-1007 unused), computed as pool3 @ fc.weight.T WITHOUT the fc bias (the TF
  graph's `softmax/logits/MatMul`, torch-fidelity's default 'logits_unbiased'), i.e. the
  Extractor's `logits_unbiased`. Shuffle the samples first if their order is not random.
  """
  x = _host(logits).astype(np.float64)
  n = x.shape[0]
  if n < splits:
    raise ValueError(f'{n} samples cannot make {splits} splits')
  logp = x - x.max(axis=1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
  scores = []
  for i in range(splits):
    part = logp[i * n // splits : (i + 1) * n // splits]
    log_py = np.log(np.exp(part).mean(axis=0))
    kl = np.sum(np.exp(part) * (part - log_py), axis=1).mean()
    scores.append(np.exp(kl))
  return float(np.mean(scores)), float(np.std(scores))
