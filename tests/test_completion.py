"""Completion and inpainting (`completion.py`, `TrainedTransformer.complete`): kept codes never
change (GPT and MaskGIT, several masks, with guidance), the GPT's prefill of the kept prefix
equals feeding it one code at a time, a mask that is not a raster prefix is refused for the
GPT, a key always gives the same codes, and 8 fake devices give what one gives.

No training and no checkpoint: tiny class-conditional models (4 classes, class dropout) with
random params over a random smoke VQGAN's 4x4 code grids of 8x8 images.
"""

import functools
import os
import subprocess
import sys

import bounds
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import pytest

from configs import fashion_mnist_maskgit
from configs import fashion_mnist_transformer
from vqgan_jax import checkpoints
from vqgan_jax import completion
from vqgan_jax import config_base
from vqgan_jax import inference
from vqgan_jax import maskgit_sampling
from vqgan_jax import parallel
from vqgan_jax import run_config
from vqgan_jax import sample as sample_lib
from vqgan_jax import sampling
from vqgan_jax.models import gpt_load
from vqgan_jax.models import vqgan as vqgan_lib
from vqgan_jax.validate import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 8  # image side: a 4x4 code grid under the smoke VQGAN's factor 2
GRID = (4, 4)
N = 4  # images per batch


def _mesh(n):
  return parallel.make_mesh({'data': n, 'fsdp': 1, 'tensor': 1}, jax.devices()[:n])


def _random(shapes, seed, scale):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: (scale * rng.standard_normal(a.shape)).astype(a.dtype), shapes)


@functools.cache
def _host_models():
  """(vqgan config, vqgan model and host params, {kind: (config, layout, model, params)})."""
  vq_config = config_base.smoke_stage1()
  vq = vqgan_lib.from_config(vq_config.model, frozen=True)
  shapes = jax.eval_shape(
    lambda r: nn.unbox(vq.init(r, jnp.zeros((1, SIZE, SIZE, 3))))['params'], jax.random.key(0)
  )
  vq_params = _random(shapes, 0, 0.05)
  gens = {}
  for kind, module in (('gpt', fashion_mnist_transformer), ('maskgit', fashion_mnist_maskgit)):
    c = module.get_config('smoke')
    c.stage1_config.update(vq_config.model.to_dict())
    c.data.image_size = SIZE
    c.cond.update(n_classes=4, drop_prob=0.1)
    c.transformer.update(scan_layers=False, n_embd=32)
    c.train.dtype = 'float32'
    layout = gpt_load.make_layout(c)
    model = gpt_load.build_model(c, layout, scan_layers=False)
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
    gens[kind] = (c, layout, model, _random(shapes['params'], 1, 0.3))
  return vq_config, vq, vq_params, gens


def _run(kind, devices):
  vq_config, vq, vq_params, gens = _host_models()
  mesh = _mesh(devices)
  rep = lambda tree: jax.device_put(tree, parallel.replicated(mesh))
  trained_vq = inference.TrainedVQGAN(
    vq, rep(vq_params), ml_collections.ConfigDict({'model': vq_config.model}), 0, mesh
  )
  c, layout, model, params = gens[kind]
  return inference.TrainedTransformer(model, rep(params), trained_vq, layout, c, 0, mesh)


@pytest.fixture(scope='module')
def gpt():
  return _run('gpt', 1)


@pytest.fixture(scope='module')
def maskgit():
  return _run('maskgit', 1)


def _codes(run, seed=0):
  return np.random.default_rng(seed).integers(0, run.layout.n_image, (N, *GRID), dtype=np.int32)


def _cond(run):
  return run.condition_for_class(np.arange(N) % 4)


def test_keep_masks():
  want = {
    'top_half': [[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]],
    'left_half': [[1, 1, 0, 0]] * 4,
    'center_box': [[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]],
    'outside_center_box': [[1, 1, 1, 1], [1, 0, 0, 1], [1, 0, 0, 1], [1, 1, 1, 1]],
  }
  for name, mask in want.items():
    np.testing.assert_array_equal(completion.keep_mask(name, GRID), np.asarray(mask, bool))
  assert completion.keep_mask('center_box', (8, 8))[2:6, 2:6].all()
  assert completion.keep_mask('center_box', (8, 8)).sum() == 16
  assert completion.prefix_length(completion.top_half((5, 3))) == 6
  with pytest.raises(ValueError, match=r"keep must be one of \['center_box'"):
    completion.keep_mask('bottom_half', GRID)


