"""`--mode=eval` (vqgan_jax/evaluate.py) and the classifier behind the offline fd_<name>.

Real parts throughout: a real image folder on disk, a classifier trained by its own trainer,
a real orbax stage-1 checkpoint, LPIPS's real weights. The numbers eval reports are checked
against the same quantities computed independently through the public API.
"""

import json
import os
import shutil

import jax
import numpy as np
from PIL import Image
import pytest

from vqgan_jax import checkpoints
from vqgan_jax import classifier_features
from vqgan_jax import config_base
from vqgan_jax import evaluate
from vqgan_jax import inference
from vqgan_jax import metrics
from vqgan_jax import parallel
from vqgan_jax import validate
from vqgan_jax.data import builders
from vqgan_jax.data import pipeline
from vqgan_jax.train import classifier_trainer
from vqgan_jax.train import common
from vqgan_jax.train import stage1
from vqgan_jax.train import vqgan_trainer
from vqgan_jax.validate import ConfigError

PER_CLASS = 12


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  """Two classes of striped images (horizontal / vertical), odd sizes, RGB and gray."""
  root = tmp_path_factory.mktemp('eval_images') / 'stripes'
  rng = np.random.default_rng(0)
  for label, name in enumerate(('horizontal', 'vertical')):
    os.makedirs(root / name)
    for i in range(PER_CLASS):
      h, w = 32 + 4 * (i % 3), 36 + 2 * (i % 2)
      period = 4 + i % 3
      line = (np.arange(h if label == 0 else w) // period) % 2 * 200 + 30
      image = np.repeat(line[:, None], w, 1) if label == 0 else np.repeat(line[None], h, 0)
      image = np.clip(image + rng.integers(-20, 20, image.shape), 0, 255).astype(np.uint8)
      if i % 4 == 0:
        Image.fromarray(image).save(root / name / f'{i}.png')  # gray
      else:
        Image.fromarray(np.stack([image] * 3, -1)).save(root / name / f'{i}.png')
  return str(root)


def _data(config, folder, data_dir):
  config.data.update(
    name='folder',
    folder=folder,
    data_dir=data_dir,
    image_size=32,
    train_split='train',
    eval_split='train',
    validation_fraction=0.0,
    random_crop=False,
    eval_examples=-1,
  )


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('eval_tfds'))


@pytest.fixture(scope='module')
def classifier_workdir(folder, data_dir, tmp_path_factory):
  c = config_base.classifier_base()
  _data(c, folder, data_dir)
  c.model.update(features=(16, 16), hidden=32, num_classes=2, feature_name='stripes')
  c.optim.warmup_steps = 5
  c.train.update(batch_size=8, eval_batch_size=8, num_steps=40, log_every=20, eval_every=40)
  c.train.update(checkpoint_every=20, max_to_keep=2)
  workdir = str(tmp_path_factory.mktemp('classifier'))
  result = classifier_trainer.train_and_evaluate(c, workdir)
  return workdir, result


def test_classifier_trains_and_checkpoints_like_a_run(classifier_workdir):
  workdir, result = classifier_workdir
  assert result['num_images'] == 2 * PER_CLASS
  assert result['accuracy'] >= 0.9, result  # the stripes' direction is easy to tell
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert rows[-1]['split'] == 'eval' and rows[-1]['step'] == 40


@pytest.fixture(scope='module')
def stage1_config(folder, data_dir):
  c = config_base.smoke_stage1()
  _data(c, folder, data_dir)
  c.train.update(eval_batch_size=16, num_grid_images=4)
  return c


@pytest.fixture(scope='module')
def stage1_workdir(stage1_config, tmp_path_factory):
  """A real stage-1 checkpoint holding what the loaders read: random params of the smoke
  VQGAN's shapes and a different random EMA copy, as a run with train.params_ema_decay keeps
  (eval does not care how the weights were found; drawing them with numpy spares compiling
  the model's init)."""
  workdir = str(tmp_path_factory.mktemp('vqgan'))
  mesh = parallel.make_mesh(stage1_config.mesh)
  vqgan = stage1.build_models(stage1_config).vqgan
  abstract, shardings = stage1.vqgan_param_shardings(vqgan, mesh)
  rng = np.random.default_rng(3)
  draw = lambda: jax.tree.map(
    lambda a, sh: jax.device_put(0.1 * rng.standard_normal(a.shape, np.float32), sh),
    abstract,
    shardings,
  )
  state = {'step': jax.numpy.asarray(5, jax.numpy.int32), 'params': draw(), 'params_ema': draw()}
  with checkpoints.Checkpointer(workdir, max_to_keep=1, save_every=1) as ckpt:
    ckpt.save(5, state, None, stage1_config, force=True)
  return workdir


