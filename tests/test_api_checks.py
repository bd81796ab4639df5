"""The Python API refuses bad arguments with one ValueError naming them (vqgan_jax/checks.py):
images, code indices, class ids, condition tokens, sample counts, batches larger than memory;
and `load_vqgan(ema=False)` reads the raw params of a run that kept an EMA.

No training: a real stage-1 checkpoint of random smoke-VQGAN params (and a different random
EMA copy), and a tiny GPT with random params built in memory.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import fashion_mnist_transformer
from vqgan_jax import checkpoints
from vqgan_jax import checks
from vqgan_jax import config_base
from vqgan_jax import fingerprint
from vqgan_jax import inference
from vqgan_jax import parallel
from vqgan_jax import sampling
from vqgan_jax.models import gpt_load
from vqgan_jax.train import stage1
from vqgan_jax.train import stage2_config

SIZE = 8  # image side: a 4x4 code grid under the smoke VQGAN's factor 2


def _mesh1():
  return parallel.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, jax.devices()[:1])


@pytest.fixture(scope='module')
def vq_workdir(tmp_path_factory):
  """A stage-1 checkpoint whose state holds random `params` and a different `params_ema`."""
  config = config_base.smoke_stage1()
  workdir = str(tmp_path_factory.mktemp('vq_ema'))
  mesh = parallel.make_mesh(config.mesh)
  abstract, shardings = stage1.vqgan_param_shardings(stage1.build_models(config).vqgan, mesh)
  rng = np.random.default_rng(0)

  def draw():
    return jax.tree.map(
      lambda a, sh: jax.device_put(0.1 * rng.standard_normal(a.shape, np.float32), sh),
      abstract,
      shardings,
    )

  state = {'step': jnp.asarray(3, jnp.int32), 'params': draw(), 'params_ema': draw()}
  with checkpoints.Checkpointer(workdir, max_to_keep=1, save_every=1) as ckpt:
    ckpt.save(3, state, None, config, force=True)
  return workdir, jax.device_get(state)


@pytest.fixture(scope='module')
def vq(vq_workdir):
  return inference.load_vqgan(vq_workdir[0], mesh=_mesh1())


@pytest.fixture(scope='module')
def gpt(vq):
  """A class-conditional GPT (4 classes, offset vocabulary, class dropout) with random params
  over `vq`'s 4x4 code grids."""
  c = fashion_mnist_transformer.get_config('smoke')
  c.stage1_config.update(vq.config.model.to_dict())
  c.data.image_size = SIZE
  c.cond.update(n_classes=4, drop_prob=0.1)
  c.transformer.update(scan_layers=False, n_embd=32)
  c.train.dtype = 'float32'
  layout = stage2_config.make_layout(c)
  model = stage2_config.build_model(c, layout, scan_layers=False)
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
  rng = np.random.default_rng(1)
  params = jax.tree.map(
    lambda a: jnp.asarray(rng.standard_normal(a.shape, np.float32)), shapes['params']
  )
  return inference.TrainedTransformer(model, params, vq, layout, c, 0, vq.mesh)


def test_load_vqgan_ema_false_reads_the_raw_params(vq_workdir):
  workdir, saved = vq_workdir
  raw, ema = saved['params'], saved['params_ema']
  same = lambda a, b: all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))
  default = jax.device_get(inference.load_vqgan(workdir).params)
  plain = jax.device_get(inference.load_vqgan(workdir, ema=False).params)
  assert same(default, ema) and same(plain, raw) and not same(plain, default)


def _images(n=3):
  return np.random.default_rng(2).integers(0, 256, (n, SIZE, SIZE, 1), dtype=np.uint8)


def test_encode_takes_uint8_and_unit_floats_alike(vq):
  x = _images()
  codes = vq.encode(x)
  assert codes.shape == (3, 4, 4)
  np.testing.assert_array_equal(vq.encode(x.astype(np.float32) / 127.5 - 1.0), codes)
  np.testing.assert_array_equal(vq.encode(x.astype(np.int32)), codes)


