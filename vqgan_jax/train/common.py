"""What both trainers share: the workdir, the log/eval/checkpoint schedule, the writer, the
step loop with its finite-loss guard and progress bar, and state set-up born sharded.

The two trainers differ only in their models, steps, data and evals; everything about how a
run advances, reports and stops lives here, so the stages cannot drift apart.
"""

import json
import math
import os
import time
from typing import Any
from typing import Callable

from absl import logging
import jax
import tqdm

from vqgan_jax import checkpoints
from vqgan_jax import metrics as metrics_lib
from vqgan_jax import run_config


class RunError(RuntimeError):
  """A run cannot go on (an unwritable workdir, a diverged loss): one sentence, no traceback."""


def peak_learning_rate(config) -> float:
  """taming's main.py: lr = accumulate x n_gpus x per-GPU batch x base_lr = global batch x
  base_lr when `config.optim.scale_lr`, else base_lr itself (both stages)."""
  if config.optim.scale_lr:
    return config.optim.base_lr * config.train.batch_size
  return config.optim.base_lr


def itstime(step: int, every: int, total: int) -> bool:
  """Whether a periodic action (log, eval) is due after `step`: every `every` steps and at the
  last one (big_vision's `itstime`)."""
  return step % every == 0 or step == total


def prepare_workdir(workdir: str) -> str:
  """Creates `workdir` and checks that this process can write there, before anything is
  computed; returns its absolute path."""
  workdir = os.path.abspath(workdir)
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f'.write_test_{jax.process_index()}')
    with open(probe, 'w'):
      pass
    os.remove(probe)
  except OSError as e:
    raise RunError(
      f'--workdir {workdir} is not writable ({e.strerror or e}); pick another directory'
    ) from None
  return workdir


def check_init_from(path: str, stage: str, config=None, fields=()) -> None:
  """`config.init_from`, checked before anything is computed or written: a workdir of the
  same stage ('vqgan' or 'transformer') with a checkpoint, whose saved config agrees with
  `config` in `fields` (dotted names, e.g. the quantizer's: params of another quantizer
  cannot start this run, and the saved configs say so in field names, not array shapes)."""
  if not path:
    return
  field = f'config.init_from={path!r}'
  if not os.path.isdir(checkpoints.checkpoint_dir(path)):
    raise checkpoints.CheckpointError(
      f'{field} has no checkpoints/ folder: point it at a {stage} workdir (a training run or '
      'the output of `python -m vqgan_jax.convert`)'
    )
  try:
    with checkpoints.Checkpointer(path, read_only=True, max_to_keep=None) as ckpt:
      saved_config = ckpt.restore_config()
  except checkpoints.CheckpointError as e:
    raise checkpoints.CheckpointError(f'{field}: {e}') from None
  saved = saved_config.get('stage', 'vqgan')
  if saved != stage:
    raise checkpoints.CheckpointError(
      f'{field} is a {saved!r} run; this {stage} run starts from a {stage} workdir'
    )
  differences = run_config.config_differences(saved_config, config, fields) if fields else []
  if differences:
    raise run_config.IncompatibleCheckpointError(
      f'{field} cannot start this run: '
      + '; '.join('config.' + d.replace(': checkpoint ', ': init_from run ') for d in differences)
      + '. Set these as the init_from run has them, or train from scratch'
    )


def _json_value(v):
  """A metric as strict JSON: non-finite floats become null (json.dumps would write NaN)."""
  v = float(v)
  return v if math.isfinite(v) else None


class Writer:
  """TensorBoard scalars/images and `metrics.jsonl`, written by process 0 only.

  `metrics.jsonl` holds one strict-JSON row per (step, split). A resumed run replays the
  steps after its checkpoint: `start_step` drops the rows the replay will write again, so the
  file never holds two rows for one step and split.
  """

  def __init__(self, workdir: str, start_step: int = 0):
    self.active = jax.process_index() == 0
    self.workdir = workdir
    self._tb = self._jsonl = None
    if not self.active:
      return
    path = os.path.join(workdir, 'metrics.jsonl')
    try:
      _truncate_rows(path, start_step)
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))
      self._jsonl = open(path, 'a')
    except OSError as e:
      self.close()
      raise RunError(
        f'cannot write the logs in {workdir} ({e}); pick a writable --workdir'
      ) from None

  def scalars(self, step: int, values, prefix: str) -> None:
    if not self.active:
      return
    for k, v in values.items():
      self._tb.add_scalar(f'{prefix}/{k}', v, step)
    row = {'step': int(step), 'split': prefix, **{k: _json_value(v) for k, v in values.items()}}
    self._jsonl.write(json.dumps(row, allow_nan=False) + '\n')
    self._jsonl.flush()

  def image(self, step: int, name: str, grid) -> None:
    if self.active:
      self._tb.add_image(name, grid, step, dataformats='HWC')

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None


