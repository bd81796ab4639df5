"""The data iterators' states as one JSON item of a checkpoint: every process's state in process
order, each kept as the type its iterator gave (bytes, str, JSON, None), so `set_state` gets
back exactly what `get_state` produced.

Not grain's orbax handler (`grain.checkpoint.CheckpointHandler`, fed by
`pipeline.TrainIterator.grain_iterator`): it writes `process_<i>-of-<n>.json` and raises when a
run on another process count restores (this item restarts the iterator there, as
test_two_processes_save_and_restore asserts); it takes and restores grain iterators only, inside
orbax's restore, where `Checkpointer.save` takes any iterator's state and `restore` returns it;
and the checkpoints already written hold this item.
"""

import base64
from collections.abc import Mapping
import json
import logging
from typing import Any

import jax
from jax.experimental import multihost_utils
import numpy as np

_log = logging.getLogger(__name__)


def _encode(s) -> dict[str, Any]:
  if s is None:
    return {'type': 'none'}
  if isinstance(s, (bytes, bytearray)):
    try:
      return {'type': 'bytes', 'utf8': bytes(s).decode('utf-8')}
    except UnicodeDecodeError:
      return {'type': 'bytes', 'base64': base64.b64encode(bytes(s)).decode('ascii')}
  return {'type': 'str' if isinstance(s, str) else 'json', 'value': s}


def _decode(blob: Mapping[str, Any]):
  if blob['type'] == 'none':
    return None
  if blob['type'] == 'bytes':
    return blob['utf8'].encode('utf-8') if 'utf8' in blob else base64.b64decode(blob['base64'])
  return blob['value']


def all_processes(text: str) -> list[str]:
  """Every process's `text`, in process order (a collective: all must call)."""
  if jax.process_count() == 1:
    return [text]
  data = np.frombuffer(text.encode('utf-8'), np.uint8)
  lengths = np.asarray(multihost_utils.process_allgather(np.int32(len(data)))).reshape(-1)
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[: len(data)] = data
  rows = np.asarray(multihost_utils.process_allgather(padded))
  return [bytes(rows[i, :n]).decode('utf-8') for i, n in enumerate(lengths)]


def gather(data_state) -> dict[str, Any]:
  """The item for this process's `data_state` (or a callable giving it) and every other's (a
  collective: all must call)."""
  local = json.dumps(_encode(data_state() if callable(data_state) else data_state))
  states = [json.loads(s) for s in all_processes(local)]
  return {'process_count': len(states), 'states': states}


def local(item: Mapping[str, Any], where: str):
  """This process's state from `item`, or None (the iterator restarts, said in one line) when
  the item was written by another process count; `where`: the checkpoint, for that line."""
  if item['process_count'] == jax.process_count():
    return _decode(item['states'][jax.process_index()])
  _log.warning(
    'Checkpoint %s was written by %d processes, this run has %d: the data iterator restarts '
    'from its initial state.',
    where,
    item['process_count'],
    jax.process_count(),
  )
  return None
