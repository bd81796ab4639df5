"""Checkpoints: the only module that imports orbax.

One checkpoint is one step directory of three items, committed atomically by orbax's
`CheckpointManager` (whose policies decide the cadence and the retention), so a crash mid-save
leaves the previous step intact:

  <workdir>/checkpoints/<step>/state/    the training-state pytree (OCDBT arrays)
  <workdir>/checkpoints/<step>/data/     the data-iterator state of every process (JSON)
  <workdir>/checkpoints/<step>/config/   the run's config (JSON, see `run_config`)

Restores go into an abstract target carrying the *target* shardings, so a checkpoint written on
one mesh restores onto any other mesh or process count.

What this adds to orbax: the config identity check (`run_config.check_compatible`), a shape
check that names the leaves (`_check_target`), the non-finite guard (a NaN/Inf state is never
saved, so retention never rotates a good step out for a bad one), the fallback past a damaged
step (restoring "the latest" takes the newest step that reads whole; a resuming writer moves
the others to `checkpoints/corrupt/`), and one-sentence errors for failed reads and writes.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
import contextlib
import logging
import os
import shutil
from typing import Any

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

from vqgan_jax import iterator_state
from vqgan_jax import orbax_workarounds
from vqgan_jax import run_config
from vqgan_jax.run_config import IncompatibleCheckpointError  # noqa: F401  `restore` raises it.

PyTree = Any
_log = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = 'checkpoints'
# Steps a resuming writer found unreadable (orbax lists only numeric names, so it ignores it).
CORRUPT_SUBDIR = 'corrupt'
_FIELDS = run_config.COMPATIBILITY_FIELDS  # What `restore` and `resume` check by default.


class CheckpointError(RuntimeError):
  """A checkpoint is missing, corrupt, or cannot be read into the target."""


class CorruptCheckpointError(CheckpointError):
  """A committed step's files cannot be read (truncated, deleted, garbled). Restoring the
  latest step skips such steps; restoring a named step raises it."""


class NonFiniteStateError(CheckpointError, FloatingPointError):
  """A training state holding NaN or Inf was due to be saved; nothing was written."""


def checkpoint_dir(workdir: str | os.PathLike[str]) -> str:
  """Where a workdir's checkpoints live (absolute: orbax's OCDBT writer rejects relative
  paths, and only when the first async save commits)."""
  return os.path.join(os.path.abspath(os.fspath(workdir)), CHECKPOINT_SUBDIR)


# Abstract targets.


def _to_abstract(x, sharding=None) -> jax.ShapeDtypeStruct:
  sharding = sharding or getattr(x, 'sharding', None)
  if not isinstance(x, (jax.Array, jax.ShapeDtypeStruct)):
    x = np.asarray(x)  # numpy arrays and Python scalars.
  if not isinstance(sharding, jax.sharding.Sharding):
    # What jnp.asarray gives in one process; replicated when several must each hold a part.
    if jax.process_count() == 1:
      sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    else:
      mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ('_replica',))
      sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def abstract_like(tree: PyTree, shardings: PyTree = None) -> PyTree:
  """`tree` (arrays, `ShapeDtypeStruct`s, numpy arrays or scalars) as `ShapeDtypeStruct`s with
  target shardings: `shardings` is one `Sharding`, a pytree (or prefix) of them, or None: each
  leaf's own, else one device (one process) or full replication (several processes)."""
  if shardings is None or isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda x: _to_abstract(x, shardings), tree)
  return jax.tree.map(
    lambda s, sub: jax.tree.map(lambda x: _to_abstract(x, s), sub),
    shardings,
    tree,
    is_leaf=lambda x: x is None or isinstance(x, jax.sharding.Sharding),
  )


# Matching a target against what a checkpoint holds.


def _leaves_by_path(tree) -> dict[str, Any]:
  # Namedtuples (optax states) are saved as dicts of their fields and tuples as lists, so
  # paths are compared as plain '/'-joined names.
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return {jax.tree_util.keystr(p, simple=True, separator='/'): x for p, x in leaves}


