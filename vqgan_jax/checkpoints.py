"""Checkpoints: the only module that imports orbax.

One checkpoint is one step directory holding three items, written together and
committed atomically by orbax (a temporary directory renamed on local disks, a
commit file on GCS), so a crash mid-save leaves the previous step intact:

  <workdir>/checkpoints/<step>/state/    the training-state pytree (OCDBT arrays)
  <workdir>/checkpoints/<step>/data/     the data-iterator state of every process
  <workdir>/checkpoints/<step>/config/   the run's config, as JSON

Restores go into an abstract target whose leaves carry the *target* shardings,
so a checkpoint written on one mesh restores onto any other mesh or process
count.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any

CHECKPOINT_SUBDIR = 'checkpoints'

# Fields that change the shapes or meaning of saved arrays: a checkpoint whose
# config differs in any of these is refused. A name covers its whole subtree.
COMPATIBILITY_FIELDS = ('model', 'loss.disc_num_layers', 'loss.disc_ndf',
                        'stage')

# Fields added to the configs after checkpoints were already being written, with the value
# that means what a config without the field meant: absent and this value compare equal.
ADDED_FIELD_DEFAULTS = {'model.quantizer': 'vq', 'model.kl_weight': 1e-8,
                        'model.temperature': 1.0}


class CheckpointError(RuntimeError):
  """A checkpoint is missing, corrupt, or cannot be read into the target."""


class IncompatibleCheckpointError(ValueError):
  """A checkpoint was written by a config that differs in a field that matters."""


def checkpoint_dir(workdir: str | os.PathLike[str]) -> str:
  """Where the checkpoints of a run's workdir live (absolute: orbax's OCDBT writer
  rejects relative paths, and only when the first async save commits)."""
  return os.path.join(os.path.abspath(os.fspath(workdir)), CHECKPOINT_SUBDIR)


# --------------------------------------------------------------------------
# Abstract targets.


def _default_sharding() -> jax.sharding.Sharding:
  # What a plain jnp.asarray gives in one process; replicated over all devices
  # when there are several processes, since every process must hold its part.
  if jax.process_count() == 1:
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ('_replica',))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _is_sharding(x) -> bool:
  return x is None or isinstance(x, jax.sharding.Sharding)


def _to_abstract(x, sharding=None) -> jax.ShapeDtypeStruct:
  if sharding is None:
    sharding = getattr(x, 'sharding', None)
  if not isinstance(x, (jax.Array, jax.ShapeDtypeStruct)):
    x = np.asarray(x)  # numpy arrays and Python scalars.
  if sharding is None or not isinstance(sharding, jax.sharding.Sharding):
    sharding = _default_sharding()
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def abstract_like(tree: PyTree, shardings: PyTree = None) -> PyTree:
  """Returns `tree` as `jax.ShapeDtypeStruct`s carrying target shardings.

  Args:
    tree: arrays, `ShapeDtypeStruct`s (e.g. from `jax.eval_shape`), numpy
      arrays or scalars.
    shardings: one `Sharding` for every leaf, a pytree of shardings matching
      `tree` (or a prefix of it), or None: keep each leaf's own sharding, and
      use one device (one process) or full replication (several processes)
      for leaves that have none.
  """
  if shardings is None or isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda x: _to_abstract(x, shardings), tree)
  return jax.tree.map(
      lambda s, sub: jax.tree.map(lambda x: _to_abstract(x, s), sub),
      shardings, tree, is_leaf=_is_sharding)


# --------------------------------------------------------------------------
# JSON items: config and data-iterator state.


def config_to_dict(config) -> dict[str, Any]:
  """A config (ConfigDict or mapping) as plain JSON types (tuples -> lists)."""
  if hasattr(config, 'to_json_best_effort'):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(dict(config), default=repr))


def _encode_data_state(data_state) -> dict[str, Any]:
  # Keep the type the iterator gave (grain's DataLoader gives bytes, dataset
  # iterators give dicts) so `set_state` gets back exactly what it produced.
  if data_state is None:
    return {'type': 'none'}
  if isinstance(data_state, (bytes, bytearray)):
    try:
      return {'type': 'bytes', 'utf8': bytes(data_state).decode('utf-8')}
    except UnicodeDecodeError:
      return {'type': 'bytes',
              'base64': base64.b64encode(bytes(data_state)).decode('ascii')}
  if isinstance(data_state, str):
    return {'type': 'str', 'value': data_state}
  return {'type': 'json', 'value': data_state}


def _decode_data_state(blob: Mapping[str, Any]):
  kind = blob['type']
  if kind == 'none':
    return None
  if kind == 'bytes':
    if 'utf8' in blob:
      return blob['utf8'].encode('utf-8')
    return base64.b64decode(blob['base64'])
  return blob['value']


def _gather_strings(text: str) -> list[str]:
  """Every process's `text`, in process order (a collective: all must call)."""
  if jax.process_count() == 1:
    return [text]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  data = np.frombuffer(text.encode('utf-8'), np.uint8)
  lengths = np.asarray(multihost_utils.process_allgather(
      np.asarray(len(data), np.int32))).reshape(-1)
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:len(data)] = data
  rows = np.asarray(multihost_utils.process_allgather(padded))
  return [bytes(rows[i, :n]).decode('utf-8') for i, n in enumerate(lengths)]