def _truncate_rows(path: str, start_step: int) -> None:
  """Rewrites `path` (atomically) without rows after `start_step`, and with any older NaN
  literals as null, so that the file stays valid JSON lines."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  kept = []
  for line in lines:
    try:
      row = json.loads(line)  # Reads NaN literals too.
    except ValueError:
      continue  # A line cut short by a kill.
    if int(row.get('step', 0)) > start_step:
      continue
    row = {k: _json_value(v) if isinstance(v, float) else v for k, v in row.items()}
    kept.append(json.dumps(row, allow_nan=False) + '\n')
  if kept != lines:
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
      f.writelines(kept)
    os.replace(tmp, path)


def progress_bar(total: int, start: int, desc: str):
  return tqdm.tqdm(
    total=total, initial=start, disable=jax.process_index() != 0, dynamic_ncols=True, desc=desc
  )


def say(bar, line: str) -> None:
  """A line above the progress bar, from process 0 (tqdm.write ignores `disable`)."""
  if jax.process_index() == 0:
    bar.write(line)


def setup_initial_state(init_fn: Callable, rng, shardings_fn: Callable):
  """(abstract state, shardings, born-sharded initialiser) of `init_fn(rng)`.

  The state is traced once (`jax.eval_shape`) to derive its shardings; the initialiser then
  runs `init_fn` under jit with those out_shardings, so no array is ever whole on one device
  (flax lm1b's `setup_initial_state`). It is only called when there is nothing to resume.
  """
  abstract = jax.eval_shape(init_fn, rng)
  shardings = shardings_fn(abstract)
  return abstract, shardings, lambda: jax.jit(init_fn, out_shardings=shardings)(rng)


def restore_or_init(ckpt, abstract, shardings, init, data_iter, config, fields=None):
  """The state to train from: the latest checkpoint (and the data iterator's position) when
  there is one, else `init()`; and the step it is at."""
  state = ckpt.resume(
    checkpoints.abstract_like(abstract, shardings),
    data_iter,
    config=config,
    **({} if fields is None else {'fields': fields}),
  )
  if state is not None:
    logging.info('Resumed from %s at step %d', ckpt.workdir, int(state['step']))
    return state, True
  return init(), False


def train_loop(
  state,
  run: tuple,
  *,
  step_fn: Callable,
  next_batch: Callable,
  evaluate: Callable[[Any, int], dict],
  loss_key: str,
  rate: tuple[str, float],
  postfix: Callable[[dict], dict],
  desc: str,
):
  """Runs steps start+1 .. total (from `state`'s step to config.train.num_steps); returns
  (state, the last eval's result). A run that had already finished evaluates its final state
  again. `run`: (config, the Checkpointer, the train iterator, the `Writer`).

  Every `log_every` steps the metrics are written and shown; every `eval_every` steps (and at
  the end) `evaluate(state, step)` runs; checkpoints follow `ckpt`'s schedule. The loss is
  checked on every step that logs or saves, *before* saving: a non-finite loss stops the run
  with one sentence naming the step and the last good checkpoint, and no bad state is ever
  written. `rate` = (name, units per step) of the throughput shown (images/s, tokens/s).
  """
  config, ckpt, train_it, writer = run
  train_config, data_state = config.train, train_it.get_state
  start, total = int(jax.device_get(state['step'])), config.train.num_steps
  rate_name, per_step = rate
  result = {}
  bar = progress_bar(total, start, desc)
  t0, steps_since = time.perf_counter(), 0
  pending = None
  try:
    for step in range(start + 1, total + 1):
      state, metrics = step_fn(state, next_batch())
      # Wait for the previous step only: the host prepares the next batch while this one runs,
      # and the bar counts finished steps, not dispatched ones.
      if pending is not None:
        jax.block_until_ready(pending)
        bar.update(1)
      pending = metrics[loss_key]
      steps_since += 1
      final = step == total
      logs = itstime(step, train_config.log_every, total)
      if logs or ckpt.should_save(step, final):
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if logs:
          host[rate_name] = steps_since * per_step / max(time.perf_counter() - t0, 1e-9)
          t0, steps_since = time.perf_counter(), 0
          writer.scalars(step, host, 'train')
          bar.set_postfix(postfix(host))
        if not math.isfinite(host[loss_key]):
          _diverged(ckpt, step, loss_key, host[loss_key])
      if itstime(step, train_config.eval_every, total):
        result = evaluate(state, step)
        say(bar, f'eval step {step}: {metrics_lib.format_metrics(result)}')
        t0, steps_since = time.perf_counter(), 0
      ckpt.save(step, state, data_state, config, force=final)
    if pending is not None:
      jax.block_until_ready(pending)
      bar.update(1)
  finally:
    bar.close()
  if start >= total:
    result = evaluate(state, start)
  return state, result


def _diverged(ckpt, step: int, loss_key: str, value: float):
  ckpt.wait()
  last = ckpt.latest_step()
  kept = (
    f'the last good checkpoint, step {last}, is kept in {ckpt.directory} (a rerun resumes from it)'
    if last is not None
    else 'no checkpoint had been written yet'
  )
  raise RunError(
    f'{loss_key} is {value} at step {step}: training diverged and stopped without '
    f'saving; {kept}. Lower config.optim.base_lr or check the data.'
  )