def _check_target(saved_tree, target, where: str, partial: bool) -> None:
  """One clear error for leaves missing on either side or differing in shape (orbax 0.12.8
  silently hands back the abstract leaf for a target leaf a partial restore does not find)."""
  saved, wanted = _leaves_by_path(saved_tree), _leaves_by_path(target)
  problems = []
  missing = [p for p in wanted if p not in saved]
  if missing:
    more = f' (+{len(missing) - 20} more)' if len(missing) > 20 else ''
    problems.append('missing in the checkpoint: ' + ', '.join(missing[:20]) + more)
  extra = [] if partial else [p for p in saved if p not in wanted]
  if extra:
    problems.append('in the checkpoint but not in the target: ' + ', '.join(extra[:20]))
  for p, leaf in wanted.items():
    shape = getattr(saved.get(p), 'shape', None)
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      continue  # Keys are saved as their raw key data.
    if shape is not None and tuple(shape) != tuple(leaf.shape):
      problems.append(f'{p}: checkpoint shape {tuple(shape)}, target shape {tuple(leaf.shape)}')
  if problems:
    raise CheckpointError(
      f'Checkpoint {where} does not match the restore target: ' + '; '.join(problems) + '.'
    )


# Failed reads and writes, unreadable steps, non-finite states.


def _brief(e: BaseException, reason_only: bool = False) -> str:
  """One line for an orbax or TensorStore error: TensorStore's own error is the innermost
  cause and names the file; the wrappers append the whole JSON spec. `reason_only`: just what
  follows the last file it names (e.g. "File too large")."""
  while e.__cause__ is not None:
    e = e.__cause__
  text = str(e).strip().split('\n', 1)[0]
  for tail in (' [tensorstore_spec=', ' See full TensorStore details'):
    text = text.split(tail, 1)[0]
  if reason_only:
    text = text.rsplit('": ', 1)[-1]
  return f'{type(e).__name__}: {text[:297] + "..." if len(text) > 300 else text}'


def _array_read_error(message: str, path: str) -> CheckpointError:
  """The error for a restore that failed inside orbax. In a multi-process run each process
  reads only its shards, so processes could disagree on a damaged step: there it is an error
  naming the way out, not a fallback."""
  if jax.process_count() == 1:
    return CorruptCheckpointError(message)
  return CheckpointError(
    f'{message.rstrip(".")}. A multi-process run does not skip an unreadable step (its '
    f'processes could disagree on it): move {path} out of {os.path.dirname(path)} to '
    'resume from the step before it.'
  )


def _restore(manager, step: int, path: str, what: str, **items):
  try:
    return manager.restore(step, args=ocp.args.Composite(**items))
  except Exception as e:  # pylint: disable=broad-except  TensorStore raises bare Exception.
    message = f'Could not restore {what} from checkpoint {path}: {_brief(e)}'
  orbax_workarounds.drop_orbax_aftermath()  # The reads orbax left pending.
  # Not chained (orbax's error holds the abandoned reads); the JSON items read the same on
  # every process.
  raise _array_read_error(message, path) if 'state' in items else CorruptCheckpointError(message)


def _read_tree_metadata(manager, step: int, path: str):
  try:
    metadata = manager.item_metadata(step)['state']
  except Exception as e:  # pylint: disable=broad-except
    message = f'Could not read the array metadata of checkpoint {path}: {_brief(e)}'
  else:
    if getattr(metadata, 'tree', None) is None:
      raise CorruptCheckpointError(
        f'Checkpoint {path} has no array metadata (state/_METADATA is missing).'
      )
    return metadata.tree
  orbax_workarounds.drop_orbax_aftermath()
  raise CorruptCheckpointError(message)


def _read_newest(steps, step, read, directory, done=None, empty=None):
  """`(step, read(step), skipped)` for `step`, or by default for the newest of `steps` that
  `read` gets whole; `skipped`: `(step, reason)` for the newer ones it could not, logged in one
  line unless `done` is None. Only `CorruptCheckpointError` moves on: a config or target
  mismatch would recur on every step. Every process reads the same metadata and JSON, so they
  skip a step together (see `_array_read_error` for the arrays)."""
  if not steps and (step is None or empty):
    raise CheckpointError(empty or f'No checkpoint in {directory}.')
  if step is not None:
    if step not in steps:
      raise CheckpointError(
        f'No checkpoint for step {step} in {directory}; committed steps: {steps or "none"}.'
      )
    return step, read(step), []
  skipped = []
  for step in sorted(steps, reverse=True):
    try:
      out = read(step)
    except CorruptCheckpointError as e:
      skipped.append((step, str(e)))
      continue
    if skipped and done:
      _log.warning(_skipped_line(skipped, step, done))
    return step, out, skipped
  reasons = '; '.join(f'step {s}: {r}' for s, r in skipped)
  raise CheckpointError(f'No checkpoint in {directory} can be read: {reasons}.')


