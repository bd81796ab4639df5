"""Entry point.

  python -m vqgan_jax.main --config=configs/fashion_mnist_vqgan.py --workdir=/tmp/fm \
      [--config.train.num_steps=2000 ...]

Rerunning the same command in the same workdir resumes from the latest checkpoint.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

# configs/*.py import `configs.common`: make the repo root importable wherever we run from.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_REPO_ROOT, 'configs')) and _REPO_ROOT not in sys.path:
  sys.path.insert(0, _REPO_ROOT)

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file (file.py[:arg]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and images.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train'], 'What to run.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # Imported here so `--help` and flag errors do not pay for importing jax.
  from vqgan_jax import validate  # pylint: disable=g-import-not-at-top
  from vqgan_jax.checkpoints import IncompatibleCheckpointError  # pylint: disable=g-import-not-at-top
  from vqgan_jax.data.builders import DataError  # pylint: disable=g-import-not-at-top
  from vqgan_jax.train import loop  # pylint: disable=g-import-not-at-top

  if not flags.FLAGS['verbosity'].present:
    # orbax and TFDS log every file operation at INFO; the progress bar says what matters.
    logging.set_verbosity(logging.WARNING)
  config, workdir = _CONFIG.value, _WORKDIR.value
  try:
    if _MODE.value == 'train':
      result = loop.train_and_evaluate(config, workdir)
      if result:
        logging.info('Final eval: %s', result)
        print('final eval: ' + ', '.join(f'{k}={v:.4f}' for k, v in result.items()))
      print(f'workdir: {os.path.abspath(workdir)}')
  except (validate.ConfigError, DataError, IncompatibleCheckpointError) as e:
    # One clear sentence, no traceback from deep inside the stack.
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
