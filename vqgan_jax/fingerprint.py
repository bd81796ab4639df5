"""A digest of a params tree's values: what identifies the stage-1 params that encoded a codes
dataset (`models.vqgan_load.tokenizer_identity`), whatever mesh they were read onto."""

import hashlib

import jax
from jax.experimental import multihost_utils
import numpy as np


def params_fingerprint(params) -> str:
  """The sha256 (hex) of a params tree's values: each leaf's '/'-joined path, shape and
  float32 bytes (little-endian, C order), in sorted path order.

  The same values give the same digest on any mesh or process count. Every process must call
  it (a leaf sharded across processes is gathered whole, one leaf at a time). Cost: one host
  copy and one sha256 pass over 4 bytes per parameter, about 0.5 s per 100M parameters.
  """
  digest = hashlib.sha256()
  leaves = jax.tree_util.tree_leaves_with_path(params)
  named = {jax.tree_util.keystr(p, simple=True, separator='/'): x for p, x in leaves}
  for path, leaf in sorted(named.items()):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      leaf = multihost_utils.process_allgather(leaf, tiled=True)
    x = np.ascontiguousarray(jax.device_get(leaf), dtype='<f4')
    digest.update(f'{path} {list(x.shape)}\n'.encode())
    digest.update(x.data)
  return digest.hexdigest()