def _skipped_line(skipped, step: int, done: str, moved: Sequence[str] = ()) -> str:
  """The one line a fallback logs: which steps, where they went, which step instead, why."""
  steps = ', '.join(str(s) for s, _ in skipped)
  where = f' (moved to {", ".join(moved)})' if moved else ''
  return (
    f'Skipped unreadable checkpoint step{"s" if len(skipped) > 1 else ""} {steps}{where}, '
    f'{done} step {step} instead: ' + '; '.join(r for _, r in skipped)
  )


def _nonfinite_leaves(state: PyTree) -> list[str]:
  """Paths of the floating leaves of `state` holding NaN or Inf (a collective when the
  leaves span several processes); only a bool per leaf leaves the devices."""
  flags = {
    p: jnp.all(jnp.isfinite(x))
    for p, x in _leaves_by_path(state).items()
    if jnp.issubdtype(jnp.result_type(x), jnp.inexact)  # Not integers, bools or PRNG keys.
  }
  return [p for p, finite in jax.device_get(flags).items() if not finite]


# The manager.


def _manager(directory, read_only, max_to_keep=None, save_every=1, async_save=True, handler=None):
  # Readers stay out of orbax's read_only mode, which warns on every open: they never create,
  # clean up (a writer may be mid-save) or save (`Checkpointer.save` refuses), so write nothing.
  options = ocp.CheckpointManagerOptions(
    create=not read_only,
    save_interval_steps=0,  # Unused (the policy below decides); anything else warns readers.
    # Multiples of `save_every`, and a step a preemption notice (multi-host) reaches.
    save_decision_policy=ocm.AnySavePolicy(
      [ocm.FixedIntervalPolicy(save_every), ocm.PreemptionCheckpointingPolicy()]
    ),
    preservation_policy=ocm.LatestN(None if read_only else max_to_keep),  # None: keep all.
    enable_async_checkpointing=async_save and not read_only,
    cleanup_tmp_directories=not read_only,  # Temporaries of saves a crash interrupted.
  )
  handlers = {
    'state': handler or ocp.StandardCheckpointHandler(),
    'data': ocp.JsonCheckpointHandler(),
    'config': ocp.JsonCheckpointHandler(),
  }
  return ocp.CheckpointManager(
    directory, options=options, item_names=tuple(handlers), item_handlers=handlers
  )


def _require_dir(directory: str, what: str) -> None:
  if not os.path.isdir(directory):
    raise CheckpointError(f'{what}: no checkpoint directory {directory}.')


