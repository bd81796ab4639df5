"""The stage-1 training loop: data -> sharded step -> logs, evals, checkpoints, resume."""

import json
import os
import time

from absl import logging
import jax
import numpy as np
from jax.experimental import multihost_utils
import tqdm

from vqgan_jax import checkpoints
from vqgan_jax import images as images_lib
from vqgan_jax import metrics as metrics_lib
from vqgan_jax import parallel
from vqgan_jax import validate
from vqgan_jax.data import pipeline
from vqgan_jax.models import lpips as lpips_lib
from vqgan_jax.train import stage1


class Writer:
  """TensorBoard scalars/images and a metrics.jsonl file, written by process 0 only."""

  def __init__(self, workdir):
    self.active = jax.process_index() == 0
    self.workdir = workdir
    self._tb = None
    if self.active:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')

  def scalars(self, step, values, prefix):
    if not self.active:
      return
    for k, v in values.items():
      self._tb.add_scalar(f'{prefix}/{k}', v, step)
    self._jsonl.write(json.dumps({'step': int(step), 'split': prefix,
                                  **{k: float(v) for k, v in values.items()}}) + '\n')
    self._jsonl.flush()

  def image(self, step, name, grid):
    if self.active:
      self._tb.add_image(name, grid, step, dataformats='HWC')

  def close(self):
    if self.active:
      self._tb.close()
      self._jsonl.close()


