"""`--mode=eval`: a trained run measured as the field measures it, on any split or folder.

Stage 1 (a VQGAN workdir): reconstructs `data.eval_split` (or `eval.split`, or every image of
`eval.folder`, whose unreadable files are skipped and counted: `skipped_files`) and reports
PSNR, SSIM, LPIPS, L1, codebook usage and perplexity, rFID (the Frechet distance between the
Inception features of the inputs and of their reconstructions, when `eval.inception_weights`
or $VQGAN_JAX_INCEPTION names pytorch-fid's weights) and `fd_<name>` (the same in the feature
space of `eval.classifier_workdir`'s classifier: an offline proxy, never called FID).

Stage 2 (a transformer workdir): draws `eval.num_samples` samples (class-balanced for class
models; they depend only on `eval.seed` and the checkpoint) and reports gFID and Inception
Score against the reference split (`eval.split`, default `data.train_split`, the usual gFID
protocol), `fd_<name>`, and the class accuracy of class-conditional samples (the share the
classifier labels as the class they were drawn for). The samples are saved as an `.npz` in
the ADM evaluator's layout (uint8 NHWC images under `arr_0`, labels under `arr_1`; and `codes`)
for other evaluators.

Results go to `<workdir>/eval_<step>.json` (process 0), with a PNG grid. Reference statistics
of a dataset split are cached (pytorch-fid's `.npz` format) in `eval.stats_dir`.
"""

import json
import os
import re
import time

from absl import logging
import jax
import ml_collections
import numpy as np
import tqdm

from vqgan_jax import checkpoints
from vqgan_jax import feature_nets
from vqgan_jax import fid
from vqgan_jax import images as images_lib
from vqgan_jax import inference
from vqgan_jax import parallel
from vqgan_jax import stage1_eval
from vqgan_jax.data import builders
from vqgan_jax.data import pipeline
from vqgan_jax.feature_nets import extractors  # noqa: F401  (evaluate.extractors, as before)
from vqgan_jax.models import lpips as lpips_lib
from vqgan_jax.models import vqgan_load
from vqgan_jax.validate import ConfigError

_stats = stage1_eval.stats


def _say(line):
  if jax.process_index() == 0:
    tqdm.tqdm.write(line)


def _bar(total, desc):
  return tqdm.tqdm(total=total, desc=desc, disable=jax.process_index() != 0, dynamic_ncols=True)


FOLDER_FIELD = 'config.eval.folder'


class _FolderSource:
  """Every image of a folder (`builders.list_image_folder`: any nesting, links once), in
  sorted order, as eval elements. A file that does not decode is skipped as the training
  reader skips it (`builders.load_rgb_or_skip`): its element is masked out, so the eval
  counts it (`skipped_files`) instead of stopping."""

  def __init__(self, folder):
    self.folder = folder
    self.listing = builders.list_image_folder(folder, FOLDER_FIELD)

  def __len__(self):
    return len(self.listing.paths)

  def __getitem__(self, i):
    image = builders.load_rgb_or_skip(os.path.join(self.folder, self.listing.paths[i]), [])
    if image is None:  # a 1x1 stand-in, masked out of every metric
      return {'image': np.zeros((1, 1, 3), np.uint8), 'label': -1, 'mask': False}
    return {'image': image, 'label': -1}


def _data_config(config, split):
  data = ml_collections.ConfigDict(config.data.to_dict())
  data.eval_split = split
  data.eval_examples = int(config.eval.num_examples)
  return data