class Checkpointer:
  """Periodic, asynchronous, atomic checkpoints of a training run.

  Every process calls every method (saves and restores are collective). A trainer asks
  `should_save` each step to run its own checks (the loss) on exactly the saving steps, then
  calls `save(step, state, it.get_state, config, force=last)`. `close()` (or leaving the
  `with`) commits the pending save; it may be called again, and from `finally`. One still open
  when the interpreter exits is closed then."""

  def __init__(
    self,
    workdir: str | os.PathLike[str],
    *,
    max_to_keep: int | None = 3,
    save_every: int = 1000,
    async_save: bool = True,
    read_only: bool = False,
  ):
    if save_every < 1:
      raise ValueError(f'save_every must be >= 1, got {save_every}.')
    self.workdir = os.fspath(workdir)
    self.directory = checkpoint_dir(self.workdir)
    self.save_every = save_every
    self.read_only = read_only
    # The step the latest `restore`/`resume` read (older than `latest_step()` when newer steps
    # were unreadable); None before any.
    self.restored_step: int | None = None
    if read_only:
      _require_dir(self.directory, f'Checkpointer({self.workdir!r})')
    self._manager = _manager(self.directory, read_only, max_to_keep, save_every, async_save)
    self._closed, self._failed = False, False
    self._pending: int | None = None  # The step of the save in flight.
    if not read_only:
      orbax_workarounds.writer_opened(self)

  # Saving.

  def should_save(self, step: int, force: bool = False) -> bool:
    """Whether `save(step, ..., force)` would write (a collective; all must call). Cheap: a
    trainer asks every step, to run its own checks (the loss) on exactly the saving steps."""
    if self.read_only or step in self._manager.all_steps():
      return False  # E.g. the last step after a resume, saved already.
    return force or self._manager.should_save(step)  # orbax's save_decision_policy.

  def save(self, step: int, state: PyTree, data_state, config, force: bool = False) -> bool:
    """Starts saving `step` if due (or `force`); returns whether it did. Non-blocking: it returns
    once the arrays are off the devices (`state` may be donated), and the files become visible
    when complete. `data_state`: the iterator's state (bytes, str, JSON-able, None) or a
    callable giving it, called only when saving. Raises `NonFiniteStateError` (nothing written)
    when a floating leaf holds NaN or Inf, checked only on saving steps."""
    step = int(step)
    if not self.should_save(step, force):
      return False
    bad = _nonfinite_leaves(state)
    if bad:
      last, more = self.latest_step(), f' (+{len(bad) - 5} more)' if len(bad) > 5 else ''
      kept = f'the last good checkpoint, step {last}, stays'
      kept = 'no earlier checkpoint is' if last is None else kept
      raise NonFiniteStateError(
        f'Step {step}: the training state holds NaN or Inf in {", ".join(bad[:5])}{more}, so '
        f'it was not saved; {kept} in {self.directory}.'
      )
    # In a multi-process run, a leaf living on one process's devices has no global layout.
    local = [p for p, x in _leaves_by_path(state).items() if getattr(x, 'is_fully_addressable', 0)]
    if local and jax.process_count() > 1:
      raise ValueError(
        'Checkpointer.save: in a multi-process run every state leaf must be a global '
        'jax.Array (on the mesh, e.g. from jit out_shardings); these live on one process '
        'only: ' + ', '.join(local[:20]) + '.'
      )
    data = iterator_state.gather(data_state)
    self.wait()  # orbax would too; here a failure names the step it belongs to.
    with self._writing(step):
      started = self._manager.save(
        step,
        force=True,  # Decided by `should_save` above.
        args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=ocp.args.JsonSave(data),
          config=ocp.args.JsonSave(run_config.config_to_dict(config)),
        ),
      )
    self._pending = step if started else None
    return started

  def wait(self) -> None:
    """Blocks until the pending save is committed; raises `CheckpointError` if it failed (a
    full disk, a file size limit): see `_writing`."""
    if self._pending is not None:
      with self._writing(self._pending):
        self._manager.wait_until_finished()
      self._pending = None

  @contextlib.contextmanager
  def _writing(self, step: int):
    """A failed save of `step` as one `CheckpointError`, its temporary directory removed."""
    try:
      yield
      return
    except Exception as e:  # pylint: disable=broad-except
      error = CheckpointError(
        f'Could not write checkpoint step {step} to {self.step_path(step)}: '
        f'{_brief(e, reason_only=True)}; the steps committed before it stay.'
      )
    self._pending, self._failed = None, True
    orbax_workarounds.save_failed()
    with contextlib.suppress(OSError):  # orbax's <step>.orbax-checkpoint-tmp[-<n>]
      for name in os.listdir(self.directory) if jax.process_index() == 0 else ():
        if name.startswith(f'{step}.orbax-checkpoint-tmp'):
          shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
    raise error  # Not chained: orbax's error holds its save.

  def close(self) -> None:
    """Commits the pending save and releases orbax's threads; later calls do nothing."""
    if self._closed:
      return
    self._closed = True
    try:
      self.wait()
      if not self._failed:  # orbax's close would raise the failed save again.
        self._manager.close()
    finally:
      orbax_workarounds.writer_closed(self)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  # Reading.

  def all_steps(self) -> list[int]:
    """Steps committed on disk, plus this object's saves (one in flight included: `wait()`
    commits it), ascending. Interrupted saves are never listed."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest of `all_steps()`, or None. Its files are not read: `restore` may find it
    unreadable and take an older step (see `restored_step`)."""
    return self._manager.latest_step()

  def step_path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _read_newest(self, step, read, done):
    self.wait()  # A save of ours in flight is committed before it is read.
    return _read_newest(self.all_steps(), step, read, self.directory, done)

  def restore_config(self, step: int | None = None) -> dict[str, Any]:
    """The config dict stored with a checkpoint (by default the newest step whose config
    reads), upgraded to today's fields (`run_config.upgrade_config`)."""
    return self._read_newest(step, self._read_config, 'read the config of')[1]

  def _read_config(self, step: int) -> dict[str, Any]:
    path = self.step_path(step)
    saved = _restore(self._manager, step, path, 'config', config=ocp.args.JsonRestore())['config']
    return run_config.upgrade_config(saved)

  def restore(
    self, abstract_state: PyTree, step: int | None = None, *, config=None, fields=_FIELDS
  ):
    """Restores a checkpoint onto the target shardings.

    `abstract_state`: the saved structure (optax namedtuples included) as `ShapeDtypeStruct`s
    with `sharding=` (see `abstract_like`) or live arrays. `step`: by default the newest step
    that reads whole; newer unreadable ones are skipped with one logged line (`restored_step`
    says which was read), while a named unreadable step raises `CorruptCheckpointError`.
    `config`: if given, checked with `run_config.check_compatible` over `fields` before any
    array is read (`IncompatibleCheckpointError`). Returns `(state, data_state, saved_config)`;
    `data_state` is this process's, or None when the process count changed (the iterator
    starts afresh)."""
    return self._restore_newest(abstract_state, step, config, fields, 'restored')[1]

  def _restore_newest(self, abstract_state, step, config, fields, done):
    target = abstract_like(abstract_state)

    def read(step):
      path = self.step_path(step)
      saved_config = self._read_config(step)
      if config is not None:
        run_config.check_compatible(saved_config, config, fields, where=path)
      _check_target(_read_tree_metadata(self._manager, step, path), target, path, partial=False)
      args = dict(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore())
      out = _restore(self._manager, step, path, 'state/data', **args)
      return out['state'], iterator_state.local(out['data'], path), saved_config

    step, out, skipped = self._read_newest(step, read, done)
    self.restored_step = step
    return step, out, skipped

  def resume(self, abstract_state: PyTree, iterator, *, config, fields=_FIELDS):
    """A run's restart: `restore`s the newest step that reads whole and moves `iterator`
    (`set_state`) to where it left off; None when there is no checkpoint yet. Newer unreadable
    steps are moved to `checkpoints/corrupt/<step>` (one line says which and why), so the run
    saves those step numbers afresh."""
    if self.latest_step() is None:
      return None
    step, (state, data_state, _), skipped = self._restore_newest(
      abstract_state, None, config, fields, None
    )
    if skipped:
      moved = [] if self.read_only else [self._set_aside(s) for s, _ in skipped]
      _log.warning(_skipped_line(skipped, step, 'resumed from', moved))
    if data_state is not None:
      iterator.set_state(data_state)
    return state

  def _set_aside(self, step: int) -> str:
    """Moves an unreadable step out of orbax's sight; returns where it went."""
    aside = os.path.join(self.directory, CORRUPT_SUBDIR)
    dest, n = os.path.join(aside, str(step)), 0
    while os.path.exists(dest):  # The same step number went bad before.
      n += 1
      dest = os.path.join(aside, f'{step}.{n}')
    dest = iterator_state.all_processes(dest)[0]  # Process 0's, looked up before it renames.
    if jax.process_index() == 0:
      os.makedirs(aside, exist_ok=True)
      os.rename(self.step_path(step), dest)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'vqgan_jax_set_aside_{step}')
    self._manager.reload()
    return dest