def _gather(x):
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def evaluate(config, eval_fn, params, lpips_params, mesh, workdir, step, writer):
  """One pass over the held-out split: PSNR, SSIM, LPIPS, L1 and codebook usage."""
  it = pipeline.make_eval_iterator(config.data, config.train.eval_batch_size)
  sharding = parallel.batch_sharding(mesh)
  totals = None
  grid_written = False
  for batch in it:
    gbatch = pipeline.to_global({'image': batch['image'], 'mask': batch['mask']}, sharding)
    sums, xrec = eval_fn(params, lpips_params, gbatch['image'], gbatch['mask'])
    sums = jax.device_get(sums)
    totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
    if not grid_written:
      n = config.train.num_grid_images
      inputs = _gather(gbatch['image'])[:n]
      recons = images_lib.to_uint8(_gather(xrec)[:n])
      if jax.process_index() == 0:
        ncol = int(np.ceil(np.sqrt(2 * len(inputs)) / 2) * 2) or 1
        ncol = min(ncol, len(inputs))
        grid = images_lib.make_grid(images_lib.interleave_rows(inputs, recons, ncol), ncol)
        images_lib.save_png(os.path.join(workdir, f'reconstructions_{step:07d}.png'), grid,
                            scale=max(1, 512 // grid.shape[1]))
        writer.image(step, 'eval/reconstructions', grid)
      grid_written = True
  count = max(float(totals['count']), 1.0)
  result = {k: float(totals[k]) / count for k in ('psnr', 'ssim', 'lpips', 'l1')}
  result['codebook_usage'] = float(metrics_lib.usage_from_counts(totals['code_counts']))
  result['perplexity'] = float(metrics_lib.perplexity_from_counts(totals['code_counts']))
  result['num_images'] = float(totals['count'])
  writer.scalars(step, result, 'eval')
  return result


def train_and_evaluate(config, workdir):
  """Trains stage 1 in `workdir`, resuming from its latest checkpoint; returns final eval."""
  os.makedirs(workdir, exist_ok=True)
  mesh = parallel.make_mesh(config.mesh)
  validate.validate_stage1(config, parallel.batch_divisor(mesh))
  models = stage1.build_models(config)
  rng = jax.random.PRNGKey(config.seed)

  lpips_params = lpips_lib.load_pretrained_params()
  lpips_shardings = jax.tree.map(lambda _: parallel.replicated(mesh), lpips_params)
  lpips_params = jax.device_put(lpips_params, lpips_shardings)

  init = lambda r: stage1.init_state(config, models, r)
  abstract = jax.eval_shape(init, rng)
  shardings = parallel.state_shardings(abstract, mesh, parallel.axis_rules(config))
  ckpt = checkpoints.Checkpointer(workdir, max_to_keep=config.train.max_to_keep,
                                  save_every=config.train.checkpoint_every)
  train_it = pipeline.make_train_iterator(config.data, config.train.batch_size, config.seed)

  state = ckpt.resume(checkpoints.abstract_like(abstract, shardings), train_it, config=config)
  if state is not None:
    logging.info('Resumed from %s at step %d', workdir, int(state['step']))
  else:
    state = jax.jit(init, out_shardings=shardings)(rng)
    if config.init_from:
      abstract_params = checkpoints.abstract_like(abstract['params'], shardings['params'])
      state['params'] = checkpoints.restore_params(config.init_from, abstract_params)
      # A converted release trains with its GAN on from step 0: start from its
      # discriminator too when the source has a compatible one.
      try:
        for key in ('disc_params', 'disc_stats'):
          state[key] = checkpoints.restore_params(
              config.init_from, checkpoints.abstract_like(abstract[key], shardings[key]), key=key)
      except checkpoints.CheckpointError as e:
        logging.warning('init_from %s: discriminator not restored (%s)', config.init_from, e)
      logging.info('Initialised params from %s (fresh optimizer state)', config.init_from)

  train_fn = stage1.make_train_step(config, models, mesh, shardings, lpips_shardings)
  eval_fn = stage1.make_eval_step(models, mesh, shardings['params'], lpips_shardings)
  writer = Writer(workdir)
  batch_sharding = parallel.batch_sharding(mesh)

  start = int(jax.device_get(state['step']))
  total = config.train.num_steps
  result = {}
  bar = tqdm.tqdm(total=total, initial=start, disable=jax.process_index() != 0,
                  dynamic_ncols=True, desc='stage1')
  t0, steps_since = time.perf_counter(), 0
  pending = None
  for step in range(start + 1, total + 1):
    batch = next(train_it)
    images = pipeline.to_global({'image': batch['image']}, batch_sharding)['image']
    state, metrics = train_fn(state, lpips_params, images)
    # Wait for the previous step only: the host prepares the next batch while this one
    # runs, and the progress bar counts finished steps, not dispatched ones.
    if pending is not None:
      jax.block_until_ready(pending)
      bar.update(1)
    pending = metrics['total_loss']
    steps_since += 1
    if step % config.train.log_every == 0 or step == total:
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      dt = time.perf_counter() - t0
      metrics['images_per_s'] = steps_since * config.train.batch_size / max(dt, 1e-9)
      t0, steps_since = time.perf_counter(), 0
      writer.scalars(step, metrics, 'train')
      bar.set_postfix(img_s=f"{metrics['images_per_s']:.1f}", rec=f"{metrics['rec_loss']:.4f}",
                      p=f"{metrics['p_loss']:.4f}", q=f"{metrics['quant_loss']:.4f}",
                      d=f"{metrics['disc_loss']:.3f}")
      if not np.isfinite(metrics['total_loss']):
        raise FloatingPointError(f'total_loss is {metrics["total_loss"]} at step {step}')
    if step % config.train.eval_every == 0 or step == total:
      result = evaluate(config, eval_fn, state['params'], lpips_params, mesh, workdir, step,
                        writer)
      if jax.process_index() == 0:  # tqdm.write ignores `disable`
        bar.write(f'eval step {step}: ' + ', '.join(f'{k} {v:.4f}' for k, v in result.items()))
      t0, steps_since = time.perf_counter(), 0
    ckpt.save(step, state, train_it.get_state, config, force=step == total)
  if pending is not None:
    jax.block_until_ready(pending)
    bar.update(1)
  bar.close()
  if start >= total:  # Already finished: report the final model again.
    result = evaluate(config, eval_fn, state['params'], lpips_params, mesh, workdir, start,
                      writer)
  ckpt.close()
  writer.close()
  return result
