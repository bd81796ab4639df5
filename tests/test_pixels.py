"""The pixel first stage (f = 1, k-means: issue 27) and stage 2 on crops of the code grid.

Unit checks of the k-means fit and the code crops on tiny arrays, then one end-to-end test:
the smoke configs fit the k-means, encode, train a GPT on 8x8 windows of the 16x16 code grid
and sample whole 16x16 grids with the sliding window, each through `python -m vqgan_jax.main`.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import fashion_mnist_pixels
from configs import fashion_mnist_pixels_transformer
from vqgan_jax import run_config
from vqgan_jax import validate
from vqgan_jax.data import tokens
from vqgan_jax.models import gpt_load
from vqgan_jax.models import kmeans
from vqgan_jax.models import vqgan as vqgan_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CENTRES = np.array([[-0.8, -0.8, -0.8], [0.0, 0.1, 0.0], [0.7, 0.7, 0.9]], np.float32)


def _points(key, n=3000):
  """n points around CENTRES (std 0.02), in cluster order."""
  noise = 0.02 * jax.random.normal(key, (n, 3))
  return jnp.asarray(np.repeat(CENTRES, n // 3, axis=0)) + noise


@jax.jit
def _fit(x, key):
  """k-means++ seeding on x, then 10 mini-batch steps over shuffled batches of 300."""
  centers = kmeans.kmeans_init(x[:300], 3, key)
  counts = jnp.zeros((3,), jnp.float32)
  order = jax.random.permutation(jax.random.fold_in(key, 1), x.shape[0]).reshape(10, 300)

  def step(carry, rows):
    centers, counts, _ = kmeans.kmeans_step(*carry, x[rows])
    return (centers, counts), None

  centers, counts = jax.lax.scan(step, (centers, counts), order[:-1])[0]
  return kmeans.kmeans_step(centers, counts, x[order[-1]])[::2]


def test_kmeans_is_deterministic_and_recovers_separated_centres():
  x = _points(jax.random.key(0))
  x = x[jax.random.permutation(jax.random.key(1), x.shape[0])]
  a, metrics = _fit(x, jax.random.key(2))
  b, _ = _fit(x, jax.random.key(2))
  np.testing.assert_array_equal(a, b)  # the same seed, the same fit
  for seed in (2, 3, 4):
    centers, _ = _fit(x, jax.random.key(seed))
    got = np.asarray(centers)[np.argsort(np.asarray(centers)[:, 0])]
    np.testing.assert_allclose(got, CENTRES, atol=0.01)
  assert float(metrics['inertia']) < 3 * 0.02**2 * 1.5  # the noise's variance, 3 channels
  assert float(metrics['codebook_usage']) == 1.0


def test_pixel_vqgan_encodes_the_nearest_centre_and_decodes_its_value():
  """The VQGAN with quantizer='kmeans' has no encoder/decoder: its params are the centres,
  codes the nearest centre of each pixel, decoding the centre's value."""
  c = fashion_mnist_pixels.get_config('smoke,k=3')
  validate.validate_stage1(c)
  vqgan = vqgan_lib.from_config(c.model, frozen=True)
  assert vqgan.downsample_factor == 1
  params = {'quantize': {'centers': jnp.asarray(CENTRES)}}
  idx = np.array([[[0, 1, 2, 1], [2, 2, 0, 1]]])  # (1, 2, 4)
  image = CENTRES[idx] + 0.05 * np.sign(np.random.default_rng(0).normal(size=idx.shape + (3,)))
  apply = lambda method, x: vqgan.apply({'params': params}, x, method=method)
  np.testing.assert_array_equal(apply('encode_to_indices', jnp.asarray(image)), idx)
  np.testing.assert_array_equal(apply('decode_indices', jnp.asarray(idx)), CENTRES[idx])
  variables = jax.eval_shape(vqgan.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  assert jax.tree.map(lambda v: v.shape, variables['params']) == {'quantize': {'centers': (3, 3)}}
  c.model.ch_mult = (1, 2)
  with pytest.raises(validate.ConfigError, match=r'config.model.ch_mult=\(1, 2\).*f = 1'):
    validate.validate_stage1(c)


class _Codes:
  """Records of 6x5 code grids: record r's codes are 1000 r + arange(30) (a crop tells where
  it was taken), label r."""

  grid = (6, 5)

  def __len__(self):
    return 12

  def __repr__(self):  # grain checks a restored state against the source's repr
    return '_Codes()'

  def __getitem__(self, r):
    codes = 1000 * r + np.arange(30, dtype=np.int32)
    return {'codes': codes, 'label': np.int32(r), 'index': np.int64(r)}


def _crops(it, n):
  return [next(it) for _ in range(n)]


def test_code_crops_are_random_windows_deterministic_per_seed_and_resume_exactly():
  crop = (_Codes.grid, 3)
  make = lambda seed: tokens.make_train_iterator(
    None, 'train', 4, seed, process_index=0, process_count=1, source=_Codes(), crop=crop
  )
  batches = _crops(make(7), 6)  # two epochs of 12 records
  offsets = set()
  for b in batches:
    assert b['codes'].shape == (4, 9)
    for codes, r in zip(b['codes'], b['label']):
      top, left = divmod(int(codes[0]) - 1000 * int(r), 5)
      full = (1000 * r + np.arange(30)).reshape(_Codes.grid)
      np.testing.assert_array_equal(codes, full[top : top + 3, left : left + 3].reshape(-1))
      offsets.add((top, left))
  assert len(offsets) > 4  # random windows, not one place
  for x, y in zip(batches, _crops(make(7), 6)):  # the same seed, the same crops
    np.testing.assert_array_equal(x['codes'], y['codes'])
  assert any((x['codes'] != y['codes']).any() for x, y in zip(batches, _crops(make(8), 6)))
  it = make(7)
  _crops(it, 2)
  state = it.get_state()
  resumed = make(7)
  resumed.set_state(state)
  for x, y in zip(batches[2:], _crops(resumed, 4)):
    np.testing.assert_array_equal(x['codes'], y['codes'])
  # Eval: the centred window of every record, padding included.
  ev = tokens.make_eval_iterator(
    None, 'test', 8, process_index=0, process_count=1, source=_Codes(), crop=crop
  )
  first = next(ev)
  np.testing.assert_array_equal(first['codes'][0], [6, 7, 8, 11, 12, 13, 16, 17, 18])


def test_crop_codes_layout_and_old_configs():
  """data.crop_codes makes the GPT's grid the window while encode writes the whole grid; a
  saved stage-2 config from before the field reads as crop_codes=0; a bad value is one
  error naming the field."""
  c = fashion_mnist_pixels_transformer.get_config('smoke')
  layout = gpt_load.make_layout(c)
  assert (layout.grid, layout.code_grid, layout.sample_grid) == ((8, 8), (16, 16), (16, 16))
  assert layout.crop == ((16, 16), 8) and layout.block_size == 1 + 64 - 1
  saved = run_config.config_to_dict(c)
  del saved['data']['crop_codes']
  upgraded = ml_collections.ConfigDict(run_config.upgrade_config(saved))
  assert upgraded.data.crop_codes == 0
  assert gpt_load.make_layout(upgraded).crop is None
  c.data.crop_codes = 17
  with pytest.raises(validate.ConfigError, match=r'config.data.crop_codes=17 .*\[1, 16\]'):
    gpt_load.make_layout(c)


def _main(cwd, config, workdir, *flags):
  """`python -m vqgan_jax.main` run in `cwd` (the stage-2 smoke's default stage1_workdir is
  relative), importing this checkout."""
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  env['PYTHONPATH'] = os.pathsep.join([REPO] + [p for p in [env.get('PYTHONPATH')] if p])
  cmd = [sys.executable, '-m', 'vqgan_jax.main', f'--config={config}', f'--workdir={workdir}']
  proc = subprocess.run(
    cmd + list(flags), cwd=cwd, env=env, capture_output=True, text=True, timeout=600
  )
  assert proc.returncode == 0, f'{cmd + list(flags)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}'
  return proc.stdout


def test_pixels_smoke_end_to_end(tmp_path):
  """configs/fashion_mnist_pixels.py:smoke fits (stage 1), --mode=encode writes 16x16 grids,
  a GPT trains on 8x8 windows of them, --mode=sample draws whole 16x16 grids."""
  stage1 = tmp_path / 'workdirs' / 'fashion_mnist_pixels_smoke'  # the stage-2 smoke's default
  out = _main(tmp_path, os.path.join(REPO, 'configs/fashion_mnist_pixels.py:smoke'), stage1)
  assert 'final eval: psnr=' in out
  rows = [json.loads(line) for line in open(stage1 / 'metrics.jsonl')]
  assert [r['step'] for r in rows if r['split'] == 'eval'] == [4]
  config = os.path.join(REPO, 'configs/fashion_mnist_pixels_transformer.py:smoke')
  gpt = tmp_path / 'gpt'
  assert 'encoded: ' in _main(tmp_path, config, gpt, '--mode=encode')
  meta = json.loads((gpt / 'codes/vqgan_codes/fashion_mnist_16/1.0.0/metadata.json').read_text())
  assert (meta['grid_h'], meta['grid_w'], meta['n_embed']) == (16, 16, 16)
  _main(tmp_path, config, gpt)
  evals = [json.loads(line) for line in open(gpt / 'metrics.jsonl')]
  evals = [r for r in evals if r['split'] == 'eval']
  assert evals and evals[-1]['num_tokens'] == 64 * evals[-1]['num_examples']  # 8x8 windows
  out = _main(tmp_path, config, gpt, '--mode=sample')
  assert 'sampled 2 x 16x16 tokens' in out
  step = max(int(p.name) for p in (gpt / 'checkpoints').iterdir() if p.name.isdigit())
  samples = np.load(gpt / f'samples_{step:07d}.npz')
  assert samples['tokens'].shape == (2, 16, 16) and samples['tokens'].max() < 16