@pytest.mark.parametrize(
  'bad,match',
  [
    (np.full((2, SIZE, SIZE, 1), np.nan, np.float32), 'NaN'),
    (_images().astype(np.float32), r'outside \[-1, 1\].*uint8'),  # [0, 255] as floats
    (np.full((2, SIZE, SIZE, 1), 300, np.int32), r'outside \[0, 255\]'),
    (np.full((2, SIZE, SIZE, 1), -1, np.int16), r'outside \[0, 255\]'),
    (np.zeros((0, SIZE, SIZE, 1), np.uint8), 'empty batch'),
    (np.zeros((2, SIZE, SIZE, 2), np.uint8), r'\(N, H, W, '),
  ],
  ids=['nan', 'float-0-255', 'int-300', 'int-negative', 'empty', 'channels'],
)
def test_encode_refuses_bad_images(vq, bad, match):
  with pytest.raises(ValueError, match=f'^images.*{match}'):
    vq.encode(bad)


@pytest.mark.parametrize(
  'bad,match',
  [
    (np.full((1, 4, 4), 3.7), r'must be integers.*3\.7'),
    (np.full((1, 4, 4), np.nan), 'must be integers'),
    (np.full((1, 4, 4), 64), r'\[64\] are outside \[0, 64\)'),
    (np.full((1, 4, 4), -1), r'\[-1\] are outside'),
    (np.zeros((0, 4, 4), np.int32), 'empty batch'),
    (np.zeros((1, 4, 4), bool), 'dtype bool'),
  ],
  ids=['fraction', 'nan', 'n_embed', 'negative', 'empty', 'bool'],
)
def test_decode_refuses_bad_codes(vq, bad, match):
  with pytest.raises(ValueError, match=f'^indices.*{match}'):
    vq.decode(bad)


@pytest.mark.parametrize(
  'labels,match',
  [
    ([2.5], r'integers.*2\.5'),
    ([4], r'\[4\] are outside \[0, 4\)'),
    ([-1], r'\[-1\]'),
    ([], 'empty batch'),
    ([True], 'dtype bool'),
  ],
  ids=['fraction', 'n_classes', 'negative', 'empty', 'bool'],
)
def test_condition_for_class_refuses_bad_labels(gpt, labels, match):
  with pytest.raises(ValueError, match=f'^labels.*{match}'):
    gpt.condition_for_class(labels)


@pytest.mark.parametrize(
  'kwargs,match',
  [
    (dict(condition=[[100]]), r'^condition: class tokens \[100\] are outside \[64, 68\) or 68'),
    (dict(condition=[[3]]), r'^condition: class tokens \[3\]'),  # an image code, not a class
    (dict(condition=[[64.5]]), '^condition.*integers'),
    (dict(condition=np.zeros((0, 1), np.int32)), '^condition is an empty batch'),
    (dict(condition=[[64, 65]]), r'^condition must be \(N, 1\)'),
    (dict(condition=[[64]], num_samples=0), '^num_samples must be a positive int'),
    (dict(condition=[[64]], num_samples=-2), '^num_samples must be a positive int'),
    (dict(condition=[[64]], num_samples=2.0), '^num_samples must be a positive int'),
    (dict(condition=[[64]], num_samples=True), '^num_samples must be a positive int'),
  ],
  ids=['vocab', 'image-code', 'fraction', 'empty', 'length', 'zero', 'negative', 'float', 'bool'],
)
def test_sample_refuses_bad_arguments(gpt, kwargs, match):
  kwargs = dict(kwargs)
  with pytest.raises(ValueError, match=match):
    gpt.sample(kwargs.pop('condition'), jax.random.key(0), **kwargs)


def test_sample_refuses_what_memory_cannot_hold(gpt, monkeypatch):
  # The host cannot hold 10**12 samples' codes and images, whatever machine runs this.
  with pytest.raises(ValueError, match=r'^num_samples=10+ needs about .* GB for the codes and'):
    gpt.sample([[64]], num_samples=10**12)
  # A 24 GB accelerator cannot run here: free_bytes is faked (only that), as on one.
  monkeypatch.setattr(checks, 'free_bytes', lambda devices: (24 * 10**9, 'NVIDIA H100 device'))
  monkeypatch.setattr(gpt, 'batch_size', 10**6)
  with pytest.raises(ValueError, match='than the NVIDIA H100 device has free') as e:
    gpt.sample([[64]], num_samples=2 * 10**6)
  assert str(e.value).startswith('batch_size=1000000 needs about')
  most = int(re.search(r'sample in batches of at most (\d+)$', str(e.value))[1])
  assert 0 < most < 10**6
  gpt.batch_size = most
  gpt._check_memory(10**6, 10**6, (4, 4), None, False)  # fits in batches of `most`
  gpt.batch_size = most + 1
  with pytest.raises(ValueError, match='batch_size'):
    gpt._check_memory(10**6, 10**6, (4, 4), None, False)