def test_cli_names_an_unknown_keep_before_reading_the_run(tmp_path):
  c = fashion_mnist_transformer.get_config('smoke')
  c.sample.update(complete_folder='test', keep='bottom_half')
  with pytest.raises(ConfigError, match=r"^config.sample.keep must be one of \['center_box'"):
    sample_lib.complete(c, str(tmp_path / 'no_run_here'))


@pytest.mark.parametrize('mask', ['left_half', 'center_box', 'outside_center_box'])
def test_gpt_refuses_a_mask_that_is_not_a_raster_prefix(gpt, mask):
  with pytest.raises(ValueError, match=r'^keep must be a raster prefix for a GPT [^.]*MaskGIT'):
    gpt.complete(_codes(gpt), completion.keep_mask(mask, GRID), jax.random.key(0))
  with pytest.raises(ValueError, match="keep must be a boolean array of the code grid's shape"):
    gpt.complete(_codes(gpt), np.ones((2, 8), bool), jax.random.key(0))


def test_gpt_kept_codes_never_change(gpt):
  """Raster prefixes of 8 (top half, guided), 5 and 0 codes and the whole grid: the prefix
  comes back unchanged, the rest are image codes, drawn anew; a key always gives the same."""
  x, key = _codes(gpt), jax.random.key(3)
  keep = completion.top_half(GRID)
  codes, images = gpt.complete(x, keep, key, condition=_cond(gpt), cfg_scale=2.0)
  assert codes.shape == (N, *GRID) and images.shape == (N, SIZE, SIZE, 3)
  np.testing.assert_array_equal(codes[:, keep], x[:, keep])
  assert codes.max() < gpt.layout.n_image and not np.array_equal(codes[:, ~keep], x[:, ~keep])
  again = gpt.complete(x, keep, key, condition=_cond(gpt), cfg_scale=2.0)[0]
  np.testing.assert_array_equal(again, codes)
  other = gpt.complete(x, keep, jax.random.key(4), condition=_cond(gpt), cfg_scale=2.0)[0]
  assert not np.array_equal(other, codes)
  five = np.arange(16).reshape(GRID) < 5
  np.testing.assert_array_equal(gpt.complete(x, five, key)[0][:, five], x[:, five])
  assert gpt.complete(x, np.zeros(GRID, bool), key)[0].shape == (N, *GRID)
  np.testing.assert_array_equal(gpt.complete(x, np.ones(GRID, bool), key)[0], x)


def test_gpt_prefill_equals_one_code_at_a_time(gpt):
  """The condition and the kept prefix in one forward give the logits and K/V cache that
  feeding them one code at a time gives, and greedy completion equals a greedy loop that
  feeds every code one at a time."""
  x, p = _codes(gpt), 8
  cond = np.asarray(_cond(gpt))
  model, variables = sampling.decoding_variables(gpt.model, gpt.params)
  seq = jnp.asarray(np.concatenate([cond, x.reshape(N, -1)[:, :p]], axis=1))
  lc, total = cond.shape[1], cond.shape[1] + 16 - 1
  step = jax.jit(
    lambda tok, cache, pos: model.apply(variables, tok, cache, pos, 0, method=model.decode)
  )
  at_once, cache_once = model.apply(
    variables, seq, model.init_cache(N, total), 0, method=model.decode
  )
  cache, one = model.init_cache(N, total), []
  for t in range(lc + p):
    logits, cache = step(seq[:, t : t + 1], cache, t)
    one.append(logits)
  one = np.stack(one, axis=1)
  # Bound: the two differ only in how XLA blocks the same float32 dot products (T queries
  # at once, or one); each of the model's 2 x 4 + 1 chained matmuls (q/k/v, attention,
  # projection, MLP, head) sums at most n = 4 * n_embd = 128 products, within gamma_n = n u
  # relative to its terms' magnitudes, and LayerNorm renormalises between layers, so the
  # errors add: 2 x 9 x 128 u of the largest logit (and of the largest cached key/value).
  bound = 2 * 9 * 128 * bounds.U32
  scale = float(np.abs(one).max())
  bounds.check('prefill logits (of max |logit|)', float(np.abs(at_once - one).max()) / scale, bound)
  for name in ('k', 'v'):
    a = np.stack([np.asarray(c[name])[:, :, : lc + p] for c in cache_once])
    b = np.stack([np.asarray(c[name])[:, :, : lc + p] for c in cache])
    bounds.check(f'prefill cache {name}', float(np.abs(a - b).max() / np.abs(b).max()), bound)

  # Greedy: one code at a time from an empty cache, every code fed back.
  cache, out = model.init_cache(N, total), np.array(seq)
  for t in range(lc + 16 - 1):
    logits, cache = step(jnp.asarray(out[:, t : t + 1]), cache, t)
    if t + 1 >= lc + p:
      out = np.concatenate([out, np.argmax(logits[:, : gpt.layout.n_image], -1)[:, None]], 1)
  keep = completion.top_half(GRID)
  got = gpt.complete(x, keep, jax.random.key(0), condition=cond, temperature=0.0)[0]
  np.testing.assert_array_equal(got.reshape(N, -1), out[:, lc:])


