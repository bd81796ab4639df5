"""Reading a PyTorch Lightning `.ckpt` without running code from it.

A `.ckpt` is a pickle: loading one with plain `torch.load(weights_only=False)` imports and
calls whatever it names, so a file from someone else could run any code on this machine. We
load with torch's restricted unpickler (`weights_only=True`: tensors, containers, numbers,
strings) plus an allow-list of the few other globals that checkpoints of the original
release hold, each replaced by an inert stand-in, so nothing is imported or run. A file that
names anything else is refused with one sentence naming it; `trust_pickle=True` (the CLI's
`--trust_pickle`) loads it with the full unpickler for users who trust its source.
"""

from __future__ import annotations

from collections.abc import Mapping
import os
import pickle
import re
import zipfile

from vqgan_jax.convert import ConversionError

INSTALL_HINT = "pip install -e '.[reference]' -c reference-constraints.txt"


class LightningCallbackKey:
  """Stands in for a Lightning callback class named by a checkpoint. Lightning 1.0.x (the
  original's) keys `ckpt['callbacks']` by the callback's class object; we never read those
  states, so an inert class in its place keeps pytorch_lightning from being imported."""


# Global (as the pickle names it) -> the stand-in loaded in its place. Found by
# `torch.serialization.get_unsafe_globals_in_checkpoint` on a checkpoint laid out as
# Lightning 1.0.8 writes it (tests/test_convert.py builds one with the optimizer and
# callback states): everything else in it is a tensor, a container or a number.
ALLOWED_GLOBALS = {
  'pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint': LightningCallbackKey,
}


def _import_torch(path: str = 'a PyTorch checkpoint'):
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f'reading {path} needs torch, which is not installed: {INSTALL_HINT}') from e
  return torch


def require_file(path: str, what: str, example: str = '') -> None:
  """FileNotFoundError / IsADirectoryError naming `what` (e.g. '--ckpt') unless `path` is a
  file: checked before torch is imported, so a wrong path is not reported as missing torch."""
  path = os.fspath(path)
  if os.path.isdir(path):
    eg = f' ({example})' if example else ''
    raise IsADirectoryError(f'{what} {path} is a directory; pass the file itself{eg}')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{what} {path}: no such file')


def _refused(torch, path: str, error: pickle.UnpicklingError) -> str:
  """What the restricted unpickler refused, as the message's first clause: the globals the
  file names beyond the allow-list (a static scan lists them all; the error names the first),
  or the refused instruction; '' when `error` is no refusal."""
  try:
    found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
  except Exception:  # pylint: disable=broad-except
    found = []
  names = sorted(set(found) - set(ALLOWED_GLOBALS)) or re.findall(
    r'GLOBAL (\S+) was not an allowed global', str(error)
  )
  if names:
    return (
      f'{path} names {", ".join(names)} in its pickle, which loading would import and '
      'may run (no checkpoint of the original release needs that)'
    )
  what = re.search(r'WeightsUnpickler error:\s*(\S[^\n]*)', str(error))
  return (
    (f'{path} holds pickle instructions that loading without running code refuses ({what[1]})')
    if what
    else ''
  )


def zip_problem(path: str, index_note: str) -> tuple[bytes, str | None]:
  """(the first 6 bytes of `path`, why it is not a whole zip archive): '' when it is one,
  None when it is no zip at all (the caller knows what else it may be). `index_note` says
  who writes the index a truncated file lost."""
  with open(path, 'rb') as f:
    head = f.read(6)
  if not head:
    return head, 'the file is empty'
  if zipfile.is_zipfile(path):
    return head, ''
  if head[:4] == b'PK\x03\x04':
    return head, (
      f'it is a truncated or damaged zip archive ({index_note} at the end: '
      'was the download or copy complete?)'
    )
  return head, None


def _not_a_checkpoint(path: str) -> str:
  """Why `path` cannot be a torch.save file, read off its first bytes; '' when it could be."""
  head, why = zip_problem(path, 'torch.save writes its index')
  if why is not None:
    return why
  return '' if head[:1] == b'\x80' else 'it is neither a zip archive nor a pickle'


def load(path: str, *, trust_pickle: bool = False):
  """The object a `.ckpt` holds, loaded with the least trust that works (see the module
  docstring); ConversionError for a refused or unreadable file."""
  require_file(path, 'checkpoint file')
  torch = _import_torch(path)
  try:
    if trust_pickle:
      return torch.load(path, map_location='cpu', weights_only=False)
    with torch.serialization.safe_globals([(v, k) for k, v in ALLOWED_GLOBALS.items()]):
      return torch.load(path, map_location='cpu', weights_only=True)
  except MemoryError:
    raise
  except ImportError as e:  # only the full unpickler imports
    raise ConversionError(
      f'{path}: its pickle needs the module {e.name}, which is not installed here'
    ) from None
  except Exception as e:  # pylint: disable=broad-except
    # torch raises anything for a file that is not a checkpoint (KeyError for text,
    # RuntimeError for a truncated zip, EOFError, UnpicklingError): each gets a sentence.
    what = _not_a_checkpoint(path)
    refused = (
      ''
      if what or trust_pickle or not isinstance(e, pickle.UnpicklingError)
      else (_refused(torch, path, e))
    )
    if refused:
      raise ConversionError(
        f'{refused}; pass --trust_pickle to load it anyway, only if you trust its source, '
        'since its pickle can run any code'
      ) from None
    if not what:
      what = f'torch could not load it ({type(e).__name__}: {str(e).strip().splitlines()[0][:160]})'
    raise ConversionError(f'{path} is not a readable PyTorch checkpoint: {what}') from None


def read_lightning_ckpt(path: str, *, trust_pickle: bool = False) -> tuple[dict, dict]:
  """(state dict, metadata {'global_step', 'epoch'}) of a Lightning `.ckpt` or of a plain
  state dict saved with torch.save; the state dict's values are still torch tensors."""
  obj = load(path, trust_pickle=trust_pickle)
  if isinstance(obj, Mapping) and isinstance(obj.get('state_dict'), Mapping):
    sd, meta = obj['state_dict'], {k: obj.get(k) for k in ('global_step', 'epoch')}
  elif isinstance(obj, Mapping) and obj and all(hasattr(v, 'shape') for v in obj.values()):
    sd, meta = obj, {}
  else:
    raise ConversionError(
      f'{path} holds neither a Lightning checkpoint (no "state_dict") nor a state dict'
    )
  return dict(sd), {k: v for k, v in meta.items() if v is not None}