def _eval_config(stage1_config, **overrides):
  c = type(stage1_config)(stage1_config.to_dict())
  c.eval.update(**overrides)
  return c


def _features(clf, images_m11):
  divisor = parallel.batch_divisor(clf.mesh)
  pad = -len(images_m11) % divisor
  x = np.concatenate([images_m11, np.repeat(images_m11[-1:], pad, 0)]) if pad else images_m11
  return np.asarray(clf(x)['features'])[: len(images_m11)].astype(np.float64)


def test_eval_folder_reports_what_the_public_api_computes(
  stage1_config, stage1_workdir, classifier_workdir, folder, tmp_path
):
  # Plus one truncated file: skipped and counted (`skipped_files`), as training's reader
  # skips it, not the end of the eval.
  folder_copy = str(tmp_path / 'stripes')
  shutil.copytree(folder, folder_copy)
  png = (tmp_path / 'stripes' / 'vertical' / '1.png').read_bytes()
  (tmp_path / 'stripes' / 'vertical' / '1_cut.png').write_bytes(png[: len(png) // 2])
  folder = folder_copy
  config = _eval_config(stage1_config, folder=folder, classifier_workdir=classifier_workdir[0])
  result, path = evaluate.evaluate(config, stage1_workdir)
  saved = json.load(open(path))
  assert path == os.path.join(stage1_workdir, 'eval_5.json')
  for key in ('psnr', 'ssim', 'lpips', 'l1', 'codebook_usage', 'perplexity', 'fd_stripes'):
    assert saved[key] == pytest.approx(result[key])
  assert saved['num_images'] == 2 * PER_CLASS and saved['folder'] == folder
  assert result['skipped_files'] == saved['skipped_files'] == 1
  assert 'rfid' not in saved  # no Inception weights here
  assert os.path.exists(os.path.join(stage1_workdir, 'eval_5.png'))

  # The same images as eval reads them (sorted, resized, centre-cropped), through the API.
  listing = builders.list_image_folder(folder)
  readable = [p for p in listing.paths if not p.endswith('_cut.png')]
  images = np.stack(
    [pipeline.preprocess(builders.load_rgb(os.path.join(folder, p)), 32) for p in readable]
  )
  vq = inference.load_vqgan(stage1_workdir, mesh=parallel.make_mesh(config.mesh))
  x = images.astype(np.float32) / 127.5 - 1.0
  rec = np.clip(vq.reconstruct(images), -1.0, 1.0)
  psnr = np.mean(np.asarray(metrics.psnr(x, rec)))
  assert result['psnr'] == pytest.approx(float(psnr), rel=1e-4)
  # Eval read the EMA params (load_vqgan's default), not the raw ones.
  raw = inference.load_vqgan(stage1_workdir, mesh=vq.mesh, ema=False)
  raw_rec = np.clip(raw.reconstruct(images), -1.0, 1.0)
  assert abs(float(np.mean(np.asarray(metrics.psnr(x, raw_rec)))) - result['psnr']) > 1e-3
  codes = vq.encode(images)
  counts = np.bincount(codes.reshape(-1), minlength=vq.model.n_embed)
  assert result['codebook_usage'] == pytest.approx(np.mean(counts > 0))

  clf = classifier_features.load_classifier(classifier_workdir[0], vq.mesh)
  fr, fx = _features(clf, x), _features(clf, rec)
  expected = metrics.frechet_distance(
    fr.mean(0), np.cov(fr, rowvar=False), fx.mean(0), np.cov(fx, rowvar=False)
  )
  assert result['fd_stripes'] == pytest.approx(expected, rel=1e-4)
  assert result['fd_stripes'] > 0


def test_eval_runs_on_the_kernels_of_its_config_not_of_the_run(
  stage1_config, stage1_workdir, folder, monkeypatch
):
  # The run was trained with 'auto'; an eval on another machine picks its own kernels
  # (`train.conv_impl`, e.g. 'tuned') for the VQGAN and LPIPS's VGG16 alike.
  config = _eval_config(stage1_config, folder=folder)
  config.train.conv_impl = 'cpu'
  seen, load = {}, inference.load_vqgan
  original_lpips = evaluate.lpips_lib.LPIPS

  def spy_load(*args, **kwargs):
    vq = load(*args, **kwargs)
    seen['vqgan'] = vq.model.conv_impl
    return vq

  def spy_lpips(**kwargs):
    seen['lpips'] = kwargs.get('conv_impl', 'auto')
    return original_lpips(**kwargs)

  monkeypatch.setattr(inference, 'load_vqgan', spy_load)
  monkeypatch.setattr(evaluate.lpips_lib, 'LPIPS', spy_lpips)
  result, _ = evaluate.evaluate(config, stage1_workdir)
  assert seen == {'vqgan': 'cpu', 'lpips': 'cpu'}
  assert result['num_images'] == 2 * PER_CLASS
  assert inference.load_vqgan(stage1_workdir).model.conv_impl == 'auto'  # the API's default


def test_eval_split_caches_the_reference_statistics(
  stage1_config, stage1_workdir, classifier_workdir
):
  config = _eval_config(stage1_config, classifier_workdir=classifier_workdir[0])
  mesh = parallel.make_mesh(config.mesh)
  exts = evaluate.extractors(config, mesh)
  first = evaluate.reference_stats(config, stage1_workdir, 'train', exts, mesh)['fd_stripes']
  stats_dir = os.path.join(stage1_workdir, 'eval_stats')
  (name,) = [n for n in os.listdir(stats_dir) if n.startswith('folder_train_32px_24_')]
  stats_path = os.path.join(stats_dir, name)
  mtime = os.stat(stats_path).st_mtime_ns
  saved = np.load(stats_path)
  assert {'mu', 'sigma'} <= set(saved.files)  # pytorch-fid's format
  assert first['count'] == 2 * PER_CLASS
  again = evaluate.reference_stats(config, stage1_workdir, 'train', exts, mesh)['fd_stripes']
  assert os.stat(stats_path).st_mtime_ns == mtime  # read, not recomputed
  np.testing.assert_allclose(again['sigma'], first['sigma'], rtol=1e-12)
  # Another classifier (here: another step of the same run) is another feature space.
  other = dict(exts)
  other['fd_stripes'] = classifier_features.load_classifier(classifier_workdir[0], mesh, 20)
  evaluate.reference_stats(config, stage1_workdir, 'train', other, mesh)
  assert len(os.listdir(stats_dir)) == 2


def test_eval_names_a_missing_inception_file(stage1_config, stage1_workdir, tmp_path):
  config = _eval_config(stage1_config, inception_weights=str(tmp_path / 'pt_inception.pth'))
  with pytest.raises(ConfigError, match='eval.inception_weights'):
    evaluate.evaluate(config, stage1_workdir)


def test_eval_names_the_eval_field_of_a_missing_folder_or_classifier(
  stage1_config, stage1_workdir, tmp_path
):
  config = _eval_config(stage1_config, folder=str(tmp_path / 'no_images'))
  with pytest.raises(
    builders.DataError, match=r"no_images' does not exist .*\(config\.eval\.folder"
  ):
    evaluate.evaluate(config, stage1_workdir)
  (tmp_path / 'empty_run').mkdir()
  for name, what in (('no_run', 'does not exist'), ('empty_run', 'has no checkpoints/ folder')):
    config = _eval_config(stage1_config, classifier_workdir=str(tmp_path / name))
    field = rf"^config\.eval\.classifier_workdir='\S+{name}' {what}: point it at"
    with pytest.raises(checkpoints.CheckpointError, match=field):
      evaluate.evaluate(config, stage1_workdir)


def test_init_from_another_quantizer_names_the_fields_and_writes_nothing(
  stage1_config, stage1_workdir, tmp_path
):
  """Reuses this module's stage-1 checkpoint (quantizer 'vq') as the init_from source."""
  config = _eval_config(stage1_config)
  config.model.update(quantizer='fsq', fsq_levels=(4, 4, 4), embed_dim=3)  # 64 codes, as vq's
  config.init_from = stage1_workdir
  workdir = tmp_path / 'run'
  with pytest.raises(checkpoints.IncompatibleCheckpointError) as e:
    vqgan_trainer.train_and_evaluate(config, str(workdir))
  assert str(e.value) == (
    f'config.init_from={stage1_workdir!r} cannot start this run: '
    'config.model.embed_dim: init_from run 16, config 3; '
    'config.model.fsq_levels: init_from run [], config [4, 4, 4]; '
    "config.model.quantizer: init_from run 'vq', config 'fsq'. "
    'Set these as the init_from run has them, or train from scratch'
  )
  assert not workdir.exists()  # not even an empty checkpoints/
  # The same quantizer passes the check (the configs' other fields may differ).
  same = _eval_config(stage1_config)
  same.model.beta = 0.5
  common.check_init_from(stage1_workdir, 'vqgan', same, validate.QUANTIZER_FIELDS)


def test_eval_of_an_empty_workdir_says_train_first(stage1_config, tmp_path):
  with pytest.raises(checkpoints.CheckpointError, match='train it first'):
    evaluate.evaluate(_eval_config(stage1_config), str(tmp_path))