def test_maskgit_kept_codes_never_change(maskgit):
  """Any mask, with and without guidance: kept codes come back unchanged; the sampler starts
  them decoded, never re-masks them, and its schedule counts only the unknown codes."""
  x, key = _codes(maskgit), jax.random.key(3)
  for name, cfg in (('left_half', 2.0), ('center_box', None), ('outside_center_box', 3.0)):
    keep = completion.keep_mask(name, GRID)
    codes, images = maskgit.complete(x, keep, key, condition=_cond(maskgit), cfg_scale=cfg)
    assert images.shape == (N, SIZE, SIZE, 3)
    np.testing.assert_array_equal(codes[:, keep], x[:, keep], err_msg=name)
    assert codes.max() < maskgit.layout.n_image and not np.array_equal(codes, x), name
  again = maskgit.complete(x, keep, key, condition=_cond(maskgit), cfg_scale=3.0)[0]
  np.testing.assert_array_equal(again, codes)
  other = maskgit.complete(x, keep, jax.random.key(4), condition=_cond(maskgit), cfg_scale=3.0)
  assert not np.array_equal(other[0], codes)

  # The schedule over the 12 unknown codes of center_box, step by step.
  keep = completion.center_box(GRID)
  _, hist = maskgit_sampling.sample(
    maskgit.params,
    maskgit.model,
    _cond(maskgit),
    key,
    iterations=4,
    known=(x.reshape(N, -1), keep),
    return_history=True,
  )
  hist = np.asarray(hist)
  masked = hist == maskgit.layout.mask_id
  np.testing.assert_array_equal(
    masked.sum(-1), np.broadcast_to(maskgit_sampling.mask_counts(12, 4), (N, 4))
  )
  flat = keep.reshape(-1)
  np.testing.assert_array_equal(hist[:, :, flat], np.repeat(x.reshape(N, 1, -1)[:, :, flat], 4, 1))


def test_images_in_codes_out_and_8_devices_equal_one(gpt, maskgit):
  """uint8 images are encoded first (kept codes: the encoder's); a mesh of 8 fake devices
  completes the same codes and images as one device, for both kinds."""
  images = np.random.default_rng(5).integers(0, 256, (N, SIZE, SIZE, 1), dtype=np.uint8)
  key = jax.random.key(7)
  for run, mask in ((gpt, 'top_half'), (maskgit, 'outside_center_box')):
    keep = completion.keep_mask(mask, GRID)
    codes, out = run.complete(images, keep, key, cfg_scale=2.0)
    np.testing.assert_array_equal(codes[:, keep], run.vqgan.encode(images)[:, keep])
    # (Codes in: encoding on 8 devices is the VQGAN's business, tested there.)
    codes8, out8 = _run(run.kind, 8).complete(run.vqgan.encode(images), keep, key, cfg_scale=2.0)
    np.testing.assert_array_equal(codes8, codes, err_msg=run.kind)
    np.testing.assert_allclose(out8, out, atol=1e-5, err_msg=run.kind)


def test_old_saved_configs_read_the_completion_fields_as_off():
  old = run_config.config_to_dict(fashion_mnist_transformer.get_config('smoke'))
  for field in ('complete_folder', 'keep', 'complete_examples', 'completions_per_image'):
    del old['sample'][field]
  got = run_config.upgrade_config(old)['sample']
  assert got['complete_folder'] == '' and got['keep'] == 'top_half'
  assert got['complete_examples'] == 8 and got['completions_per_image'] == 4


