"""Metrics against hand computations and scikit-image."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from skimage import data as skdata
from skimage import filters
from skimage import metrics as skm
from skimage import transform

from vqgan_jax import metrics


def _real_images(size=96):
  out = []
  for name in ('astronaut', 'coffee', 'chelsea'):
    img = getattr(skdata, name)()
    h, w = img.shape[:2]
    s = min(h, w)
    img = img[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
    out.append(transform.resize(img, (size, size), anti_aliasing=True))
  return np.stack(out)  # [0, 1] float64


@pytest.fixture(scope='module')
def distorted():
  """Real images and three distortions of them, both on the [0, 1] scale."""
  x = _real_images()
  rng = np.random.default_rng(0)
  noisy = np.clip(x + 0.05 * rng.standard_normal(x.shape), 0, 1)
  blurred = np.stack([filters.gaussian(im, sigma=1.2, channel_axis=-1) for im in x])
  dark = np.clip(0.8 * x + 0.05, 0, 1)
  return np.concatenate([x] * 3), np.concatenate([noisy, blurred, dark])


def _m11(x):
  return jnp.asarray(x * 2 - 1, jnp.float32)


def test_psnr_hand_and_skimage(distorted):
  x = np.zeros((1, 4, 4, 3), np.float32) - 1.0  # 0 on the [0, 1] scale
  y = x.copy()
  y[0, 0, 0, 0] = 1.0  # one element off by the full range: mse = 1/48
  np.testing.assert_allclose(metrics.psnr(x, y), [10 * np.log10(48)], rtol=1e-6)
  assert np.isinf(metrics.psnr(x, x)[0])
  a, b = distorted
  got = np.asarray(jax.jit(metrics.psnr)(_m11(a), _m11(b)))
  want = [skm.peak_signal_noise_ratio(p, q, data_range=1) for p, q in zip(a, b)]
  np.testing.assert_allclose(got, want, atol=1e-4)


def test_ssim_matches_skimage(distorted):
  a, b = distorted
  got = np.asarray(jax.jit(metrics.ssim)(_m11(a), _m11(b)))
  want = np.array(
    [
      skm.structural_similarity(
        p,
        q,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=1,
        channel_axis=-1,
      )
      for p, q in zip(a, b)
    ]
  )
  assert got.shape == (len(a),)
  assert np.all(want < 0.99)  # the distortions are not trivial
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
  same = np.asarray(metrics.ssim(_m11(a[:3]), _m11(a[:3])))
  np.testing.assert_allclose(same, 1.0, atol=1e-6)


def test_ssim_rejects_small_images():
  x = jnp.zeros((1, 10, 32, 3))
  with pytest.raises(ValueError, match='11'):
    metrics.ssim(x, x)


def test_codebook_stats_hand_example():
  idx = jnp.array([[0, 0, 1], [1, 2, 2]])  # codes 0,1,2 twice each; 3 unused
  s = jax.jit(metrics.codebook_stats, static_argnums=1)(idx, 4)
  np.testing.assert_array_equal(s['counts'], [2, 2, 2, 0])
  np.testing.assert_allclose(s['usage'], 0.75)
  np.testing.assert_allclose(s['perplexity'], 3.0, rtol=1e-6)
  # Masked entries are not counted.
  mask = jnp.array([[True, True, True], [False, False, False]])
  s = metrics.codebook_stats(idx, 4, mask)
  np.testing.assert_array_equal(s['counts'], [2, 1, 0, 0])
  p = np.array([2, 1]) / 3
  np.testing.assert_allclose(s['perplexity'], np.exp(-(p * np.log(p)).sum()), rtol=1e-6)
  # Accumulating counts over batches gives split-level numbers.
  total = metrics.codebook_counts(jnp.array([0, 0]), 4) + metrics.codebook_counts(jnp.array([3]), 4)
  np.testing.assert_array_equal(total, [2, 0, 0, 1])
  np.testing.assert_allclose(metrics.usage_from_counts(total), 0.5)
  p = np.array([2, 1]) / 3
  np.testing.assert_allclose(
    metrics.perplexity_from_counts(total), np.exp(-(p * np.log(p)).sum()), rtol=1e-6
  )
  np.testing.assert_allclose(metrics.perplexity_from_counts(jnp.array([0, 5])), 1.0)
  np.testing.assert_allclose(metrics.perplexity_from_counts(jnp.zeros(3)), 1.0)


def test_frechet_distance():
  rng = np.random.default_rng(0)
  a = rng.standard_normal((50, 8))
  mu, sigma = a.mean(0), np.cov(a, rowvar=False)
  assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-9
  # Diagonal covariances: sum (m1-m2)^2 + sum (sqrt(s1) - sqrt(s2))^2.
  m1, m2 = rng.standard_normal(6), rng.standard_normal(6)
  v1, v2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
  want = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
  got = metrics.frechet_distance(m1, np.diag(v1), m2, np.diag(v2))
  np.testing.assert_allclose(got, want, rtol=1e-10)
  # Invariant under a common rotation.
  q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
  got_rot = metrics.frechet_distance(q @ m1, q @ np.diag(v1) @ q.T, q @ m2, q @ np.diag(v2) @ q.T)
  np.testing.assert_allclose(got_rot, want, rtol=1e-9)
  # Non-commuting covariances: tr sqrt(S1 S2) = sum sqrt(eig(S1 S2)).
  b = rng.standard_normal((40, 8)) @ rng.standard_normal((8, 8))
  mu2, sigma2 = b.mean(0), np.cov(b, rowvar=False)
  tr = np.sum(np.sqrt(np.linalg.eigvals(sigma @ sigma2).real))
  want = np.sum((mu - mu2) ** 2) + np.trace(sigma) + np.trace(sigma2) - 2 * tr
  np.testing.assert_allclose(metrics.frechet_distance(mu, sigma, mu2, sigma2), want, rtol=1e-9)
  with pytest.raises(ValueError):
    metrics.frechet_distance(m1, np.diag(v1), m2[:3], np.diag(v2))


def test_one_metric_list_names_and_prints_the_evals_figures():
  # Counts print as integers whatever their type (a trainer's row holds floats), the rest to
  # four decimals; a feature net's distance is rFID / gFID by stage, a classifier's keeps its
  # name.
  line = metrics.format_metrics({'psnr': 20.46607, 'num_images': 24.0, 'fd_x': 0.8, 'n': 3})
  assert line == 'psnr=20.4661, num_images=24, fd_x=0.8000, n=3'
  assert metrics.feature_metric('fid', stage=1).name == 'rfid'
  assert metrics.feature_metric('fid', stage=2).name == 'gfid'
  assert metrics.feature_metric('fd_fmnist', stage=1).lower_is_better
  assert [m.name for m in metrics.PER_IMAGE] == ['psnr', 'ssim', 'lpips', 'l1']
  better = {m.name: m.lower_is_better for m in metrics.STAGE1}
  assert better['lpips'] and better['l1'] and not better['psnr'] and not better['ssim']
