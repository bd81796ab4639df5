"""Completion of held-out Fashion-MNIST test images by the demo's GPT and MaskGIT.

  python experiments/completion.py --gpt_workdir=workdirs/fashion_mnist_transformer \
      --maskgit_workdir=workdirs/fm_maskgit --classifier_workdir=workdirs/fashion_mnist_classifier

A fixed class-balanced subset of the test split (--num_images, --num_images / 10 per class,
drawn with --seed) is encoded by the GPT run's VQGAN; for each mask of --masks the kept codes
are fixed and the rest generated under the image's own class (`TrainedTransformer.complete`,
each run's own `config.sample` settings, key --seed). The GPT completes raster prefixes only
(top_half); center_box (keep the central box, generate the border) is MaskGIT's alone.

Per generator and mask, one row: `class_agreement` (the share of completions the demo
classifier labels as the original image's class, the test label), `fd_fmnist` (Frechet
distance in the classifier's feature space, `evaluate.reference_stats`, of the completions
vs all 10k test images: an offline proxy, not FID) and `seconds_per_completion` (batches
after the first, which compiles). Reference rows: `original` (the subset itself: fd_fmnist at
this sample size vs the full split) and `reconstruction` (every code kept, decoded: the most
a completion can reach). Rows go to --out (experiments/results/completion.jsonl) with
`machine.info()` and are printed as JSON.
"""

import json
import os
import statistics
import sys
import time

from absl import app
from absl import flags
import jax
import ml_collections
import numpy as np

import vqgan_jax
from vqgan_jax import classifier_features
from vqgan_jax import completion
from vqgan_jax import evaluate
from vqgan_jax import fid
from vqgan_jax import images as images_lib
from vqgan_jax.data import builders
from vqgan_jax.data import pipeline

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # noqa: E402  (experiments/machine.py)

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_GPT = flags.DEFINE_string('gpt_workdir', '', 'The GPT demo run (its VQGAN encodes the images).')
_MASKGIT = flags.DEFINE_string('maskgit_workdir', '', 'A MaskGIT run on the same codes.')
_STAGE1 = flags.DEFINE_string(
  'stage1_workdir', '', 'The VQGAN run, when it moved since the GPT trained (default: saved).'
)
_CLASSIFIER = flags.DEFINE_string('classifier_workdir', '', 'The demo classifier run.')
_NUM = flags.DEFINE_integer('num_images', 1000, 'Test images, class-balanced (a multiple of 10).')
_SEED = flags.DEFINE_integer('seed', 0, 'Draws the subset and keys the completions.')
_MASKS = flags.DEFINE_list('masks', ['top_half', 'center_box'], 'completion.KEEP_MASKS names.')
_BATCH = flags.DEFINE_integer('batch_size', 200, 'Completions per sampler call.')
_GENERATORS = flags.DEFINE_list(
  'generators', ['gpt', 'maskgit'], 'Which to run (maskgit needs --maskgit_workdir).'
)
_REFERENCES = flags.DEFINE_bool('references', True, 'Also the original and reconstruction rows.')
_GRID_DIR = flags.DEFINE_string('grid_dir', '', 'If set, a PNG per generator and mask there.')
_OUT = flags.DEFINE_string(
  'out',
  os.path.join(_REPO, 'experiments', 'results', 'completion.jsonl'),
  "JSON lines file the rows are appended to ('' only prints).",
)

GPT_NOTE = 'the GPT completes raster prefixes only (top_half); center_box needs MaskGIT'


def test_subset(data, num, seed):
  """(uint8 images (num, S, S, 3), labels (num,), test indices): num / 10 per class."""
  source = builders.get_source(data, 'test')
  labels = np.asarray([source[i]['label'] for i in range(len(source))])
  classes = np.unique(labels)
  if num % len(classes):
    raise ValueError(f'--num_images={num} must be a multiple of {len(classes)} (classes)')
  rng = np.random.default_rng(seed)
  per = num // len(classes)
  idx = np.sort(
    np.concatenate([rng.choice(np.flatnonzero(labels == c), per, replace=False) for c in classes])
  )
  images = np.stack([pipeline.preprocess(source[int(i)]['image'], data.image_size) for i in idx])
  return images, labels[idx].astype(np.int32), idx


class Scorer:
  """The demo classifier's agreement with given labels and fd_fmnist vs the test split."""

  def __init__(self, run, workdir, classifier_workdir):
    config = ml_collections.ConfigDict(run.config.to_dict())
    config.eval.num_examples = -1  # the whole test split is the reference (cached in workdir)
    self.ext = classifier_features.load_classifier(classifier_workdir, run.mesh)
    self.metric = f'fd_{self.ext.feature_name}'
    exts = {self.metric: self.ext}
    self.ref = evaluate.reference_stats(config, workdir, 'test', exts, run.mesh)[self.metric]

  def __call__(self, images, labels, batch=500):
    """images: float [-1, 1] (clipped here) or uint8."""
    x = np.asarray(images, np.float32)
    x = x / 127.5 - 1.0 if images.dtype == np.uint8 else np.clip(x, -1.0, 1.0)
    acc, preds = fid.StatsAccumulator(self.ext.feature_dim), []
    for start in range(0, len(x), batch):
      out = self.ext(x[start : start + batch])
      acc.add(out['features'])
      preds.append(np.argmax(np.asarray(out['logits']), -1))
    mu, sigma = acc.mu_sigma()
    fd = fid.fid_from_stats(self.ref, {'mu': mu, 'sigma': sigma})
    preds = np.concatenate(preds)
    return {'class_agreement': float(np.mean(preds == labels)), self.metric: fd}, preds


