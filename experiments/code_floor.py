"""What a perfect stage-2 model would score: fd_fmnist and class accuracy of real held-out
images, and of the same images through the frozen VQGAN (encoded, decoded), in the draws
`--mode=eval` scores samples in (class-balanced, 1000).

  python experiments/code_floor.py --workdir=workdirs/fashion_mnist_transformer \
      --classifier_workdir=workdirs/fashion_mnist_classifier

A stage-2 model that matched the data's code distribution exactly would draw code grids like
the encoded images', so its samples would score like their reconstructions; the real images
show what the tokenizer itself costs. Per split (--splits) and per draw (--draws disjoint sets
of --per_class images of each class, in the split's order) one row per source ('real',
'reconstructed') goes to --out (experiments/results/code_floor.jsonl, with machine.info()):
fd_fmnist against the stage-2 run's reference split (its training split, as `--mode=eval`),
class_accuracy against the images' labels, the workdirs and the stage-1 step.
"""

import os
import sys

from absl import app
from absl import flags
import ml_collections
import numpy as np

from vqgan_jax import evaluate
from vqgan_jax import fid
from vqgan_jax import inference
from vqgan_jax import parallel
from vqgan_jax.data import pipeline

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # noqa: E402  (experiments/machine.py)

_WORKDIR = flags.DEFINE_string('workdir', '', 'A trained class-conditional stage-2 run.')
_CLASSIFIER = flags.DEFINE_string('classifier_workdir', '', 'The demo classifier run.')
_STATS = flags.DEFINE_string('stats_dir', '', 'Reference statistics cache (default: workdir).')
_SPLITS = flags.DEFINE_list('splits', ['test', 'train'], 'Splits to draw the images from.')
_DRAWS = flags.DEFINE_integer('draws', 3, 'Disjoint class-balanced draws per split.')
_PER_CLASS = flags.DEFINE_integer('per_class', 100, 'Images per class in a draw.')
_OUT = flags.DEFINE_string(
  'out', 'code_floor.jsonl', "Rows file under experiments/results/ (or a path); '' prints."
)


def _config(workdir):
  config, step = inference._saved_config(workdir, None)  # noqa: SLF001  (the run's own config)
  config.eval.classifier_workdir = _CLASSIFIER.value
  config.eval.stats_dir = _STATS.value
  return ml_collections.ConfigDict(config.to_dict()), step


def _split_images(config, split, n_needed):
  """(uint8 images, labels) of the split's first examples, enough for every class's draws."""
  data = ml_collections.ConfigDict(config.data.to_dict())
  data.eval_split, data.eval_examples = split, 0
  images, labels = [], []
  for batch in pipeline.make_eval_iterator(data, 500):
    keep = batch['mask']
    images.append(batch['image'][keep])
    labels.append(batch['label'][keep])
    counts = np.bincount(np.concatenate(labels), minlength=n_needed[1])
    if counts.min() >= n_needed[0]:
      break
  return np.concatenate(images), np.concatenate(labels)


def _scores(ext, ref, images, labels):
  acc = fid.StatsAccumulator(ext.feature_dim)
  feats, logits = [], []
  for start in range(0, len(images), 500):
    out = ext(images[start : start + 500])
    feats.append(parallel.gather(out['features']))
    logits.append(parallel.gather(out['logits']))
  acc.add(np.concatenate(feats))
  logits = np.concatenate(logits)
  return {
    'fd_fmnist': fid.fid_from_stats(ref, evaluate._stats(acc, ext)),  # noqa: SLF001
    'class_accuracy': float(np.mean(np.argmax(logits, -1) == labels)),
  }


def main(argv):
  del argv
  if not _WORKDIR.value or not _CLASSIFIER.value:
    raise app.UsageError('--workdir and --classifier_workdir are required')
  config, step = _config(_WORKDIR.value)
  if config.cond.kind != 'class':
    raise app.UsageError(f'--workdir: a class-conditional run, got cond.kind={config.cond.kind!r}')
  mesh = parallel.make_mesh(config.mesh)
  exts = {m: e for m, e in evaluate.extractors(config, mesh).items() if m == 'fd_fmnist'}
  ref_split = config.eval.split or config.data.train_split
  ref = evaluate.reference_stats(config, _WORKDIR.value, ref_split, exts, mesh)['fd_fmnist']
  ext = exts['fd_fmnist']
  vqgan = inference.load_vqgan(config.stage1_workdir, mesh=mesh)
  n_classes, per, draws = int(config.cond.n_classes), _PER_CLASS.value, _DRAWS.value
  for split in _SPLITS.value:
    images, labels = _split_images(config, split, (per * draws, n_classes))
    recon = np.clip(vqgan.reconstruct(images), -1.0, 1.0)
    real = images.astype(np.float32) / 127.5 - 1.0
    for draw in range(draws):
      idx = np.concatenate(
        [np.flatnonzero(labels == c)[draw * per : (draw + 1) * per] for c in range(n_classes)]
      )
      for source, x in (('real', real), ('reconstructed', recon)):
        row = {
          'name': 'code_floor',
          'source': source,
          'split': split,
          'draw': draw,
          'num_images': len(idx),
          **_scores(ext, ref, x[idx], labels[idx]),
          'reference': ref_split,
          'workdir': os.path.abspath(_WORKDIR.value),
          'stage1_workdir': os.path.abspath(config.stage1_workdir),
          'stage1_step': vqgan.step,
          'stage2_step': step,
        }
        machine.write_row(_OUT.value, row)


if __name__ == '__main__':
  app.run(main)
