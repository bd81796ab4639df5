"""Converters from the original PyTorch checkpoints to this project's params and checkpoints.

  python -m vqgan_jax.convert taming --ckpt last.ckpt --config model.yaml --out DIR
  python -m vqgan_jax.convert inception --pth pt_inception-2015-12-05-6726825d.pth --out X.npz

One idea per module:
  torch_ckpt     reading a Lightning `.ckpt` without running code from it
  param_mapping  the table: torch state-dict keys and layouts <-> our param paths (VQGAN,
                 discriminator, LPIPS, GPT), both ways, numpy only
  yaml_config    a taming yaml -> our ml_collections config (stage 1 and stage 2)
  taming         the driver: read and validate everything, write a workdir, swap it in
  inception      pytorch-fid's FID Inception weights (.pth) -> our params (.npz, no torch)

The names below are imported on first use, so `python -m vqgan_jax.convert --help` does not
wait for jax.
"""

import importlib


class ConversionError(ValueError):
  """A checkpoint, state dict or config that does not map one-to-one onto our model, or a
  file that is not one; its message is the one sentence the command line prints."""


_EXPORTS = {
  'convert_taming_checkpoint': 'taming',
  'convert_vqmodel_state_dict': 'taming',
  'stage1_config': 'yaml_config',
}

__all__ = ['ConversionError', *_EXPORTS]


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(f'{__name__}.{_EXPORTS[name]}'), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
