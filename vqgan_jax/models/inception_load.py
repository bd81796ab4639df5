"""The FID Inception's weights: pytorch-fid's `.pth` or its converted `.npz` -> the variables
of `models.inception.FIDInceptionV3` (`load`), and the `.npz` cache (`save_npz`).

The `.pth` is a plain state dict (pytorch-fid downloads it from its GitHub release; here the
user supplies it). It is read with the restricted unpickler of `torch_ckpt` (tensors and
containers only, nothing imported or run), and every key and shape is checked against our
network. The `.npz` holds that tree flattened ('params/Mixed_5b/branch1x1/conv/kernel', ...),
so eval loads it without torch (`python -m vqgan_jax.convert inception` writes it). Key
table: `models/inception.py`.
"""

from __future__ import annotations

from collections.abc import Mapping
import functools
import os
import uuid
import zipfile

import numpy as np

from vqgan_jax.convert import ConversionError
from vqgan_jax.convert import torch_ckpt

WEIGHTS_FILE = 'pt_inception-2015-12-05-6726825d.pth'
# BatchNorm's step counter: in state dicts from torch >= 0.4.1, unused in eval mode (and
# torch fills it in itself when a file lacks it, so either way loads there too).
_IGNORED_SUFFIX = '.num_batches_tracked'
# flax leaf -> torch leaf, per module kind; kernels change layout.
_LEAF_TO_TORCH = {
  ('params', 'conv', 'kernel'): ('conv', 'weight'),
  ('params', 'bn', 'scale'): ('bn', 'weight'),
  ('params', 'bn', 'bias'): ('bn', 'bias'),
  ('batch_stats', 'bn', 'mean'): ('bn', 'running_mean'),
  ('batch_stats', 'bn', 'var'): ('bn', 'running_var'),
  ('params', 'fc', 'kernel'): ('fc', 'weight'),
  ('params', 'fc', 'bias'): ('fc', 'bias'),
}


@functools.cache
def variable_shapes() -> dict[str, tuple[int, ...]]:
  """Our flat variable names -> shapes (traced once, no compile)."""
  from vqgan_jax.models import inception  # pylint: disable=g-import-not-at-top

  return inception.variable_shapes()


def flax_to_torch(name: str) -> str:
  """'params/Mixed_5b/branch1x1/conv/kernel' -> 'Mixed_5b.branch1x1.conv.weight'."""
  collection, *path, module, leaf = name.split('/')
  mod, tleaf = _LEAF_TO_TORCH[(collection, module, leaf)]
  return '.'.join([*path, mod, tleaf])


def _torch_shape(s: tuple[int, ...]) -> tuple[int, ...]:
  # HWIO conv kernel -> OIHW; (in, out) dense kernel -> (out, in); vectors unchanged.
  return (s[3], s[2], s[0], s[1]) if len(s) == 4 else tuple(reversed(s))


def _from_torch_layout(a: np.ndarray) -> np.ndarray:
  return a.transpose(2, 3, 1, 0) if a.ndim == 4 else a.T if a.ndim == 2 else a


def torch_shapes() -> dict[str, tuple[int, ...]]:
  """pytorch-fid's state-dict keys (without num_batches_tracked) -> shapes."""
  return {flax_to_torch(k): _torch_shape(s) for k, s in variable_shapes().items()}


def _check(arrays: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple], source: str):
  """One sentence naming `source` and the first key that is missing, extra or misshapen."""
  what = "pytorch-fid's FID Inception (" + WEIGHTS_FILE + ')'
  missing = [k for k in expected if k not in arrays]
  if missing:
    more = f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''
    raise ConversionError(f'{source} lacks {missing[0]}{more}: is it {what}?')
  extra = [k for k in arrays if k not in expected]
  if extra:
    more = f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''
    raise ConversionError(f'{source} holds {extra[0]}{more}, which {what} does not have')
  for k, s in expected.items():
    if tuple(arrays[k]) != tuple(s):
      raise ConversionError(
        f'{source}: {k} has shape {tuple(arrays[k])}, {what} has {tuple(s)} there'
      )