# --------------------------------------------------------------------------
# Config compatibility.


def _flatten(tree, prefix=''):
  if isinstance(tree, Mapping):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f'{prefix}{k}.'))
    return out
  return {prefix[:-1]: tree}  # Lists compare whole.


def _normalize(value):
  # JSON turns tuples into lists; compare like with like.
  return json.loads(json.dumps(value, default=repr))


_ABSENT = object()


def config_differences(saved_config: Mapping[str, Any], config,
                       fields: Sequence[str] = COMPATIBILITY_FIELDS
                       ) -> list[str]:
  """Lines `name: checkpoint X, config Y` for each differing field."""
  saved = _flatten(_normalize(dict(saved_config)))
  current = _flatten(config_to_dict(config))
  lines = []
  for name in sorted(set(saved) | set(current)):
    if not any(name == f or name.startswith(f.rstrip('.*') + '.')
               for f in fields):
      continue
    default = ADDED_FIELD_DEFAULTS.get(name, _ABSENT)
    a, b = saved.get(name, default), current.get(name, default)
    if a != b:
      fmt = lambda v: '<absent>' if v is _ABSENT else repr(v)
      lines.append(f'{name}: checkpoint {fmt(a)}, config {fmt(b)}')
  return lines


def check_compatible(saved_config: Mapping[str, Any], config,
                     fields: Sequence[str] = COMPATIBILITY_FIELDS,
                     where: str = '') -> None:
  """Raises one `IncompatibleCheckpointError` naming every differing field.

  Args:
    saved_config: the config dict stored with a checkpoint.
    config: the run's config (ConfigDict or mapping).
    fields: dotted names that must agree; a name covers its whole subtree
      (`'model'` or `'model.*'`: every `model.` field).
    where: the checkpoint's path, for the message.
  """
  lines = config_differences(saved_config, config, fields)
  if lines:
    at = f' {where}' if where else ''
    raise IncompatibleCheckpointError(
        f'Checkpoint{at} was written with an incompatible config; '
        'differing fields: ' + '; '.join(lines) + '.')


# --------------------------------------------------------------------------
# Matching a target against what a checkpoint holds.


def _key_name(k) -> str:
  for attr in ('key', 'idx', 'name'):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _leaves_by_path(tree) -> dict[str, Any]:
  # Namedtuples (optax states) are saved as dicts of their fields and tuples
  # as lists, so paths are compared as plain '/'-joined names.
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {'/'.join(_key_name(k) for k in path): leaf for path, leaf in leaves}


