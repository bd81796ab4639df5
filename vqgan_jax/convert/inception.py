"""pytorch-fid's FID Inception weights -> their `.npz` cache, so eval loads them without torch.

  python -m vqgan_jax.convert inception --pth pt_inception-2015-12-05-6726825d.pth --out FILE.npz

The reading and checking live with the model (`models.inception_load`), which FID uses too.
"""

from __future__ import annotations

import os
import time

from vqgan_jax.models.inception_load import WEIGHTS_FILE  # noqa: F401  (the old names)
from vqgan_jax.models.inception_load import _flatten
from vqgan_jax.models.inception_load import load  # noqa: F401
from vqgan_jax.models.inception_load import load_npz  # noqa: F401
from vqgan_jax.models.inception_load import read_pth
from vqgan_jax.models.inception_load import save_npz


def convert(pth: str, out: str, *, trust_pickle: bool = False) -> dict:
  """`.pth` -> `.npz` (written atomically); returns a summary for the command line."""
  t0 = time.time()
  variables = read_pth(pth, trust_pickle=trust_pickle)
  save_npz(variables, out)
  flat = _flatten(variables)
  return {
    'source': os.path.abspath(pth),
    'out': os.path.abspath(out),
    'arrays': len(flat),
    'parameters': int(sum(a.size for a in flat.values())),
    'seconds': time.time() - t0,
  }