def sampler_settings(run):
  """config.sample's filter and decoding settings, without guidance (completion.py runs
  unguided)."""
  kw = run.sampler_args()
  kw.pop('cfg_scale')
  return kw


def complete_timed(run, codes, labels, keep, seed, batch):
  """(completions float (N, H, W, C), per-batch seconds): batch i keyed fold_in(seed, i)."""
  cond = run.condition_for_class(labels)
  kw = sampler_settings(run)
  run.batch_size = batch
  out, seconds = [], []
  for i, start in enumerate(range(0, len(codes), batch)):
    t0 = time.perf_counter()
    sl = slice(start, start + batch)
    done, images = run.complete(
      codes[sl], keep, jax.random.fold_in(jax.random.key(seed), i), condition=cond[sl], **kw
    )
    seconds.append(time.perf_counter() - t0)
    assert (done[:, keep] == codes[sl][:, keep]).all()  # the contract: kept codes unchanged
    out.append(images)
  return np.concatenate(out), seconds


def save_grid(path, originals, keep, completions, labels):
  """One row per class (its first image): original, masked (generated region gray), completion."""
  first = [int(np.flatnonzero(labels == c)[0]) for c in np.unique(labels)]
  f = originals.shape[1] // keep.shape[0]
  pixels = np.kron(keep, np.ones((f, f), bool))[None, :, :, None]
  masked = np.where(pixels, originals, np.uint8(128))
  rows = np.stack([originals[first], masked[first], images_lib.to_uint8(completions[first])], 1)
  grid = images_lib.make_grid(rows.reshape(-1, *rows.shape[2:]), 3)
  images_lib.save_png(path, grid, scale=4)


def main(argv):
  del argv
  if not (_GPT.value and _CLASSIFIER.value):
    raise app.UsageError('--gpt_workdir and --classifier_workdir are required')
  gpt = vqgan_jax.load_transformer(_GPT.value, stage1_workdir=_STAGE1.value or None)
  score = Scorer(gpt, _GPT.value, _CLASSIFIER.value)
  originals, labels, _ = test_subset(gpt.config.data, _NUM.value, _SEED.value)
  codes = gpt.vqgan.encode(originals)
  base = dict(
    name='completion',
    num_images=len(labels),
    subset='class-balanced test images',
    seed=_SEED.value,
    reference=f'{score.ref["count"]} test images',
    vqgan_step=gpt.vqgan.step,
  )
  orig_scores, orig_preds = score(originals, labels)
  if _REFERENCES.value:
    machine.write_row(_OUT.value, {**base, 'generator': 'original', 'mask': 'all', **orig_scores})
    gpt.vqgan.batch_size = _BATCH.value  # one compiled shape, compiled before timing
    gpt.vqgan.decode(codes[: _BATCH.value])
    t0 = time.perf_counter()
    recon = gpt.vqgan.decode(codes)
    per = (time.perf_counter() - t0) / len(codes)
    machine.write_row(
      _OUT.value,
      {
        **base,
        'generator': 'reconstruction',
        'mask': 'all',
        **score(recon, labels)[0],
        'seconds_per_completion': per,
      },
    )
  runs = [('gpt', gpt, _GPT.value)] if 'gpt' in _GENERATORS.value else []
  if _MASKGIT.value and 'maskgit' in _GENERATORS.value:
    mg = vqgan_jax.load_transformer(_MASKGIT.value, stage1_workdir=_STAGE1.value or None)
    if mg.vqgan.step != gpt.vqgan.step or tuple(mg.layout.grid) != tuple(gpt.layout.grid):
      raise ValueError("--maskgit_workdir must sample the GPT run's VQGAN codes")
    runs.append(('maskgit', mg, _MASKGIT.value))
  for name, run, workdir in runs:
    for mask in _MASKS.value:
      keep = completion.keep_mask(mask, run.layout.grid, field='--masks')
      if run.kind == 'gpt':
        try:
          completion.prefix_length(keep)
        except ValueError:
          print(json.dumps({'skipped': name, 'mask': mask, 'why': GPT_NOTE}), flush=True)
          continue
      images, seconds = complete_timed(run, codes, labels, keep, _SEED.value, _BATCH.value)
      scores, preds = score(images, labels)
      steady = seconds[1:] or seconds
      row = {
        **base,
        'generator': name,
        'mask': mask,
        'kept_codes': int(keep.sum()),
        'codes': int(keep.size),
        **scores,
        # Agreement with the classifier's label of the original image (not the test label).
        'agreement_with_original_prediction': float(np.mean(preds == orig_preds)),
        'seconds_per_completion': statistics.median(steady) / _BATCH.value,
        'first_batch_seconds': seconds[0],  # includes compiling
        'batch_size': _BATCH.value,
        'load_avg_1m': round(os.getloadavg()[0], 2),
        'condition': 'the test label',
        'sampler': sampler_settings(run),
        'workdir': os.path.basename(os.path.normpath(workdir)),
        'step': run.step,  # the checkpoint used, of
        'num_steps': int(run.config.train.num_steps),  # its training schedule's
      }
      machine.write_row(_OUT.value, row)
      if _GRID_DIR.value:
        os.makedirs(_GRID_DIR.value, exist_ok=True)
        save_grid(
          os.path.join(_GRID_DIR.value, f'completion_{name}_{mask}.png'),
          originals,
          keep,
          images,
          labels,
        )


if __name__ == '__main__':
  app.run(main)