def _check_target(saved_tree, target, where: str, partial: bool) -> None:
  """One clear error for leaves missing on either side or differing in shape.

  orbax 0.12.8 silently hands back the abstract leaf for a target leaf that a
  partial restore does not find, so this check is what catches a wrong key.
  """
  saved, wanted = _leaves_by_path(saved_tree), _leaves_by_path(target)
  problems = []
  missing = [p for p in wanted if p not in saved]
  if missing:
    problems.append('missing in the checkpoint: ' + ', '.join(missing[:20])
                    + (f' (+{len(missing) - 20} more)' if len(missing) > 20 else ''))
  if not partial:
    extra = [p for p in saved if p not in wanted]
    if extra:
      problems.append('in the checkpoint but not in the target: '
                      + ', '.join(extra[:20]))
  for p, leaf in wanted.items():
    meta = saved.get(p)
    if meta is None or jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      continue  # Keys are saved as their raw key data.
    shape = getattr(meta, 'shape', None)
    if shape is not None and tuple(shape) != tuple(leaf.shape):
      problems.append(f'{p}: checkpoint shape {tuple(shape)}, '
                      f'target shape {tuple(leaf.shape)}')
  if problems:
    raise CheckpointError(f'Checkpoint {where} does not match the restore '
                          'target: ' + '; '.join(problems) + '.')


# --------------------------------------------------------------------------
# The manager.


