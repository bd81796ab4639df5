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

import os
import pickle
import re
import zipfile
from collections.abc import Mapping

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


def _import_torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f'reading a PyTorch .ckpt needs torch: {INSTALL_HINT}') from e
  return torch


def _unsafe_globals(torch, path: str, error: Exception) -> list[str]:
  """What the restricted unpickler refused: every such global of the file when a static scan
  can list them, else the one that `error` names; [] when the error is not a refusal."""
  named = re.findall(r'GLOBAL (\S+) was not an allowed global', str(error))
  if not named:
    return []
  try:
    found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
  except Exception:  # pylint: disable=broad-except
    found = []
  return sorted(set(found) - set(ALLOWED_GLOBALS)) or named


def _unreadable(path: str, error: Exception) -> ConversionError:
  """One sentence for a file torch cannot load, saying what the file looks like instead."""
  with open(path, 'rb') as f:
    head = f.read(4)
  if not head:
    what = 'the file is empty'
  elif head == b'PK\x03\x04' and not zipfile.is_zipfile(path):
    what = ('it is a truncated or damaged zip archive (torch.save writes its index at the end: '
            'was the download or copy complete?)')
  elif head[:1] != b'\x80' and not zipfile.is_zipfile(path):
    what = 'it is neither a zip archive nor a pickle'
  else:
    reason = str(error).strip().split('\n')[0][:160]
    what = f'torch could not load it ({type(error).__name__}: {reason})'
  return ConversionError(f'{path} is not a readable PyTorch checkpoint: {what}')


def load(path: str, *, trust_pickle: bool = False):
  """The object a `.ckpt` holds, loaded with the least trust that works (see the module
  docstring); ConversionError for a refused or unreadable file."""
  torch = _import_torch()
  if not os.path.isfile(path):
    raise FileNotFoundError(f'no checkpoint file {path}')
  try:
    if trust_pickle:
      return torch.load(path, map_location='cpu', weights_only=False)
    with torch.serialization.safe_globals([(v, k) for k, v in ALLOWED_GLOBALS.items()]):
      return torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    # torch raises anything for a file that is not a checkpoint (KeyError for text,
    # RuntimeError for a truncated zip, EOFError, UnpicklingError): each gets a sentence.
    unsafe = [] if trust_pickle or not isinstance(e, pickle.UnpicklingError) else (
        _unsafe_globals(torch, path, e))
    if unsafe:
      raise ConversionError(
          f'{path} names {", ".join(unsafe)}, which loading would import and may run (no '
          'checkpoint of the original release needs that), so it was not loaded; pass '
          '--trust_pickle to load it anyway, only if you trust its source, since its pickle '
          'can run any code') from None
    raise _unreadable(path, e) from None


def read_lightning_ckpt(path: str, *, trust_pickle: bool = False) -> tuple[dict, dict]:
  """(state dict, metadata {'global_step', 'epoch'}) of a Lightning `.ckpt` or of a plain
  state dict saved with torch.save; the state dict's values are still torch tensors."""
  obj = load(path, trust_pickle=trust_pickle)
  if isinstance(obj, Mapping) and isinstance(obj.get('state_dict'), Mapping):
    sd, meta = obj['state_dict'], {k: obj.get(k) for k in ('global_step', 'epoch')}
  elif isinstance(obj, Mapping) and obj and all(hasattr(v, 'shape') for v in obj.values()):
    sd, meta = obj, {}
  else:
    raise ConversionError(f'{path} holds neither a Lightning checkpoint (no "state_dict") nor '
                          'a state dict')
  return dict(sd), {k: v for k, v in meta.items() if v is not None}