def _batch_size(config, mesh):
  size = int(config.eval.batch_size)
  size = size if size > 0 else int(config.train.eval_batch_size)
  divisor = parallel.batch_divisor(mesh)
  return max(divisor, size // divisor * divisor)


def _stats_path(config, workdir, split, n, ext):
  stats_dir = config.eval.stats_dir or os.path.join(workdir, 'eval_stats')
  key = f'{config.data.name}_{split}_{config.data.image_size}px_{n}_{ext.name}'
  return os.path.join(stats_dir, re.sub(r'[^A-Za-z0-9._-]+', '_', key) + '.npz')


def reference_stats(config, workdir, split, exts, mesh) -> dict:
  """{metric: stats} of the real images of `split` in each extractor's feature space, read
  from the cache or computed in one pass (and cached)."""
  data = _data_config(config, split)
  out, missing, paths = {}, {}, {}
  n = None
  for metric, ext in exts.items():
    if n is None:
      pipeline.check_splits(data, fields=('eval_split',))
      n = pipeline.num_eval_examples(data)
    paths[metric] = _stats_path(config, workdir, split, n, ext)
    try:
      stats = fid.load_stats(paths[metric])
      if stats['extractor'] == ext.name and stats['count'] == n:
        out[metric] = stats
        continue
    except (FileNotFoundError, ValueError):
      pass
    missing[metric] = ext
  if not missing:
    return out
  accs = {m: fid.StatsAccumulator(e.feature_dim) for m, e in missing.items()}
  batch = _batch_size(config, mesh)
  sharding = parallel.batch_sharding(mesh)
  with _bar(n, f'reference {split}') as bar:
    for local in pipeline.make_eval_iterator(data, batch):
      g = pipeline.to_global({'image': local['image'], 'mask': local['mask']}, sharding)
      x = vqgan_load.to_model_range(g['image'])
      mask = parallel.gather(g['mask'])
      for m, e in missing.items():
        accs[m].add(e(x)['features'], mask)
      bar.update(int(mask.sum()))
  for m, acc in accs.items():
    mu, sigma = acc.mu_sigma()
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(paths[m]), exist_ok=True)
      fid.save_stats(paths[m], mu, sigma, acc.count, missing[m].name)
    out[m] = {'mu': mu, 'sigma': sigma, 'count': acc.count, 'extractor': missing[m].name}
  return out


def _write_json(workdir, step, result):
  path = os.path.join(workdir, f'eval_{step}.json')
  if jax.process_index() == 0:
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
      json.dump(result, f, indent=2, sort_keys=True, allow_nan=False)
      f.write('\n')
    os.replace(tmp, path)
  return path


def _step(config):
  return None if int(config.eval.step) < 0 else int(config.eval.step)


def _stage1_source(config):
  """(source or None, data config, what the json says was measured): `eval.folder`, listed
  before the model loads (a wrong folder fails at once), else a split of the dataset."""
  folder = config.eval.folder
  if folder:
    source = _FolderSource(os.path.abspath(os.path.expanduser(folder)))
    return source, _data_config(config, 'folder'), {'folder': source.folder}
  split = config.eval.split or config.data.eval_split
  data = _data_config(config, split)
  pipeline.check_splits(data, fields=('eval_split',))
  return builders.get_source(data, split), data, {'dataset': config.data.name, 'split': split}


def _skipped(source, n, num_images) -> int:
  """The folder's files that did not decode (masked out by _FolderSource), said in one line;
  none readable is a DataError."""
  skipped = n - num_images
  if skipped == n:
    raise builders.DataError(
      f'No readable image in {source.folder} ({FOLDER_FIELD}): all {n} files failed to decode'
    )
  if skipped:
    _say(
      f'skipped {skipped} unreadable image file(s) of {n} in {source.folder} '
      f'({FOLDER_FIELD}); they are named in the warnings above'
    )
  return skipped


