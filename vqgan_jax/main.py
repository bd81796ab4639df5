"""Entry point.

  python -m vqgan_jax.main --config=configs/fashion_mnist_vqgan.py --workdir=/tmp/fm \
      [--config.train.num_steps=2000 ...]

Rerunning the same command in the same workdir resumes from the latest checkpoint. One run
(any mode) at a time holds a workdir: a second is refused, naming the first.

Modes (`--mode`):
  train   config.stage 'vqgan': the stage-1 loop; 'transformer': the stage-2 loop.
  encode  (stage 2) encodes data.train_split and data.eval_split with the stage-1 VQGAN of
          config.stage1_workdir into a codes dataset under <workdir>/codes (or
          config.data.codes_dir), which stage-2 training reads.
  sample  (stage 2) samples with the workdir's latest GPT (config.sample.*), decodes with the
          stage-1 decoder, writes samples_<step>.png (one row per class) and .npz of tokens.
  eval    (stage 1) reconstructs data.eval_split or config.eval.folder: PSNR, SSIM, LPIPS, L1,
          codebook usage, perplexity, rFID (config.eval.inception_weights) and fd_<name>
          (config.eval.classifier_workdir); (stage 2) draws config.eval.num_samples samples:
          gFID, IS, fd_<name>, class accuracy. Writes <workdir>/eval_<step>.json.

A config with stage='classifier' (configs/fashion_mnist_classifier.py) trains the classifier
whose features give the offline fd_<name>.

Several hosts (a TPU pod, a GPU cluster): run the same command on every host. JAX's
distributed runtime (`jax.distributed.initialize`) starts before anything else touches JAX:
  --distributed=auto (default)  when --coordinator_address/--num_processes/--process_id, or
                                $JAX_COORDINATOR_ADDRESS, are given, or a multi-process
                                Slurm step (srun, SLURM_NTASKS > 1) or Open MPI job
                                (mpirun, OMPI_COMM_WORLD_SIZE > 1) is detected; missing
                                values are filled in by JAX's cluster auto-detection.
  --distributed=on              always (e.g. a Cloud TPU pod slice: JAX reads the topology from
                                the TPU metadata; or any cluster JAX auto-detects).
  --distributed=off             never: one process.
Every process then loads its slice of each global batch; process 0 alone writes logs,
TensorBoard, metrics.jsonl and images; checkpoints are written by all processes together, so
--workdir (and a stage-2 codes_dir) must be one shared filesystem path.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from vqgan_jax import distributed  # imports no JAX
from vqgan_jax import run_config  # plain Python: the renamed fields

_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'Experiment config file (file.py[:arg]).', lock_config=True
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and images.')
_MODE = flags.DEFINE_enum(
  'mode',
  'train',
  ['train', 'encode', 'sample', 'eval'],
  'What to run (encode and sample: stage-2 configs; eval: stage 1 or 2).',
)
_DISTRIBUTED = flags.DEFINE_enum(
  'distributed',
  'auto',
  ['auto', 'on', 'off'],
  'Call jax.distributed.initialize (several hosts): auto = when a coordinator flag or '
  '$JAX_COORDINATOR_ADDRESS is given or a multi-process Slurm / Open MPI job is detected; '
  'on = always (e.g. TPU pods); off = never.',
)
_COORDINATOR = flags.DEFINE_string(
  'coordinator_address',
  None,
  "host:port of process 0's coordinator service (same on every process).",
)
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, "This process's id in [0, num_processes).")


def _check_stage_and_mode(stage, mode, config_error):
  """One `config_error` for a stage this program lacks or a mode the stage does not have."""
  if stage not in ('vqgan', 'transformer', 'classifier'):
    raise config_error(f"config.stage={stage!r}: use 'vqgan', 'transformer' or 'classifier'")
  if mode in ('encode', 'sample') and stage != 'transformer':
    raise config_error(
      f"--mode={mode} needs a stage-2 config (config.stage='transformer'), got stage={stage!r}"
    )
  if mode == 'eval' and stage == 'classifier':
    raise config_error(
      '--mode=eval evaluates a stage-1 or stage-2 run; a classifier run evaluates itself '
      'at the end of training (rerun --mode=train to print it again)'
    )


def _run_mode(mode, stage, config, workdir, say):
  """Runs `mode` on `workdir` and says its summary lines (process 0)."""
  # Imported here so `--help` and flag errors do not pay for importing jax.
  from vqgan_jax import encode as codes_lib  # pylint: disable=g-import-not-at-top
  from vqgan_jax import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
  from vqgan_jax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  from vqgan_jax import sample as sample_lib  # pylint: disable=g-import-not-at-top
  from vqgan_jax.train import classifier_trainer  # pylint: disable=g-import-not-at-top
  from vqgan_jax.train import transformer_trainer  # pylint: disable=g-import-not-at-top
  from vqgan_jax.train import vqgan_trainer  # pylint: disable=g-import-not-at-top

  if mode == 'train':
    train = {
      'vqgan': vqgan_trainer.train_and_evaluate,
      'transformer': transformer_trainer.train_and_evaluate,
      'classifier': classifier_trainer.train_and_evaluate,
    }[stage]
    result = train(config, workdir)
    if result:
      logging.info('Final eval: %s', result)
      say(f'final eval: {metrics_lib.format_metrics(result)}')
    say(f'workdir: {os.path.abspath(workdir)}')
  elif mode == 'encode':
    path, counts, kept = codes_lib.encode(config, workdir)
    say(
      ('up to date, kept: ' if kept else 'encoded: ')
      + ', '.join(f'{k}={v}' for k, v in counts.items())
    )
    say(f'codes: {path}')
  elif mode == 'eval':
    result, path = evaluate_lib.evaluate(config, workdir)
    say(f'eval: {metrics_lib.format_metrics(result)}')
    say(f'results: {path}')
  elif mode == 'sample':
    out = sample_lib.sample(config, workdir)
    say(
      f'sampled {out["num_samples"]} x {out["grid"][0]}x{out["grid"][1]} tokens '
      f'({out["tokens_per_s"]:.0f} tokens/s incl. compile)'
    )
    say(f'tokens: {out["npz"]}')
    say(f'grid: {out["png"]}')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # Before anything else touches JAX (the config file is plain ml_collections).
  try:
    started = distributed.initialize(
      _DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value
    )
  except (ValueError, RuntimeError) as e:
    print(f'error: jax.distributed: {e}', file=sys.stderr)
    sys.exit(2)
  if started:
    print(started, flush=True)
  import jax  # pylint: disable=g-import-not-at-top

  from vqgan_jax import malloc  # pylint: disable=g-import-not-at-top
  from vqgan_jax import validate  # pylint: disable=g-import-not-at-top
  from vqgan_jax import workdir_lock  # pylint: disable=g-import-not-at-top
  from vqgan_jax.checkpoints import CheckpointError  # pylint: disable=g-import-not-at-top
  from vqgan_jax.checkpoints import IncompatibleCheckpointError  # pylint: disable=g-import-not-at-top
  from vqgan_jax.data.builders import DataError  # pylint: disable=g-import-not-at-top
  from vqgan_jax.train.common import RunError  # pylint: disable=g-import-not-at-top

  if not flags.FLAGS['verbosity'].present:
    # orbax and TFDS log every file operation at INFO; the progress bar says what matters.
    logging.set_verbosity(logging.WARNING)
  if jax.default_backend() == 'cpu' and malloc.name() == 'glibc':
    logging.warning(malloc.HINT)
  config, workdir = _CONFIG.value, os.path.abspath(_WORKDIR.value)
  stage = config.get('stage', 'vqgan')
  # Several processes: the summary lines come from process 0 (like the logs).
  say = print if jax.process_index() == 0 else lambda *a, **k: None
  try:
    _check_stage_and_mode(stage, _MODE.value, validate.ConfigError)
    # Every mode writes into the workdir (checkpoints and logs, codes, samples, eval_*.json):
    # one run at a time, or two would write the same files.
    with workdir_lock.hold(workdir, create=_MODE.value in ('train', 'encode')):
      _run_mode(_MODE.value, stage, config, workdir, say)
  except (
    validate.ConfigError,
    DataError,
    IncompatibleCheckpointError,
    CheckpointError,
    RunError,
    workdir_lock.WorkdirError,
  ) as e:
    # One clear sentence, no traceback from deep inside the stack.
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


def parse_flags(argv):
  """absl's flag parsing, with an unknown `--config.a.b=...` override as one sentence
  (ml_collections raises AttributeError/KeyError from inside the parser)."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    msg = e
    while isinstance(msg, BaseException):  # AttributeError(KeyError("'key'\nDid you mean...")).
      msg = msg.args[0] if msg.args else ''
    key, *hint = str(msg).splitlines()
    key = key.strip('\'"')
    given = [a.split('=')[0] for a in argv[1:] if a.startswith('--config.')]
    named = [a for a in given if key in a[len('--config.') :].split('.')] or given
    renamed = [
      f'{old} is now {new}'
      for old, new in run_config.RENAMED_FIELDS.items()
      if any(a.endswith('.' + old) or a == '--config.' + old for a in named)
    ]
    hint = renamed or hint
    print(
      f'error: {", ".join(named) or "--config"}: the config has no field {key!r}'
      + (f'. {" ".join(hint)}' if hint else ''),
      file=sys.stderr,
    )
    sys.exit(2)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main, flags_parser=parse_flags)