def _manager(directory: str, *, read_only: bool, max_to_keep=None,
             async_save=True, state_handler=None) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      save_interval_steps=0 if read_only else 1,  # Saves are decided above.
      read_only=read_only,
      create=not read_only,
      enable_async_checkpointing=async_save,
      # A writer removes temporaries of saves that a crash interrupted;
      # readers never do, since a writer may be mid-save.
      cleanup_tmp_directories=not read_only,
  )
  handlers = {'state': state_handler or ocp.StandardCheckpointHandler(),
              'data': ocp.JsonCheckpointHandler(),
              'config': ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(directory, options=options,
                               item_names=tuple(handlers),
                               item_handlers=handlers)


def _require_dir(directory: str, what: str) -> None:
  if not os.path.isdir(directory):
    raise CheckpointError(f'{what}: no checkpoint directory {directory}.')


def _check_global(state: PyTree) -> None:
  # A leaf living on one process's devices has no global layout to write.
  local = [p for p, x in _leaves_by_path(state).items()
           if isinstance(x, jax.Array) and x.is_fully_addressable]
  if local:
    raise ValueError(
        'Checkpointer.save: in a multi-process run every state leaf must be a '
        'global jax.Array (on the mesh, e.g. from jit out_shardings); these '
        'live on one process only: ' + ', '.join(local[:20]) + '.')


class Checkpointer:
  """Periodic, asynchronous, atomic checkpoints of a training run.

  Every process calls every method (the saves and restores are collective);
  orbax lets only the primary process write the JSON items.

    ckpt = Checkpointer(workdir, save_every=config.train.checkpoint_every)
    if ckpt.latest_step() is not None:
      state, data_state, _ = ckpt.restore(abstract_state, config=config)
    for step in ...:
      state = train_step(state, batch)
      ckpt.save(step, state, it.get_state, config)
    ckpt.save(step, state, it.get_state(), config, force=True)
    ckpt.close()
  """

  def __init__(self, workdir: str | os.PathLike[str], *, max_to_keep: int | None = 3,
               save_every: int = 1000, async_save: bool = True,
               read_only: bool = False):
    if save_every < 1:
      raise ValueError(f'save_every must be >= 1, got {save_every}.')
    self.workdir = os.fspath(workdir)
    self.directory = checkpoint_dir(self.workdir)
    self.save_every = save_every
    if read_only:
      _require_dir(self.directory, f'Checkpointer({self.workdir!r})')
    self._manager = _manager(self.directory, read_only=read_only,
                             max_to_keep=max_to_keep, async_save=async_save)

  # Saving.

  def should_save(self, step: int, force: bool = False) -> bool:
    """Whether `save(step, ...)` would write (a collective; all must call)."""
    if step in self._manager.all_steps():
      return False  # Already saved, e.g. the last step after a resume.
    # A preemption notice (multi-host) also triggers a save.
    return (force or step % self.save_every == 0
            or self._manager.reached_preemption(step))

  def save(self, step: int, state: PyTree, data_state, config,
           force: bool = False) -> bool:
    """Starts saving a checkpoint if `step` is due (or `force`); non-blocking.

    Returns once the arrays are copied off the devices, so `state` may be
    donated to the next step right away; the files are written in the
    background and become visible only when complete.

    Args:
      step: the training step (number of updates applied to `state`).
      state: a pytree of jax.Arrays (any sharding; typed PRNG keys included).
      data_state: the data-iterator state (bytes, str, JSON-able, None), or a
        callable returning it, called only when a checkpoint is written.
      config: the run's config (ConfigDict or mapping).
      force: save even if `step` is not a multiple of `save_every`.

    Returns:
      Whether a save was started.
    """
    step = int(step)
    if not self.should_save(step, force):
      return False
    if jax.process_count() > 1:
      _check_global(state)
    if callable(data_state):
      data_state = data_state()
    local = json.dumps(_encode_data_state(data_state))
    per_process = [json.loads(s) for s in _gather_strings(local)]
    data = {'process_count': len(per_process), 'states': per_process}
    return self._manager.save(
        step, force=True,  # The decision is ours (above).
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data),
            config=ocp.args.JsonSave(config_to_dict(config))))

  def wait(self) -> None:
    """Blocks until the pending save is committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for the pending save and releases orbax's threads."""
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  # Reading.

  def all_steps(self) -> list[int]:
    """Steps found committed on disk, plus this object's saves, ascending.

    Interrupted saves are never listed. A save of this object still in flight
    is (orbax tracks it from `save()` on); `wait()` commits it.
    """
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest step of `all_steps()`, or None when there is none."""
    return self._manager.latest_step()

  def step_path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _resolve_step(self, step: int | None) -> int:
    self.wait()  # A save of ours in flight is committed before it is read.
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise CheckpointError(f'No checkpoint in {self.directory}.')
      return steps[-1]
    if step not in steps:
      raise CheckpointError(
          f'No checkpoint for step {step} in {self.directory}; '
          f'committed steps: {steps or "none"}.')
    return step

  def restore_config(self, step: int | None = None) -> dict[str, Any]:
    """The config dict stored with a checkpoint (latest by default)."""
    step = self._resolve_step(step)
    return self._restore(step, config=ocp.args.JsonRestore())['config']

  def restore(self, abstract_state: PyTree, step: int | None = None, *,
              config=None, fields: Sequence[str] = COMPATIBILITY_FIELDS):
    """Restores a checkpoint onto the target shardings.

    Args:
      abstract_state: the target: a pytree of the saved structure (optax
        namedtuples included) whose leaves are `jax.ShapeDtypeStruct`s with
        `sharding=` (see `abstract_like`) or live jax.Arrays.
      step: the step to restore; the latest committed one by default.
      config: if given, the run's config, checked against the saved one
        (`check_compatible` over `fields`) before any array is read.
      fields: see `check_compatible`.

    Returns:
      `(state, data_state, saved_config)`: the state with the target's
      structure and shardings, this process's data-iterator state (None when
      the process count changed: the iterator then starts afresh), and the
      saved config as a dict.
    """
    step = self._resolve_step(step)
    saved_config = self.restore_config(step)
    if config is not None:
      check_compatible(saved_config, config, fields, where=self.step_path(step))
    target = abstract_like(abstract_state)
    _check_target(self._saved_tree(step), target, self.step_path(step),
                  partial=False)
    out = self._restore(step, state=ocp.args.StandardRestore(target),
                        data=ocp.args.JsonRestore())
    return out['state'], self._local_data_state(out['data'], step), saved_config

  def resume(self, abstract_state: PyTree, iterator, *, config,
             fields: Sequence[str] = COMPATIBILITY_FIELDS):
    """A run's restart: restores the latest committed step (see `restore`) and moves the data
    `iterator` (`set_state`) to where that step left it. Returns the state, or None when there
    is no checkpoint yet."""
    if self.latest_step() is None:
      return None
    state, data_state, _ = self.restore(abstract_state, config=config, fields=fields)
    if data_state is not None:
      iterator.set_state(data_state)
    return state

  def _local_data_state(self, data, step):
    count = data['process_count']
    if count != jax.process_count():
      logging.warning(
          'Checkpoint %s was written by %d processes, this run has %d: the '
          'data iterator restarts from its initial state.',
          self.step_path(step), count, jax.process_count())
      return None
    return _decode_data_state(data['states'][jax.process_index()])

  def _saved_tree(self, step: int):
    try:
      return self._manager.item_metadata(step)['state'].tree
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(
          f'Could not read the array metadata of checkpoint '
          f'{self.step_path(step)}: {type(e).__name__}: {e}') from e

  def _restore(self, step: int, **items):
    try:
      return self._manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, TypeError, FileNotFoundError, OSError) as e:
      raise CheckpointError(
          f'Could not restore {"/".join(items)} from checkpoint '
          f'{self.step_path(step)}: {type(e).__name__}: {e}') from e


def restore_params(workdir: str | os.PathLike[str], abstract_params: PyTree,
                   key: str | Sequence[str] = 'params',
                   step: int | None = None) -> PyTree:
  """Restores one subtree of another run's checkpoint (e.g. stage-1 params).

  Only the arrays of that subtree are read, onto the shardings that
  `abstract_params` carries (any mesh, any process count).

  Args:
    workdir: the other run's workdir.
    abstract_params: the target subtree (see `abstract_like`).
    key: the subtree's path in the saved state: `'params'`, or a sequence of
      keys / a `'/'`-separated string for nested subtrees.
    step: the step; the latest committed one by default.
  """
  directory = checkpoint_dir(workdir)
  _require_dir(directory, f'restore_params(workdir={os.fspath(workdir)!r})')
  manager = _manager(directory, read_only=True,
                     state_handler=ocp.PyTreeCheckpointHandler())
  try:
    steps = sorted(manager.all_steps())
    if not steps:
      raise CheckpointError(
          f'restore_params: no committed checkpoint in {directory} '
          f'(workdir {os.fspath(workdir)}).')
    if step is None:
      step = steps[-1]
    elif step not in steps:
      raise CheckpointError(f'No checkpoint for step {step} in {directory}; '
                            f'committed steps: {steps}.')
    path = os.path.join(directory, str(step))
    keys = key.split('/') if isinstance(key, str) else list(key)
    target = abstract_like(abstract_params)
    item = target
    for k in reversed(keys):
      item = {k: item}
    try:
      saved = manager.item_metadata(step)['state'].tree
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f'Could not read the array metadata of checkpoint '
                            f'{path}: {type(e).__name__}: {e}') from e
    node = saved
    for i, k in enumerate(keys):
      if not isinstance(node, Mapping) or k not in node:
        have = ', '.join(map(str, node)) if isinstance(node, Mapping) else '-'
        raise CheckpointError(
            f'Checkpoint {path} has no {"/".join(keys[:i + 1])!r} in its '
            f'state; {"/".join(keys[:i]) or "the top level"} holds: {have}.')
      node = node[k]
    _check_target(saved, item, path, partial=True)
    restore_args = ocp.checkpoint_utils.construct_restore_args(item)
    try:
      out = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                       partial_restore=True)))
    except (ValueError, KeyError, TypeError, FileNotFoundError, OSError) as e:
      raise CheckpointError(
          f'Could not restore {"/".join(keys)!r} from checkpoint {path}: '
          f'{type(e).__name__}: {e}') from e
    tree = out['state']
    for k in keys:
      tree = tree[k]
    return tree
  finally:
    manager.close()
