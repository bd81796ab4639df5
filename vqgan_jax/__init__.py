"""vqgan_jax: Taming Transformers (VQGAN + autoregressive transformer) in pure JAX.

The public API:

  load_vqgan(workdir, step=None, *, mesh=None, ema=True, conv_impl='auto') -> TrainedVQGAN
      .encode(images) -> codes, .decode(codes) -> images, .reconstruct(images)
  load_transformer(workdir, step=None, *, mesh=None) -> TrainedTransformer
      .sample(condition, rng, ...) -> (codes, images), .condition_for_class(labels),
      .complete(images_or_codes, keep, rng, ...) -> (codes, images) (completion.py)
  train_stage1(config, workdir) / train_stage2(config, workdir)
      the trainers `python -m vqgan_jax.main` runs (resume from the workdir's checkpoints)

Attributes load lazily, so `import vqgan_jax` (and the `main` entry point's flag parsing)
costs nothing until one is used.
"""

import importlib

_EXPORTS = {
  'load_vqgan': ('vqgan_jax.inference', 'load_vqgan'),
  'load_transformer': ('vqgan_jax.inference', 'load_transformer'),
  'TrainedVQGAN': ('vqgan_jax.inference', 'TrainedVQGAN'),
  'TrainedTransformer': ('vqgan_jax.inference', 'TrainedTransformer'),
  'train_stage1': ('vqgan_jax.train.vqgan_trainer', 'train_and_evaluate'),
  'train_stage2': ('vqgan_jax.train.transformer_trainer', 'train_and_evaluate'),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    module, attr = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
  return sorted(list(globals()) + __all__)