def evaluate_stage1(config, workdir, inception=None):
  """Reconstruction metrics of a stage-1 workdir; returns (metrics, path of the json).
  `inception`: the FID Inception's weights when `evaluate` read them already."""
  t0 = time.perf_counter()
  mesh = parallel.make_mesh(config.mesh)
  source, data, what = _stage1_source(config)
  # The kernels this config runs on (train.conv_impl), not the ones the run was trained with:
  # eval is forward passes, LPIPS's VGG16 most of them.
  impl = config.train.conv_impl
  vq = inference.load_vqgan(workdir, _step(config), mesh=mesh, conv_impl=impl)
  if data.image_size % vq.downsample_factor:
    raise ConfigError(
      f"config.data.image_size={data.image_size} is not divisible by the VQGAN's "
      f'downsampling factor {vq.downsample_factor}'
    )
  exts = extractors(config, mesh, inception)
  # Dataset splits: the real images' statistics are cached (reused by later evals and by
  # stage 2); a folder's are gathered in the same pass.
  ref = {} if 'folder' in what else reference_stats(config, workdir, what['split'], exts, mesh)
  lpips_params, lpips_sh = feature_nets.load_lpips(mesh)
  models = vqgan_load.Models(vq.model, None, lpips_lib.LPIPS(conv_impl=impl))
  p_sh = jax.tree.map(lambda x: x.sharding, vq.params)
  eval_fn = stage1_eval.make_eval_step(models, mesh, p_sh, lpips_sh)
  n = pipeline.num_eval_examples(data, source=source)
  batch, skipped = _batch_size(config, mesh), []
  with _bar(n, 'eval stage 1') as bar:
    result, grid = stage1_eval.run(
      eval_fn,
      vq.params,
      lpips_params,
      pipeline.make_eval_iterator(data, batch, source=source),
      mesh,
      exts,
      ref=ref,
      num_grid=int(config.train.get('num_grid_images', 16)),
      hooks=(
        lambda: bar.update(min(batch, n - bar.n)),  # skipped files were read too
        lambda count: skipped.append(_skipped(source, n, count) if 'folder' in what else 0),
      ),
    )
  if 'folder' in what:
    result['skipped_files'] = skipped[0]
  result['seconds'] = time.perf_counter() - t0
  step = vq.step
  if jax.process_index() == 0:
    stage1_eval.save_pairs(os.path.join(workdir, f'eval_{step}.png'), *grid)
  path = _write_json(
    workdir,
    step,
    {**result, 'step': step, 'stage': 'vqgan', **what, 'extractors': _names(exts)},
  )
  return result, path


def _names(exts):
  return {m: e.name for m, e in exts.items()}


def _pad(x, divisor):
  extra = -len(x) % divisor
  return np.concatenate([x, np.repeat(x[-1:], extra, axis=0)]) if extra else x


def evaluate_stage2(config, workdir, inception=None):
  """Sample metrics of a stage-2 workdir; returns (metrics, path of the json).
  `inception`: the FID Inception's weights when `evaluate` read them already."""
  t0 = time.perf_counter()
  mesh = parallel.make_mesh(config.mesh)
  run = inference.load_transformer_for_config(config, workdir, _step(config), mesh)
  labels = _eval_labels(config, run.layout)
  exts = extractors(config, mesh, inception)
  split = config.eval.split or config.data.train_split
  ref = reference_stats(config, workdir, split, exts, mesh) if exts else {}
  args = run.sampler_args()
  result, codes, images, _ = sample_metrics(run, config, labels, exts, ref, args)
  result['seconds'] = time.perf_counter() - t0
  if run.layout.kind != 'class':
    labels = np.full((len(labels),), -1, np.int32)
  _save_samples(workdir, run.step, images, codes, labels)
  # What drew the samples: figures of one model differ by these.
  sampler = {'kind': run.kind, **args, 'top_k': int(config.sample.top_k)}
  record = {
    **result,
    'step': run.step,
    'stage': 'transformer',
    'reference': {'dataset': config.data.name, 'split': split},
    'extractors': _names(exts),
    'sampler': {**sampler, 'seed': int(config.eval.seed)},
  }
  return result, _write_json(workdir, run.step, record)


def _eval_labels(config, layout):
  """The class ids of the `eval.num_samples` samples (class-balanced; zeros for an
  unconditional model)."""
  if layout.kind == 'spatial':
    raise ConfigError(
      '--mode=eval on a spatially conditioned model is not supported: its samples need '
      'cond maps (use --mode=sample)'
    )
  num = int(config.eval.num_samples)
  if num < 2:
    raise ConfigError(f'config.eval.num_samples={num}: need >= 2 for a covariance')
  if layout.kind == 'class':
    return np.arange(num, dtype=np.int32) % layout.n_classes  # class-balanced
  return np.zeros((num,), np.int32)