def _unflatten(flat: Mapping[str, np.ndarray]) -> dict:
  tree: dict = {}
  for name, a in flat.items():
    *path, leaf = name.split('/')
    node = tree
    for p in path:
      node = node.setdefault(p, {})
    node[leaf] = a
  return tree


def _flatten(tree: Mapping, prefix: str = '') -> dict[str, np.ndarray]:
  flat = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      flat.update(_flatten(v, f'{prefix}{k}/'))
    else:
      flat[f'{prefix}{k}'] = np.asarray(v)
  return flat


def state_dict_to_variables(state_dict: Mapping, source: str = 'the state dict') -> dict:
  """A pytorch-fid FID Inception state dict (torch tensors or numpy) -> our variables tree."""
  sd = {k: v for k, v in state_dict.items() if not str(k).endswith(_IGNORED_SUFFIX)}
  _check({k: tuple(v.shape) for k, v in sd.items()}, torch_shapes(), source)
  flat = {}
  for name in variable_shapes():
    v = sd[flax_to_torch(name)]
    v = v.detach().cpu().numpy() if hasattr(v, 'detach') else np.asarray(v)
    flat[name] = np.ascontiguousarray(_from_torch_layout(v.astype(np.float32)))
  return _unflatten(flat)


def read_pth(path: str, *, trust_pickle: bool = False) -> dict:
  """pytorch-fid's `.pth` -> our variables tree, read without running code from the file."""
  obj = torch_ckpt.load(path, trust_pickle=trust_pickle)
  if not isinstance(obj, Mapping) or not all(hasattr(v, 'shape') for v in obj.values()):
    raise ConversionError(f'{path} holds no state dict (a mapping of names to tensors)')
  return state_dict_to_variables(obj, path)


def write_npz_atomic(path: str, arrays: Mapping[str, np.ndarray]) -> None:
  """np.savez to a temp file beside `path`, then one rename: readers never see half a file.
  (Not `tempfile.mkstemp`: its 0600 mode would make a shared statistics cache unreadable.)"""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}'
  try:
    with open(tmp, 'xb') as f:  # a file object, so np.savez adds no '.npz' suffix
      np.savez(f, **arrays)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def save_npz(variables: Mapping, path: str) -> None:
  write_npz_atomic(path, _flatten(variables))


def _not_an_npz(path: str) -> str:
  """Why `path` cannot be a `.npz`, read off its first bytes; '' when it could be one.
  (np.load's own errors mislead: text reads as "pickled data", try `allow_pickle`.)"""
  head, why = torch_ckpt.zip_problem(path, 'a .npz keeps its index')
  if why is not None:
    return why
  if head == b'\x93NUMPY':
    return 'it is a single-array .npy, not a .npz archive'
  return 'it is not a zip archive (a .npz is one)'


def load_npz(path: str) -> dict:
  """A `.npz` written by `save_npz` -> our variables tree (numpy only, no torch)."""
  what = _not_an_npz(path)
  if what:
    raise ConversionError(f'{path} is not a readable .npz: {what}')
  try:
    with np.load(path, allow_pickle=False) as f:
      flat = {k: np.asarray(f[k], np.float32) for k in f.files}
  except ValueError as e:
    if 'pickle' not in str(e):
      raise ConversionError(f'{path} is not a readable .npz (ValueError: {e})') from None
    # Object arrays: never unpickled (that could run code), and no weights file holds them.
    raise ConversionError(f'{path} holds pickled object arrays, not weight arrays') from None
  except (OSError, EOFError, zipfile.BadZipFile) as e:
    raise ConversionError(f'{path} is not a readable .npz ({type(e).__name__}: {e})') from None
  _check({k: v.shape for k, v in flat.items()}, variable_shapes(), path)
  return _unflatten(flat)


def load(path: str, *, trust_pickle: bool = False) -> dict:
  """Our variables tree from pytorch-fid's `.pth` (needs torch) or a converted `.npz`."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'no Inception weights file {path}')
  if path.endswith('.npz'):
    return load_npz(path)
  if path.endswith(('.pth', '.pt')):
    return read_pth(path, trust_pickle=trust_pickle)
  raise ConversionError(
    f"{path}: Inception weights must be a .pth (pytorch-fid's {WEIGHTS_FILE}) or a .npz "
    'converted from it'
  )
