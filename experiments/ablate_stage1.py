"""Stage-1 ablation on Fashion-MNIST (issue 13): what each quantizer and each loss term buys at
the demo's budget (configs/fashion_mnist_vqgan.py: 600 steps, batch 32, the whole 10k test
split held out).

  python experiments/ablate_stage1.py --root=/tmp/ablate [--variants=vq,fsq,lfq]
      [--seeds=0,1] [--steps=600] [--base=fsq] [--config=configs/fashion_mnist_vqgan.py]

Each run trains in its own workdir, <root>/<variant>_seed<seed>_steps<steps> (rerunning the
same command resumes or, when finished, only re-evaluates it), then prints one JSON row and
appends it to --out: variant, seed, steps, wall_s (training + the final eval, compiles
included; null for a workdir that was finished before), and the final held-out eval: psnr,
ssim, lpips, l1, codebook_usage, perplexity.

A variant is a '+'-joined list of the atoms in VARIANTS, applied in order on top of the demo
config (and of --base, when given): `fsq+no_gan` is FSQ without the GAN. The quantizer atoms
keep the demo's 256 codes and model size; the others toggle one thing each.

  --variants=all     every atom on its own (on --base)
  --config=configs/fashion_mnist_vqgan.py:smoke --steps=4   a smoke run of the plumbing
"""

import os
import time

from absl import app
from absl import flags
from absl import logging
import machine

from vqgan_jax import config_base
from vqgan_jax.train import vqgan_trainer

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Atom -> config overrides ('section.field': value). Quantizers at the demo's 256 codes.
VARIANTS = {
  # The original's quantizer and losses at the demo's size (the demo itself now uses fsq with
  # a fixed GAN weight).
  'vq': {
    'model.quantizer': 'vq',
    'model.fsq_levels': (),
    'model.embed_dim': 32,
    'model.n_embed': 256,
    'loss.adaptive_weight': True,
    'loss.disc_weight': 0.8,
  },
  # taming's GumbelQuantize: logits over the 256 codes, Gumbel-softmax at the config's constant
  # temperature 1.0 (the release's cosine from 0.9 over 1M steps would stay ~0.9 for 600).
  'gumbel': {
    'model.quantizer': 'gumbel',
    'model.fsq_levels': (),
    'model.embed_dim': 32,
    'model.n_embed': 256,
  },
  'vq_l2': {'model.codebook_dim': 8, 'model.codebook_l2_norm': True},  # LlamaGen-style codes
  'vq_ema': {'model.ema_decay': 0.99, 'model.restart_window': 50},  # EMA codebook + restart
  'fsq': {
    'model.quantizer': 'fsq',
    'model.fsq_levels': (4, 4, 4, 4),
    'model.embed_dim': 4,
    'model.n_embed': 256,
  },
  'lfq': {
    'model.quantizer': 'lfq',
    'model.lfq_bits': 8,
    'model.embed_dim': 8,
    'model.n_embed': 256,
    'loss.entropy_anneal_steps': 200,
  },
  'no_gan': {'loss.disc_factor': 0.0},  # D never trains, the generator never sees it
  'no_lpips': {'loss.perceptual_weight': 0.0},
  'lecam': {'loss.lecam_weight': 0.05},
  'fixed_gan_weight': {'loss.adaptive_weight': False, 'loss.disc_weight': 0.1},
  'adaptive_gan_weight': {'loss.adaptive_weight': True, 'loss.disc_weight': 0.8},  # original
  'r1': {'loss.r1_weight': 10.0},
  'params_ema': {'train.params_ema_decay': 0.99},  # ~100-step horizon for a 600-step run
  'f8': {'model.ch_mult': (1, 2, 2, 2), 'model.attn_resolutions': (4,)},  # 4x4 codes
  'bf16': {'train.dtype': 'bfloat16'},
}