def restore_params(
  workdir: str | os.PathLike[str],
  abstract_params: PyTree,
  key: str | Sequence[str] = 'params',
  step: int | None = None,
) -> PyTree:
  """Restores one subtree (`key`: `'params'`, or nested keys as a sequence or a '/'-joined
  string) of another run's checkpoint, reading only its arrays, onto the shardings of
  `abstract_params` (see `abstract_like`). `step`: by default the newest step whose subtree
  reads whole, skipping unreadable newer ones with one logged line."""
  directory = checkpoint_dir(workdir)
  _require_dir(directory, f'restore_params(workdir={os.fspath(workdir)!r})')
  # orbax's PyTree handler: the Standard one has no partial restore.
  manager = _manager(directory, True, handler=ocp.PyTreeCheckpointHandler())
  keys = key.split('/') if isinstance(key, str) else list(key)
  item = abstract_like(abstract_params)
  for k in reversed(keys):
    item = {k: item}

  def read(step):
    path = os.path.join(directory, str(step))
    node = saved = _read_tree_metadata(manager, step, path)
    for i, k in enumerate(keys):
      if not isinstance(node, Mapping) or k not in node:
        have = ', '.join(map(str, node)) if isinstance(node, Mapping) else '-'
        raise CheckpointError(
          f'Checkpoint {path} has no {"/".join(keys[: i + 1])!r} in its '
          f'state; {"/".join(keys[:i]) or "the top level"} holds: {have}.'
        )
      node = node[k]
    _check_target(saved, item, path, partial=True)
    args = ocp.args.PyTreeRestore(
      item=item,
      restore_args=ocp.checkpoint_utils.construct_restore_args(item),
      partial_restore=True,
    )
    tree = _restore(manager, step, path, repr('/'.join(keys)), state=args)['state']
    for k in keys:
      tree = tree[k]
    return tree

  try:
    empty = f'restore_params: no committed checkpoint in {directory} (workdir {workdir}).'
    done = f'restored {"/".join(keys)!r} from'
    return _read_newest(sorted(manager.all_steps()), step, read, directory, done, empty)[1]
  finally:
    manager.close()