def sample_metrics(run, config, labels, exts, ref, args):
  """The metrics of the samples `run.sample(**args)` draws for `labels` (keys from
  eval.seed, so one setting gives --mode=eval's figures): (metrics, codes, uint8 images,
  seconds per batch). experiments/guidance_sweep.py calls it once per sampling setting."""
  codes, images, fake, logits, seconds = _sample_features(run, config, labels, exts, args)
  result = {'num_samples': len(labels)}
  for m, e in exts.items():
    name = 'gfid' if m == 'fid' else m
    result[name] = fid.fid_from_stats(ref[m], _stats(fake[m], e))
    if m == 'fid':
      result['inception_score'], result['inception_score_std'] = fid.inception_score(logits[m])
    elif run.layout.kind == 'class':
      result['class_accuracy'] = float(np.mean(np.argmax(logits[m], -1) == labels))
  return result, codes, images, seconds


def _sample_features(run, config, labels, exts, args):
  """Draws the samples of `labels` in batches of sample.batch_size and feeds each batch to
  the extractors: (codes, uint8 images, {metric: feature statistics}, {metric: logits},
  seconds each batch took to sample and decode)."""
  cond = run.condition_for_class(labels)
  num, batch = len(labels), max(1, int(config.sample.batch_size))
  run.batch_size = batch  # the batches below, as they are
  rng = jax.random.PRNGKey(int(config.eval.seed))
  divisor = parallel.batch_divisor(run.mesh)
  fake = {m: fid.StatsAccumulator(e.feature_dim) for m, e in exts.items()}
  logits = {m: [] for m in exts}
  all_codes, all_images, seconds = [], [], []
  with _bar(num, 'eval samples') as bar:
    for i, start in enumerate(range(0, num, batch)):
      t0 = time.perf_counter()
      try:
        # grid: the data's image size (a model trained on crops samples it by the sliding window)
        codes, images = run.sample(
          cond[start : start + batch],
          jax.random.fold_in(rng, i),
          grid=run.layout.sample_grid,
          **args,
        )
      except ValueError as e:
        raise ConfigError(f'config.sample: {e}') from None
      seconds.append(time.perf_counter() - t0)
      images = np.clip(images, -1.0, 1.0)
      k = len(images)
      mask = np.arange(k + (-k % divisor)) < k
      for m, e in exts.items():
        out = e(_pad(images, divisor))
        fake[m].add(out['features'], mask)
        key = 'logits_unbiased' if m == 'fid' else 'logits'
        logits[m].append(parallel.gather(out[key])[:k])
      all_codes.append(codes)
      all_images.append(images_lib.to_uint8(images))
      bar.update(k)
  logits = {m: np.concatenate(v) for m, v in logits.items()}
  return np.concatenate(all_codes), np.concatenate(all_images), fake, logits, seconds


def _save_samples(workdir, step, images, codes, labels):
  """The eval samples as `eval_samples_<step>.npz` and a grid of the first 100 (process 0)."""
  if jax.process_index() != 0:
    return
  # The ADM evaluator's layout (guided-diffusion evaluations/evaluator.py reads arr_0):
  # uint8 NHWC images under arr_0, labels under arr_1 (-1 without classes), then our codes.
  np.savez(os.path.join(workdir, f'eval_samples_{step}.npz'), images, labels, codes=codes)
  shown = images[: min(len(images), 100)]
  grid = images_lib.make_grid(shown, int(np.ceil(np.sqrt(len(shown)))))
  images_lib.save_png(
    os.path.join(workdir, f'eval_{step}.png'), grid, scale=max(1, 512 // grid.shape[1])
  )


def evaluate(config, workdir):
  """`--mode=eval` on a stage-1 or stage-2 workdir: (metrics, the json's path)."""
  workdir = os.path.abspath(workdir)
  if not os.path.isdir(checkpoints.checkpoint_dir(workdir)):
    raise checkpoints.CheckpointError(f'No checkpoints in {workdir}: train it first.')
  # The feature networks' files, checked before anything loads or computes: a bad weights file
  # is one sentence now, not a traceback after reconstructing the whole split.
  inception = feature_nets.check(config)['inception']
  logging.info('Evaluating %s', workdir)
  if config.get('stage', 'vqgan') == 'vqgan':
    return evaluate_stage1(config, workdir, inception)
  return evaluate_stage2(config, workdir, inception)
