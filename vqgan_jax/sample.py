"""`--mode=sample`: draws the samples a stage-2 config asks for (`config.sample`) with the
run's latest transformer and writes them into its workdir as `samples_<step>.png` (one row per
class for class models) and `samples_<step>.npz` (codes, labels, condition tokens) for other
evaluators. The jitted samplers themselves are in `sampling.py` (the GPT) and
`maskgit_sampling.py` (MaskGIT: `config.sample.iterations`, `schedule`, `choice_temperature`).
"""

import os
import time

import jax
import numpy as np

from vqgan_jax import encode as codes_lib
from vqgan_jax import images as images_lib
from vqgan_jax import inference
from vqgan_jax import parallel
from vqgan_jax.data import tokens
from vqgan_jax.models import gpt_load
from vqgan_jax.validate import ConfigError


def _conditions(config, layout, workdir, run):
  """(cond ids (N, Lc), labels (N,), grid columns) of the samples to draw."""
  s = config.sample
  if layout.kind == 'class':
    classes = list(s.classes) if s.classes else list(range(layout.n_classes))
    bad = [c for c in classes if not 0 <= c < layout.n_classes]
    if bad:
      raise ConfigError(f'config.sample.classes {bad} outside [0, {layout.n_classes})')
    labels = np.repeat(np.asarray(classes, np.int32), s.num_per_class)
    return run.condition_for_class(labels), labels, s.num_per_class
  if layout.kind == 'unconditional':
    labels = np.full((s.num_samples,), -1, np.int32)
    return run.condition_for_class(np.zeros_like(labels)), labels, None
  # Spatial: the cond codes of the first eval examples of the codes dataset.
  builder = codes_lib.open_codes(config, workdir, layout)
  it = tokens.make_eval_iterator(
    builder,
    config.data.eval_split,
    s.num_samples,
    max_examples=s.num_samples,
    process_index=0,
    process_count=1,
  )
  batch = next(it)
  keep = batch['mask']
  return (batch['cond_codes'][keep] + layout.cond_offset, batch['label'][keep], None)


def sample(config, workdir):
  """Samples with the latest stage-2 params; writes samples_<step>.png/.npz; returns paths."""
  mesh = parallel.make_mesh(config.mesh)
  run = inference.load_transformer_for_config(config, workdir, None, mesh)
  run.batch_size = max(1, int(config.sample.batch_size))  # the batches below, as they are
  config, layout, step = run.config, run.layout, run.step
  gpt_load.validate_config(config, parallel.batch_divisor(mesh))
  s = config.sample
  grid = (s.grid_h or layout.sample_grid[0], s.grid_w or layout.sample_grid[1])
  if s.cfg_scale != 1.0 and layout.null_id < 0:
    raise ConfigError(
      'config.sample.cfg_scale != 1 needs a model trained with class dropout '
      '(config.cond.drop_prob > 0, offset vocabulary)'
    )
  cond, labels, ncol = _conditions(config, layout, workdir, run)
  n = len(cond)
  rng = jax.random.PRNGKey(s.seed)
  # Every process samples the same batches (the same conditions and keys) on the mesh that
  # spans them all.
  out_codes, out_images = [], []
  args = run.sampler_args()
  t0 = time.perf_counter()
  for i, start in enumerate(range(0, n, s.batch_size)):
    try:
      codes, images = run.sample(
        cond[start : start + s.batch_size],
        jax.random.fold_in(rng, i),
        grid=grid,
        **args,
      )
    except ValueError as e:
      raise ConfigError(f'config.sample: {e}') from None
    out_codes.append(codes)
    out_images.append(images_lib.to_uint8(images))
  elapsed = time.perf_counter() - t0
  codes = np.concatenate(out_codes)
  imgs = np.concatenate(out_images)
  grid_img = images_lib.make_grid(imgs, ncol or int(np.ceil(np.sqrt(n))))
  png = os.path.join(workdir, f'samples_{step:07d}.png')
  npz = os.path.join(workdir, f'samples_{step:07d}.npz')
  if jax.process_index() == 0:
    images_lib.save_png(png, grid_img, scale=max(1, 512 // grid_img.shape[1]))
    np.savez(npz, tokens=codes, labels=labels, cond_tokens=np.asarray(cond))
  return {
    'png': png,
    'npz': npz,
    'num_samples': n,
    'grid': grid,
    'seconds': elapsed,
    'tokens_per_s': n * grid[0] * grid[1] / max(elapsed, 1e-9),
  }