_ROOT = flags.DEFINE_string('root', None, "Folder for the runs' workdirs.")
_VARIANTS = flags.DEFINE_list('variants', ['all'], "Variants ('+'-joined atoms) or 'all'.")
_SEEDS = flags.DEFINE_list('seeds', ['0'], 'Seeds (config.seed) of each variant.')
_STEPS = flags.DEFINE_integer('steps', 600, 'Training steps per run (the demo: 600).')
_BASE = flags.DEFINE_string('base', '', "Atoms applied before each variant's, e.g. 'fsq'.")
_CONFIG = flags.DEFINE_string(
  'config', os.path.join(_REPO, 'configs', 'fashion_mnist_vqgan.py'), 'Config file[:arg].'
)
_CLASSIFIER = flags.DEFINE_string(
  'classifier_workdir',
  '',
  'A classifier run (configs/fashion_mnist_classifier.py): the final eval adds fd_fmnist.',
)
_OUT = flags.DEFINE_string(
  'out',
  'ablate_stage1.jsonl',
  'Results file under experiments/results/ (or a path) the rows are appended to, with where '
  'they ran (machine.write_row); empty: print only.',
)

EVAL_KEYS = (
  'psnr',
  'ssim',
  'lpips',
  'l1',
  'codebook_usage',
  'perplexity',
  'fd_fmnist',
  'num_images',
)


def atoms(variant: str) -> list:
  names = [a for a in variant.split('+') if a]
  unknown = [a for a in names if a not in VARIANTS]
  if unknown:
    raise app.UsageError(f'unknown variant atom(s) {unknown}; known: {", ".join(VARIANTS)}')
  return names


def load_config(spec: str):
  path, _, arg = spec.partition(':')
  module = config_base.load_sibling(os.path.abspath(path), os.path.basename(path)[: -len('.py')])
  return module.get_config(arg or None)


def make_config(
  spec: str, variant: str, seed: int, steps: int, base: str = '', classifier_workdir: str = ''
):
  """The demo config (`spec`) with the base's and the variant's overrides, `seed`, and a
  budget of `steps` (one eval, at the end; checkpoints at most every third of the run)."""
  c = load_config(spec)
  # Every row measures the raw weights, as the table's first rows were (before the demo
  # adopted the EMA); the EMA is the 'params_ema' atom.
  c.train.params_ema_decay = 0.0
  for name in atoms(base) + atoms(variant):
    for key, value in VARIANTS[name].items():
      section, field = key.split('.')
      c[section][field] = value
  c.seed = seed
  c.eval.classifier_workdir = classifier_workdir
  c.train.num_steps = steps
  c.train.eval_every = steps
  c.train.log_every = min(c.train.log_every, steps)
  c.train.checkpoint_every = max(1, min(c.train.checkpoint_every, steps // 3 or steps))
  return c


def run_one(spec, variant, seed, steps, base, root, classifier_workdir=''):
  config = make_config(spec, variant, seed, steps, base, classifier_workdir)
  name = '+'.join(atoms(base) + atoms(variant)) or 'vq'
  workdir = os.path.join(root, f'{name}_seed{seed}_steps{steps}')
  commit = machine.info()['commit']  # the code the run imports, not HEAD when it ends
  # A run finished before (or a workdir another script trained, e.g. context_study's VQVAE)
  # is only re-evaluated: its training time is then unknown.
  finished = os.path.isdir(os.path.join(workdir, 'checkpoints', str(steps)))
  t0 = time.perf_counter()
  result = vqgan_trainer.train_and_evaluate(config, workdir)
  row = {
    'variant': name,
    'seed': seed,
    'steps': steps,
    'wall_s': None if finished else round(time.perf_counter() - t0, 1),
    **{k: result[k] for k in EVAL_KEYS if k in result},
    'config': spec.replace(_REPO + os.sep, ''),
    'workdir': workdir,
    'commit': commit,
  }
  return row


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  if not _ROOT.value:
    raise app.UsageError('--root (the folder for the runs) is required')
  variants = list(VARIANTS) if _VARIANTS.value == ['all'] else _VARIANTS.value
  for v in variants:
    atoms(v)  # every name checked before the first run starts
  atoms(_BASE.value)
  seeds = [int(s) for s in _SEEDS.value]
  for variant in variants:
    for seed in seeds:
      row = run_one(
        _CONFIG.value,
        variant,
        seed,
        _STEPS.value,
        _BASE.value,
        _ROOT.value,
        _CLASSIFIER.value,
      )
      row = machine.write_row(_OUT.value, row)
      logging.info('%s seed %d: %s', variant, seed, row)


if __name__ == '__main__':
  app.run(main)
