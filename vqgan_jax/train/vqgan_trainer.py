"""Trains a VQGAN (stage 1): data -> sharded fused AE + discriminator step -> logs, held-out
evals (PSNR, SSIM, LPIPS, L1, codebook usage), reconstruction grids, checkpoints, resume."""

import os

from absl import logging
import jax
import numpy as np

from vqgan_jax import checkpoints
from vqgan_jax import images as images_lib
from vqgan_jax import metrics as metrics_lib
from vqgan_jax import parallel
from vqgan_jax import validate
from vqgan_jax.data import pipeline
from vqgan_jax.models import lpips as lpips_lib
from vqgan_jax.train import common
from vqgan_jax.train import stage1


def evaluate(config, eval_fn, params, lpips_params, mesh, workdir, step, writer):
  """One pass over the held-out split: PSNR, SSIM, LPIPS, L1 and codebook usage; writes the
  reconstructions of the first batch as a grid."""
  it = pipeline.make_eval_iterator(config.data, config.train.eval_batch_size)
  sharding = parallel.batch_sharding(mesh)
  totals = None
  for batch in it:
    gbatch = pipeline.to_global({'image': batch['image'], 'mask': batch['mask']}, sharding)
    sums, xrec = eval_fn(params, lpips_params, gbatch['image'], gbatch['mask'])
    sums = jax.device_get(sums)
    if totals is None:
      _write_grid(config, gbatch['image'], xrec, workdir, step, writer)
      totals = sums
    else:
      totals = jax.tree.map(np.add, totals, sums)
  count = max(float(totals['count']), 1.0)
  result = {k: float(totals[k]) / count for k in ('psnr', 'ssim', 'lpips', 'l1')}
  result['codebook_usage'] = float(metrics_lib.usage_from_counts(totals['code_counts']))
  result['perplexity'] = float(metrics_lib.perplexity_from_counts(totals['code_counts']))
  result['num_images'] = float(totals['count'])
  writer.scalars(step, result, 'eval')
  return result


def _write_grid(config, images, xrec, workdir, step, writer):
  n = config.train.num_grid_images
  inputs = common.gather(images)[:n]
  recons = images_lib.to_uint8(common.gather(xrec)[:n])
  if jax.process_index() != 0:
    return
  ncol = min(int(np.ceil(np.sqrt(2 * len(inputs)) / 2) * 2) or 1, len(inputs))
  grid = images_lib.make_grid(images_lib.interleave_rows(inputs, recons, ncol), ncol)
  images_lib.save_png(
    os.path.join(workdir, f'reconstructions_{step:07d}.png'),
    grid,
    scale=max(1, 512 // grid.shape[1]),
  )
  writer.image(step, 'eval/reconstructions', grid)


def _init_from(config, state, abstract, shardings):
  """Parameters (and a compatible discriminator) of another stage-1 run, fresh optimizer."""
  src = config.init_from
  state['params'] = checkpoints.restore_params(
    src, checkpoints.abstract_like(abstract['params'], shardings['params'])
  )
  # A converted release trains with its GAN on from step 0: start from its discriminator too
  # when the source has a compatible one.
  try:
    for key in ('disc_params', 'disc_stats'):
      state[key] = checkpoints.restore_params(
        src, checkpoints.abstract_like(abstract[key], shardings[key]), key=key
      )
  except checkpoints.CheckpointError as e:
    logging.warning('init_from %s: discriminator not restored (%s)', src, e)
  logging.info('Initialised params from %s (fresh optimizer state)', src)
  return state


def train_and_evaluate(config, workdir):
  """Trains stage 1 in `workdir`, resuming from its latest checkpoint; returns the final eval.

  The function `python -m vqgan_jax.main` calls for a stage-1 config (`vqgan_jax.train_stage1`).
  """
  workdir = common.prepare_workdir(workdir)
  mesh = parallel.make_mesh(config.mesh)
  validate.validate_stage1(config, parallel.batch_divisor(mesh))
  common.check_init_from(config.init_from, 'vqgan')
  pipeline.check_splits(config.data)
  models = stage1.build_models(config)

  lpips_params = lpips_lib.load_pretrained_params()
  lpips_shardings = jax.tree.map(lambda _: parallel.replicated(mesh), lpips_params)
  lpips_params = jax.device_put(lpips_params, lpips_shardings)
  abstract, shardings, init = stage1.state_setup(
    config, models, mesh, jax.random.PRNGKey(config.seed)
  )
  train_it = pipeline.make_train_iterator(config.data, config.train.batch_size, config.seed)

  with checkpoints.Checkpointer(
    workdir, max_to_keep=config.train.max_to_keep, save_every=config.train.checkpoint_every
  ) as ckpt:
    state, resumed = common.restore_or_init(ckpt, abstract, shardings, init, train_it, config)
    if not resumed and config.init_from:
      state = _init_from(config, state, abstract, shardings)
    train_fn = stage1.make_train_step(config, models, mesh, shardings, lpips_shardings)
    eval_fn = stage1.make_eval_step(models, mesh, shardings['params'], lpips_shardings)
    batch_sharding = parallel.batch_sharding(mesh)
    start, total = int(jax.device_get(state['step'])), config.train.num_steps
    writer = common.Writer(workdir, start)
    try:
      run_eval = lambda s, step: evaluate(
        config, eval_fn, s['params'], lpips_params, mesh, workdir, step, writer
      )
      state, result = common.train_loop(
        state,
        step_fn=lambda s, images: train_fn(s, lpips_params, images),
        next_batch=lambda: pipeline.to_global({'image': next(train_it)['image']}, batch_sharding)[
          'image'
        ],
        start=start,
        total=total,
        train_config=config.train,
        ckpt=ckpt,
        data_state=train_it.get_state,
        config=config,
        writer=writer,
        evaluate=run_eval,
        loss_key='total_loss',
        rate=('images_per_s', config.train.batch_size),
        postfix=lambda m: dict(
          img_s=f'{m["images_per_s"]:.1f}',
          rec=f'{m["rec_loss"]:.4f}',
          p=f'{m["p_loss"]:.4f}',
          q=f'{m["quant_loss"]:.4f}',
          d=f'{m["disc_loss"]:.3f}',
        ),
        desc='stage1',
      )
    finally:
      writer.close()
  return result
