"""`--mode=sample`: draws the samples a stage-2 config asks for (`config.sample`) with the
run's latest transformer and writes them into its workdir as `samples_<step>.png` (one row per
class for class models) and `samples_<step>.npz` (codes, labels, condition tokens) for other
evaluators. The jitted samplers themselves are in `sampling.py` (the GPT) and
`maskgit_sampling.py` (MaskGIT: `config.sample.iterations`, `schedule`, `choice_temperature`,
`confidence`, `final_temperature`).

With `config.sample.complete_folder` (an image folder, or a split of `config.data`) it
completes images instead (`complete`): the first `complete_examples` images, the codes that
`config.sample.keep` names kept, `completions_per_image` completions of each, written as
`completions_<step>_<keep>.png` (per row: the input, the masked input, the completions) and
`.npz`.
"""

import os
import time

import jax
import numpy as np

from vqgan_jax import completion
from vqgan_jax import encode as codes_lib
from vqgan_jax import images as images_lib
from vqgan_jax import inference
from vqgan_jax import parallel
from vqgan_jax.data import builders
from vqgan_jax.data import pipeline
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
  if config.sample.complete_folder:
    return complete(config, workdir)
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


def _complete_inputs(config):
  """(uint8 images (n, S, S, 3), labels (n,), -1 where unknown) of config.sample.complete_folder:
  the first complete_examples images of a folder (sorted) or of a split of config.data."""
  s, data = config.sample, config.data
  where, n, field = s.complete_folder, int(s.complete_examples), 'config.sample.complete_folder'
  if n < 1:
    raise ConfigError(f'config.sample.complete_examples={n}: need >= 1')
  folder = os.path.abspath(os.path.expanduser(where))
  if os.sep in where or os.path.isdir(folder):
    listing = builders.list_image_folder(folder, field)
    paths = listing.paths[:n]
    images = [builders.load_rgb(os.path.join(folder, p)) for p in paths]
    labels = np.full((len(paths),), -1, np.int32)  # a folder's classes are not the model's
  else:
    builders.check_builder_splits(builders.prepare(data), {field: where})
    source = builders.get_source(data, where)
    elements = [source[i] for i in range(min(n, len(source)))]
    images = [e[data.image_key] for e in elements]
    labels = np.asarray([e.get('label', -1) for e in elements], np.int32)
  images = np.stack([pipeline.preprocess(x, data.image_size) for x in images])
  return images, labels


def complete(config, workdir):
  """`--mode=sample` with config.sample.complete_folder: completes its images; writes
  completions_<step>_<keep>.png/.npz; returns what `sample` returns."""
  mesh = parallel.make_mesh(config.mesh)
  s = config.sample
  keep_name = s.keep
  try:
    completion.check_keep_name(keep_name, field='config.sample.keep')  # before loading
  except ValueError as e:
    raise ConfigError(str(e)) from None
  k = int(s.completions_per_image)
  if k < 1:
    raise ConfigError(f'config.sample.completions_per_image={k}: need >= 1')
  images, labels = _complete_inputs(config)
  run = inference.load_transformer_for_config(config, workdir, None, mesh)
  run.batch_size = max(1, int(s.batch_size))
  layout, step = run.layout, run.step
  gpt_load.validate_config(run.config, parallel.batch_divisor(mesh))
  if layout.kind == 'spatial':
    raise ConfigError('config.sample.complete_folder: spatially conditioned models need cond maps')
  grid_keep = completion.keep_mask(keep_name, layout.grid)
  t0 = time.perf_counter()
  try:
    # Labelled inputs (a split) complete under their class; unlabelled ones (a folder) under
    # the null class of a model trained with class dropout (complete's default).
    condition = None
    if layout.kind == 'class' and (labels >= 0).all():
      condition = np.repeat(run.condition_for_class(labels), k, axis=0)
    codes, out = run.complete(
      np.repeat(images, k, axis=0),
      grid_keep,
      jax.random.PRNGKey(s.seed),
      condition=condition,
      **run.sampler_args(),
    )
  except ValueError as e:
    raise ConfigError(f'config.sample: {e}') from None
  elapsed = time.perf_counter() - t0
  n, h, w = len(images), *layout.grid
  out = images_lib.to_uint8(out).reshape(n, k, *out.shape[1:])
  f = images.shape[1] // h
  pixels = np.kron(grid_keep, np.ones((f, f), bool))[None, :, :, None]
  masked = np.where(pixels, images, np.uint8(128))  # the generated region gray
  rows = np.concatenate([images[:, None], masked[:, None], out], axis=1)
  grid_img = images_lib.make_grid(rows.reshape(-1, *rows.shape[2:]), k + 2)
  stem = os.path.join(workdir, f'completions_{step:07d}_{keep_name}')
  if jax.process_index() == 0:
    images_lib.save_png(stem + '.png', grid_img, scale=max(1, 512 // grid_img.shape[1]))
    np.savez(
      stem + '.npz',
      inputs=images,
      labels=labels,
      keep=grid_keep,
      codes=codes.reshape(n, k, h, w),
      images=out,
    )
  return {
    'png': stem + '.png',
    'npz': stem + '.npz',
    'num_samples': n * k,
    'grid': tuple(layout.grid),
    'seconds': elapsed,
    'tokens_per_s': n * k * int((~grid_keep).sum()) / max(elapsed, 1e-9),
  }