# ----------------------------------------------------------------------------------------
# Through main: --mode=sample with config.sample.complete_folder; --mode=eval's ADM .npz
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def workdirs(tmp_path_factory):
  """(stage-1 workdir, stage-2 workdir, the stage-2 config, an image folder): random smoke
  models saved as runs would save them (no training), over 8x8 images."""
  root = tmp_path_factory.mktemp('complete')
  vq_config, vq, vq_params, _ = _host_models()
  with checkpoints.Checkpointer(root / 'stage1', save_every=1) as ckpt:
    ckpt.save(1, {'params': vq_params}, None, vq_config, force=True)
  c = fashion_mnist_transformer.get_config('smoke')
  c.stage1_workdir = str(root / 'stage1')
  c.data.image_size = SIZE
  c.cond.drop_prob = 0.1
  c.sample.update(batch_size=8)
  c = gpt_load.resolve_config(c)
  layout = gpt_load.make_layout(c)
  model = gpt_load.build_model(c, layout)
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
  with checkpoints.Checkpointer(root / 'gpt', save_every=1) as ckpt:
    ckpt.save(2, {'params': _random(shapes['params'], 2, 0.3)}, None, c, force=True)
  folder = root / 'images'
  folder.mkdir()
  rng = np.random.default_rng(0)
  for i in range(3):
    Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(folder / f'{i}.png')
  return root / 'stage1', root / 'gpt', c, folder


def test_main_completes_a_folder(workdirs):
  stage1, workdir, _, folder = workdirs

  def main(*flags):
    return subprocess.run(
      [
        sys.executable,
        '-m',
        'vqgan_jax.main',
        '--config=configs/fashion_mnist_transformer.py:smoke',
        f'--workdir={workdir}',
        '--mode=sample',
        f'--config.stage1_workdir={stage1}',
        f'--config.data.image_size={SIZE}',
        '--config.cond.drop_prob=0.1',
        f'--config.sample.complete_folder={folder}',
        *flags,
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=600,
    )

  proc = main('--config.sample.complete_examples=2', '--config.sample.completions_per_image=3')
  assert proc.returncode == 0, f'{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}'
  stem = workdir / 'completions_0000002_top_half'
  out = np.load(f'{stem}.npz')
  keep = completion.top_half(GRID)
  assert out['inputs'].shape == (2, SIZE, SIZE, 3) and out['images'].shape == (2, 3, SIZE, SIZE, 3)
  codes = out['codes']
  assert codes.shape == (2, 3, *GRID)
  np.testing.assert_array_equal(codes[:, :, keep], np.repeat(codes[:, :1, keep], 3, axis=1))
  np.testing.assert_array_equal(out['keep'], keep)
  np.testing.assert_array_equal(out['labels'], [-1, -1])  # a folder: unlabelled, null class
  with Image.open(f'{stem}.png') as png:  # 2 rows of input, masked input, 3 completions
    assert png.size[0] * (2 * (SIZE + 2) + 2) == png.size[1] * (5 * (SIZE + 2) + 2)


def test_an_explicit_temperature_is_constant_and_the_default_is_the_runs_schedule(maskgit):
  """The run's config warms its draws (1 to 2). Left out, the temperatures are the config's;
  a temperature given alone is that temperature throughout, for sample and complete alike."""
  assert maskgit.sampler_args()['final_temperature'] == 2.0
  cond, key = maskgit.condition_for_class([1]), jax.random.key(2)
  draw = lambda **kw: maskgit.sample(cond, key, num_samples=N, **kw)[0]
  np.testing.assert_array_equal(draw(), draw(temperature=1.0, final_temperature=2.0))
  np.testing.assert_array_equal(draw(temperature=1.5), draw(temperature=1.5, final_temperature=1.5))
  # guidance_sweep's constant settings pass final_temperature=None explicitly: the same.
  constant = draw(temperature=1.5, final_temperature=None)
  np.testing.assert_array_equal(constant, draw(temperature=1.5, final_temperature=1.5))
  assert not np.array_equal(draw(temperature=1.5), draw(temperature=1.5, final_temperature=2.0))
  np.testing.assert_array_equal(
    draw(final_temperature=3.0), draw(temperature=1.0, final_temperature=3.0)
  )

  x, keep = _codes(maskgit), completion.center_box(GRID)
  fill = lambda **kw: maskgit.complete(x, keep, key, condition=_cond(maskgit), **kw)[0]
  np.testing.assert_array_equal(fill(), fill(temperature=1.0, final_temperature=2.0))
  np.testing.assert_array_equal(fill(temperature=1.5), fill(temperature=1.5, final_temperature=1.5))
  assert not np.array_equal(fill(temperature=1.5), fill(temperature=1.5, final_temperature=2.0))