def test_sample_draws_more_than_batch_size_in_batches(gpt, monkeypatch):
  """Five samples in batches of two: batch i is what a call of two draws with
  fold_in(rng, i) (the last one padded and cut)."""
  rng = jax.random.key(3)
  monkeypatch.setattr(gpt, 'batch_size', 2)
  cond = gpt.condition_for_class([0, 1, 2, 3, 1])
  # The arguments are checked once per call, not again by each batch's sampler (a spy, not a
  # mock: the real check runs).
  check, calls = sampling.check_sampling_args, []
  spy = lambda *a, **kw: calls.append(kw['top_k']) or check(*a, **kw)
  monkeypatch.setattr(sampling, 'check_sampling_args', spy)
  codes, images = gpt.sample(cond, rng, top_k=8)
  assert calls == [8]
  assert codes.shape == (5, 4, 4) and images.shape[0] == 5
  for i in range(3):
    batch = cond[2 * i : 2 * i + 2]
    want, _ = gpt.sample(np.resize(batch, (2, 1)), jax.random.fold_in(rng, i), top_k=8)
    np.testing.assert_array_equal(codes[2 * i : 2 * i + 2], want[: len(batch)])


def test_trainer_exports_are_the_trainers_main_runs(tmp_path):
  """`vqgan_jax.train_stage1` / `train_stage2` (the README's API) import and are the trainers
  `main` runs; called with a config they refuse, they say why before training anything."""
  import vqgan_jax  # pylint: disable=g-import-not-at-top
  from vqgan_jax.data.builders import DataError  # pylint: disable=g-import-not-at-top
  from vqgan_jax.train import transformer_trainer  # pylint: disable=g-import-not-at-top
  from vqgan_jax.train import vqgan_trainer  # pylint: disable=g-import-not-at-top
  from vqgan_jax.validate import ConfigError  # pylint: disable=g-import-not-at-top

  assert {'train_stage1', 'train_stage2'} <= set(vqgan_jax.__all__) & set(dir(vqgan_jax))
  assert vqgan_jax.train_stage1 is vqgan_trainer.train_and_evaluate
  assert vqgan_jax.train_stage2 is transformer_trainer.train_and_evaluate
  c1 = config_base.smoke_stage1()
  c1.model.ch = 48
  with pytest.raises(ConfigError, match=r'^config\.model\.ch '):
    vqgan_jax.train_stage1(c1, str(tmp_path / 'stage1'))
  c2 = fashion_mnist_transformer.get_config('smoke')
  with pytest.raises(DataError, match='^No codes dataset at .* run --mode=encode'):
    vqgan_jax.train_stage2(c2, str(tmp_path / 'stage2'))


def test_encode_and_stage_2_read_the_ema_params(vq_workdir):
  """--mode=encode, stage-2 training, sampling and eval read the stage-1 VQGAN through
  `gpt_load.load_frozen`, whose identity of what it read is what encode records with the
  codes: the EMA params of a run that kept them."""
  workdir, saved = vq_workdir
  c = fashion_mnist_transformer.get_config('smoke')
  c.stage1_workdir = workdir
  c, mesh, layout = gpt_load.setup(c)
  frozen, params, _ = gpt_load.load_frozen(c, layout, mesh, cond=False)
  assert frozen.stage1_id['ema'] is True and frozen.stage1_id['step'] == 3
  assert frozen.stage1_id['params_sha256'] == fingerprint.params_fingerprint(saved['params_ema'])
  got = jax.device_get(params['stage1'])
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, got, saved['params_ema'])))
